"""The library API: Mapping, parse_connections, Proxy (context manager,
apply, connections, status, stop) in this process, with thread and
descriptor counts back to their baseline afterwards."""

import errno
import os
import socket
import sys
import threading
import time

import pytest
from helpers import (
    LOOP4,
    banner_via,
    closed_by_peer,
    connect,
    echo_once,
    free_port,
    http,
    http_json,
    roundtrip,
    spec,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import tcpproxy
from tcpproxy import ConfigError, Mapping, Proxy, ProxyError, parse_connections


def test_exports():
    for name in ("ProxyError", "ConfigError", "BackendError", "ResolveError", "Mapping",
                 "parse_connections", "Resolver", "Proxy", "main", "__version__"):
        assert hasattr(tcpproxy, name), name
    for name in ("ConfigError", "BackendError", "ResolveError"):
        assert issubclass(getattr(tcpproxy, name), ProxyError)
    assert issubclass(ProxyError, Exception)


# -- Mapping -------------------------------------------------------------------

def test_mapping_parse():
    m = Mapping.parse("8002:db.example.com:5432")
    assert (m.listen_port, m.host, m.port) == (8002, "db.example.com", 5432)
    assert m.spec == str(m) == "8002:db.example.com:5432"
    assert m == Mapping(8002, "db.example.com", 5432)
    with pytest.raises(AttributeError):
        m.port = 1          # frozen


def test_mapping_ipv6_literal():
    m = Mapping.parse("8002:[::1]:5432")
    assert (m.listen_port, m.host, m.port) == (8002, "::1", 5432)
    assert m.spec == "8002:[::1]:5432"
    assert Mapping(8002, "::1", 5432).spec == "8002:[::1]:5432"


@pytest.mark.parametrize("bad,named", [
    ("70000:h:1", "70000"), ("1:h:70000", "70000"), ("0:h:1", "0:h:1"), ("x:h:1", "x"),
    ("1:h:y", "y"), ("1:h", "1:h"), ("1::2", "1::2"), ("", ""), ("1:h:2:3", "1:h:2:3"),
    ("1:[::1:2", "[::1"),
])
def test_mapping_parse_rejects(bad, named):
    with pytest.raises(ConfigError) as exc:
        Mapping.parse(bad)
    assert named in str(exc.value)


hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
    # 0.0.0.0/8, :: and multicast are refused as targets (tests/test_hostile.py)
    st.ip_addresses().map(str).filter(lambda a: not tcpproxy._unusable_address(a)),
)
ports = st.integers(1, 65535)


@settings(max_examples=200, deadline=None)
@given(ports, hosts, ports)
def test_mapping_spec_roundtrip(lport, host, rport):
    m = Mapping(lport, host, rport)
    again = Mapping.parse(m.spec)
    assert again == m
    assert again.spec == m.spec


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(ports, hosts, ports), min_size=1, max_size=6,
                unique_by=lambda t: t[0]),
       st.sampled_from([",", " ", ", ", " ,  "]))
def test_parse_connections_separators(items, sep):
    mappings = [Mapping(*t) for t in items]
    text = sep.join(m.spec for m in mappings)
    assert parse_connections([text]) == mappings
    assert parse_connections([m.spec for m in mappings]) == mappings


def test_parse_connections_duplicate_port():
    with pytest.raises(ConfigError) as exc:
        parse_connections(["9000:a:1", "9001:b:2,9000:c:3"])
    assert "9000" in str(exc.value)


# -- Proxy -----------------------------------------------------------------

def mapping(lport, upstream):
    return Mapping(lport, upstream.host, upstream.port)


def test_context_manager_leaves_nothing(make_echo):
    echo = make_echo()
    threads = threading.active_count()
    lport = free_port()
    with Proxy([mapping(lport, echo)], listen_host=LOOP4) as proxy:
        assert [m.spec for m in proxy.mappings] == [spec(lport, LOOP4, echo.port)]
        clients = [connect((LOOP4, lport)) for _ in range(10)]
        for i, c in enumerate(clients):
            assert roundtrip(c, b"%d" % i) == b"%d" % i
        assert threading.active_count() > threads
    for c in clients:
        assert closed_by_peer(c, 2), "session left open after stop"
        c.close()
    wait_until(lambda: threading.active_count() == threads, 5, message=threading.enumerate)
    with pytest.raises(OSError):
        connect((LOOP4, lport), timeout=2).close()
    assert echo.wait_idle(5)


