"""DNS that obeys TTLs, against the loopback DNS server whose answers the
tests change while the proxy runs.

First ``tcpproxy.Resolver`` on its own, then the proxy CLI (``--resolver
127.0.0.1:PORT``).  Waiting for a TTL to run out is waiting on the DNS
server's query counter (``wait_queries``) with a timeout, between
connection attempts; no sleeps.
"""

import time

import dns.rdatatype as dns_rdatatype
import pytest
from dnsserver import DNSServer
from helpers import (
    LOOP4,
    Blackhole,
    banner_via,
    closed_by_peer,
    closed_promptly,
    connect,
    echo_once,
    free_port,
    http_json,
    lookups_at_once,
    recv_exact,
    roundtrip,
    spec,
    wait_until,
    walk,
)

import tcpproxy

NAME = "db.example.test"
SLACK = 0.75   # scheduling allowance on top of "TTL + 1 s"


def resolver(dns_server, timeout=1.0):
    return tcpproxy.Resolver([dns_server.nameserver], timeout=timeout)


def until_requeried(dns_server, name, action, timeout):
    """Call ``action()`` repeatedly, waiting up to 0.1 s on the DNS server's
    query counter between calls, until the server gets a new query for
    ``name``.  Returns the results of ``action`` in order."""
    q0 = dns_server.queries(name)
    results = []
    deadline = time.monotonic() + timeout
    while dns_server.queries(name) == q0:
        assert time.monotonic() < deadline, "no new query for %s within %ss" % (name, timeout)
        results.append(action())
        dns_server.wait_queries(q0 + 1, name, timeout=0.1)
    return results


def until_answered(dns_server, name, addresses, action, timeout):
    """Call ``action()`` repeatedly (waiting on the query counter between
    calls) until the DNS server has answered an A query for ``name`` with
    exactly ``addresses`` since this call."""
    start = len(dns_server.history(name))
    want = set(addresses)
    deadline = time.monotonic() + timeout
    while not any(q.rdtype == dns_rdatatype.A and set(q.addresses) == want
                  for q in dns_server.history(name)[start:]):
        assert time.monotonic() < deadline, "%s not re-queried within %ss" % (name, timeout)
        action()
        dns_server.wait_queries(dns_server.queries(name) + 1, name, timeout=0.1)


# -- Resolver ----------------------------------------------------------------

def test_lookup_and_info(dns_server):
    dns_server.set(NAME, ["127.0.0.2", "127.0.0.3"], ttl=30)
    r = resolver(dns_server)
    assert sorted(r.lookup(NAME)) == ["127.0.0.2", "127.0.0.3"]
    info = r.info(NAME)
    assert sorted(info["addresses"]) == ["127.0.0.2", "127.0.0.3"]
    assert 25 < info["expires_in"] <= 30
    assert info["stale"] is False and info["error"] is None


def test_ipv6_answer(dns_server):
    dns_server.set("v6." + NAME, ["::1"], ttl=30)
    assert resolver(dns_server).lookup("v6." + NAME) == ["::1"]


def test_ip_literals_need_no_lookup(dns_server):
    dns_server.mode = "refused"
    r = resolver(dns_server)
    assert r.lookup("127.0.0.9") == ["127.0.0.9"]
    assert r.lookup("::1") == ["::1"]
    assert dns_server.queries() == 0


def test_nameserver_ipv6_with_port():
    with DNSServer(host="::1") as v6:
        v6.set(NAME, ["127.0.0.4"], ttl=30)
        r = tcpproxy.Resolver(["[::1]:%d" % v6.port], timeout=1.0)
        assert r.lookup(NAME) == ["127.0.0.4"]


def test_cached_until_ttl_then_requeried(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=1)
    r = resolver(dns_server)
    assert r.lookup(NAME) == ["127.0.0.2"]
    q = dns_server.queries(NAME)
    dns_server.set(NAME, ["127.0.0.3"], ttl=1)
    assert r.lookup(NAME) == ["127.0.0.2"]           # still within its TTL
    assert dns_server.queries(NAME) == q               # served from cache
    seen = until_requeried(dns_server, NAME, lambda: r.lookup(NAME), timeout=1 + 1 + SLACK)
    # every lookup but the one that sent the new query got the cached answer
    assert all(s == ["127.0.0.2"] for s in seen[:-1])
    assert wait_until(lambda: r.lookup(NAME) == ["127.0.0.3"], 2)


