"""Failing upstreams (issue 11): a bounded connect per client (attempt cap
and deadline), passive health (an address that refused or timed out is
tried last for a growing hold), re-resolution on a connect failure, and
the TTL policy (clamps, lookups shared even with TTL 0, and
--close-on-dns-change with a hold that rotation does not trip).

Loopback only: upstreams on 127.0.0.x sharing a port, blackholes (a full
backlog: SYNs are dropped), the loopback DNS server.  Waits are on
sockets, the DNS server's query counter or ``wait_until``.
"""

import time

import pytest
from helpers import (
    LOOP4,
    Blackhole,
    EchoServer,
    banner_via,
    closed_by_peer,
    connect,
    echo_once,
    free_port,
    http_json,
    lookups_at_once,
    recv_exact,
    roundtrip,
    run_cli,
    spec,
    wait_until,
)

import tcpproxy

NAME = "db.example.test"
SLACK = 1.0     # scheduling allowance (2 CPUs shared with other test runs)


def upstreams(kinds):
    """Upstreams on 127.0.0.2, .3, ... sharing one port: "echo" (banner
    A, B, ... by position), "hole" (a Blackhole) or "none" (refuses).
    Returns (port, [server or None])."""
    for _ in range(30):
        port, made = 0, []
        try:
            for i, kind in enumerate(kinds):
                host = "127.0.0.%d" % (i + 2)
                if kind == "echo":
                    made.append(EchoServer(host=host, port=port, banner=bytes([65 + i])))
                elif kind == "hole":
                    made.append(Blackhole(host=host, port=port))
                    if not made[-1].works:
                        pytest.skip("cannot make a connect time out on this machine")
                else:
                    made.append(None)
                    continue
                port = port or made[-1].port
            if port == 0:
                port = free_port("127.0.0.2")
            return port, made
        except OSError:
            for server in made:
                if server is not None:
                    server.close()
    pytest.fail("no common port free on 127.0.0.2-%d" % (len(kinds) + 1))


def close_all(servers):
    for server in servers:
        if server is not None:
            server.close()


def addresses(n):
    return ["127.0.0.%d" % (i + 2) for i in range(n)]


def dns_proxy(start_proxy, dns_server, port, *extra):
    lport = free_port()
    p = start_proxy(spec(lport, NAME, port),
                    extra=["--resolver", dns_server.nameserver] + list(extra))
    p.addr = (LOOP4, lport)
    return p


def banner(addr, timeout=5.0):
    """banner_via(), b"" also when the proxy resets the client so fast that
    connect() itself fails."""
    try:
        return banner_via(addr, timeout=timeout)
    except ConnectionError:
        return b""


def upstream_state(p, address):
    status = http_json(p.status_address, "/status?format=json")
    return next(u for u in status["mappings"][0]["upstreams"] if u["address"] == address)


# -- bounded connect -----------------------------------------------------------

def test_connect_attempts_cap_addresses_per_client(start_proxy, dns_server):
    port, servers = upstreams(["none"] * 6)
    dns_server.set(NAME, addresses(6), ttl=300)
    p = dns_proxy(start_proxy, dns_server, port, "--debug", "1")
    t0 = time.monotonic()
    assert banner(p.addr) == b""
    assert time.monotonic() - t0 < 2
    assert wait_until(lambda: "gave up after 3 attempt(s)" in p.stderr(), 5), p.stderr()
    assert p.stderr().count("connect to 127.0.0.") == 3, p.stderr()
    close_all(servers)


def test_connect_deadline_bounds_a_client(start_proxy, dns_server):
    port, servers = upstreams(["hole"] * 4)
    try:
        dns_server.set(NAME, addresses(4), ttl=300)
        p = dns_proxy(start_proxy, dns_server, port, "--connect-timeout", "0.6",
                      "--connect-deadline", "1", "--connect-attempts", "10")
        t0 = time.monotonic()
        assert banner(p.addr, timeout=10) == b""
        took = time.monotonic() - t0
        assert 0.9 < took < 1 + SLACK, took
        assert wait_until(lambda: "gave up after 2 attempt(s)" in p.stderr(), 5), p.stderr()
    finally:
        close_all(servers)


