"""tcpproxy.py runs on CPython 3.9 (Amazon Linux 2023's Python): the syntax
is 3.9's, and, where a 3.9 interpreter is installed (pyenv on the project's
machines), the file runs there with the standard library alone (no
dnspython, no os.splice) and forwards bytes, half-close included."""

import ast
import glob
import hashlib
import os
import shutil
import socket
import subprocess
import threading

import pytest
from helpers import LOOP4, REPO, EchoServer, ProxyProcess, echo_once, free_port, spec


def python39():
    """A CPython 3.9 interpreter, or None."""
    candidates = [shutil.which("python3.9")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    candidates += ["/usr/bin/python3.9", "/usr/local/bin/python3.9"]
    for path in filter(None, candidates):
        try:
            out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 9)":
            return path
    return None


def test_syntax_is_python39():
    for path in [REPO / "tcpproxy.py"] + sorted((REPO / "tcpproxy_backends").glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))


def test_runs_on_python39_with_stdlib_only():
    interpreter = python39()
    if interpreter is None:
        pytest.skip("no CPython 3.9 interpreter here (python3.9 on PATH, "
                    "~/.pyenv/versions/3.9*, /usr/bin or /usr/local/bin): only the "
                    "syntax is checked, by test_syntax_is_python39")
    with EchoServer() as echo:
        lport = free_port()
        p = ProxyProcess(["--listen-address", LOOP4, "--status", "off",
                          "--connections", spec(lport, LOOP4, echo.port)],
                         argv0=[interpreter, "-I", "-S", str(REPO / "tcpproxy.py")])
        try:
            p.wait_listening([lport])
            assert echo_once((LOOP4, lport), b"py39") == b"py39"
            # 8 MB both ways through the copy pump, then half-close.
            data = os.urandom(8 << 20)
            with socket.create_connection((LOOP4, lport), timeout=10) as s:
                got = hashlib.sha256()
                received = [0]

                def reader():
                    while True:
                        chunk = s.recv(1 << 20)
                        if not chunk:
                            return
                        got.update(chunk)
                        received[0] += len(chunk)

                t = threading.Thread(target=reader)
                t.start()
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)      # EOF travels through, echo closes
                t.join(30)
                assert not t.is_alive()
            assert received[0] == len(data)
            assert got.hexdigest() == hashlib.sha256(data).hexdigest()
            assert p.stop() == 0
            assert "Traceback" not in p.stderr()
            # -I -S: no site-packages, so dnspython is missing: one warning
            assert "dnspython is not installed" in p.stderr()
        finally:
            p.close()
