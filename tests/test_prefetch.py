"""Prefetch: a name in use is looked up again in the background in the last
part of its TTL, so that while the nameserver answers no connection after
the first waits for a lookup.

Unit tests drive the Resolver's clock; the proxy tests use the loopback DNS
server with a delay (tests/dnsserver.py) and time connect+echo round trips.
"""

import threading
import time

import pytest
from helpers import LOOP4, echo_once, free_port, http, spec, wait_until

import tcpproxy

NAME = "db.example.test"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def set(self, offset):
        with self.lock:
            self.now = 1000.0 + offset


def resolver(dns_server, clock, timeout=1.0, **kw):
    return tcpproxy.Resolver([dns_server.nameserver], timeout=timeout, clock=clock, **kw)


def settled(r, ok):
    """Wait until *r* has finished *ok* good lookups of NAME."""
    return wait_until(lambda: r.info(NAME)["lookups_ok"] >= ok, 5,
                      message=lambda: r.info(NAME))


@pytest.mark.parametrize("ttl, window", [(1, 0.5), (2, 1.0), (4, 1.0), (10, 1.0), (30, 3.0),
                                         (0, 0.0)])
def test_window(ttl, window):
    assert tcpproxy.prefetch_window(ttl) == pytest.approx(window)


def test_prefetch_in_the_last_part_of_the_ttl(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=10)
    clock = Clock()
    r = resolver(dns_server, clock)
    assert r.lookup(NAME) == ["127.0.0.2"]
    assert dns_server.queries(NAME, "A") == 1
    dns_server.set(NAME, ["127.0.0.3"], ttl=10)
    clock.set(8.9)                         # before the window (the last 1 s)
    assert r.lookup(NAME) == ["127.0.0.2"]
    assert dns_server.queries(NAME, "A") == 1
    clock.set(9.1)                         # in it: the cached answer, and a lookup
    assert r.lookup(NAME) == ["127.0.0.2"]
    assert dns_server.wait_queries(2, NAME, "A", timeout=5)
    settled(r, 2)
    assert r.lookup(NAME) == ["127.0.0.3"]
    info = r.info(NAME)
    assert info["prefetches"] == 1 and info["lookups_ok"] == 2
    assert info["expires_in"] == pytest.approx(10, abs=0.01)   # from the prefetch's start
    r.close()


def test_one_prefetch_at_a_time_and_only_for_a_name_in_use(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=10)
    dns_server.set("idle." + NAME, ["127.0.0.4"], ttl=10)
    dns_server.delay = 0.3
    clock = Clock()
    r = resolver(dns_server, clock)
    r.lookup(NAME)
    r.lookup("idle." + NAME)
    clock.set(9.5)
    t0 = time.monotonic()
    for _ in range(20):
        assert r.lookup(NAME) == ["127.0.0.2"]
    assert time.monotonic() - t0 < 0.3, "lookups in the window waited for DNS"
    settled(r, 2)
    assert r.info(NAME)["prefetches"] == 1
    assert dns_server.queries(NAME, "A") == 2
    assert dns_server.queries("idle." + NAME, "A") == 1      # not used: not prefetched
    assert r.info("idle." + NAME)["prefetches"] == 0
    r.close()


def test_answer_expiring_during_its_prefetch_is_served(dns_server):
    """A nameserver slower than the window: the answer expires while the
    prefetch is under way; callers get it rather than wait."""
    dns_server.set(NAME, ["127.0.0.2"], ttl=10)
    clock = Clock()
    r = resolver(dns_server, clock, timeout=2.0)
    r.lookup(NAME)
    dns_server.delay = 0.6
    clock.set(9.5)
    r.lookup(NAME)                         # starts the prefetch
    assert dns_server.wait_queries(2, NAME, "A", timeout=5)
    clock.set(10.5)                        # expired, prefetch still waiting
    t0 = time.monotonic()
    assert r.lookup(NAME) == ["127.0.0.2"]
    assert time.monotonic() - t0 < 0.3
    settled(r, 2)
    assert r.info(NAME)["prefetches"] == 1
    r.close()