def test_twenty_dead_addresses_and_one_good(start_proxy, dns_server):
    """No client waits longer than the deadline; as the dead addresses are
    held down, clients reach the good one."""
    port, servers = upstreams(["hole"] * 20 + ["echo"])
    try:
        dns_server.set(NAME, addresses(21), ttl=300)
        p = dns_proxy(start_proxy, dns_server, port, "--connect-timeout", "0.5")
        times, served = [], 0
        for _ in range(40):
            t0 = time.monotonic()
            served += banner(p.addr, timeout=10) == b"U"
            times.append(time.monotonic() - t0)
            if served >= 3:
                break
        assert max(times) < 1 + SLACK, "a client waited %.1fs (deadline 1 s)" % max(times)
        assert served >= 3, "no client reached the good address in %d tries" % len(times)
    finally:
        close_all(servers)


def test_clients_one_at_a_time_converge_in_one_pass(start_proxy, dns_server):
    """Clients coming strictly one at a time: an address that timed out is
    held for as long as a pass through all 21 addresses at the connect
    timeout takes (0.5 s x 21), so the 20 dead addresses cost about one
    pass of failed clients (2 attempts each), not one every time a short
    hold runs out."""
    port, servers = upstreams(["hole"] * 20 + ["echo"])
    try:
        dns_server.set(NAME, addresses(21), ttl=300)
        p = dns_proxy(start_proxy, dns_server, port, "--connect-timeout", "0.5")
        results = [banner(p.addr, timeout=10) for _ in range(40)]
        # Before: 28 of 40 failed, 6 of the last 10.  After: 10-11, then a
        # client fails only when two holds that end together come first.
        trace = b"".join(r or b"-" for r in results)
        assert trace.count(b"-") <= 14, trace
        assert trace[-10:].count(b"-") <= 1, trace
    finally:
        close_all(servers)


# -- passive health ------------------------------------------------------------

def test_refusing_address_is_held_down_then_retried(start_proxy, dns_server):
    port, (a, b) = upstreams(["echo", "echo"])
    try:
        dns_server.set(NAME, addresses(2), ttl=300)
        p = dns_proxy(start_proxy, dns_server, port)
        a_addr = "127.0.0.2:%d" % port
        assert banner(p.addr) in (b"A", b"B")      # the name is resolved
        assert upstream_state(p, a_addr) == {"address": a_addr, "up": True,
                                             "down_until": None, "failures": 0}
        a.refuse()
        # a connection that starts at A fails over to B within itself
        assert wait_until(lambda: banner(p.addr) == b"B"
                          and not upstream_state(p, a_addr)["up"], 5)
        down = upstream_state(p, a_addr)
        assert down["failures"] == 1 and down["down_until"], down
        a.resume()
        t_down = time.monotonic()
        # while held (2 s) A is not tried: every connection goes to B
        seen = []
        while time.monotonic() < t_down + 1.0:
            seen.append(banner(p.addr))
        assert set(seen) == {b"B"}, seen
        assert upstream_state(p, a_addr)["failures"] == 1
        # after the hold a live connection tries A again: it is up
        assert wait_until(lambda: banner(p.addr) == b"A", 2 + SLACK + 1)
        assert upstream_state(p, a_addr) == {"address": a_addr, "up": True,
                                             "down_until": None, "failures": 0}
        assert "is up again" in p.stderr()
    finally:
        close_all([a, b])


