"""The loopback DNS server used by the DNS tests answers as a real one does."""

import threading
import time

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest
from dnsserver import DNSServer


def ask(server, name, rdtype="A", tcp=False, timeout=2.0):
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, server.host, port=server.port, timeout=timeout)
    return dns.query.udp(q, server.host, port=server.port, timeout=timeout)


def resolver_for(server):
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [server.host]
    r.port = server.port
    r.timeout = r.lifetime = 2.0
    return r


@pytest.fixture
def srv():
    with DNSServer() as s:
        yield s


@pytest.mark.parametrize("tcp", [False, True])
def test_a_record_with_ttl_is_authoritative(srv, tcp):
    srv.set("db.example.test", ["127.0.0.2", "127.0.0.3"], ttl=7)
    r = ask(srv, "db.example.test", tcp=tcp)
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    (rrset,) = r.answer
    assert rrset.ttl == 7
    assert sorted(rd.address for rd in rrset) == ["127.0.0.2", "127.0.0.3"]
    assert srv.queries("db.example.test") == 1
    assert srv.queries("DB.Example.Test.", "A") == 1
    assert srv.history()[0].transport == ("tcp" if tcp else "udp")


def test_aaaa_and_missing_type(srv):
    srv.set("v6.example.test", ["::1"], ttl=5)
    r = ask(srv, "v6.example.test", "AAAA")
    assert [rd.address for rd in r.answer[0]] == ["::1"]
    r = ask(srv, "v6.example.test", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.answer == []
    assert r.authority[0].rdtype == dns.rdatatype.SOA
    with pytest.raises(dns.resolver.NoAnswer):
        resolver_for(srv).resolve("v6.example.test", "A")


def test_cname_chain_ttl_is_minimum(srv):
    srv.set("target.example.test", ["127.0.0.5"], ttl=300)
    srv.set("mid.example.test", cname="target.example.test", ttl=30)
    srv.set("alias.example.test", cname="mid.example.test", ttl=2)
    answer = resolver_for(srv).resolve("alias.example.test", "A")
    assert [rd.address for rd in answer] == ["127.0.0.5"]
    assert answer.canonical_name.to_text() == "target.example.test."
    assert answer.expiration - time.time() <= 2.0
    assert answer.response.flags & dns.flags.AA


def test_remove_gives_nxdomain(srv):
    srv.set("gone.example.test", ["127.0.0.2"], ttl=5)
    srv.remove("gone.example.test")
    assert ask(srv, "gone.example.test").rcode() == dns.rcode.NXDOMAIN
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver_for(srv).resolve("gone.example.test", "A")


def test_changes_are_seen_while_running(srv):
    srv.set("x.example.test", ["127.0.0.2"], ttl=1)
    assert ask(srv, "x.example.test").answer[0][0].address == "127.0.0.2"
    srv.set("x.example.test", ["127.0.0.3"], ttl=4)
    r = ask(srv, "x.example.test")
    assert r.answer[0][0].address == "127.0.0.3" and r.answer[0].ttl == 4


@pytest.mark.parametrize("mode,rcode", [
    ("servfail", dns.rcode.SERVFAIL),
    ("refused", dns.rcode.REFUSED),
    ("nxdomain", dns.rcode.NXDOMAIN),
])
def test_failure_modes(srv, mode, rcode):
    srv.set("x.example.test", ["127.0.0.2"], ttl=1)
    srv.mode = mode
    assert ask(srv, "x.example.test").rcode() == rcode
    srv.mode = "ok"
    assert ask(srv, "x.example.test").rcode() == dns.rcode.NOERROR


def test_timeout_mode_drops(srv):
    srv.set("x.example.test", ["127.0.0.2"], ttl=1)
    srv.mode = "timeout"
    with pytest.raises(dns.exception.Timeout):
        ask(srv, "x.example.test", timeout=0.3)
    with pytest.raises(dns.exception.Timeout):
        ask(srv, "x.example.test", tcp=True, timeout=0.3)
    assert srv.queries("x.example.test") == 2
    assert [q.rcode for q in srv.history()] == [None, None]


def test_bad_mode_rejected(srv):
    with pytest.raises(ValueError):
        srv.mode = "sometimes"


def test_wait_queries(srv):
    srv.set("w.example.test", ["127.0.0.2"], ttl=1)
    assert not srv.wait_queries(1, "w.example.test", timeout=0.05)
    t = threading.Thread(target=lambda: [ask(srv, "w.example.test") for _ in range(3)])
    t.start()
    assert srv.wait_queries(3, "w.example.test", timeout=5)
    t.join(5)
    assert not t.is_alive()
    assert srv.queries("other.example.test") == 0
    assert srv.queries() == 3


def test_delay_holds_answers(srv):
    srv.set("slow.example.test", ["127.0.0.2"], ttl=1)
    srv.delay = 0.3
    t0 = time.monotonic()
    ask(srv, "slow.example.test")
    assert time.monotonic() - t0 >= 0.25


def test_stops_cleanly():
    before = threading.active_count()
    with DNSServer() as s:
        s.set("x.example.test", ["127.0.0.2"])
        ask(s, "x.example.test", tcp=True)
        assert threading.active_count() == before + 1
        udp, tcp = s.udp, s.tcp
    assert threading.active_count() == before
    assert udp.fileno() == -1 and tcp.fileno() == -1
