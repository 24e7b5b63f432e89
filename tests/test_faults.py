"""Faults and abuse (issue 4, section 5): peers that die, reset, stall or
say nothing; DNS and DynamoDB outages and a configuration change while
bytes flow; overload (more clients than --max-connections, a connect storm,
descriptors and threads exhausted).  Each test is bounded in time."""

import errno
import hashlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from helpers import (
    LOOP4,
    TCPPROXY,
    BulkServer,
    ProxyProcess,
    accept,
    closed_by_peer,
    closed_promptly,
    connect,
    echo_once,
    free_port,
    http,
    mapping_stats,
    pattern,
    proc_fds,
    proc_rss_kib,
    proc_threads,
    recv_exact,
    reset_close,
    roundtrip,
    sha256,
    spec,
    wait_until,
)

import tcpproxy

MB = 1 << 20
PAUSE = threading.Event()          # never set: Event.wait() is a bounded pause


# -- helpers -------------------------------------------------------------------

def cpu_seconds(pid, task=None):
    """utime + stime of a process (or one of its threads), in seconds."""
    path = "/proc/%d/stat" % pid if task is None else "/proc/%d/task/%s/stat" % (pid, task)
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Traffic:
    """Background traffic on one proxy port: a long-lived connection pinged
    every loop and a fresh connection per loop, until stop().  Every
    failure is recorded with the time it happened."""

    def __init__(self, addr, every=0.05):
        self.addr = addr
        self.every = every
        self.pings = 0
        self.fresh = 0
        self.failures = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.long = None
        self.thread = threading.Thread(target=self._run, name="traffic")

    def _run(self):
        try:
            self.long = connect(self.addr, timeout=5)
        except OSError as exc:
            self.failures.append(("long-connect", repr(exc)))
            self._ready.set()
            return
        n = 0
        try:
            while not self._stop.is_set():
                payload = b"L%07d" % n
                try:
                    if roundtrip(self.long, payload, timeout=5) != payload:
                        self.failures.append(("long", n, time.monotonic()))
                        return
                    self.pings += 1
                except OSError as exc:
                    self.failures.append(("long", repr(exc), time.monotonic()))
                    return
                try:
                    payload = b"F%07d" % n
                    got = echo_once(self.addr, payload, timeout=5)
                    if got != payload:
                        self.failures.append(("fresh", got, time.monotonic()))
                    else:
                        self.fresh += 1
                except OSError as exc:
                    self.failures.append(("fresh", repr(exc), time.monotonic()))
                n += 1
                self._ready.set()
                self._stop.wait(self.every)
        finally:
            self._ready.set()
            self.long.close()

    def __enter__(self):
        self.thread.start()
        assert self._ready.wait(10), "traffic did not start"
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self._stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "traffic thread did not stop"

    def counts(self):
        return self.pings, self.fresh

    def wait_more(self, pings=10, timeout=10.0):
        """Wait until ``pings`` more loops have run (or a failure); True when
        there was no failure."""
        target = self.pings + pings
        wait_until(lambda: self.pings >= target or self.failures or not self.thread.is_alive(),
                   timeout, message=lambda: "traffic stalled at %d pings (waiting for %d)"
                   % (self.pings, target))
        return not self.failures


UPSTREAM_SCRIPT = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(8)
sys.stdout.write("%d\n" % s.getsockname()[1])
sys.stdout.flush()
c, _ = s.accept()
while True:
    data = c.recv(65536)
    if not data:
        break
    c.sendall(data)
"""


class UpstreamProcess:
    """An echo upstream in its own process, so that it can be killed."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", UPSTREAM_SCRIPT],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(10):
                raise AssertionError("upstream process did not start")
        finally:
            sel.close()
        self.port = int(self.proc.stdout.readline())

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self):
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()


# -- peers that misbehave ----------------------------------------------------------