def test_blackholed_address_is_skipped_by_new_connections(start_proxy, dns_server):
    port, (hole, b) = upstreams(["hole", "echo"])
    try:
        dns_server.set(NAME, addresses(2), ttl=300)
        p = dns_proxy(start_proxy, dns_server, port, "--connect-timeout", "1")
        hole_addr = "127.0.0.2:%d" % port
        assert banner(p.addr, timeout=10) == b"B"
        while upstream_state(p, hole_addr)["up"]:
            t0 = time.monotonic()
            assert banner(p.addr, timeout=10) == b"B"
            assert time.monotonic() - t0 < 1 + SLACK
        for _ in range(10):             # within the hold: no connect timeout paid
            t0 = time.monotonic()
            assert banner(p.addr) == b"B"
            assert time.monotonic() - t0 < 0.5
        assert "127.0.0.2:%d is down (timed out" % port in p.stderr()
    finally:
        close_all([hole, b])


def test_hold_grows_with_repeated_failures():
    clock = [100.0]
    health = tcpproxy.UpstreamHealth(clock=lambda: clock[0])
    holds = []
    for _ in range(8):
        health.failed("127.0.0.2", 1, "refused")
        holds.append(health.down[("127.0.0.2", 1)][0] - clock[0])
        assert health.order(["127.0.0.2", "127.0.0.3"], 1) == (["127.0.0.3", "127.0.0.2"], 1)
        clock[0] += holds[-1]
        assert health.order(["127.0.0.2", "127.0.0.3"], 1) == (["127.0.0.2", "127.0.0.3"], 2)
    assert holds == [2, 4, 8, 16, 32, 60, 60, 60]
    health.succeeded("127.0.0.2", 1)
    assert not health.down


def test_held_addresses_go_last_best_first_and_trials_are_one_at_a_time():
    clock = [0.0]
    health = tcpproxy.UpstreamHealth(clock=lambda: clock[0], trial=5)
    health.failed("a", 1, "refused")            # held until 2
    health.failed("b", 1, "refused")
    health.failed("b", 1, "refused")            # held until 4
    assert health.order(["b", "a", "c"], 1) == (["c", "a", "b"], 1)
    assert health.order(["b", "a"], 1) == (["a", "b"], 0)     # every address down: all tried
    assert not health.claim("a", 1) and health.claim("c", 1)
    clock[0] = 2.5                              # a's hold ended: back in the rotation
    assert health.order(["b", "a", "c"], 1) == (["a", "c", "b"], 2)
    assert health.claim("a", 1)                 # one connection tries it ...
    assert not health.claim("a", 1)             # ... the others do not
    assert health.order(["b", "a", "c"], 1) == (["c", "b", "a"], 1)
    assert health.snapshot(["a", "c"], 1)[0]["up"] is False
    assert health.snapshot(["a", "c"], 1)[1] == {"address": "c:1", "up": True,
                                                 "down_until": None, "failures": 0}


def test_address_on_trial_elsewhere_is_tried_last_not_dropped(echo):
    """An address whose hold just ended and that another connection claimed
    between order() and claim() is still tried, after the others."""
    lport = free_port()
    key = (LOOP4, echo.port)
    with tcpproxy.Proxy([tcpproxy.Mapping(lport, LOOP4, echo.port)],
                        listen_host=LOOP4) as proxy:
        calls = []

        def clock():
            calls.append(1)
            if len(calls) == 2:                 # claim(): another connection won
                proxy.health.down[key][0] = 1e9
            return 100.0

        proxy.health.clock = clock
        proxy.health.down[key] = [50.0, 1]      # its hold ended at 50
        assert echo_once((LOOP4, lport)) == b"hello"
        assert len(calls) == 2 and not proxy.health.down


def test_every_address_down_is_still_tried(start_proxy, dns_server):
    port, (a, b) = upstreams(["echo", "echo"])
    try:
        dns_server.set(NAME, addresses(2), ttl=300)
        p = dns_proxy(start_proxy, dns_server, port)
        a.refuse()
        b.refuse()
        assert banner(p.addr) == b""
        assert wait_until(lambda: not upstream_state(p, "127.0.0.2:%d" % port)["up"]
                          and not upstream_state(p, "127.0.0.3:%d" % port)["up"], 5)
        a.resume()
        assert banner(p.addr) == b"A", "held addresses not tried when all are down"
    finally:
        close_all([a, b])


