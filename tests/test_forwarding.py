"""Forwarding through the proxy (run as ``python tcpproxy.py``): bytes intact
both ways, half-close, resets, backpressure (each with every pump), failing
upstreams, thousands of connections, and no leaks afterwards."""

import errno
import hashlib
import select
import selectors
import socket
import threading
import time

import pytest
from helpers import (
    LOOP4,
    Blackhole,
    BulkServer,
    EchoServer,
    accept,
    closed_by_peer,
    closed_promptly,
    connect,
    each_pump,
    echo_once,
    free_port,
    listen_overflows,
    pattern,
    proc_fds,
    proc_rss_kib,
    proc_threads,
    raise_nofile,
    recv_all,
    recv_exact,
    reset_close,
    roundtrip,
    sha256,
    spec,
    tcp_timers,
    wait_until,
)

MB = 1 << 20

# Tests of how bytes move (contents, half-close, resets, backpressure, what a
# pump leaves behind) run with each pump (@each_pump); those of addressing,
# upstream failures, socket options and scale run once.


def settled(p, timeout=10.0):
    """(threads, fds) of the proxy once they stop changing, or the last
    sample after ``timeout`` (pump threads still retiring one by one: a later
    round of the same work compares against that)."""
    last = [None]

    def stable():
        now = (proc_threads(p.pid), proc_fds(p.pid))
        same, last[0] = now == last[0], now
        return same

    try:
        wait_until(stable, timeout, interval=0.2)
    except AssertionError:
        pass
    return last[0]


def assert_no_growth(p, before, timeout=15.0):
    """Threads and descriptors are back to ``before`` (taken after an earlier
    round of the same work: pools the proxy keeps are not leaks, growth from
    round to round is)."""
    threads, fds = before
    wait_until(lambda: proc_threads(p.pid) <= threads and proc_fds(p.pid) <= fds, timeout,
               message=lambda: "proxy leaks: threads %d (was %d), fds %d (was %d)" % (
                   proc_threads(p.pid), threads, proc_fds(p.pid), fds))


@each_pump
def test_bytes_pass_unchanged(start_proxy, echo):
    lport = free_port()
    start_proxy(spec(lport, LOOP4, echo.port))
    payload = bytes(range(256)) * 64
    with connect((LOOP4, lport)) as c:
        assert roundtrip(c, payload) == payload
        assert roundtrip(c, b"\x00") == b"\x00"


def test_ipv6_target(start_proxy, make_echo):
    e6 = make_echo(host="::1")
    lport = free_port()
    start_proxy(spec(lport, "::1", e6.port))
    assert echo_once((LOOP4, lport), b"six") == b"six"


def test_dual_stack_listen(start_proxy, echo):
    lport = free_port("::")
    start_proxy(spec(lport, LOOP4, echo.port), listen="::")
    assert echo_once((LOOP4, lport), b"four") == b"four"
    assert echo_once(("::1", lport), b"six") == b"six"


@each_pump
def test_50mb_each_way_sha256(start_proxy):
    size = 50 * MB
    up = pattern(size, 1)
    down = pattern(size, 2)
    with BulkServer(payload=down) as bulk:
        lport = free_port()
        start_proxy(spec(lport, LOOP4, bulk.port))
        c = connect((LOOP4, lport), timeout=60)
        got = {}

        def receive():
            digest, n = hashlib.sha256(), 0
            try:
                while True:
                    data = c.recv(MB)
                    if not data:
                        break
                    digest.update(data)
                    n += len(data)
            finally:
                got["n"], got["sha"] = n, digest.hexdigest()

        reader = threading.Thread(target=receive, name="bulk-reader")
        reader.start()
        try:
            view = memoryview(up)
            for i in range(0, size, MB):
                c.sendall(view[i:i + MB])
            c.shutdown(socket.SHUT_WR)
            result = bulk.results.get(timeout=90)
        finally:
            reader.join(90)
            c.close()
        assert not reader.is_alive()
        assert result["error"] is None, result
        assert (result["received"], result["sha256"]) == (size, sha256(up))
        assert (got["n"], got["sha"]) == (size, sha256(down))