def test_cname_chain_uses_smallest_ttl(dns_server):
    dns_server.set("target." + NAME, ["127.0.0.2"], ttl=300)
    dns_server.set(NAME, cname="target." + NAME, ttl=1)
    r = resolver(dns_server)
    assert r.lookup(NAME) == ["127.0.0.2"]
    assert r.info(NAME)["expires_in"] <= 1
    dns_server.set("target." + NAME, ["127.0.0.3"], ttl=300)
    until_requeried(dns_server, NAME, lambda: r.lookup(NAME), timeout=1 + 1 + SLACK)
    assert wait_until(lambda: r.lookup(NAME) == ["127.0.0.3"], 2)


def test_ttl_zero_looks_up_every_time(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=0)
    r = resolver(dns_server)
    for i in range(5):
        q = dns_server.queries(NAME, "A")
        addr = "127.0.0.%d" % (10 + i)
        dns_server.set(NAME, [addr], ttl=0)
        assert r.lookup(NAME) == [addr]
        assert dns_server.queries(NAME, "A") == q + 1


def test_unknown_name_raises_resolve_error(dns_server):
    r = resolver(dns_server)
    t0 = time.monotonic()
    with pytest.raises(tcpproxy.ResolveError) as exc:
        r.lookup("nowhere.example.test")
    assert "nowhere.example.test" in str(exc.value)
    assert time.monotonic() - t0 < 3
    assert isinstance(exc.value, tcpproxy.ProxyError)
    assert r.info("nowhere.example.test")["error"]


@pytest.mark.parametrize("mode", ["servfail", "refused", "nxdomain", "timeout"])
def test_serves_stale_on_failure(dns_server, mode):
    dns_server.set(NAME, ["127.0.0.2"], ttl=1)
    r = resolver(dns_server, timeout=0.5)
    assert r.lookup(NAME) == ["127.0.0.2"]
    dns_server.mode = mode
    # the first lookup in the last part of the TTL starts one in the background
    # (a prefetch) that meets the outage; every lookup gets the old answer
    seen = until_requeried(dns_server, NAME, lambda: r.lookup(NAME), timeout=1 + 1 + SLACK)
    assert all(s == ["127.0.0.2"] for s in seen)
    wait_until(lambda: r.info(NAME)["stale"], 2, message=lambda: r.info(NAME))
    wait_until(lambda: r.expires_in(NAME) <= 0, 2)
    # once the answer has expired, the following lookups are quick, stale, and
    # do not each send a query (retries back off)
    assert r.lookup(NAME) == ["127.0.0.2"]
    q = dns_server.queries(NAME)
    t0 = time.monotonic()
    for _ in range(20):
        assert r.lookup(NAME) == ["127.0.0.2"]
    assert time.monotonic() - t0 < 0.5 + 0.6, "stale lookups wait for the DNS server"
    assert dns_server.queries(NAME) - q <= 4, "no back-off: a query per lookup"
    info = r.info(NAME)
    assert info["stale"] is True
    assert info["error"]
    assert info["addresses"] == ["127.0.0.2"]
    # the server comes back with a new answer: picked up after the back-off
    dns_server.set(NAME, ["127.0.0.3"], ttl=30)
    dns_server.mode = "ok"
    wait_until(lambda: r.lookup(NAME) == ["127.0.0.3"], 20, interval=0.1,
               message=lambda: r.info(NAME))
    assert r.info(NAME)["stale"] is False


def test_concurrent_lookups_share_one_query(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=30)
    dns_server.delay = 0.3
    r = resolver(dns_server, timeout=2.0)
    assert lookups_at_once(r, NAME, 16) == ([["127.0.0.2"]] * 16, [])
    assert dns_server.queries(NAME, "A") == 1


# -- through the proxy ---------------------------------------------------------