# -- a connect failure re-resolves at once --------------------------------------

def test_connect_failure_reresolves_before_the_ttl(start_proxy, dns_server):
    port, (a, b) = upstreams(["echo", "echo"])
    try:
        dns_server.set(NAME, ["127.0.0.2"], ttl=300)
        p = dns_proxy(start_proxy, dns_server, port)
        assert banner(p.addr) == b"A"
        # failover: the old primary dies, DNS moves on; the TTL is 300 s
        dns_server.set(NAME, ["127.0.0.3"], ttl=300)
        a.refuse()
        q = dns_server.queries(NAME, "A")
        t0 = time.monotonic()
        assert banner(p.addr) == b""           # this one still had the old answer
        assert dns_server.wait_queries(q + 1, NAME, "A", timeout=2), "not re-resolved"
        assert wait_until(lambda: banner(p.addr) == b"B", 2)
        assert time.monotonic() - t0 < 3
    finally:
        close_all([a, b])


def test_reresolution_is_rate_limited(start_proxy, dns_server):
    port, servers = upstreams(["none"])
    dns_server.set(NAME, ["127.0.0.2"], ttl=300)
    p = dns_proxy(start_proxy, dns_server, port)
    q = dns_server.queries(NAME, "A")
    t0 = time.monotonic()
    for _ in range(30):
        assert banner(p.addr) == b""
    elapsed = time.monotonic() - t0
    assert dns_server.wait_queries(q + 1, NAME, "A", timeout=2)
    assert dns_server.queries(NAME, "A") - q <= elapsed / tcpproxy.REFRESH_INTERVAL + 2
    close_all(servers)


# -- TTL policy ----------------------------------------------------------------

def resolver(dns_server, **kw):
    return tcpproxy.Resolver([dns_server.nameserver], timeout=1.0, **kw)


def test_huge_ttl_is_clamped(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=2 ** 31 - 1)
    r = resolver(dns_server)
    r.lookup(NAME)
    assert r.info(NAME)["expires_in"] <= 3600 and r.info(NAME)["ttl"] == 3600
    r = resolver(dns_server, max_ttl=1)
    r.lookup(NAME)
    q = dns_server.queries(NAME, "A")
    assert wait_until(lambda: r.lookup(NAME) and dns_server.queries(NAME, "A") > q, 1 + SLACK + 1)


def test_min_ttl_keeps_a_ttl_zero_answer(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=0)
    r = resolver(dns_server, min_ttl=30)
    for _ in range(5):
        assert r.lookup(NAME) == ["127.0.0.2"]
    assert dns_server.queries(NAME, "A") == 1
    assert r.info(NAME)["ttl"] == 30


def test_ttl_zero_concurrent_lookups_share_one_query(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=0)
    dns_server.delay = 0.3
    r = resolver(dns_server)
    assert lookups_at_once(r, NAME, 16) == ([["127.0.0.2"]] * 16, [])
    assert dns_server.queries(NAME, "A") == 1
    # TTL 0 still means a fresh lookup for a call that comes afterwards
    dns_server.delay = 0
    dns_server.set(NAME, ["127.0.0.3"], ttl=0)
    assert r.lookup(NAME) == ["127.0.0.3"]


def test_shared_lookup_failure_reaches_every_waiter(dns_server):
    dns_server.delay = 0.3
    r = resolver(dns_server)       # NAME is not set: NXDOMAIN
    results, errors = lookups_at_once(r, NAME, 8)
    assert not results and len(errors) == 8
    assert dns_server.queries(NAME, "A") == 1