def test_stop_with_timeout_returns_promptly(make_echo):
    echo = make_echo()
    threads = threading.active_count()
    lport = free_port()
    proxy = Proxy([mapping(lport, echo)], listen_host=LOOP4)
    proxy.start()
    clients = [connect((LOOP4, lport)) for _ in range(20)]
    try:
        for c in clients:
            assert roundtrip(c, b"z") == b"z"
        stopper = threading.Thread(target=proxy.stop, kwargs={"timeout": 5.0}, name="stopper")
        stopper.start()
        stopper.join(6)
        assert not stopper.is_alive(), "stop(timeout=5) did not return"
        for c in clients:
            assert closed_by_peer(c, 2)
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: threading.active_count() == threads, 5, message=threading.enumerate)


def test_connections_snapshot(make_echo):
    echo = make_echo()
    lport = free_port()
    with Proxy([mapping(lport, echo)], listen_host=LOOP4, name="ops") as proxy:
        snap = proxy.connections()
        assert snap["name"] == "ops"
        assert snap["connections"] == [spec(lport, LOOP4, echo.port)]
        assert snap["sessions"] == []
        with connect((LOOP4, lport)) as c:
            assert roundtrip(c, b"abc") == b"abc"
            snap = proxy.connections()
            assert len(snap["sessions"]) == 1
            assert str(c.getsockname()[1]) in repr(snap["sessions"][0])
            # a snapshot: changing it changes nothing in the proxy
            snap["sessions"].clear()
            assert len(proxy.connections()["sessions"]) == 1
        assert wait_until(lambda: proxy.connections()["sessions"] == [], 5)
        status = proxy.status()
        assert status["version"] == tcpproxy.__version__


def test_apply(make_echo):
    a = make_echo(banner=b"A")
    b = make_echo(banner=b"B")
    p_keep, p_remove, p_change, p_new = (free_port() for _ in range(4))
    keep = Mapping(p_keep, LOOP4, a.port)
    remove = Mapping(p_remove, LOOP4, a.port)
    change = Mapping(p_change, LOOP4, a.port)
    threads = threading.active_count()
    with Proxy([keep, remove, change], listen_host=LOOP4) as proxy:
        c_keep = connect((LOOP4, p_keep))
        c_remove = connect((LOOP4, p_remove))
        c_change = connect((LOOP4, p_change))
        try:
            for c in (c_keep, c_remove, c_change):
                assert c.recv(1) == b"A"
            changed = Mapping(p_change, LOOP4, b.port)
            new = Mapping(p_new, LOOP4, b.port)
            proxy.apply([keep, changed, new])
            assert sorted(m.spec for m in proxy.mappings) == sorted(
                m.spec for m in (keep, changed, new))
            # unchanged: its connection is untouched
            assert roundtrip(c_keep, b"kept") == b"kept"
            assert banner_via((LOOP4, p_keep)) == b"A"
            # removed: listener and sessions closed
            assert closed_by_peer(c_remove, 3), "session of a removed mapping left open"
            with pytest.raises(OSError):
                connect((LOOP4, p_remove), timeout=2).close()
            # changed target: new connections go to the new target
            assert banner_via((LOOP4, p_change)) == b"B"
            # new: started
            assert banner_via((LOOP4, p_new)) == b"B"
            # applying the same set again changes nothing
            proxy.apply([keep, changed, new])
            assert roundtrip(c_keep, b"again") == b"again"
        finally:
            for c in (c_keep, c_remove, c_change):
                c.close()
    wait_until(lambda: threading.active_count() == threads, 5, message=threading.enumerate)


def test_apply_reports_failures_and_applies_the_rest(make_echo):
    echo = make_echo()
    good, other = free_port(), free_port()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        status_port = free_port()
        with Proxy([Mapping(good, LOOP4, echo.port)], listen_host=LOOP4,
                   status_address=(LOOP4, status_port)) as proxy:
            assert http(proxy.status_address, "GET", "/status")[0] == 200
            bad = Mapping(taken, LOOP4, echo.port)
            new = Mapping(other, LOOP4, echo.port)
            with pytest.raises(ConfigError) as exc:
                proxy.apply([Mapping(good, LOOP4, echo.port), bad, new])
            assert bad.spec in exc.value.failures
            assert str(taken) in str(exc.value)
            assert echo_once((LOOP4, good)) == b"hello"
            assert echo_once((LOOP4, other)) == b"hello"
            status, _, body = http(proxy.status_address, "GET", "/status")
            assert status == 503, (status, body)
            assert body.strip() and len(body.strip().splitlines()) == 1, body