def dns_proxy(start_proxy, dns_server, target_port, *extra, status=True):
    lport = free_port()
    p = start_proxy(spec(lport, NAME, target_port),
                    extra=["--resolver", dns_server.nameserver] + list(extra), status=status)
    p.addr = (LOOP4, lport)
    return p


def test_ttl_expiry_picked_up(start_proxy, dns_server, upstream_pair):
    a, _b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2"], ttl=1)
    p = dns_proxy(start_proxy, dns_server, a.port)
    assert banner_via(p.addr) == b"A"
    dns_server.set(NAME, ["127.0.0.3"], ttl=1)
    deadline = time.monotonic() + 1 + 1 + SLACK + 2
    while True:
        t = time.monotonic()
        got = banner_via(p.addr)
        if got == b"B":
            break
        assert got == b"A", got
        old = [q.monotonic for q in dns_server.history(NAME) if "127.0.0.2" in q.addresses]
        assert t <= old[-1] + 1 + 1 + SLACK, (
            "connection used an answer %.2fs old (TTL 1 s)" % (t - old[-1]))
        assert t < deadline, "new address never used"
        dns_server.wait_queries(dns_server.queries(NAME) + 1, NAME, timeout=0.1)
    for _ in range(3):
        assert banner_via(p.addr) == b"B"


def test_ttl_zero_fresh_lookup_per_connection(start_proxy, dns_server, upstream_pair):
    a, _b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2"], ttl=0)
    p = dns_proxy(start_proxy, dns_server, a.port)
    for i in range(6):
        addr, banner = (("127.0.0.2", b"A"), ("127.0.0.3", b"B"))[i % 2]
        dns_server.set(NAME, [addr], ttl=0)
        q = dns_server.queries(NAME, "A")
        assert banner_via(p.addr) == banner
        assert dns_server.queries(NAME, "A") > q


def test_serve_stale_during_outage(start_proxy, dns_server, upstream_pair):
    a, _b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2"], ttl=1)
    p = dns_proxy(start_proxy, dns_server, a.port)
    assert banner_via(p.addr) == b"A"
    dns_server.mode = "timeout"
    # connections until the proxy asks again (the answer expired)
    seen = until_requeried(dns_server, NAME, lambda: banner_via(p.addr, timeout=15),
                           timeout=1 + 1 + SLACK)
    assert set(seen) == {b"A"}, seen
    # the outage goes on for 3 s (past several retry back-offs): new
    # connections keep working on the old address and none waits for DNS
    times = []
    q_outage = dns_server.queries(NAME)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        t0 = time.monotonic()
        assert banner_via(p.addr, timeout=15) == b"A"
        times.append(time.monotonic() - t0)
        dns_server.wait_queries(dns_server.queries(NAME) + 1, NAME, timeout=0.2)
    slow = [round(t, 2) for t in times if t > 0.5]
    assert not slow, "connections waited for DNS during the outage: %s" % slow
    assert dns_server.queries(NAME) > q_outage, "lookups not retried during the outage"
    # /status reports the answer as stale
    data = http_json(p.status_address, "/status?format=json")
    assert any(k == "stale" and v is True for k, v in walk(data)), data
    assert NAME in p.stderr(), "no warning about the DNS failure:\n" + p.stderr()
    assert p.alive()


def test_unresolvable_at_startup(start_proxy, dns_server, upstream_pair):
    a, _b = upstream_pair
    p = dns_proxy(start_proxy, dns_server, a.port)    # NAME not set: NXDOMAIN
    t0 = time.monotonic()
    assert closed_promptly(p.addr, 5), "client not closed while the name does not resolve"
    assert time.monotonic() - t0 < 3
    wait_until(lambda: NAME in p.stderr(), 5, message=lambda: "reason not logged:\n" + p.stderr())
    assert p.alive()
    dns_server.set(NAME, ["127.0.0.2"], ttl=30)
    deadline = time.monotonic() + 20
    while banner_via(p.addr) != b"A":
        assert time.monotonic() < deadline, "the name resolved but the proxy did not use it"
        dns_server.wait_queries(dns_server.queries(NAME) + 1, NAME, timeout=0.2)
    assert echo_once(p.addr, b"x") != b""