def test_failing_prefetch_serves_the_answer_until_it_expires(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=10)
    clock = Clock()
    r = resolver(dns_server, clock)
    r.lookup(NAME)
    dns_server.mode = "servfail"
    clock.set(9.2)
    assert r.lookup(NAME) == ["127.0.0.2"]
    wait_until(lambda: r.info(NAME)["lookups_failed"] == 1, 5, message=lambda: r.info(NAME))
    info = r.info(NAME)
    assert info["stale"] is True and info["addresses"] == ["127.0.0.2"]
    q = dns_server.queries(NAME)
    clock.set(9.3)                         # within the backoff (0.5 s): no new lookup
    assert r.lookup(NAME) == ["127.0.0.2"]
    assert dns_server.queries(NAME) == q
    clock.set(11)                          # expired: the stale answer, a retry
    assert r.lookup(NAME) == ["127.0.0.2"]
    wait_until(lambda: r.info(NAME)["lookups_failed"] == 2, 5, message=lambda: r.info(NAME))
    dns_server.mode = "ok"
    dns_server.set(NAME, ["127.0.0.3"], ttl=10)
    clock.set(20)                          # after the backoff: recovered
    r.lookup(NAME)
    wait_until(lambda: r.lookup(NAME) == ["127.0.0.3"], 5, message=lambda: r.info(NAME))
    assert r.info(NAME)["stale"] is False
    r.close()


def test_ttl_zero_never_prefetches_unless_raised(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=0)
    clock = Clock()
    r = resolver(dns_server, clock)
    for i in range(3):
        r.lookup(NAME)
        assert dns_server.queries(NAME, "A") == i + 1      # a lookup per call, in the caller
    assert r.info(NAME)["prefetches"] == 0
    raised = resolver(dns_server, clock, min_ttl=4)         # --dns-min-ttl 4: window 1 s
    raised.lookup(NAME)
    clock.set(3.5)
    raised.lookup(NAME)
    assert dns_server.wait_queries(5, NAME, "A", timeout=5)
    wait_until(lambda: raised.info(NAME)["lookups_ok"] == 2, 5)
    assert raised.info(NAME)["prefetches"] == 1
    raised.close()


# -- through the proxy -------------------------------------------------------------

def timed_echo(addr):
    t0 = time.monotonic()
    assert echo_once(addr, b"ping", timeout=5) == b"ping"
    return time.monotonic() - t0


def test_connections_do_not_wait_for_the_lookup(start_proxy, dns_server, echo):
    """Nameserver delay 0.4 s per query (a lookup asks A and AAAA: 0.8 s),
    TTL 2 (a 1 s window): after the first, no connection waits."""
    dns_server.set(NAME, ["127.0.0.1"], ttl=2)
    dns_server.delay = 0.4
    lport = free_port()
    p = start_proxy(spec(lport, NAME, echo.port), extra=["--resolver", dns_server.nameserver])
    addr = (LOOP4, lport)
    first = timed_echo(addr)
    assert first >= 0.4, "the first connection did not wait for DNS? %.3f" % first
    q0 = dns_server.queries(NAME, "A")
    times = []
    # connections until the proxy has looked the name up three more times
    # (about 3 TTLs), paced on the DNS server's query counter
    deadline = time.monotonic() + 20
    while dns_server.queries(NAME, "A") < q0 + 3:
        assert time.monotonic() < deadline, "no lookups in the background"
        times.append(timed_echo(addr))
        dns_server.wait_queries(dns_server.queries(NAME, "A") + 1, NAME, "A", timeout=0.05)
    for _ in range(10):
        times.append(timed_echo(addr))
    slow = sorted(round(t, 3) for t in times if t > 0.2)
    assert not slow, "connections waited for DNS (delay 0.4 s): %s of %d" % (slow, len(times))
    metrics = http(p.status_address, path="/metrics")[2].decode()
    line = [m for m in metrics.splitlines() if m.startswith("tcpproxy_dns_prefetches_total{")]
    assert line and int(float(line[0].split()[-1])) >= 3, metrics


def test_ttl_zero_still_looks_up_per_connection(start_proxy, dns_server, echo):
    dns_server.set(NAME, ["127.0.0.1"], ttl=0)
    dns_server.delay = 0.1
    lport = free_port()
    start_proxy(spec(lport, NAME, echo.port), extra=["--resolver", dns_server.nameserver])
    for i in range(4):
        q = dns_server.queries(NAME, "A")
        assert timed_echo((LOOP4, lport)) >= 0.1       # waited for its own lookup
        assert dns_server.queries(NAME, "A") == q + 1