def test_upstream_killed_mid_stream(start_proxy, echo):
    up = UpstreamProcess()
    try:
        lport, other = free_port(), free_port()
        p = start_proxy(spec(lport, LOOP4, up.port), spec(other, LOOP4, echo.port))
        c = connect((LOOP4, lport))
        with c:
            chunk = pattern(64 * 1024, 7)
            for _ in range(16):                       # bytes are flowing both ways
                assert roundtrip(c, chunk) == chunk
            c.sendall(chunk)                          # in flight when it dies
            up.kill()
            t0 = time.monotonic()
            assert closed_by_peer(c, 5), "client not told that the upstream died"
            assert time.monotonic() - t0 < 3
        assert wait_until(lambda: mapping_stats(p.status_address, lport)["active"] == 0, 5)
        # the proxy serves on, on both mappings
        assert echo_once((LOOP4, other), b"alive") == b"alive"
        assert closed_promptly((LOOP4, lport), 3)   # the dead upstream refuses now
        assert p.alive() and "Traceback" not in p.stderr()
    finally:
        up.close()


def test_client_resets_mid_stream(start_proxy, listener, echo):
    lport, other = free_port(), free_port()
    p = start_proxy(spec(lport, LOOP4, listener.getsockname()[1]),
                    spec(other, LOOP4, echo.port))
    c = connect((LOOP4, lport))
    with accept(listener) as u:
        stop = threading.Event()

        def upstream_talks():           # the upstream keeps sending while it reads
            try:
                while not stop.is_set():
                    u.sendall(b"d" * 4096)
                    stop.wait(0.005)
            except OSError:
                pass

        talker = threading.Thread(target=upstream_talks, name="upstream-talker")
        talker.start()
        try:
            c.sendall(pattern(MB, 1))
            assert len(recv_exact(u, MB, timeout=10)) == MB
            assert len(recv_exact(c, 64 * 1024)) == 64 * 1024
            reset_close(c)
            t0 = time.monotonic()
            assert closed_by_peer(u, 5), "upstream side kept open after the client reset"
            assert time.monotonic() - t0 < 3
        finally:
            stop.set()
            talker.join(5)
        assert not talker.is_alive()
    assert wait_until(lambda: mapping_stats(p.status_address, lport)["active"] == 0, 5)
    assert echo_once((LOOP4, other), b"alive") == b"alive"
    with connect((LOOP4, lport)) as c2, accept(listener) as u2:   # same mapping works too
        c2.sendall(b"again")
        assert recv_exact(u2, 5) == b"again"
    assert p.alive() and "Traceback" not in p.stderr()


def push_until_blocked(sock, limit, quiet=1.0):
    """Send (non-blocking) until the socket stays unwritable for ``quiet``
    seconds or ``limit`` bytes went out; returns (sent, blocked)."""
    chunk = pattern(MB, 3)
    sent = 0
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_WRITE)
    sock.setblocking(False)
    try:
        while sent < limit:
            if not sel.select(quiet):
                return sent, True
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                continue
        return sent, False
    finally:
        sel.close()
        sock.setblocking(True)