@each_pump
def test_half_close_client_first(start_proxy, listener):
    lport = free_port()
    start_proxy(spec(lport, LOOP4, listener.getsockname()[1]))
    with connect((LOOP4, lport)) as c, accept(listener) as u:
        c.sendall(b"request")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(u, 5) == b"request"          # upstream sees EOF
        u.sendall(b"answer after your EOF")           # other way still flows
        assert recv_exact(c, 21) == b"answer after your EOF"
        u.sendall(b" and more")
        assert recv_exact(c, 9) == b" and more"
        u.shutdown(socket.SHUT_WR)
        assert recv_all(c, 5) == b""                  # now both halves done


@each_pump
def test_half_close_upstream_first(start_proxy, listener):
    lport = free_port()
    start_proxy(spec(lport, LOOP4, listener.getsockname()[1]))
    with connect((LOOP4, lport)) as c, accept(listener) as u:
        u.sendall(b"banner")
        u.shutdown(socket.SHUT_WR)
        assert recv_all(c, 5) == b"banner"            # client sees EOF
        c.sendall(b"late request")                     # other way still flows
        assert recv_exact(u, 12) == b"late request"
        c.sendall(b"!")
        assert recv_exact(u, 1) == b"!"
        c.shutdown(socket.SHUT_WR)
        assert recv_all(u, 5) == b""


@each_pump
def test_upstream_reset_closes_client(start_proxy, listener):
    lport = free_port()
    start_proxy(spec(lport, LOOP4, listener.getsockname()[1]))
    with connect((LOOP4, lport)) as c:
        u = accept(listener)
        assert roundtrip_pair(c, u)
        reset_close(u)
        assert closed_by_peer(c, 3)


@each_pump
def test_client_reset_closes_upstream(start_proxy, listener):
    lport = free_port()
    start_proxy(spec(lport, LOOP4, listener.getsockname()[1]))
    c = connect((LOOP4, lport))
    with accept(listener) as u:
        assert roundtrip_pair(c, u)
        reset_close(c)
        assert closed_by_peer(u, 3)


def roundtrip_pair(c, u):
    c.sendall(b"ping")
    if recv_exact(u, 4) != b"ping":
        return False
    u.sendall(b"pong")
    return recv_exact(c, 4) == b"pong"


def test_refused_upstream_closes_client_others_keep_working(start_proxy, echo):
    dead = free_port()
    bad, good = free_port(), free_port()
    p = start_proxy(spec(bad, LOOP4, dead), spec(good, LOOP4, echo.port))
    for _ in range(20):
        t0 = time.monotonic()
        assert closed_promptly((LOOP4, bad), 3)
        assert time.monotonic() - t0 < 2
        assert echo_once((LOOP4, good), b"still") == b"still"
    wait_until(lambda: str(dead) in p.stderr() or "refused" in p.stderr().lower(), 5,
               message=lambda: "reason not logged:\n" + p.stderr())
    assert "Traceback" not in p.stderr()
    assert p.alive()


def test_upstream_timeout_closes_client(start_proxy, echo):
    with Blackhole() as hole:
        if not hole.works:
            pytest.skip("cannot make a connect time out on this machine")
        slow, good = free_port(), free_port()
        p = start_proxy(spec(slow, LOOP4, hole.port), spec(good, LOOP4, echo.port),
                        extra=["--connect-timeout", "1"])
        with connect((LOOP4, slow)) as c:
            t0 = time.monotonic()
            # while that connect hangs, the other mapping keeps working
            assert echo_once((LOOP4, good), b"meanwhile") == b"meanwhile"
            assert closed_by_peer(c, 6), "client kept open past --connect-timeout"
            elapsed = time.monotonic() - t0
        assert 0.5 < elapsed < 4, elapsed
        assert p.alive()