@pytest.mark.parametrize("args,named", [
    (["--dns-min-ttl", "10", "--dns-max-ttl", "5"], "--dns-min-ttl"),
    (["--dns-max-ttl", "-1"], "--dns-max-ttl"),
    (["--connect-attempts", "0"], "--connect-attempts"),
    (["--connect-deadline", "0"], "--connect-deadline"),
    (["--dns-change-hold", "x"], "--dns-change-hold"),
])
def test_bad_policy_flags(args, named):
    r = run_cli(["--connections", "%d:127.0.0.1:1" % free_port(), "--status", "off"] + args)
    assert r.returncode == 2, r
    assert named in r.stderr, r.stderr


# -- --close-on-dns-change: rotation is not a failover --------------------------

def four_connections(p):
    """Two connections on each of A and B (the answer has both)."""
    conns = {b"A": [], b"B": []}
    deadline = time.monotonic() + 10
    while min(len(c) for c in conns.values()) < 2:
        assert time.monotonic() < deadline
        s = connect(p.addr)
        banner = recv_exact(s, 1)
        if len(conns[banner]) < 2:
            conns[banner].append(s)
        else:
            s.close()
    return conns


def flip_answers(dns_server, answers, seconds):
    """Serve the *answers* in turn, a new one after every A query, for
    *seconds*; return how many answers were served."""
    served = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        q = dns_server.queries(NAME, "A")
        dns_server.set(NAME, answers[served % len(answers)], ttl=1)
        if dns_server.wait_queries(q + 1, NAME, "A", timeout=3):
            served += 1
    return served


def test_rotation_between_live_addresses_closes_nothing(start_proxy, dns_server,
                                                        upstream_pair):
    a, _b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2", "127.0.0.3"], ttl=1)
    p = dns_proxy(start_proxy, dns_server, a.port, "--close-on-dns-change")
    conns = four_connections(p)
    try:
        # each address leaves the answer for one TTL at a time, for longer
        # than the default hold (max(TTL, 5 s))
        served = flip_answers(dns_server, [["127.0.0.3"], ["127.0.0.2"]], 7)
        assert served >= 4, "the proxy did not re-resolve"
        for socks in conns.values():
            for s in socks:
                assert roundtrip(s, b"alive") == b"alive", "rotation closed a connection"
        assert "closing" not in p.stderr(), p.stderr()
    finally:
        for socks in conns.values():
            for s in socks:
                s.close()


def test_real_failover_closes_within_ttl_plus_hold(start_proxy, dns_server, upstream_pair):
    a, _b = upstream_pair
    dns_server.set(NAME, ["127.0.0.2", "127.0.0.3"], ttl=1)
    p = dns_proxy(start_proxy, dns_server, a.port, "--close-on-dns-change",
                  "--dns-change-hold", "2")
    conns = four_connections(p)
    try:
        dns_server.set(NAME, ["127.0.0.3"], ttl=1)
        t0 = time.monotonic()
        for s in conns[b"A"]:
            assert closed_by_peer(s, 1 + 2 + SLACK + 1), "not closed after the failover"
        took = time.monotonic() - t0
        assert 2 - 0.2 <= took <= 1 + 2 + SLACK, took
        for s in conns[b"B"]:
            assert roundtrip(s, b"alive") == b"alive"
        assert "has not resolved to 127.0.0.2" in p.stderr(), p.stderr()
    finally:
        for socks in conns.values():
            for s in socks:
                s.close()


def test_default_hold_is_the_ttl_at_least_five_seconds(dns_server):
    dns_server.set(NAME, ["127.0.0.2"], ttl=30)
    proxy = tcpproxy.Proxy([], resolver=resolver(dns_server))
    watcher = tcpproxy.DnsChangeWatcher(proxy)
    proxy.resolver.lookup(NAME)
    assert watcher._hold(NAME) == 30
    dns_server.set("short." + NAME, ["127.0.0.2"], ttl=1)
    proxy.resolver.lookup("short." + NAME)
    assert watcher._hold("short." + NAME) == 5
    assert tcpproxy.DnsChangeWatcher(proxy, hold=0.5)._hold(NAME) == 0.5