def test_upstream_accepts_and_never_reads(start_proxy, listener, echo):
    lport, other = free_port(), free_port()
    p = start_proxy(spec(lport, LOOP4, listener.getsockname()[1]),
                    spec(other, LOOP4, echo.port))
    with connect((LOOP4, lport), timeout=30) as c, accept(listener) as stuck:
        rss0 = proc_rss_kib(p.pid)
        sent, blocked = push_until_blocked(c, 256 * MB)
        assert blocked, "client never blocked after %d MB: no backpressure" % (sent // MB)
        assert sent < 96 * MB, sent
        grew = proc_rss_kib(p.pid) - rss0
        assert grew < 24 * 1024, "proxy RSS grew %d KiB for a stalled upstream" % grew
        # meanwhile a second connection works, on the other mapping and on this one
        assert echo_once((LOOP4, other), b"other") == b"other"
        with connect((LOOP4, lport)) as c2, accept(listener) as u2:
            u2.sendall(b"second")
            assert recv_exact(c2, 6) == b"second"
            c2.sendall(b"up")
            assert recv_exact(u2, 2) == b"up"
        stats = mapping_stats(p.status_address, lport)
        assert stats["active"] >= 1 and stats["failed"] == 0, stats
        stuck.setblocking(False)           # the stalled upstream can still catch up
        assert len(stuck.recv(MB)) > 0
    assert p.alive() and "Traceback" not in p.stderr()


@pytest.mark.parametrize("idle_timeout", [None, "1"], ids=["no-idle-timeout", "idle-timeout-1"])
def test_client_connects_and_sends_nothing(start_proxy, listener, idle_timeout):
    lport = free_port()
    extra = ["--idle-timeout", idle_timeout] if idle_timeout else []
    p = start_proxy(spec(lport, LOOP4, listener.getsockname()[1]), extra=extra)
    with connect((LOOP4, lport)) as c, accept(listener) as u:
        t0 = time.monotonic()
        if idle_timeout:
            assert closed_by_peer(c, 4), "silent client kept past --idle-timeout"
            assert closed_by_peer(u, 2), "upstream side kept past --idle-timeout"
            assert 0.8 < time.monotonic() - t0 < 3.5
            assert wait_until(lambda: mapping_stats(p.status_address, lport)["active"] == 0, 5)
        else:
            # without it the connection just stays, and still works afterwards
            assert not closed_by_peer(c, 2.5)
            u.sendall(b"late banner")
            assert recv_exact(c, 11) == b"late banner"
            c.sendall(b"late reply")
            assert recv_exact(u, 10) == b"late reply"
            assert mapping_stats(p.status_address, lport)["active"] == 1
    assert http(p.status_address, "GET", "/status")[0] == 200


# -- outages -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["timeout", "servfail"])
def test_dns_outage_while_traffic_flows(dns_server, echo, mode):
    name = "db.outage.test"
    dns_server.set(name, ["127.0.0.1"], ttl=1)
    resolver = tcpproxy.Resolver([dns_server.nameserver], timeout=0.5)
    lport = free_port()
    mapping = tcpproxy.Mapping(lport, name, echo.port)
    with tcpproxy.Proxy([mapping], listen_host=LOOP4, resolver=resolver,
                        connect_timeout=2) as proxy:
        with Traffic((LOOP4, lport)) as traffic:
            assert traffic.wait_more(5), traffic.failures
            dns_server.mode = mode
            t0 = time.monotonic()
            queries = dns_server.queries(name)
            # the answer expires (ttl 1) and lookups fail: stale is served
            wait_until(lambda: resolver.info(name)["stale"], 10,
                       message=lambda: resolver.info(name))
            assert dns_server.wait_queries(queries + 2, name, timeout=10)
            before = traffic.counts()
            assert wait_until(lambda: time.monotonic() - t0 > 3 or traffic.failures, 5)
            assert traffic.wait_more(5), traffic.failures
            during = traffic.counts()
            assert during[1] - before[1] >= 5, (before, during)
            info = proxy.status()["mappings"][0]
            assert info["stale"] and info["dns_error"] and info["addresses"] == ["127.0.0.1"]
            dns_server.mode = "ok"
            wait_until(lambda: not resolver.info(name)["stale"], 15,
                       message=lambda: resolver.info(name))
            assert traffic.wait_more(5), traffic.failures
        assert traffic.failures == []
        assert proxy.status()["mappings"][0]["failed"] == 0


def test_dynamodb_outage_keeps_mappings_serving(aws_env, monkeypatch, echo):
    from tcpproxy_backends import dynamodb
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")          # fail fast while it is down
    table, name = "faults-%s" % uuid.uuid4().hex[:8], "p-%s" % uuid.uuid4().hex[:8]
    assert dynamodb.cli(["create-table", "--table", table]) == 0
    lport = free_port()
    helper = dynamodb.make_client("dynamodb")
    helper.put_item(TableName=table, Item={
        "proxy_name": {"S": name}, "proxy_configuration": {"S": spec(lport, LOOP4, echo.port)},
        "max_connections": {"N": "50"}})
    helper.close()
    backend = dynamodb.Backend(SimpleNamespace(proxy=name, dynamodb=table, region=None))
    proxy = tcpproxy.Proxy(listen_host=LOOP4, name=name, connect_timeout=2)
    proxy.start()
    poller = tcpproxy.BackendPoller(proxy, backend, interval=0.2).start()
    try:
        assert wait_until(lambda: [m.listen_port for m in proxy.mappings] == [lport], 10)
        before = proxy.mappings
        with Traffic((LOOP4, lport)) as traffic:
            assert traffic.wait_more(5), traffic.failures
            aws_env.stop()
            polls = poller.polls
            # polls fail (and are retried with backoff); the mapping stays
            assert wait_until(lambda: poller.polls >= polls + 2, 15)
            status = proxy.status()
            assert status["backend"]["last_error"], status["backend"]
            assert "poll failed" in status["backend"]["last_error"]
            assert proxy.mappings == before
            assert traffic.wait_more(10), traffic.failures
            aws_env.start()                          # same port, same data
            ok = poller.last_ok
            wait_until(lambda: poller.last_ok != ok and proxy.status()["ok"], 15,
                       message=lambda: proxy.status()["backend"])
            assert proxy.mappings == before
            assert traffic.wait_more(5), traffic.failures
        assert traffic.failures == []
        stats = proxy.status()["mappings"][0]
        assert stats["failed"] == 0 and stats["refused"] == 0, stats
    finally:
        poller.stop()
        proxy.stop()
        backend.client.close()
    assert not poller._thread.is_alive()


def test_config_change_during_heavy_traffic_loses_no_byte(make_echo):
    size, sessions = 24 * MB, 3
    up = [pattern(size, 10 + i) for i in range(sessions)]
    down = pattern(size, 99)
    gate = threading.Event()                  # the upstream reads only once applies ran
    e1, e2 = make_echo(), make_echo()
    with BulkServer(payload=down, read_gate=gate) as bulk:
        keep = tcpproxy.Mapping(free_port(), LOOP4, bulk.port)
        extra1, extra2 = free_port(), free_port()
        sets = [
            [keep, tcpproxy.Mapping(extra1, LOOP4, e1.port)],
            [keep, tcpproxy.Mapping(extra1, LOOP4, e2.port)],            # target change
            [keep, tcpproxy.Mapping(extra1, LOOP4, e2.port, max_connections=5),
             tcpproxy.Mapping(extra2, LOOP4, e1.port)],
            [keep, tcpproxy.Mapping(extra2, LOOP4, e1.port, allow=["127.0.0.0/8"])],
            [keep],
        ]
        with tcpproxy.Proxy([keep], listen_host=LOOP4) as proxy:
            results = [{} for _ in range(sessions)]

            def client(i):
                res = results[i]
                try:
                    c = connect((LOOP4, keep.listen_port), timeout=60)
                except OSError as exc:
                    res["error"] = exc
                    return
                with c:
                    def receive():
                        digest, n = hashlib.sha256(), 0
                        try:
                            while True:
                                data = c.recv(MB)
                                if not data:
                                    break
                                digest.update(data)
                                n += len(data)
                        except OSError as exc:
                            res["recv_error"] = exc
                        res["down"] = (n, digest.hexdigest())

                    reader = threading.Thread(target=receive, name="heavy-reader-%d" % i)
                    reader.start()
                    try:
                        view = memoryview(up[i])
                        for off in range(0, size, 256 * 1024):
                            c.sendall(view[off:off + 256 * 1024])
                        c.shutdown(socket.SHUT_WR)
                    except OSError as exc:
                        res["error"] = exc
                    reader.join(90)
                    res["reader_alive"] = reader.is_alive()

            clients = [threading.Thread(target=client, args=(i,), name="heavy-%d" % i)
                       for i in range(sessions)]
            for t in clients:
                t.start()
            applied = 0
            try:
                assert wait_until(lambda: proxy.registry.active() == sessions, 10)
                # the uploads are stalled (the upstream does not read yet) and
                # the downloads flowing while the configuration changes
                for mappings in sets * 2:
                    proxy.apply(mappings)
                    applied += 1
                    if any(m.listen_port == extra1 for m in mappings):
                        assert echo_once((LOOP4, extra1), b"x", timeout=2) == b"x"
                gate.set()
                while any(t.is_alive() for t in clients):
                    proxy.apply(sets[applied % len(sets)])
                    applied += 1
                    for t in clients:
                        t.join(0.05)
            finally:
                gate.set()
                for t in clients:
                    t.join(90)
            assert not any(t.is_alive() for t in clients)
            got_up = sorted((r["received"], r["sha256"], r["error"])
                            for r in (bulk.results.get(timeout=30) for _ in range(sessions)))
            want_up = sorted((size, sha256(u), None) for u in up)
            assert got_up == want_up
            for res in results:
                assert "error" not in res and "recv_error" not in res, res
                assert not res["reader_alive"]
                assert res["down"] == (size, sha256(down))
            stats = next(m for m in proxy.status()["mappings"]
                         if m["listen"] == "%s:%d" % (LOOP4, keep.listen_port))
            assert stats["total"] == sessions and stats["failed"] == 0, stats
            assert applied >= 10


# -- overload ---------------------------------------------------------------------

def test_more_clients_than_max_connections(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--max-connections", "20"])
    addr = (LOOP4, lport)
    clients = [connect(addr) for _ in range(50)]
    try:
        served, closed = [], 0
        for i, c in enumerate(clients):
            try:
                if roundtrip(c, b"c%02d" % i, timeout=3) == b"c%02d" % i:
                    served.append(c)
                    continue
            except OSError:
                pass
            closed += 1
        assert (len(served), closed) == (20, 30)
        for c in served:                      # the established ones are unaffected
            assert roundtrip(c, b"again") == b"again"
        stats = mapping_stats(p.status_address, lport)
        assert (stats["active"], stats["refused"]) == (20, 30), stats
        assert echo.accepted == 20
    finally:
        for c in clients:
            c.close()
    assert wait_until(lambda: mapping_stats(p.status_address, lport)["active"] == 0, 5)
    more = [connect(addr) for _ in range(20)]
    try:
        for i, c in enumerate(more):
            assert roundtrip(c, b"m%02d" % i) == b"m%02d" % i
    finally:
        for c in more:
            c.close()
    assert p.alive() and "Traceback" not in p.stderr()


def test_connect_storm_1000_at_once(start_proxy, echo):
    n = 1000
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    assert echo_once((LOOP4, lport)) == b"hello"
    base_threads, base_fds = proc_threads(p.pid), proc_fds(p.pid)
    sel = selectors.DefaultSelector()
    socks, done, failed = [], 0, []
    try:
        # every connect is started before any is finished
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            socks.append(s)
            err = s.connect_ex((LOOP4, lport))
            assert err in (0, errno.EINPROGRESS), os.strerror(err)
            sel.register(s, selectors.EVENT_WRITE, [i, b"", "connect"])
        deadline = time.monotonic() + 60
        while done + len(failed) < n and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                s, state = key.fileobj, key.data
                i = state[0]
                token = b"%05d" % i
                try:
                    if state[2] == "connect":
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, os.strerror(err))
                        s.send(token)
                        state[2] = "read"
                        sel.modify(s, selectors.EVENT_READ, state)
                    else:
                        data = s.recv(16)
                        if not data:
                            raise ConnectionError("closed")
                        state[1] += data
                        if len(state[1]) >= len(token):
                            assert state[1] == token
                            sel.unregister(s)
                            done += 1
                except OSError as exc:
                    sel.unregister(s)
                    failed.append((i, repr(exc)))
        assert failed == [], failed[:5]
        assert done == n, "%d of %d connections echoed in time" % (done, n)
        assert mapping_stats(p.status_address, lport)["active"] == n
    finally:
        sel.close()
        for s in socks:
            s.close()
    assert wait_until(lambda: mapping_stats(p.status_address, lport)["active"] == 0, 15)
    assert echo_once((LOOP4, lport), b"after") == b"after"
    # every descriptor is given back; pump threads retire after 5 s idle
    wait_until(lambda: proc_fds(p.pid) <= base_fds + 2, 10,
               message=lambda: (proc_fds(p.pid), base_fds))
    wait_until(lambda: proc_threads(p.pid) <= base_threads + 2, 20,
               message=lambda: (proc_threads(p.pid), base_threads))
    assert p.alive() and "Traceback" not in p.stderr()


class Spinner:
    """A process that spins one core: what "a whole core" gets on this
    machine right now, to compare the proxy's CPU time with."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                     stdin=subprocess.DEVNULL)

    def close(self):
        self.proc.kill()
        self.proc.wait(10)


def cpu_share(pid, seconds):
    """(proxy CPU seconds, spinner CPU seconds, wall seconds) over ``seconds``."""
    spinner = Spinner()
    try:
        s0 = cpu_seconds(spinner.proc.pid)
        p0, t0 = cpu_seconds(pid), time.monotonic()
        PAUSE.wait(seconds)
        p1, s1, t1 = cpu_seconds(pid), cpu_seconds(spinner.proc.pid), time.monotonic()
    finally:
        spinner.close()
    return p1 - p0, s1 - s0, t1 - t0


NOFILE = 64


@pytest.fixture
def starved_proxy(proxy_cli, echo):
    """The proxy with RLIMIT_NOFILE (soft and hard, so it cannot raise it
    back) at NOFILE, on one echo mapping; ``.clients`` are closed at
    teardown."""
    lport = free_port()
    status = (LOOP4, free_port())
    args = ["--listen-address", LOOP4, "--connections", spec(lport, LOOP4, echo.port),
            "--status", "%s:%d" % status]
    p = ProxyProcess(args, argv0=["prlimit", "--nofile=%d:%d" % (NOFILE, NOFILE),
                                  sys.executable, str(TCPPROXY)])
    p.clients = []
    try:
        p.wait_listening([lport], status=status)
        p.lport, p.status_address = lport, status
        yield p
    finally:
        for c in p.clients:
            c.close()
        p.close()


def exhaust(p, n=NOFILE, wait=3.0):
    """Open ``n`` clients at once (more than the proxy has descriptors for),
    send each a token and return those whose echo came back within ``wait``
    seconds.  The others were closed by the proxy or still wait in its
    listen queue."""
    addr = (LOOP4, p.lport)
    for _ in range(n):
        p.clients.append(connect(addr, timeout=5))
    sel = selectors.DefaultSelector()
    got = {}
    try:
        for i, c in enumerate(p.clients):
            c.sendall(b"%03d" % i)
            sel.register(c, selectors.EVENT_READ, i)
            got[i] = b""
        deadline = time.monotonic() + wait
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(16)
                except OSError:
                    data = b""
                got[key.data] += data
                if not data or len(got[key.data]) >= 3:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    return [c for i, c in enumerate(p.clients) if got[i] == b"%03d" % i]


def recover(p):
    for c in p.clients:
        c.close()
    p.clients = []

    def works():
        try:
            return echo_once((LOOP4, p.lport), b"back", timeout=2) == b"back"
        except OSError:
            return False

    wait_until(works, 15, message=lambda: "no recovery after the clients left:\n" + p.stderr())
    assert http(p.status_address, "GET", "/status", timeout=5)[0] == 200
    for i in range(NOFILE // 4):            # and not just for one client
        assert echo_once((LOOP4, p.lport), b"r%d" % i) == b"r%d" % i


def test_descriptors_exhausted_survives_backs_off_and_recovers(starved_proxy):
    p = starved_proxy
    served = exhaust(p)
    assert 0 < len(served) < NOFILE, len(served)
    assert proc_fds(p.pid) >= NOFILE - 2, proc_fds(p.pid)
    # more clients knock while there is no descriptor left
    for _ in range(8):
        p.clients.append(connect((LOOP4, p.lport), timeout=5))
    proxy_cpu, core, wall = cpu_share(p.pid, 3.0)
    assert p.alive(), p.output()
    assert proxy_cpu < 0.25 * core + 0.1, (
        "the proxy used %.2f s of CPU in %.1f s while out of descriptors (a spinning "
        "process got %.2f s): it spins" % (proxy_cpu, wall, core))
    for c in served:                         # the ones that got in keep working
        assert roundtrip(c, b"still") == b"still"
    wait_until(lambda: "Too many open files" in p.stderr(), 5, message=p.stderr)
    recover(p)
    assert "Traceback" not in p.stderr()


def test_descriptors_exhausted_with_a_status_probe_pending(starved_proxy):
    """A health check that connects to /status while no descriptor is left
    must not make the status server spin."""
    p = starved_proxy
    served = exhaust(p)
    assert 0 < len(served) < NOFILE
    # Take any descriptor still free with slow status clients (each holds one
    # for up to the 5 s request deadline), then one more waits in the queue.
    probes = []
    try:
        for _ in range(max(0, NOFILE - proc_fds(p.pid)) + 2):
            probe = socket.create_connection(p.status_address, timeout=5)
            probes.append(probe)
            probe.sendall(b"GET /status HTTP/1.0\r\n")
        assert proc_fds(p.pid) >= NOFILE - 1, proc_fds(p.pid)
        proxy_cpu, core, wall = cpu_share(p.pid, 3.0)
        assert p.alive(), p.output()
        assert proxy_cpu < 0.25 * core + 0.1, (
            "the proxy used %.2f s of CPU in %.1f s while a /status client waited and no "
            "descriptor was left (a spinning process got %.2f s): it spins" % (
                proxy_cpu, wall, core))
    finally:
        for probe in probes:
            probe.close()
    recover(p)
    assert "Traceback" not in p.stderr()


def test_thread_exhaustion_closes_the_client_and_recovers(echo, caplog, monkeypatch):
    """'can't start new thread' (simulated): the client is closed, the event
    logged, the proxy serves again when threads are available."""
    caplog.set_level(logging.ERROR, logger="tcpproxy")
    # both kinds of failure are to be seen in the log: no rate limiting here
    # (the handler's and the pump's messages share one rate-limit key)
    monkeypatch.setattr(tcpproxy._ratelimited, "interval", 0.0)
    mapping = tcpproxy.Mapping(free_port(), LOOP4, echo.port)
    with tcpproxy.Proxy([mapping], listen_host=LOOP4) as proxy:
        addr = (LOOP4, mapping.listen_port)
        real_reserve, real_run_on = proxy.workers.reserve, proxy.workers.run_on
        fail = {"handler": 0, "pump": 0}

        def reserve():                   # the listener takes workers for each client
            if fail["handler"]:
                fail["handler"] -= 1
                raise RuntimeError("can't start new thread")
            return real_reserve()

        def run_on(worker, func, *args):  # the first pump starts the second ("down")
            if func.__name__ == "down" and fail["pump"]:
                fail["pump"] -= 1
                raise RuntimeError("can't start new thread")
            return real_run_on(worker, func, *args)

        monkeypatch.setattr(proxy.workers, "reserve", reserve)
        monkeypatch.setattr(proxy.workers, "run_on", run_on)
        assert echo_once(addr, b"ok") == b"ok"
        fail["handler"] = 3
        for _ in range(3):
            assert closed_promptly(addr, 3)
        assert echo_once(addr, b"back") == b"back"
        fail["pump"] = 2                                # the second pump cannot start
        for _ in range(2):
            assert closed_promptly(addr, 3)
        assert echo_once(addr, b"back again") == b"back again"
        assert wait_until(lambda: proxy.registry.active() == 0, 5)
        assert wait_until(lambda: proxy.registry.active(mapping.listen_port) == 0, 5)
        messages = [r.getMessage() for r in caplog.records]
        assert any("cannot start a thread" in m for m in messages), messages
        assert any("cannot start a pump thread" in m for m in messages), messages
    assert echo.wait_idle(5)
