"""Safe operations: a drain that never cuts an exchange in flight (real
PostgreSQL and Redis clients), configuration edits that apply whole or not
at all, health checks that tell the truth and cannot be starved, signals in
bursts, and the errors a user meets on the command line."""

import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    LOOP4,
    REPO,
    TCPPROXY,
    EchoServer,
    ProxyProcess,
    free_port,
    http,
    http_json,
    many_sessions,
    run_cli,
    spec,
    wait_until,
)

import tcpproxy


def client(port, timeout=5.0, source=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if source:
        sock.bind((source, 0))
    sock.connect((LOOP4, port))
    return sock


def readable(sock, timeout):
    """True when *sock* has data or EOF within *timeout* seconds."""
    return bool(select.select([sock], [], [], timeout)[0])


def closed(sock, timeout=5.0):
    """True when the peer closed *sock* (EOF or reset) within *timeout*."""
    deadline = time.monotonic() + timeout
    while readable(sock, max(0.0, deadline - time.monotonic())):
        try:
            if not sock.recv(65536):
                return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            break
    return False


# Drain #######################################################################

@pytest.fixture
def quiet_upstream():
    """An upstream that accepts and reads but answers only when told:
    ``reply(conn_index, data)``."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOP4, 0))
    listener.listen(512)
    listener.settimeout(5)
    conns = []

    class Upstream:
        port = listener.getsockname()[1]

        def accept(self):
            conn, _ = listener.accept()
            conn.settimeout(5)
            conns.append(conn)
            return conn

    yield Upstream()
    for conn in conns:
        conn.close()
    listener.close()


def test_drain_keeps_a_request_waiting_for_its_reply(quiet_upstream):
    """The byte-level rule: a session whose last bytes went upstream (a
    request with no reply yet) is kept however quiet it is; once the reply
    is delivered and it stays quiet, it is closed; the drain then ends."""
    mapping = tcpproxy.Mapping(0, LOOP4, quiet_upstream.port)
    with tcpproxy.Proxy([mapping], listen_host=LOOP4) as proxy:
        port = next(iter(proxy.servers))
        waiting = client(port)
        waiting.sendall(b"SELECT pg_sleep(4)")
        waiting_up = quiet_upstream.accept()
        assert waiting_up.recv(100) == b"SELECT pg_sleep(4)"
        done = client(port)
        done.sendall(b"PING")
        done_up = quiet_upstream.accept()
        assert done_up.recv(100) == b"PING"
        done_up.sendall(b"PONG")
        assert done.recv(100) == b"PONG"
        stopper = threading.Thread(target=proxy.stop, kwargs={"drain": 20.0})
        started = time.monotonic()
        stopper.start()
        try:
            # the finished exchange is closed after DRAIN_QUIET...
            assert closed(done, 3 * tcpproxy.DRAIN_QUIET)
            # ...the waiting request is not, however long it waits
            assert not readable(waiting, 2.5 * tcpproxy.DRAIN_QUIET)
            assert proxy.state == "draining"
            waiting_up.sendall(b"(1 row)")
            assert waiting.recv(100) == b"(1 row)"
            # reply delivered, quiet: now it may go, and the drain is over
            assert closed(waiting, 3 * tcpproxy.DRAIN_QUIET)
            stopper.join(5)
            assert not stopper.is_alive()
            assert time.monotonic() - started < 10
        finally:
            proxy.end_drain()
            stopper.join(10)
            waiting.close()
            done.close()


def test_end_drain_cuts_a_drain_short(quiet_upstream):
    mapping = tcpproxy.Mapping(0, LOOP4, quiet_upstream.port)
    with tcpproxy.Proxy([mapping], listen_host=LOOP4) as proxy:
        port = next(iter(proxy.servers))
        waiting = client(port)
        waiting.sendall(b"BLPOP key 0")
        quiet_upstream.accept().recv(100)
        stopper = threading.Thread(target=proxy.stop, kwargs={"drain": 60.0})
        stopper.start()
        wait_until(lambda: proxy.state == "draining", 5)
        started = time.monotonic()
        proxy.end_drain()
        stopper.join(5)
        assert not stopper.is_alive()
        assert time.monotonic() - started < 3
        assert closed(waiting, 2)
        waiting.close()


def test_sigterm_lets_a_running_query_finish(postgres, start_proxy):
    """psql -c 'select pg_sleep(4)' through the proxy, SIGTERM 1-2 s into
    the query with --drain-timeout 30: the query completes, an idle pooled
    connection is closed within about 2 s, and the proxy exits 0 when the
    query's connection closes."""
    lport = free_port()
    proxy = start_proxy(spec(lport, LOOP4, postgres.port),
                        extra=["--drain-timeout", "30", "--debug", "1"])
    env = dict(os.environ, PGUSER="postgres", PGDATABASE="postgres",
               PGCONNECT_TIMEOUT="5")
    psql = [str(postgres.bin / "psql"), "-X", "-A", "-t", "-h", LOOP4, "-p", str(lport)]
    pooled = subprocess.Popen(psql, env=dict(env, PGAPPNAME="idle-pool"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    query = None
    try:
        pooled.stdin.write("select 41 + 1;\n")
        pooled.stdin.flush()
        assert pooled.stdout.readline().strip() == "42"

        def count(where):
            out = postgres.psql("-c", "select count(*) from pg_stat_activity where " + where)
            return int(out.stdout.strip() or 0)

        assert count("application_name = 'idle-pool'") == 1
        query = subprocess.Popen(psql + ["-c", "select pg_sleep(4)"],
                                 env=dict(env, PGAPPNAME="long-query"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_until(lambda: count("query like 'select pg_sleep%' and state = 'active'")
                          == 1, 10)
        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        # the idle pooled connection goes within about 2 s
        assert wait_until(lambda: count("application_name = 'idle-pool'") == 0, 3.5), \
            proxy.output()
        _out, err = query.communicate(timeout=15)
        assert query.returncode == 0, err
        assert "server closed the connection" not in err
        assert proxy.wait(10) == 0, proxy.output()
        elapsed = time.monotonic() - started
        assert elapsed < 10, elapsed
        log = proxy.output()
        assert "Traceback" not in log
        assert "idle between exchanges while draining" in log
    finally:
        for p in (pooled, query):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.communicate(timeout=5)


def test_sigterm_lets_a_blocking_pop_finish(redis, start_proxy):
    lport = free_port()
    proxy = start_proxy(spec(lport, LOOP4, redis.port), extra=["--drain-timeout", "30"])
    assert redis.cli("PING", port=lport).stdout.strip() == "PONG"
    blpop = subprocess.Popen(["redis-cli", "-h", LOOP4, "-p", str(lport), "BLPOP",
                              "drain-key", "3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: "cmd=blpop" in redis.cli("CLIENT", "LIST").stdout, 10)
        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        assert redis.cli("LPUSH", "other", "x").returncode == 0   # redis itself still fine
        out, err = blpop.communicate(timeout=15)
        assert blpop.returncode == 0, err
        assert "Error" not in out + err and "closed" not in out + err
        waited = time.monotonic() - started
        assert proxy.wait(10) == 0, proxy.output()
        assert waited >= 1.0          # it waited for BLPOP's 3 s, not the drain's quiet second
    finally:
        if blpop.poll() is None:
            blpop.kill()
            blpop.communicate(timeout=5)


# Configuration changes #######################################################

def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def status_json(proxy):
    status, _, body = http(proxy.status_address, path="/status?format=json")
    return status, json.loads(body)


def test_a_live_connection_survives_every_bad_edit(tmp_path, proxy_cli):
    path = tmp_path / "mappings.yaml"
    one, two = free_port(), free_port()
    status_address = (LOOP4, free_port())
    with EchoServer() as echo:
        good = "mappings:\n  - listen: %d\n    target: %s:%d\n  - '%d:%s:%d'\n" % (
            one, LOOP4, echo.port, two, LOOP4, echo.port)
        write_atomic(path, good)
        proxy = proxy_cli(["--listen-address", LOOP4, "--backend", "file", "--config", str(path),
                           "--status", "%s:%d" % status_address, "--debug", "1"],
                          ports=[one, two], status=status_address, timeout=20)
        proxy.status_address = status_address
        conn_one, conn_two = client(one), client(two)

        def alive():
            for conn in (conn_one, conn_two):
                conn.sendall(b"still here")
                got = b""
                while len(got) < 10:
                    chunk = conn.recv(10 - len(got))
                    assert chunk, "connection closed: %s" % proxy.stderr()
                    got += chunk
                assert got == b"still here"
            return True

        def polls():
            return status_json(proxy)[1]["backend"]["polls"]

        def rejected():
            return status_json(proxy)[1]["backend"].get("rejected") or ""

        bad_edits = [
            ("tagret", good.replace("target:", "tagret:"), "unknown key 'tagret'"),
            ("duplicate key", good + "  - listen: 1\n    listen: 2\n    target: a:1\n",
             "found duplicate key 'listen'"),
            ("second mappings", good + "mappings: []\n", "found duplicate key 'mappings'"),
            ("bad value", good.replace("listen: %d" % one, "listen: %d0" % one),
             "is not a port number"),
        ]
        for name, text, reason in bad_edits:
            write_atomic(path, text)
            assert wait_until(lambda reason=reason: reason in rejected(), 10), \
                (name, proxy.output())
            code, status = status_json(proxy)
            assert code == 200 and status["ok"]          # it still serves...
            assert any("config rejected" in w and reason in w for w in status["warnings"])
            assert sorted(m["spec"].split(":")[0] for m in status["mappings"]) == \
                sorted([str(one), str(two)])            # ...what was in force
            assert alive(), name
            log = proxy.stderr()
            assert log.count(reason) == 1, (name, log)   # logged once per change
        # a truncating in-place write, caught half-way
        before = polls()
        with open(path, "w") as f:
            f.write(good[:good.index("  - '%d" % two)])   # valid YAML without mapping two
            f.flush()
            # one poll sees it (and waits for it to settle); the rest comes
            # before the next one
            assert wait_until(lambda: polls() > before, 5)
            f.write(good[good.index("  - '%d" % two):])
        assert alive()
        assert wait_until(lambda: not rejected(), 10)
        write_atomic(path, good.replace("'%d:" % two, "'%d:" % free_port()))
        assert wait_until(lambda: len(status_json(proxy)[1]["mappings"]) == 2
                          and str(two) not in str(status_json(proxy)[1]["mappings"]), 10)
        assert closed(conn_two, 5)                        # the fixed edit applies
        conn_one.close()
        conn_two.close()
        assert proxy.stop() == 0
        assert "Traceback" not in proxy.output()


def test_check_prints_what_would_be_served_and_binds_nothing(tmp_path):
    path = tmp_path / "mappings.yaml"
    lport = free_port()
    path.write_text("mappings:\n  - listen: %d\n    target: db.example.com:5432\n"
                    "    allow: [10.0.0.0/8]\n" % lport)
    result = run_cli(["check", "--backend", "file", "--config", str(path)])
    assert result.returncode == 0, result.stderr
    assert "%d:db.example.com:5432 allow=10.0.0.0/8" % lport in result.stdout
    assert "file backend: 1 mapping(s)" in result.stdout
    result = run_cli(["--check", "--connections", "%d:127.0.0.1:1" % lport])
    assert result.returncode == 0 and "%d:127.0.0.1:1" % lport in result.stdout
    path.write_text("mappings:\n  - listen: %d\n    tagret: db:1\n" % lport)
    result = run_cli(["check", "--backend", "file", "--config", str(path)])
    assert result.returncode == 2
    assert result.stderr.startswith("tcpproxy: error: ")
    assert "mappings.yaml line 2 (entry 1): unknown key 'tagret'" in result.stderr
    assert "Traceback" not in result.stderr


# Health ######################################################################

def health(*args, env=None):
    full = dict(os.environ)
    full.pop("STATUS_ADDRESS", None)
    full.update(env or {})
    return subprocess.run([sys.executable, str(TCPPROXY), "health"] + list(args),
                          cwd=str(REPO), env=full, capture_output=True, text=True, timeout=20,
                          check=False)


@pytest.mark.parametrize("how", ["status-allow", "other-port", "env", "off"])
def test_health_reads_the_proxys_own_status_address(how, start_proxy, proxy_cli, echo):
    lport = free_port()
    if how == "status-allow":
        proxy = start_proxy(spec(lport, LOOP4, echo.port), extra=["--status-allow", "10.0.0.0/8"])
    elif how == "other-port":
        proxy = start_proxy(spec(lport, LOOP4, echo.port))      # --status 127.0.0.1:<free>
    elif how == "env":
        port = free_port()
        proxy = proxy_cli(["--listen-address", LOOP4, "--connections",
                           spec(lport, LOOP4, echo.port)], ports=[lport],
                          status=(LOOP4, port), env={"STATUS_ADDRESS": "%s:%d" % (LOOP4, port)})
    else:
        proxy = start_proxy(spec(lport, LOOP4, echo.port), status=False)
    result = health("--pid", str(proxy.pid))
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("healthy: ")
    if how == "off":
        assert str(lport) in result.stdout
    assert proxy.stop() == 0
    result = health("--pid", str(proxy.pid), "--timeout", "2")
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: ")


def test_health_with_an_explicit_address(start_proxy, echo):
    proxy = start_proxy(spec(free_port(), LOOP4, echo.port))
    address = "%s:%d" % proxy.status_address
    assert health("--status", address).returncode == 0
    assert health("--status", "%s:%d" % (LOOP4, free_port()), "--timeout", "2").returncode == 1
    assert health("--status", "nonsense").returncode == 2


def test_127_0_0_1_may_always_read_status(start_proxy, echo):
    proxy = start_proxy(spec(free_port(), LOOP4, echo.port), extra=["--status-allow", "10.0.0.0/8"])
    assert http(proxy.status_address)[0] == 200
    assert http(proxy.status_address, path="/status?format=json")[0] == 200
    assert http(proxy.status_address, path="/connections")[0] == 403   # addresses: no


def test_slow_clients_cannot_starve_health_checks(start_proxy, echo):
    """32 slow requests from 4 addresses hold the status port: /status from
    127.0.0.1 still answers within 1 s, every time."""
    proxy = start_proxy(spec(free_port(), LOOP4, echo.port))
    slow = []
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            for _ in range(8):
                sock = client(proxy.status_address[1], source=source)
                sock.sendall(b"GET /status HTTP/1.0\r\n")      # and never the rest
                slow.append(sock)
        for _ in range(10):
            started = time.monotonic()
            assert http(proxy.status_address, timeout=1.0)[0] == 200
            assert time.monotonic() - started < 1.0
        # more slow clients from a fifth address take the reserve, briefly
        for _ in range(4):
            sock = client(proxy.status_address[1], source="127.0.0.6")
            sock.sendall(b"GET /status HTTP/1.0\r\n")
            slow.append(sock)
        answered = wait_until(lambda: http(proxy.status_address, timeout=1.0)[0] == 200, 3)
        assert answered
    finally:
        for sock in slow:
            sock.close()


def test_status_answers_at_the_descriptor_limit(echo):
    lport, sport = free_port(), free_port()
    proxy = ProxyProcess(["--listen-address", LOOP4, "--connections",
                          spec(lport, LOOP4, echo.port), "--status", "%s:%d" % (LOOP4, sport)],
                         argv0=["prlimit", "--nofile=48:48", sys.executable, str(TCPPROXY)])
    conns = []
    try:
        proxy.wait_listening([lport], status=(LOOP4, sport))
        for _ in range(40):          # two descriptors each in the proxy: far past 48
            try:
                conns.append(client(lport, timeout=2))
            except OSError:
                break
        assert wait_until(lambda: "cannot accept" in proxy.stderr(), 10), proxy.stderr()
        for _ in range(3):
            assert http((LOOP4, sport), timeout=3)[0] == 200
        for conn in conns:
            conn.close()
        assert proxy.stop() == 0
    finally:
        for conn in conns:
            conn.close()
        proxy.close()


HAMMER = """
import os, sys, time, urllib.request
# SCHED_IDLE: the reader runs on this 2-CPU machine beside the test's own
# client and echo server; it must not take their CPU (what is measured is
# whether the proxy's pumps wait for its status thread).
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        r.read()
    n += 1
print(n)
"""


def ping_pong_p50(port, rounds=1500):
    sock = client(port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            sock.sendall(b"x" * 64)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            times.append(time.perf_counter() - started)
    finally:
        sock.close()
    return statistics.median(times)


@pytest.mark.parametrize("path", ["/connections", "/metrics"])
def test_reading_status_does_not_stall_proxying(path, start_proxy, echo):
    """With 2,000 sessions open and /connections (or /metrics) read in a
    loop, proxied 1-connection ping-pong p50 stays within 2x of its idle
    value."""
    lport = free_port()
    proxy = start_proxy(spec(lport, LOOP4, echo.port))
    with many_sessions(lport, 2000):
        assert wait_until(lambda: len(http_json(proxy.status_address, "/connections")
                                      ["sessions"]) == 2000, 30)
        idle = ping_pong_p50(lport)
        url = "http://%s:%d%s" % (proxy.status_address + (path,))
        hammer = subprocess.Popen([sys.executable, "-c", HAMMER, url, "6"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            loaded = ping_pong_p50(lport)
        finally:
            out, _ = hammer.communicate(timeout=60)
        reads = int(out.strip())
        assert reads >= 5, reads
        assert loaded <= 2 * idle, "p50 %.3f ms idle, %.3f ms while %s was read " \
            "%d times" % (idle * 1e3, loaded * 1e3, path, reads)
        limited = http_json(proxy.status_address, "/connections?limit=10")
        assert len(limited["sessions"]) == 10 and limited["total"] == 2000


# Signals #####################################################################

def test_signal_bursts_always_exit_0_promptly(quiet_upstream, tmp_path):
    """Bursts of 2-6 SIGTERMs (or SIGINTs) 0-50 ms apart with 100
    connections open, 20 times: each run exits 0 within the drain timeout
    + 2 s, with no traceback."""
    rng = random.Random(7)
    drain = 3.0
    for run in range(20):
        lport = free_port()
        proxy = ProxyProcess(["--listen-address", LOOP4, "--status", "off",
                              "--connections", spec(lport, LOOP4, quiet_upstream.port),
                              "--drain-timeout", str(drain)])
        conns = []
        try:
            proxy.wait_listening([lport])
            for i in range(100):
                conn = client(lport)
                if i % 2:
                    conn.sendall(b"request waiting for a reply")
                conns.append(conn)
            burst = rng.randint(2, 6)
            started = time.monotonic()
            pause = threading.Event()
            for _ in range(burst):
                proxy.send_signal(rng.choice([signal.SIGTERM, signal.SIGTERM, signal.SIGINT]))
                pause.wait(rng.uniform(0, 0.05))      # the burst's spacing, not a sync
            code = proxy.wait(drain + 2 + 5)
            elapsed = time.monotonic() - started
            log = proxy.output()
            assert code == 0, (run, burst, log)
            assert elapsed < drain + 2, (run, burst, elapsed)
            assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
        finally:
            for conn in conns:
                conn.close()
            proxy.close()


def test_a_signal_during_start_exits_0(echo):
    for _ in range(5):
        lport = free_port()
        proxy = ProxyProcess(["--listen-address", LOOP4, "--status", "off",
                              "--connections", spec(lport, LOOP4, echo.port)])
        try:
            # as soon as the interpreter runs: before, during or after start()
            pid = proxy.pid
            proc_dir = Path("/proc/%d" % pid)
            assert wait_until((proc_dir / "status").exists, 5)
            wait_until(lambda d=proc_dir: b"tcpproxy" in (d / "cmdline").read_bytes(), 5)
            proxy.send_signal(signal.SIGTERM)
            proxy.send_signal(signal.SIGTERM)
            code = proxy.wait(10)
            log = proxy.output()
            assert "Traceback" not in log, log
            assert code in (0, -signal.SIGTERM), log     # -15: killed before main() ran
        finally:
            proxy.close()


def test_sighup_is_logged_at_info(start_proxy, echo):
    proxy = start_proxy(spec(free_port(), LOOP4, echo.port), extra=["--debug", "1"])
    proxy.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "INFO MainThread: SIGHUP: the static backend has nothing "
                      "to reload" in proxy.stderr(), 5), proxy.stderr()
    assert "WARNING MainThread: SIGHUP" not in proxy.stderr()


# Errors a user meets #########################################################

@pytest.mark.parametrize("args, expected", [
    (["--idle-timeout", "abc"], "argument --idle-timeout: 'abc' is not a positive number"),
    (["--max-connections", "1.5"], "argument --max-connections: value '1.5' is not a whole"),
    (["--drain-timeout", "-1"], "argument --drain-timeout: '-1' is not a non-negative"),
    (["--connect-timeout", "nan"], "argument --connect-timeout: 'nan' is not a positive"),
    (["--debug", "7"], "argument --debug: invalid debug level '7'"),
    (["--cpus", "99"], "argument --cpus: 99: this process may only use CPUs"),
    (["--elasticache-port", "x"], "argument --elasticache-port: port 'x' is not a port"),
    (["--backend", "file"], "no config file: --backend file needs --config FILE"),
    # a listen address per mapping is fine (test_listen.py); ambiguous ones are named
    (["--connections", "::1:41002:127.0.0.1:9000"],
     ("argument --connections: invalid connection '::1:41002:127.0.0.1:9000': an IPv6 "
     "address must be in brackets, e.g. [::1]:8002:[::1]:5432")),
    (["--connections", "localhost:41002:127.0.0.1:9000"],
     "listen address 'localhost' is not an IP address (write 127.0.0.1 or [::1])"),
    (["--connections", "8002:db:٥٤٣٢"], "target port '٥٤٣٢' is not a port number"),
])
def test_bad_flag_values_exit_2_with_one_line(args, expected):
    if args[0] == "--backend" or args[0] == "--elasticache-port":
        args = args + ["--status", "off"]
    elif args[0] != "--connections":
        args = ["--connections", "%d:127.0.0.1:9" % free_port(), "--status", "off"] + args
    result = run_cli(args)
    assert result.returncode == 2, result
    assert result.stderr.startswith("tcpproxy: error: "), result.stderr
    assert expected in result.stderr, result.stderr
    for python in ("Traceback", "could not convert", "invalid literal", "ValueError"):
        assert python not in result.stderr


def test_a_second_proxy_on_the_status_port_is_told_about_status(start_proxy, echo):
    first = start_proxy(spec(free_port(), LOOP4, echo.port))
    result = run_cli(["--listen-address", LOOP4, "--connections",
                      spec(free_port(), LOOP4, echo.port),
                      "--status", "%s:%d" % first.status_address])
    assert result.returncode == 2
    assert result.stderr.startswith("tcpproxy: error: cannot serve status on")
    assert "--status HOST:PORT, or --status off" in result.stderr


def test_aws_backend_hint_works_for_a_single_file_user(tmp_path):
    (tmp_path / "tcpproxy.py").write_bytes(TCPPROXY.read_bytes())
    # -S: no site-packages, so not the installed tcpproxy_backends either
    result = subprocess.run([sys.executable, "-S", str(tmp_path / "tcpproxy.py"), "--backend",
                             "dynamodb", "--proxy", "x", "--status", "off"],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=20,
                            env=dict(os.environ, PYTHONPATH=""), check=False)
    assert result.returncode == 1, result.stderr
    assert "put the tcpproxy_backends folder next to tcpproxy.py" in result.stderr
