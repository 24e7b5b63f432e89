"""Hardening (issue 4): access control (--allow, per-mapping allow,
--status-allow), connection limits, --idle-timeout, the status server's
bounds on request size and time, the SIGTERM drain, SIGHUP, and rate-limited
log lines.

Clients "outside the list" come from 127.0.0.2: a client socket bound to
127.0.0.2 before connect() reaches the proxy on 127.0.0.1 over loopback.
"""

import http.client as httplib
import json
import logging
import os
import re
import signal
import socket
import threading
import time

import pytest
from helpers import (
    LOOP4,
    closed_by_peer,
    connect,
    echo_once,
    free_port,
    http,
    mapping_stats,
    port_listening,
    recv_all,
    roundtrip,
    spec,
    wait_until,
)

import tcpproxy

OUTSIDER = "127.0.0.2"


# -- helpers -------------------------------------------------------------------

def connect_from(source, addr, timeout=5.0):
    """A client socket bound to ``source`` (an IP) and connected to ``addr``."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def refused_from(source, addr, timeout=3.0):
    """True when a client from ``source`` is closed (EOF or reset) without
    getting a byte through, within ``timeout``."""
    try:
        s = connect_from(source, addr, timeout)
    except ConnectionError:
        return True
    with s:
        try:
            s.sendall(b"knock")
        except OSError:
            return True
        s.settimeout(timeout)
        try:
            return s.recv(100) == b""
        except socket.timeout:
            return False
        except OSError:
            return True


def echo_from(source, addr, payload=b"hello", timeout=5.0):
    with connect_from(source, addr, timeout) as s:
        return roundtrip(s, payload, timeout)


def http_from(source, addr, path="/status", timeout=5.0):
    """(status, body) of GET ``path`` from ``source``; raises OSError or
    http.client.HTTPException when the server closes without answering."""
    conn = httplib.HTTPConnection(addr[0], addr[1], timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def status_code(addr, timeout=2.0):
    """(status, body) of GET /status, or None when it cannot be had."""
    try:
        st, _, body = http(addr, "GET", "/status", timeout=timeout)
    except (OSError, httplib.HTTPException):
        return None
    return st, body


def write_config(path, text):
    """Replace ``path`` atomically (write, then rename), as an operator should."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def file_proxy(proxy_cli, tmp_path):
    """Factory: run ``--backend file`` on a YAML text; waits for ``ports``."""

    def start(text, ports, extra=()):
        cfg = tmp_path / "mappings.yaml"
        write_config(cfg, text)
        status = (LOOP4, free_port())
        p = proxy_cli(["--backend", "file", "--config", str(cfg), "--listen-address", LOOP4,
                       "--status", "%s:%d" % status] + list(extra), ports=ports, status=status)
        p.status_address = status
        p.config = cfg
        return p

    return start


