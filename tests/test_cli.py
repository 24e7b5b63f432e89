"""The command line: every bad input, --version, --help, --debug levels,
signals, the installed command, and running without dnspython."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    LOOP4,
    REPO,
    ProxyProcess,
    closed_by_peer,
    connect,
    echo_once,
    free_port,
    listening,
    port_listening,
    roundtrip,
    run_cli,
    spec,
    wait_until,
)

import tcpproxy

OK_CONN = ["--connections", "47002:127.0.0.1:9"]
QUIET = ["--status", "off", "--listen-address", LOOP4]

# (argv, strings of which at least one must appear in the message)
BAD_INPUT = [
    pytest.param(["--connections", "70000:127.0.0.1:9"], ["70000"], id="listen-port-too-big"),
    pytest.param(["--connections", "47001:127.0.0.1:70001"], ["70001"], id="remote-port-too-big"),
    pytest.param(["--connections", "0:127.0.0.1:9"],
                 ["0:127.0.0.1:9", "'0'", '"0"', "port 0", "port: 0"], id="listen-port-zero"),
    pytest.param(["--connections", "47001:127.0.0.1:0"],
                 ["47001:127.0.0.1:0", "'0'", '"0"', "port 0", "port: 0"], id="remote-port-zero"),
    pytest.param(["--connections=-5:127.0.0.1:9"], ["-5"], id="negative-port"),
    pytest.param(["--connections", "abc:127.0.0.1:9"], ["abc"], id="listen-port-not-number"),
    pytest.param(["--connections", "47001:127.0.0.1:xyz"], ["xyz"], id="remote-port-not-number"),
    pytest.param(["--connections", "47001:127.0.0.1"], ["47001:127.0.0.1"], id="missing-remote-port"),
    pytest.param(["--connections", "47001"], ["47001"], id="only-a-port"),
    pytest.param(["--connections", "47001::9"], ["47001::9"], id="missing-host"),
    pytest.param(["--connections", "47001:127.0.0.1:9:5"], ["47001:127.0.0.1:9:5"], id="extra-part"),
    pytest.param(["--connections", "47001:[::1:9"], ["47001:[::1:9", "[::1"], id="unclosed-bracket"),
    pytest.param(["--connections", "::1:47001:127.0.0.1:9"], ["::1:47001:127.0.0.1:9"],
                 id="listen-ipv6-without-brackets"),
    pytest.param(["--connections", "db:47001:127.0.0.1:9"], ["'db'"], id="listen-address-a-name"),
    pytest.param(["--connections", "127.0.0.2:47001:127.0.0.1"], ["127.0.0.2:47001:127.0.0.1"],
                 id="listen-address-missing-remote-port"),
    pytest.param(["--connections", "127.0.0.2:47001:127.0.0.1:9,127.0.0.2:47001:127.0.0.1:10"],
                 ["127.0.0.2:47001"], id="duplicate-listen-address"),
    pytest.param(["--connections", "0.0.0.0:47001:127.0.0.1:9,127.0.0.2:47001:127.0.0.1:10"],
                 ["0.0.0.0:47001 and 127.0.0.2:47001"], id="wildcard-and-specific-address"),
    pytest.param(["--connections", "47001:127.0.0.1:9,47001:127.0.0.1:10"], ["47001"],
                 id="duplicate-listen-port"),
    pytest.param(["--connections", "47001:127.0.0.1:9", "--connections", "47001:127.0.0.1:10"],
                 ["47001"], id="duplicate-listen-port-repeated-flag"),
    pytest.param(OK_CONN + ["--debug", "7"], ["7"], id="debug-7"),
    pytest.param(OK_CONN + ["--debug", "loud"], ["loud"], id="debug-not-number"),
    pytest.param(OK_CONN + ["--resolver", "not-an-ip"], ["not-an-ip"], id="resolver-not-ip"),
    pytest.param(OK_CONN + ["--resolver", "127.0.0.1:99999"], ["99999"], id="resolver-bad-port"),
    pytest.param(OK_CONN + ["--resolver", "[::1]:abc"], ["abc"], id="resolver-v6-bad-port"),
    pytest.param(OK_CONN + ["--connect-timeout", "soon"], ["soon"], id="connect-timeout-not-number"),
    pytest.param(OK_CONN + ["--connect-timeout", "-1"], ["-1"], id="connect-timeout-negative"),
    pytest.param(OK_CONN + ["--status", "127.0.0.1:notaport"], ["notaport"], id="status-bad-port"),
    pytest.param(OK_CONN + ["--cpus", "fast"], ["fast"], id="cpus-not-a-list"),
    pytest.param(OK_CONN + ["--cpus", "3-1"], ["3-1"], id="cpus-backwards-range"),
    pytest.param(OK_CONN + ["--cpus", "4096"], ["4096"], id="cpus-not-available"),
]


def check_rejected(result, names, elapsed):
    out = result.stdout + result.stderr
    assert result.returncode != 0, "bad input accepted:\n" + out
    assert "Traceback" not in out, out
    assert any(n in result.stderr for n in names), (
        "message does not name the bad value %r:\n%s" % (names, result.stderr))
    assert len(result.stderr.strip().splitlines()) <= 12, "message not short:\n" + result.stderr
    assert elapsed < 5, "took %.1fs to reject" % elapsed


@pytest.mark.parametrize("argv,names", BAD_INPUT)
def test_bad_input_exits_with_message(argv, names):
    argv = list(argv)
    if "--status" in argv:
        argv = argv + ["--listen-address", LOOP4]
    else:
        argv = argv + QUIET
    t0 = time.monotonic()
    try:
        result = run_cli(argv, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("bad input %r accepted: the proxy kept running" % argv)
    check_rejected(result, names, time.monotonic() - t0)


def test_unknown_backend_lists_valid_names():
    t0 = time.monotonic()
    result = run_cli(["--backend", "nosuch"] + OK_CONN + QUIET, timeout=15)
    check_rejected(result, ["nosuch"], time.monotonic() - t0)
    assert "static" in result.stderr


def test_listen_port_in_use():
    with socket.socket() as busy:
        busy.bind((LOOP4, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        result = run_cli(["--connections", "%d:127.0.0.1:9" % port] + QUIET, timeout=15)
        check_rejected(result, [str(port)], time.monotonic() - t0)


def test_status_port_in_use():
    with socket.socket() as busy:
        busy.bind((LOOP4, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        result = run_cli(["--connections", "%d:127.0.0.1:9" % free_port(),
                          "--listen-address", LOOP4, "--status", "127.0.0.1:%d" % port],
                         timeout=15)
        check_rejected(result, [str(port)], time.monotonic() - t0)


def test_version():
    result = run_cli(["--version"])
    assert result.returncode == 0, result.stderr
    assert tcpproxy.__version__ in result.stdout
    assert "Traceback" not in result.stderr


def test_help_lists_flags_and_examples():
    result = run_cli(["--help"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for flag in ("--connections", "--backend", "--status", "--status-address",
                 "--listen-address", "--resolver", "--connect-timeout", "--debug",
                 "--version", "--close-on-dns-change"):
        assert flag in text, flag
    assert "example" in text.lower()
    assert "STATUS_ADDRESS" in text


def test_installed_command_runs():
    script = Path(sys.executable).parent / "tcpproxy"
    if not script.exists():
        pytest.skip("tcpproxy is not installed in this environment (pip install -e .)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                            timeout=20, cwd="/", check=False)
    assert result.returncode == 0, result.stderr
    assert tcpproxy.__version__ in result.stdout


def test_connections_accepts_commas_spaces_and_repeats(start_proxy, make_echo):
    echoes = [make_echo() for _ in range(4)]
    ports = [free_port() for _ in echoes]
    specs = [spec(p, LOOP4, e.port) for p, e in zip(ports, echoes)]
    p = start_proxy(specs[0] + "," + specs[1], specs[2] + " " + specs[3])
    for port in ports:
        assert echo_once((LOOP4, port), b"x%d" % port) == b"x%d" % port
    assert p.alive()


@pytest.mark.parametrize("level,chatty", [("0", False), ("1", True), ("2", True)])
def test_debug_levels(start_proxy, echo, level, chatty):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--debug", level])
    before = p.stderr()
    assert echo_once((LOOP4, lport)) == b"hello"
    assert echo.wait_idle(5)
    if chatty:
        wait_until(lambda: p.stderr() != before, 5,
                   message=lambda: "--debug %s logged nothing for a connection" % level)
    else:
        # level 0: warnings and errors only; a good connection logs nothing
        assert echo_once((LOOP4, lport)) == b"hello"
        assert p.stderr() == before, p.stderr()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(start_proxy, echo, sig):
    """Live connections, no drain period (issue 4 adds draining on SIGTERM,
    --drain-timeout): listeners and connections close, exit 0 within 5 s."""
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--drain-timeout", "0"])
    clients = [connect((LOOP4, lport)) for _ in range(50)]
    try:
        for i, c in enumerate(clients):
            assert roundtrip(c, b"c%03d" % i) == b"c%03d" % i
        t0 = time.monotonic()
        code = p.stop(sig, timeout=5)
        assert time.monotonic() - t0 < 5
        assert code == 0, p.output()
        assert "Traceback" not in p.output()
        for c in clients:
            assert closed_by_peer(c, 2)
        assert echo.wait_idle(5), "upstream connections left open"
        assert not port_listening(lport)
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_idle_proxy(start_proxy, echo, sig):
    """Default settings, no open connection: exit 0 within 5 s."""
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    assert echo_once((LOOP4, lport)) == b"hello"
    assert echo.wait_idle(5)
    t0 = time.monotonic()
    assert p.stop(sig, timeout=5) == 0, p.output()
    assert time.monotonic() - t0 < 5
    assert "Traceback" not in p.output()


def test_status_address_env(proxy_cli, echo):
    lport, sport = free_port(), free_port()
    proxy_cli(["--listen-address", LOOP4, "--connections", spec(lport, LOOP4, echo.port)],
              ports=[lport], status=(LOOP4, sport),
              env={"STATUS_ADDRESS": "127.0.0.1:%d" % sport})


def test_status_address_alias(proxy_cli, echo):
    lport, sport = free_port(), free_port()
    proxy_cli(["--listen-address", LOOP4, "--connections", spec(lport, LOOP4, echo.port),
               "--status-address", "127.0.0.1:%d" % sport],
              ports=[lport], status=(LOOP4, sport))


def test_status_off_opens_no_status_port(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), status=False)
    assert {port for _, port in listening(p.pid)} == {lport}


def cpu_settings(pid):
    """(CPUs the process may run on, its scheduling policy) from /proc."""
    with open("/proc/%d/status" % pid) as f:
        allowed = re.search(r"^Cpus_allowed_list:\s*(\S+)", f.read(), re.MULTILINE).group(1)
    with open("/proc/%d/sched" % pid) as f:
        policy = int(re.search(r"^policy\s*:\s*(\d+)", f.read(), re.MULTILINE).group(1))
    return tcpproxy.parse_cpus(allowed), policy


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_cpus_auto_binds_one_cpu_with_batch_policy(start_proxy, echo):
    """By default the proxy runs on one CPU (the last it may use) with the
    SCHED_BATCH policy, and so do the threads it starts later."""
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    assert echo_once((LOOP4, lport)) == b"hello"
    mine = sorted(os.sched_getaffinity(0))
    assert cpu_settings(p.pid) == ({mine[-1]}, os.SCHED_BATCH)
    for tid in os.listdir("/proc/%d/task" % p.pid):
        assert cpu_settings(int(tid)) == ({mine[-1]}, os.SCHED_BATCH), tid


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_cpus_all_and_list(start_proxy, echo):
    mine = os.sched_getaffinity(0)
    p = start_proxy(spec(free_port(), LOOP4, echo.port), extra=["--cpus", "all"])
    assert cpu_settings(p.pid) == (mine, os.SCHED_OTHER)
    first = min(mine)
    p = start_proxy(spec(free_port(), LOOP4, echo.port), extra=["--cpus", str(first)])
    assert cpu_settings(p.pid) == ({first}, os.SCHED_BATCH)
    p = start_proxy(spec(free_port(), LOOP4, echo.port), env={"TCPPROXY_CPUS": "all"})
    assert cpu_settings(p.pid)[0] == mine


def test_parse_cpus():
    assert tcpproxy.parse_cpus("auto") == "auto"
    assert tcpproxy.parse_cpus("ALL") is None
    assert tcpproxy.parse_cpus("0,2-4,7") == {0, 2, 3, 4, 7}
    for bad in ("", "x", "1-", "-1", "2-1", "1,,2"):
        with pytest.raises(ValueError):
            tcpproxy.parse_cpus(bad)


def test_status_default_is_loopback_8001(proxy_cli, echo):
    if port_listening(8001):
        pytest.skip("port 8001 is in use on this machine")
    lport = free_port()
    p = proxy_cli(["--listen-address", LOOP4, "--connections", spec(lport, LOOP4, echo.port)],
                  ports=[lport, 8001])
    bound = listening(p.pid)
    assert (LOOP4, 8001) in bound, bound
    assert ("0.0.0.0", 8001) not in bound and ("::", 8001) not in bound


NO_DNSPYTHON = (
    "import sys; sys.modules['dns'] = None; sys.path.insert(0, %r); "
    "import tcpproxy; sys.exit(tcpproxy.main(sys.argv[1:]))" % str(REPO)
)


def test_runs_without_dnspython(echo):
    """Without dnspython the static backend still works through the system
    resolver (localhost from /etc/hosts) and warns once about TTLs."""
    lport = free_port()
    p = ProxyProcess(["--listen-address", LOOP4, "--status", "off",
                      "--connections", spec(lport, "localhost", echo.port)],
                     argv0=[sys.executable, "-c", NO_DNSPYTHON])
    try:
        p.wait_listening([lport])
        for i in range(3):
            assert echo_once((LOOP4, lport), b"n%d" % i) == b"n%d" % i
        lines = [l for l in p.stderr().splitlines()
                 if "ttl" in l.lower() or "dnspython" in l.lower()]
        assert len(lines) == 1, p.stderr()
        assert "Traceback" not in p.stderr()
        assert p.stop() == 0
    finally:
        p.close()


def test_import_has_no_side_effects():
    code = (
        "import logging, signal, threading, sys\n"
        "sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)\n"
        "before = [signal.getsignal(s) for s in sigs]\n"
        "import tcpproxy\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
        "assert logging.getLogger().level == logging.WARNING\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert [signal.getsignal(s) for s in sigs] == before\n"
        "assert not logging.getLogger('tcpproxy').handlers\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True,
                            text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
    assert result.stderr == ""