def push_until_blocked(sock, limit, quiet=1.0):
    """Send (non-blocking) until the socket stays unwritable for ``quiet``
    seconds or ``limit`` bytes went out; returns (sent, sha256, blocked)."""
    chunk = pattern(MB, 3)
    digest = hashlib.sha256()
    sent = 0
    sock.setblocking(False)
    try:
        while sent < limit:
            _, w, _ = select.select([], [sock], [], quiet)
            if not w:
                return sent, digest.hexdigest(), True
            try:
                n = sock.send(chunk)
            except BlockingIOError:
                continue
            digest.update(chunk[:n])
            sent += n
        return sent, digest.hexdigest(), False
    finally:
        sock.setblocking(True)


@each_pump
@pytest.mark.parametrize("direction", ["client-to-upstream", "upstream-to-client"])
def test_slow_reader_memory_is_bounded(start_proxy, listener, direction):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, listener.getsockname()[1]))
    with connect((LOOP4, lport), timeout=30) as c, accept(listener, 30) as u:
        assert roundtrip_pair(c, u)
        rss0 = proc_rss_kib(p.pid)
        sender, reader = (c, u) if direction == "client-to-upstream" else (u, c)
        limit = 256 * MB
        sent, digest, blocked = push_until_blocked(sender, limit)
        rss1 = proc_rss_kib(p.pid)
        assert blocked, "sender never blocked after %d MB: proxy buffers without limit" % (
            sent // MB)
        assert sent < 96 * MB, sent
        assert rss1 - rss0 < 32 * 1024, (
            "proxy RSS grew %d KiB while the reader was stalled" % (rss1 - rss0))
        # the reader catches up and gets every byte
        sender.shutdown(socket.SHUT_WR)
        data_sha, n = hashlib.sha256(), 0
        reader.settimeout(30)
        while True:
            data = reader.recv(MB)
            if not data:
                break
            data_sha.update(data)
            n += len(data)
        assert (n, data_sha.hexdigest()) == (sent, digest)


def test_keepalive_on_both_sockets(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    with connect((LOOP4, lport)) as c:
        assert roundtrip(c, b"ka") == b"ka"
        client_port = c.getsockname()[1]

        def sockets():
            down = tcp_timers(local_port=lport, remote_port=client_port, pid=p.pid)
            up = tcp_timers(remote_port=echo.port, pid=p.pid)
            return down, up

        def armed():
            down, up = sockets()
            return len(down) == 1 and len(up) == 1 and all(t == 2 for _, _, t in down + up)

        wait_until(armed, 5, message=lambda: (
            "keepalive timer not armed (2) on the proxy's client side / upstream side "
            "sockets: %s / %s" % sockets()))


def open_many(addr, n, inflight=256, timeout=60.0):
    """Open ``n`` connections (at most ``inflight`` handshakes at once), send
    each a unique token and read its echo.  Returns the sockets (blocking)."""
    sel = selectors.DefaultSelector()
    done, pending, nxt = [], {}, 0
    deadline = time.monotonic() + timeout
    try:
        while len(done) < n:
            while nxt < n and len(pending) < inflight:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex(addr)
                assert err in (0, errno.EINPROGRESS), os_error(err)
                pending[s] = [nxt, b"", False]
                sel.register(s, selectors.EVENT_WRITE)
                nxt += 1
            assert time.monotonic() < deadline, "opened %d of %d in %ss" % (len(done), n, timeout)
            for key, _ in sel.select(0.5):
                s = key.fileobj
                st = pending[s]
                token = b"%08d" % st[0]
                if not st[2]:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert err == 0, "connection %d: %s" % (st[0], os_error(err))
                    s.send(token)
                    st[2] = True
                    sel.modify(s, selectors.EVENT_READ)
                    continue
                data = s.recv(8 - len(st[1]))
                assert data, "connection %d closed by the proxy" % st[0]
                st[1] += data
                if len(st[1]) == 8:
                    assert st[1] == token
                    sel.unregister(s)
                    del pending[s]
                    s.setblocking(True)
                    s.settimeout(30)
                    done.append(s)
        return done
    except BaseException:
        for s in list(pending) + done:
            s.close()
        raise
    finally:
        sel.close()


def os_error(err):
    import os
    return "%s (%s)" % (errno.errorcode.get(err, err), os.strerror(err))


def verify_all(socks):
    sel = selectors.DefaultSelector()
    try:
        for i, s in enumerate(socks):
            s.sendall(b"V%07d" % i)
            sel.register(s, selectors.EVENT_READ, [i, b""])
        left = len(socks)
        deadline = time.monotonic() + 60
        while left:
            assert time.monotonic() < deadline, "%d connections did not echo" % left
            for key, _ in sel.select(0.5):
                st = key.data
                data = key.fileobj.recv(8 - len(st[1]))
                assert data, "connection %d closed" % st[0]
                st[1] += data
                if len(st[1]) == 8:
                    assert st[1] == b"V%07d" % st[0]
                    sel.unregister(key.fileobj)
                    left -= 1
    finally:
        sel.close()


def many_connections(start_proxy, n):
    assert raise_nofile() >= 2 * n + 200, "descriptor limit too low for %d connections" % n
    with EchoServer() as echo:
        lport = free_port()
        # the proxy starts with the usual soft limit: it must raise it itself
        p = start_proxy(spec(lport, LOOP4, echo.port), nofile=1024)
        _threads0, fds0 = settled(p)
        socks = open_many((LOOP4, lport), n)
        try:
            assert echo.active == n
            assert proc_fds(p.pid) >= fds0 + 2 * n
            verify_all(socks)            # every connection still echoes
            assert p.alive()
        finally:
            for s in socks:
                s.close()
        slack = max(30.0, n / 50.0)
        assert echo.wait_idle(slack), "%d upstream connections left open" % echo.active
        wait_until(lambda: proc_fds(p.pid) < fds0 + n // 4, slack, message=lambda: (
            "descriptors not released: %d (were %d before %d connections)"
            % (proc_fds(p.pid), fds0, n)))
        after = settled(p)
        # a second, smaller round: nothing grows
        socks = open_many((LOOP4, lport), n // 4)
        for s in socks:
            s.close()
        assert echo.wait_idle(30)
        assert_no_growth(p, after)
        assert echo_once((LOOP4, lport), b"after") == b"after"
        assert "Traceback" not in p.stderr()


def test_2000_concurrent_connections(start_proxy):
    many_connections(start_proxy, 2000)


@pytest.mark.perf
@pytest.mark.timeout(600)
def test_9000_concurrent_connections(start_proxy):
    many_connections(start_proxy, 9000)


def test_connection_burst_is_not_dropped(start_proxy, echo):
    """1,000 connects at once: the listen backlog takes the burst (a backlog
    of 5 overflows and clients wait for SYN retransmits)."""
    raise_nofile()
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    before = listen_overflows()
    socks = open_many((LOOP4, lport), 1000, inflight=1000)
    try:
        overflows = listen_overflows() - before
        verify_all(socks)
    finally:
        for s in socks:
            s.close()
    assert overflows == 0, "%d connections overflowed the listen queue" % overflows
    assert echo.wait_idle(30)
    assert p.alive()


@each_pump
def test_no_leaks_after_errors(start_proxy, echo):
    """Refused upstreams, resets and normal closes all give their threads
    and descriptors back."""
    good, bad = free_port(), free_port()
    p = start_proxy(spec(good, LOOP4, echo.port), spec(bad, LOOP4, free_port()))

    def work(rounds):
        for i in range(rounds):
            assert closed_promptly((LOOP4, bad), 3)
            c = connect((LOOP4, good))
            assert roundtrip(c, b"%04d" % i) == b"%04d" % i
            if i % 2:
                reset_close(c)
            else:
                c.close()
        assert echo.wait_idle(10)

    work(20)
    before = settled(p)
    work(100)
    assert_no_growth(p, before)