class Pinger:
    """A thread that round-trips a small message on ``sock`` every ``every``
    seconds until stop() (or until ``until()`` is true), recording errors."""

    def __init__(self, sock, every=0.05, size=512, until=None):
        self.sock = sock
        self.every = every
        self.size = size
        self.until = until
        self.count = 0
        self.error = None
        self.closed = False           # the other side ended the connection
        self.eof = None
        self._stop = threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pinger")

    def _run(self):
        try:
            while not self._stop.is_set() and not (self.until and self.until()):
                payload = (b"%08d" % self.count) * (self.size // 8)
                got = roundtrip(self.sock, payload, timeout=5)
                if len(got) < len(payload) and payload.startswith(got):
                    self.closed = True          # EOF: closed by the other side
                    return
                if got != payload:
                    self.error = "echo mismatch after %d round trips: %r" % (self.count, got[:16])
                    return
                self.count += 1
                self.started.set()
                self._stop.wait(self.every)
            if self.until is not None:
                # the transfer is done: half-close and wait for the echo's EOF
                self.sock.shutdown(socket.SHUT_WR)
                self.eof = recv_all(self.sock, 5) == b""
        except (ConnectionError, socket.timeout) as exc:
            self.closed = True
            self.error = exc if isinstance(exc, socket.timeout) else None
        except OSError as exc:
            self.error = exc
        finally:
            self.started.set()

    def start(self):
        self.thread.start()
        assert self.started.wait(5), "pinger did not start"
        return self

    def stop(self, timeout=10.0):
        self._stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "pinger did not stop"


# -- access control ------------------------------------------------------------

def test_allow_ipv4_refuses_outsiders_before_any_upstream_connection(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--allow", "127.0.0.1/32"])
    addr = (LOOP4, lport)
    assert echo_from(LOOP4, addr, b"inside") == b"inside"
    assert echo.wait_accepted(1)
    for _ in range(5):
        assert refused_from(OUTSIDER, addr), "a client from %s got through" % OUTSIDER
    wait_until(lambda: mapping_stats(p.status_address, lport)["refused"] == 5, 5,
               message=lambda: mapping_stats(p.status_address, lport))
    # refusals are counted before an upstream connection would be made: none was
    assert echo.accepted == 1
    assert echo_from(LOOP4, addr, b"still") == b"still"
    assert echo.accepted == 2
    stats = mapping_stats(p.status_address, lport)
    assert (stats["refused"], stats["total"], stats["failed"]) == (5, 2, 0), stats
    # logged, rate-limited: five refusals in a row make one line
    lines = [ln for ln in p.stderr().splitlines() if "not in the allow list" in ln]
    assert len(lines) == 1, p.stderr()
    assert OUTSIDER in lines[0] and str(lport) in lines[0]
    assert "Traceback" not in p.stderr()


def test_allow_list_of_several_networks(start_proxy, echo):
    """--allow is repeatable and takes comma separated lists."""
    lport = free_port()
    start_proxy(spec(lport, LOOP4, echo.port),
                extra=["--allow", "10.0.0.0/8,127.0.0.3/32", "--allow", "127.0.0.2/31"])
    addr = (LOOP4, lport)
    assert echo_from("127.0.0.2", addr, b"two") == b"two"        # 127.0.0.2/31
    assert echo_from("127.0.0.3", addr, b"three") == b"three"    # 127.0.0.3/32
    assert refused_from(LOOP4, addr)
    assert refused_from("127.0.0.4", addr)
    assert echo.accepted == 2


@pytest.mark.parametrize("allow, allowed", [
    pytest.param(["::1/128"], True, id="host"),
    pytest.param(["::/127"], True, id="network"),
    pytest.param(["fd00::/8"], False, id="other-network"),
    pytest.param(["127.0.0.0/8"], False, id="ipv4-only"),      # does not admit ::1
    pytest.param(["fd00::/8", "::1"], True, id="second-entry"),
])
def test_allow_ipv6(proxy_cli, make_echo, allow, allowed):
    """IPv6 CIDRs on a proxy listening on ::1 (loopback only)."""
    e6 = make_echo(host="::1")
    lport = free_port("::1")
    args = ["--listen-address", "::1", "--connections", spec(lport, "::1", e6.port),
            "--status", "off"]
    for cidr in allow:
        args += ["--allow", cidr]
    p = proxy_cli(args, ports=[lport])
    addr = ("::1", lport)
    if allowed:
        assert echo_from("::1", addr, b"six") == b"six"
        assert e6.accepted == 1
    else:
        assert refused_from("::1", addr)
        assert e6.accepted == 0
        wait_until(lambda: "not in the allow list" in p.stderr(), 5, message=p.stderr)


def test_ipv4_mapped_client_matches_an_ipv4_network():
    """A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; an IPv4
    network must still match them (library check: no wildcard listener)."""
    assert tcpproxy._allowed("::ffff:127.0.0.2", tcpproxy.parse_allow(["127.0.0.2/32"]))
    assert not tcpproxy._allowed("::ffff:127.0.0.1", tcpproxy.parse_allow(["127.0.0.2/32"]))
    assert not tcpproxy._allowed("::1", tcpproxy.parse_allow(["127.0.0.0/8"]))
    assert tcpproxy._allowed("::1", tcpproxy.parse_allow(["::1/128"]))


def test_per_mapping_allow_from_the_yaml_file(file_proxy, make_echo):
    ea, eb = make_echo(), make_echo()
    pa, pb = free_port(), free_port()
    p = file_proxy("""
mappings:
  - listen: %d
    target: %s:%d
    allow: [%s/32, "fd00::/8"]
  - listen: %d
    target: %s:%d
""" % (pa, LOOP4, ea.port, OUTSIDER, pb, LOOP4, eb.port), ports=[pa, pb])
    assert refused_from(LOOP4, (LOOP4, pa))
    assert echo_from(OUTSIDER, (LOOP4, pa), b"a") == b"a"
    assert echo_from(LOOP4, (LOOP4, pb), b"b") == b"b"           # no list: anyone
    assert echo_from(OUTSIDER, (LOOP4, pb), b"b2") == b"b2"
    assert ea.accepted == 1 and eb.accepted == 2
    sa, sb = mapping_stats(p.status_address, pa), mapping_stats(p.status_address, pb)
    assert sa["refused"] == 1 and sb["refused"] == 0, (sa, sb)
    assert sa["allow"] == ["127.0.0.2/32", "fd00::/8"], sa


def test_global_and_per_mapping_allow_both_apply(file_proxy, echo):
    """A client must be in --allow and in the mapping's list."""
    lport = free_port()
    file_proxy("mappings:\n  - {listen: %d, target: '%s:%d', allow: '127.0.0.0/30'}\n"
               % (lport, LOOP4, echo.port), ports=[lport],
               extra=["--allow", "127.0.0.2/31"])
    addr = (LOOP4, lport)
    assert echo_from("127.0.0.2", addr) == b"hello"       # in both
    assert echo_from("127.0.0.3", addr) == b"hello"       # in both
    assert refused_from("127.0.0.1", addr)                # mapping yes, global no
    assert refused_from("127.0.0.4", addr)                # global no, mapping no
    assert echo.accepted == 2


def test_status_allow(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--status-allow", "127.0.0.2/32"])
    st = p.status_address
    assert http_from(OUTSIDER, st, "/status") == (200, b"OK")
    code, body = http_from(OUTSIDER, st, "/connections")
    assert code == 200 and json.loads(body)["connections"]
    # loopback may always read /status (health checks on the box), not
    # /connections (client and upstream addresses)
    assert http_from(LOOP4, st, "/status") == (200, b"OK")
    assert http_from(LOOP4, st, "/connections")[0] == 403
    for path in ("/status", "/connections"):       # anyone else: refused outright
        with pytest.raises((OSError, httplib.HTTPException)):
            http_from("127.0.0.3", st, path)
    # the proxy itself is not guarded by --status-allow
    assert echo_once((LOOP4, lport)) == b"hello"
    wait_until(lambda: "not in --status-allow" in p.stderr(), 5, message=p.stderr)
    lines = [ln for ln in p.stderr().splitlines() if "not in --status-allow" in ln]
    assert len(lines) == 1, "not rate-limited:\n" + p.stderr()


# -- connection limits -----------------------------------------------------------

def test_max_connections_global(start_proxy, make_echo):
    ea, eb = make_echo(), make_echo()
    pa, pb = free_port(), free_port()
    p = start_proxy(spec(pa, LOOP4, ea.port), spec(pb, LOOP4, eb.port),
                    extra=["--max-connections", "3"])
    held = [connect((LOOP4, pa)), connect((LOOP4, pa)), connect((LOOP4, pb))]
    try:
        for i, c in enumerate(held):
            assert roundtrip(c, b"held%d" % i) == b"held%d" % i
        # past the limit: closed at once, on either mapping
        for port in (pa, pb, pa):
            t0 = time.monotonic()
            assert refused_from(LOOP4, (LOOP4, port))
            assert time.monotonic() - t0 < 2
        # established ones are unaffected
        for i, c in enumerate(held):
            assert roundtrip(c, b"again%d" % i) == b"again%d" % i
        sa, sb = mapping_stats(p.status_address, pa), mapping_stats(p.status_address, pb)
        assert (sa["refused"], sb["refused"]) == (2, 1), (sa, sb)
        assert (sa["active"], sb["active"]) == (2, 1), (sa, sb)
        assert (ea.accepted, eb.accepted) == (2, 1)       # refused ones never went upstream
        # one closes: a new client gets its place
        held.pop(0).close()
        assert wait_until(lambda: mapping_stats(p.status_address, pa)["active"] == 1, 5)
        with connect((LOOP4, pb)) as c:
            assert roundtrip(c, b"new") == b"new"
        wait_until(lambda: "connection limit reached" in p.stderr(), 5, message=p.stderr)
    finally:
        for c in held:
            c.close()


def test_max_connections_per_mapping_from_the_yaml_file(file_proxy, make_echo):
    ea, eb = make_echo(), make_echo()
    pa, pb = free_port(), free_port()
    p = file_proxy("""
mappings:
  - {listen: %d, target: "%s:%d", max_connections: 2}
  - {listen: %d, target: "%s:%d"}
""" % (pa, LOOP4, ea.port, pb, LOOP4, eb.port), ports=[pa, pb])
    held = []
    try:
        for i in range(2):
            held.append(connect((LOOP4, pa)))
            assert roundtrip(held[-1], b"a%d" % i) == b"a%d" % i
        assert refused_from(LOOP4, (LOOP4, pa))
        # the other mapping has no limit
        for i in range(6):
            held.append(connect((LOOP4, pb)))
            assert roundtrip(held[-1], b"b%d" % i) == b"b%d" % i
        for c in held:
            assert roundtrip(c, b"ok") == b"ok"
        sa = mapping_stats(p.status_address, pa)
        assert (sa["refused"], sa["active"], sa["max_connections"]) == (1, 2, 2), sa
        assert ea.accepted == 2
        held.pop(0).close()
        assert wait_until(lambda: mapping_stats(p.status_address, pa)["active"] == 1, 5)
        assert echo_once((LOOP4, pa), b"room again") == b"room again"
    finally:
        for c in held:
            c.close()


# -- idle timeout -----------------------------------------------------------------

def test_idle_timeout_closes_silent_but_not_busy_connections(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--idle-timeout", "1"])
    silent = connect((LOOP4, lport))
    busy = connect((LOOP4, lport))
    pinger = None
    try:
        assert roundtrip(silent, b"s") == b"s"
        last = time.monotonic()
        pinger = Pinger(busy, every=0.2).start()
        assert closed_by_peer(silent, 4), "silent connection not closed by --idle-timeout 1"
        waited = time.monotonic() - last
        assert 0.8 < waited < 3.5, waited
        wait_until(lambda: echo.active == 1, 5, message="upstream side of the idle one kept")
        # the busy one outlives three idle periods
        assert wait_until(lambda: time.monotonic() - last > 3.5 or pinger.error, 6)
        assert pinger.error is None and not pinger.closed, pinger.error
        pinger.stop()
        assert roundtrip(busy, b"alive") == b"alive"
        assert mapping_stats(p.status_address, lport)["active"] == 1
    finally:
        if pinger is not None:
            pinger.stop()
        silent.close()
        busy.close()


# -- the status server's bounds ----------------------------------------------------

def test_slow_loris_is_cut_off_and_status_keeps_answering(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    st = p.status_address
    loris = socket.create_connection(st, timeout=10)
    t0 = time.monotonic()
    cut = threading.Event()
    answers = []

    def trickle():
        # a byte of header every 0.2 s: each read is quick, the request never ends
        try:
            loris.sendall(b"GET /status HTTP/1.0\r\n")
            n = 0
            while not cut.wait(0.2):
                loris.sendall(b"X-%d: y\r\n" % n)
                n += 1
        except OSError:
            pass
        finally:
            cut.set()

    sender = threading.Thread(target=trickle, name="loris")
    sender.start()
    try:
        closed = None
        while time.monotonic() - t0 < 9:
            answers.append(status_code(st, timeout=3))
            assert echo_once((LOOP4, lport), b"fwd", timeout=3) == b"fwd"
            if closed is None and closed_by_peer(loris, 0.3):
                closed = time.monotonic() - t0
                break
        assert closed is not None, "slow-loris client held for more than 9 s"
        assert 4.0 <= closed <= 7.0, "cut off after %.1f s (deadline is 5 s)" % closed
        assert answers and all(a is not None and a[0] == 200 for a in answers), answers
    finally:
        cut.set()
        sender.join(5)
        loris.close()
    assert not sender.is_alive()
    assert "Traceback" not in p.stderr()


GARBAGE = [
    pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)),
                 id="tls-hello"),
    pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh-banner"),
    pytest.param(b"\x00\xff\xfe\xfd garbage\r\n\r\n", id="binary"),
    pytest.param(b"GET /status HTTP/1.0 and more words\r\n\r\n", id="too-many-words"),
    pytest.param(b"GET /status HTTZ/1.0\r\n\r\n", id="bad-version"),
    pytest.param(b"PING\r\n\r\n", id="one-word"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_request_gets_400(start_proxy, echo, garbage):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--debug", "1"])
    with socket.create_connection(p.status_address, timeout=5) as s:
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        answer = recv_all(s, 6)
    assert time.monotonic() - t0 < 2, "answered only after the request deadline"
    assert re.match(rb"^HTTP/1\.[01] 400 ", answer), (
        "no HTTP 400 status line for %r; got %r" % (garbage, answer[:120]))
    assert status_code(p.status_address) == (200, b"OK")
    assert "Traceback" not in p.stderr()


def test_oversized_requests_are_refused(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    st = p.status_address
    cases = [
        (b"GET /" + b"a" * 70000 + b" HTTP/1.0\r\n\r\n", 414),               # request line
        (b"GET /status HTTP/1.0\r\nX: " + b"b" * 70000 + b"\r\n\r\n", 431),  # header line
        (b"GET /status HTTP/1.0\r\n" + b"X: y\r\n" * 150 + b"\r\n", 431),    # header count
    ]
    for request, code in cases:
        with socket.create_connection(st, timeout=5) as s:
            try:
                s.sendall(request)
                answer = recv_all(s, 6)
            except ConnectionResetError:
                answer = b""     # refused before reading it all: closed is fine too
        if answer:
            assert answer.startswith(b"HTTP/1.0 %d " % code), answer[:100]
        assert status_code(st) == (200, b"OK")
    assert "Traceback" not in p.stderr()


def test_forty_slow_clients_do_not_stop_status(start_proxy, echo):
    """40 slow clients (from 127.0.0.2) at once: at most 32 are held (the rest
    are closed at once); a well-behaved client gets /status as soon as the
    held ones reach their 5 s deadline, and forwarding is never stalled."""
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port))
    st = p.status_address
    slow = []
    try:
        t0 = time.monotonic()
        for _ in range(40):
            s = connect_from(OUTSIDER, st, timeout=10)
            s.sendall(b"GET /status HTTP/1.0\r\nX-Slow: ")
            slow.append(s)
        # the ones over the limit are closed at once
        closed = set()

        def refused_count():
            closed.update(i for i, s in enumerate(slow)
                          if i not in closed and closed_by_peer(s, 0.01))
            return len(closed)

        wait_until(lambda: refused_count() >= 8, 3,
                   message=lambda: "only %d of 40 slow clients were refused at once" % len(closed))
        assert time.monotonic() - t0 < 4.0
        first_ok = None
        while time.monotonic() - t0 < 9:
            assert echo_once((LOOP4, lport), b"fwd", timeout=2) == b"fwd"
            got = status_code(st, timeout=2)
            if got == (200, b"OK"):
                first_ok = time.monotonic() - t0
                break
        assert first_ok is not None, "/status not answered within 9 s of 40 slow clients"
        assert first_ok < 7.0, "/status answered only after %.1f s" % first_ok
        # every slow client is gone by its deadline
        for s in slow:
            assert closed_by_peer(s, max(0.1, 7.5 - (time.monotonic() - t0))), (
                "a slow client was held past the request deadline")
        for _ in range(5):
            assert status_code(st) == (200, b"OK")
    finally:
        for s in slow:
            s.close()
    assert "Traceback" not in p.stderr()


# -- SIGTERM drain, second signal, SIGHUP ------------------------------------------

def wait_draining(p, timeout=5.0):
    """The first /status answer seen while draining: (code, body)."""
    def draining():
        got = status_code(p.status_address, timeout=1)
        return got if got is not None and got[0] == 503 else None
    return wait_until(draining, timeout, message=lambda: "no 503 while draining:\n" + p.stderr())


def test_sigterm_drains_busy_connections_and_closes_idle_ones(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--drain-timeout", "8", "--debug", "1"])
    idle = connect((LOOP4, lport))
    busy = connect((LOOP4, lport))
    finish_at = []
    pinger = Pinger(busy, every=0.02,
                    until=lambda: bool(finish_at) and time.monotonic() >= finish_at[0])
    try:
        assert roundtrip(idle, b"idle") == b"idle"
        pinger.start()
        t0 = time.monotonic()
        finish_at.append(t0 + 2.5)          # the busy client finishes 2.5 s into the drain
        p.send_signal(signal.SIGTERM)
        got = wait_draining(p)
        assert b"draining" in got[1], got
        assert closed_by_peer(idle, 3), "idle connection kept during the drain"
        assert time.monotonic() - t0 < 3.0
        with pytest.raises(OSError):        # listeners closed at once
            connect((LOOP4, lport), timeout=2).close()
        pinger.thread.join(10)
        assert not pinger.thread.is_alive()
        assert pinger.error is None and not pinger.closed, pinger.error
        assert pinger.eof, "the busy connection did not end with EOF"
        assert pinger.count > 20
        assert p.wait(timeout=8) == 0, p.output()
        elapsed = time.monotonic() - t0
        assert elapsed < 6.0, "exit %.1f s after SIGTERM: waited for more than the busy one" % (
            elapsed)
    finally:
        pinger.stop()
        idle.close()
        busy.close()
    err = p.stderr()
    assert "draining" in err and "drain timeout" not in err, err
    assert "Traceback" not in err


def test_drain_timeout_closes_what_is_still_busy(start_proxy, echo):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--drain-timeout", "2"])
    busy = connect((LOOP4, lport))
    pinger = Pinger(busy, every=0.02).start()
    try:
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        wait_draining(p)
        pinger.thread.join(6)
        assert not pinger.thread.is_alive(), "busy connection not closed at --drain-timeout"
        closed = time.monotonic() - t0
        assert pinger.closed and pinger.error is None, pinger.error
        assert 1.5 < closed < 4.5, closed
        assert p.wait(timeout=5) == 0, p.output()
    finally:
        pinger.stop()
        busy.close()
    assert "drain timeout" in p.stderr(), p.stderr()
    assert "Traceback" not in p.stderr()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_closes_at_once(start_proxy, echo, second):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--drain-timeout", "30"])
    busy = connect((LOOP4, lport))
    pinger = Pinger(busy, every=0.02).start()
    try:
        p.send_signal(signal.SIGTERM)
        wait_draining(p)
        assert p.alive() and pinger.error is None
        t1 = time.monotonic()
        p.send_signal(second)
        assert p.wait(timeout=5) == 0, p.output()
        assert time.monotonic() - t1 < 3.0
        pinger.thread.join(5)
        assert not pinger.thread.is_alive(), "busy connection survived the second signal"
        assert pinger.closed, pinger.error
    finally:
        pinger.stop()
        busy.close()
    assert echo.wait_idle(5)
    assert "Traceback" not in p.stderr()


def test_sighup_rereads_the_file_without_dropping_connections(file_proxy, make_echo):
    ea, eb = make_echo(), make_echo()
    pa, pb = free_port(), free_port()
    p = file_proxy("mappings:\n  - %s\n" % spec(pa, LOOP4, ea.port), ports=[pa],
                   extra=["--debug", "1"])
    marker = "read %s" % p.config
    wait_until(lambda: marker in p.stderr(), 5, message=p.stderr)
    reads = p.stderr().count(marker)
    kept = connect((LOOP4, pa))
    try:
        assert roundtrip(kept, b"before") == b"before"
        # an unchanged file: SIGHUP re-reads it all the same, nothing moves
        p.send_signal(signal.SIGHUP)
        wait_until(lambda: p.stderr().count(marker) > reads, 5,
                   message=lambda: "SIGHUP did not re-read the file:\n" + p.stderr())
        assert "SIGHUP" in p.stderr()
        assert roundtrip(kept, b"after hup") == b"after hup"
        # a changed file: the new mapping starts, the old connection stays
        write_config(p.config, "mappings:\n  - %s\n  - %s\n"
                     % (spec(pa, LOOP4, ea.port), spec(pb, LOOP4, eb.port)))
        p.send_signal(signal.SIGHUP)
        wait_until(lambda: port_listening(pb), 5, message=p.stderr)
        assert echo_once((LOOP4, pb), b"b") == b"b"
        assert roundtrip(kept, b"still") == b"still"
        assert ea.accepted == 1, "the unchanged mapping's connection was re-made"
        stats = mapping_stats(p.status_address, pa)
        assert (stats["total"], stats["active"]) == (1, 1), stats
    finally:
        kept.close()
    assert p.alive()
    assert "Traceback" not in p.stderr()


# -- rate-limited log lines --------------------------------------------------------

def test_repeated_log_lines_are_rate_limited_with_a_count(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="tcpproxy")
    dead = free_port()                              # nothing listens there
    mapping = tcpproxy.Mapping(free_port(), LOOP4, dead)
    with tcpproxy.Proxy([mapping], listen_host=LOOP4, connect_timeout=2) as proxy:
        addr = (LOOP4, mapping.listen_port)
        for _ in range(25):
            assert refused_from(LOOP4, addr)
        assert wait_until(lambda: proxy.status()["mappings"][0]["failed"] == 25, 5)
        lines = [r.getMessage() for r in caplog.records if "no upstream for" in r.getMessage()]
        assert len(lines) == 1, lines
        assert "suppressed" not in lines[0]
        # the next one after the interval says how many were left out
        monkeypatch.setattr(tcpproxy._ratelimited, "interval", 0.0)
        assert refused_from(LOOP4, addr)
        assert wait_until(lambda: len([r for r in caplog.records
                                       if "no upstream for" in r.getMessage()]) == 2, 5)
        last = [r.getMessage() for r in caplog.records if "no upstream for" in r.getMessage()][-1]
        assert "(24 similar messages suppressed)" in last, last


def test_rate_limiter_counts_per_key():
    limiter = tcpproxy._RateLimiter(interval=3600)
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.DEBUG)
    logger = logging.getLogger("tcpproxy")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        for i in range(10):
            limiter.log(logging.WARNING, "a", "same %s", "a")
            limiter.log(logging.WARNING, "b", "same %s", "b")
        assert records == ["same a", "same b"]
        limiter.interval = 0.0
        limiter.log(logging.WARNING, "a", "same %s", "a")
        assert records[-1] == "same a (9 similar messages suppressed)"
        limiter.log(logging.WARNING, "a", "same %s", "a")
        assert records[-1] == "same a"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