def test_failover_to_next_address_on_refusal(start_proxy, dns_server, upstream_pair):
    a, b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2", "127.0.0.3"], ttl=30)
    p = dns_proxy(start_proxy, dns_server, a.port)
    seen = {banner_via(p.addr) for _ in range(8)}
    assert seen == {b"A", b"B"}, "connections do not rotate over the addresses: %s" % seen
    a.refuse()
    for _ in range(8):
        assert banner_via(p.addr) == b"B", "no fail-over from a refusing address"
    a.resume()
    b.refuse()
    for _ in range(8):
        assert banner_via(p.addr) == b"A"


def test_failover_to_next_address_on_timeout(start_proxy, dns_server, make_echo):
    for _ in range(20):
        hole = Blackhole(host="127.0.0.2")
        try:
            make_echo(host="127.0.0.3", port=hole.port, banner=b"B")
        except OSError:
            hole.close()
            continue
        break
    with hole:
        if not hole.works:
            pytest.skip("cannot make a connect time out on this machine")
        dns_server.set(NAME, ["127.0.0.2", "127.0.0.3"], ttl=30)
        p = dns_proxy(start_proxy, dns_server, hole.port, "--connect-timeout", "1")
        for _ in range(3):
            t0 = time.monotonic()
            assert banner_via(p.addr, timeout=10) == b"B"
            assert time.monotonic() - t0 < 1 + 2


def test_close_on_dns_change(start_proxy, dns_server, upstream_pair):
    a, _b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2"], ttl=1)
    p = dns_proxy(start_proxy, dns_server, a.port, "--close-on-dns-change",
                  "--dns-change-hold", "0")     # the hold: tests/test_hostile.py
    old = connect(p.addr)
    kept = None
    try:
        assert recv_exact(old, 1) == b"A"
        # the answer grows: a connection to an address still present stays
        dns_server.set(NAME, ["127.0.0.2", "127.0.0.3"], ttl=1)
        until_answered(dns_server, NAME, ["127.0.0.2", "127.0.0.3"],
                       lambda: banner_via(p.addr), timeout=1 + 1 + SLACK)
        banner_via(p.addr)      # a connection made after the new answer came in
        assert roundtrip(old, b"still") == b"still"
        # now 127.0.0.2 is gone from the answer: the old connection is closed
        dns_server.set(NAME, ["127.0.0.3"], ttl=1)
        until_answered(dns_server, NAME, ["127.0.0.3"],
                       lambda: banner_via(p.addr), timeout=1 + 1 + SLACK)
        assert wait_until(lambda: banner_via(p.addr) == b"B", 2)
        kept = connect(p.addr)
        assert recv_exact(kept, 1) == b"B"
        assert closed_by_peer(old, 5), "connection to the dropped address kept open"
        assert roundtrip(kept, b"new") == b"new"
    finally:
        old.close()
        if kept is not None:
            kept.close()


def test_without_close_on_dns_change_connections_stay(start_proxy, dns_server, upstream_pair):
    a, _b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2"], ttl=1)
    p = dns_proxy(start_proxy, dns_server, a.port)
    with connect(p.addr) as old:
        assert recv_exact(old, 1) == b"A"
        dns_server.set(NAME, ["127.0.0.3"], ttl=1)
        deadline = time.monotonic() + 1 + 1 + SLACK + 2
        while banner_via(p.addr) != b"B":
            assert time.monotonic() < deadline
            dns_server.wait_queries(dns_server.queries(NAME) + 1, NAME, timeout=0.1)
        assert roundtrip(old, b"still here") == b"still here"


def test_localhost_from_hosts_file(start_proxy, echo):
    """No --resolver: the system's way, so /etc/hosts names work."""
    lport = free_port()
    start_proxy(spec(lport, "localhost", echo.port))
    for i in range(3):
        assert echo_once((LOOP4, lport), b"h%d" % i) == b"h%d" % i


def test_ip_literal_target_sends_no_query(start_proxy, dns_server, echo):
    dns_server.mode = "refused"
    lport = free_port()
    start_proxy(spec(lport, LOOP4, echo.port), extra=["--resolver", dns_server.nameserver])
    assert echo_once((LOOP4, lport)) == b"hello"
    assert dns_server.queries() == 0
