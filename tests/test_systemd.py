"""The systemd unit in .packaging/systemd: ``systemd-analyze verify``
accepts it without a word (no running systemd needed), and it keeps the
settings README.rst describes."""

import configparser
import shlex
import shutil
import subprocess
import sys

import pytest
from helpers import REPO

import tcpproxy

UNIT = REPO / ".packaging" / "systemd" / "tcpproxy.service"
DEFAULTS = REPO / ".packaging" / "systemd" / "tcpproxy.default"


def service():
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; "
                    ".ci/run installs it)")
    # verify insists that ExecStart exists: the copy starts this Python
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/tcpproxy " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("ExecStart=/usr/local/bin/tcpproxy ",
                                 "ExecStart=%s " % sys.executable))
    result = subprocess.run([analyze, "verify", str(copy)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, check=False)
    # unknown keys and bad values are warnings with exit status 0: none allowed
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)


def test_unit_settings():
    s = service()
    assert (s["Type"], s["NotifyAccess"]) == ("notify", "main")
    for key in ("DynamicUser", "NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[key] == "yes", key
    assert s["ProtectSystem"] == "strict"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["EnvironmentFile"] == "-/etc/default/tcpproxy"
    assert s["ExecStart"] == "/usr/local/bin/tcpproxy $TCPPROXY_ARGS"
    assert s["KillMode"] in ("mixed", "main")
    assert int(s["LimitNOFILE"]) >= 4096
    # the drain must end before systemd's SIGKILL
    drain = tcpproxy.build_parser().get_default("drain_timeout")
    assert float(s["TimeoutStopSec"]) > drain


def test_environment_file_parses_with_the_flags():
    """The example /etc/default/tcpproxy holds flags tcpproxy accepts."""
    values = dict(line.split("=", 1) for line in DEFAULTS.read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    args = shlex.split(values["TCPPROXY_ARGS"])[0].split()
    parsed = tcpproxy.build_parser().parse_args(args)
    assert parsed.connections and parsed.status == "127.0.0.1:8001"


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET
    (abstract namespace when *abstract*)."""

    def __init__(self, tmp_path, abstract=False):
        import socket
        import uuid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "tcpproxy-test-%s" % uuid.uuid4().hex
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = str(tmp_path / "notify")
            self.sock.bind(path)
            self.address = path
        self.sock.settimeout(15)
        self.messages = []

    def next(self):
        """The next datagram's lines."""
        message = self.sock.recv(4096).decode().split("\n")
        self.messages.append(message)
        return message

    def wait_for(self, line):
        while True:
            message = self.next()
            if line in message:
                return message

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_reloading_stopping_and_watchdog(tmp_path, echo, abstract):
    import signal

    from helpers import LOOP4, ProxyProcess, free_port, spec
    notify = NotifySocket(tmp_path, abstract)
    lport = free_port()
    proxy = ProxyProcess(["--listen-address", LOOP4, "--status", "off",
                          "--connections", spec(lport, LOOP4, echo.port)],
                         env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"})
    try:
        ready = notify.wait_for("READY=1")
        assert any(line.startswith("STATUS=1 mapping(s)") for line in ready), ready
        notify.wait_for("WATCHDOG=1")                   # every 0.2 s (half of 0.4 s)
        notify.wait_for("WATCHDOG=1")
        proxy.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        notify.wait_for("READY=1")
        proxy.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING=1")
        assert any(line.startswith("STATUS=draining") for line in stopping)
        assert proxy.wait(10) == 0
        order = [line for message in notify.messages for line in message
                 if line in ("READY=1", "RELOADING=1", "STOPPING=1")]
        assert order == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], notify.messages
    finally:
        proxy.close()
        notify.close()