def test_start_with_busy_port_raises(make_echo):
    echo = make_echo()
    threads = threading.active_count()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        proxy = Proxy([Mapping(taken, LOOP4, echo.port)], listen_host=LOOP4)
        with pytest.raises(ConfigError) as exc:
            proxy.start()
        assert str(taken) in str(exc.value)
        proxy.stop()
    wait_until(lambda: threading.active_count() == threads, 5, message=threading.enumerate)


def test_status_server_of_library(make_echo):
    echo = make_echo()
    lport = free_port()
    with Proxy([mapping(lport, echo)], listen_host=LOOP4,
               status_address=(LOOP4, 0)) as proxy:
        host, port = proxy.status_address
        assert port != 0
        status, _, body = http((host, port), "GET", "/status")
        assert (status, body.strip()) == (200, b"OK")
        data = http_json((host, port), "/connections")
        assert data["connections"] == [spec(lport, LOOP4, echo.port)]
    assert Proxy([]).status_address is None


def test_proxy_with_resolver(dns_server, upstream_pair):
    a, _b = upstream_pair
    dns_server.set("svc.example.test", ["127.0.0.3"], ttl=30)
    lport = free_port()
    resolver = tcpproxy.Resolver([dns_server.nameserver], timeout=1.0)
    with Proxy([Mapping(lport, "svc.example.test", a.port)], listen_host=LOOP4,
               resolver=resolver, connect_timeout=2.0):
        assert banner_via((LOOP4, lport)) == b"B"
        assert dns_server.queries("svc.example.test") >= 1


def test_libc_io_is_optional(monkeypatch):
    """Small reads go through libc recv/send on Linux; libc_io=False or
    TCPPROXY_LIBC_IO=0 keeps to the socket methods (the forwarding tests
    run every case both ways)."""
    assert Proxy([], libc_io=False).libc is None
    if sys.platform.startswith("linux"):
        proxy = Proxy([])
        assert proxy.libc is not None
        buf, address = proxy.buffers.get()
        assert address.value and len(buf) == proxy.buffers.size
    monkeypatch.setenv("TCPPROXY_LIBC_IO", "0")
    assert Proxy([]).libc is None


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_library_leaves_cpu_binding_alone():
    """Only the command binds itself to a CPU (--cpus); a Proxy does not."""
    before = os.sched_getaffinity(0), os.sched_getscheduler(0)
    with Proxy([]) as proxy:
        assert proxy.status()["state"] == "running"
        assert (os.sched_getaffinity(0), os.sched_getscheduler(0)) == before
    assert tcpproxy.pin_cpus("all") is None
    assert (os.sched_getaffinity(0), os.sched_getscheduler(0)) == before


@pytest.mark.skipif(tcpproxy._LibcIO.load() is None, reason="libc I/O is Linux only")
def test_libc_io_moves_bytes_and_reports_errno():
    io = tcpproxy._LibcIO.load()
    pool = tcpproxy._BufferPool(4096, libc=io)
    buf, address = pool.get()
    a, b = socket.socketpair()
    with a, b:
        assert io.recv(a.fileno(), address, 4096, io.FLAGS_RECV) == -1
        assert io.get_errno() == errno.EAGAIN         # never blocks
        b.sendall(b"ping")
        assert io.recv(a.fileno(), address, 4096, io.FLAGS_RECV) == 4
        assert bytes(buf[:4]) == b"ping"
        assert io.send(a.fileno(), address, 4, io.FLAGS_SEND) == 4
        assert b.recv(16) == b"ping"
        assert io.send(-1, address, 4, io.FLAGS_SEND) == -1
        assert io.get_errno() == errno.EBADF
        b.close()
        assert io.send(a.fileno(), address, 4, io.FLAGS_SEND) == -1   # no SIGPIPE
        assert io.get_errno() == errno.EPIPE


def test_worker_pool_reserve_run_give_back_close():
    """Reserved workers run a task, go back parked, and end at close()."""
    pool = tcpproxy._WorkerPool(name="test-worker")
    ran = threading.Event()
    worker = pool.reserve()
    pool.run_on(worker, ran.set)
    assert ran.wait(5)
    assert wait_until(lambda: pool.idle() == 1, 5)
    again = pool.reserve()                    # the parked one is reused
    assert again is worker and pool.idle() == 0
    pool.give_back(again)
    assert pool.idle() == 1
    spare = pool.reserve()
    unused = pool.reserve()                   # a new thread, parked, never given a task
    pool.give_back(spare)
    assert pool.close(time.monotonic() + 5) == []
    assert not unused.is_alive() and not worker.is_alive()
    with pytest.raises(RuntimeError):
        pool.run_on(unused, ran.set)
    with pytest.raises(RuntimeError):
        pool.reserve()
