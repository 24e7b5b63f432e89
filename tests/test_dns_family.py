"""--dns-family and a mapping's dns_family, against the loopback DNS server.

A name with an A record (127.0.0.2) and an AAAA record (::1) is served by
two echo upstreams on one port, one on each address, whose banners ("4",
"6") tell which address a proxied connection reached.  Query counts come
from the DNS server (tests/dnsserver.py).
"""

import uuid

import pytest
from dnsserver import DNSServer
from helpers import (
    LOOP4,
    banner_via,
    closed_promptly,
    echo_pair,
    free_port,
    spec,
    wait_until,
)

import tcpproxy

DUAL = "dual.example.test"
V6ONLY = "v6only.example.test"
V4ONLY = "v4only.example.test"


@pytest.fixture
def names(dns_server):
    dns_server.set(DUAL, ["127.0.0.2", "::1"], ttl=30)
    dns_server.set(V6ONLY, ["::1"], ttl=30)
    dns_server.set(V4ONLY, ["127.0.0.2"], ttl=30)
    return dns_server


@pytest.fixture
def dual_upstreams():
    """Echo upstreams on [::1]:P (banner b"6") and 127.0.0.2:P (b"4")."""
    six, four = echo_pair(("::1", b"6"), ("127.0.0.2", b"4"))
    try:
        yield four, six
    finally:
        four.close()
        six.close()


def resolver(dns_server, family="auto"):
    return tcpproxy.Resolver([dns_server.nameserver], timeout=1.0, family=family)


def counts(dns_server, name):
    return dns_server.queries(name, "A"), dns_server.queries(name, "AAAA")


# -- Resolver --------------------------------------------------------------------

def test_auto_asks_for_a_then_aaaa_as_before(names):
    r = resolver(names)
    assert r.lookup(DUAL) == ["127.0.0.2", "::1"]
    assert counts(names, DUAL) == (1, 1)
    assert r.info(DUAL)["family"] == "auto"


@pytest.mark.parametrize("family, want, queries", [
    ("ipv4", ["127.0.0.2"], (1, 0)),
    ("ipv6", ["::1"], (0, 1)),
    ("prefer-ipv4", ["127.0.0.2", "::1"], (1, 1)),
    ("prefer-ipv6", ["::1", "127.0.0.2"], (1, 1)),
])
def test_family_chooses_records_and_order(names, family, want, queries):
    r = resolver(names, family)
    assert r.lookup(DUAL) == want
    assert counts(names, DUAL) == queries
    assert r.lookup(DUAL) == want                 # from the cache: no query
    assert counts(names, DUAL) == queries
    assert r.info(DUAL)["addresses"] == want


def test_a_call_overrides_the_resolver_family_and_prefer_shares_the_answer(names):
    r = resolver(names)
    assert r.lookup(DUAL, "prefer-ipv6") == ["::1", "127.0.0.2"]
    assert r.lookup(DUAL) == ["127.0.0.2", "::1"]
    assert r.lookup(DUAL, "prefer-ipv4") == ["127.0.0.2", "::1"]
    assert counts(names, DUAL) == (1, 1)          # one answer for all three
    assert r.lookup(DUAL, "ipv6") == ["::1"]      # an entry of its own
    assert counts(names, DUAL) == (1, 2)


@pytest.mark.parametrize("family, name, reason", [
    ("ipv4", V6ONLY, "no A records (--dns-family ipv4)"),
    ("ipv6", V4ONLY, "no AAAA records (--dns-family ipv6)"),
])
def test_no_record_of_the_family_is_a_clear_failure(names, family, name, reason):
    r = resolver(names, family)
    with pytest.raises(tcpproxy.ResolveError) as exc:
        r.lookup(name)
    assert str(exc.value) == "cannot resolve %s: %s" % (name, reason)
    assert r.info(name)["error"] == reason
    assert r.lookup(name, "auto")                 # the name itself resolves


def test_hosts_file_answers_in_family_order(tmp_path, names):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.5 both.test\n::5 both.test\n127.0.0.6 four.test\n")
    r = tcpproxy.Resolver([names.nameserver], timeout=1.0, hosts_file=str(hosts))
    assert r.lookup("both.test") == ["127.0.0.5", "::5"]
    assert r.lookup("both.test", "prefer-ipv6") == ["::5", "127.0.0.5"]
    assert r.lookup("both.test", "ipv6") == ["::5"]
    assert r.lookup("four.test", "ipv4") == ["127.0.0.6"]
    assert names.queries() == 0
    # a hosts-file name without an address of the family goes on to DNS
    with pytest.raises(tcpproxy.ResolveError, match="NXDOMAIN"):
        r.lookup("four.test", "ipv6")
    assert names.queries("four.test", "AAAA") == 1


def test_system_resolver_fallback_orders_by_family(monkeypatch, tmp_path):
    """Without dnspython (the resolver falls back to getaddrinfo()):
    prefer-* orders its answer; ipv4/ipv6 ask for that family only."""
    r = tcpproxy.Resolver(hosts_file=str(tmp_path / "none"))
    monkeypatch.setattr(r, "_resolver", None)
    asked = []

    def getaddrinfo(host, port, family=0, type=0, *rest):
        asked.append(family)
        infos = [(10, 1, 6, "", ("::7", 0, 0, 0)), (2, 1, 6, "", ("127.0.0.7", 0))]
        return [i for i in infos if family in (0, i[0])]

    monkeypatch.setattr(tcpproxy.socket, "getaddrinfo", getaddrinfo)
    assert r.lookup("sys.test") == ["::7", "127.0.0.7"]           # the system's order
    assert r.lookup("sys.test", "prefer-ipv4") == ["127.0.0.7", "::7"]
    assert r.lookup("sys.test", "ipv4") == ["127.0.0.7"]
    assert asked == [0, 2]


def test_ip_literals_and_the_family():
    r = tcpproxy.Resolver(family="ipv6")
    assert r.lookup("::1") == ["::1"]
    assert r.lookup("127.0.0.1", "auto") == ["127.0.0.1"]
    with pytest.raises(tcpproxy.ResolveError, match="not an IPv6 address"):
        r.lookup("127.0.0.1")


# -- validation --------------------------------------------------------------------

def test_check_dns_family():
    assert tcpproxy.check_dns_family(None) is None
    assert tcpproxy.check_dns_family(" Prefer-IPv6 ") == "prefer-ipv6"
    assert tcpproxy.check_dns_family("") is None
    for bad in ("ipv5", 6, True, ["ipv4"]):
        with pytest.raises(tcpproxy.ConfigError, match="is not one of auto, ipv4"):
            tcpproxy.check_dns_family(bad)


def test_mapping_family_and_literal_mismatch():
    assert tcpproxy.Mapping.parse("8002:db:5432").dns_family is None
    assert tcpproxy.Mapping.parse("8002:db:5432", dns_family="IPV4").dns_family == "ipv4"
    assert tcpproxy.Mapping.parse("8002:[::1]:5432", dns_family="ipv6").dns_family == "ipv6"
    assert tcpproxy.Mapping.parse("8002:127.0.0.1:5432", dns_family="prefer-ipv6")
    with pytest.raises(tcpproxy.ConfigError) as exc:
        tcpproxy.Mapping.parse("8002:127.0.0.1:5432", dns_family="ipv6")
    assert str(exc.value) == ("invalid connection '8002:127.0.0.1:5432': target 127.0.0.1 "
                              "is not an IPv6 address (dns_family ipv6)")
    with pytest.raises(tcpproxy.ConfigError, match="is not an IPv4 address"):
        tcpproxy.Mapping.parse("8002:[::1]:5432", dns_family="ipv4")


def test_cli_flag_is_checked_and_applied(capsys):
    args = tcpproxy.parse_args(["--connections", "8002:db:5432", "--dns-family", "ipv6"])
    assert args.dns_family == "ipv6" and args.mappings[0].dns_family == "ipv6"
    assert tcpproxy.parse_args(["--connections", "8002:db:5432"]).mappings[0].dns_family is None
    for argv, message in (
            (["--dns-family", "ipv5"], "argument --dns-family: --dns-family 'ipv5' is not one of"),
            (["--dns-family", "ipv6", "--connections", "8002:127.0.0.1:5432"],
             "target 127.0.0.1 is not an IPv6 address")):
        with pytest.raises(SystemExit) as exc:
            tcpproxy.parse_args(["--connections", "8002:db:5432"] + argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 2, err   # the error and a hint


def test_yaml_dns_family(tmp_path):
    from tcpproxy_backends import file as file_backend
    mappings, _ = file_backend.parse_config(
        "mappings:\n  - listen: 8002\n    target: db:5432\n    dns_family: prefer-ipv6\n"
        "  - 8003:db:5432\n")
    assert [m.dns_family for m in mappings] == ["prefer-ipv6", None]
    for bad, reason in (("ipv7", "is not one of"), ("ipv6\n    host: 127.0.0.1\n    port: 1",
                                                     "is not an IPv6 address")):
        text = "mappings:\n  - listen: 8002\n    dns_family: %s\n" % bad
        if "host" not in bad:
            text += "    target: db:5432\n"
        with pytest.raises(tcpproxy.ConfigRejected, match=reason):
            file_backend.parse_config(text)


def test_dynamodb_item_dns_family():
    from tcpproxy_backends import dynamodb
    item = {"proxy_configuration": {"S": "8002:db:5432"}}
    assert dynamodb._item_mapping(item).dns_family is None
    assert dynamodb._item_mapping(dict(item, dns_family={"S": "ipv4"})).dns_family == "ipv4"
    for bad in ({"S": "ipv7"}, {"N": "4"}, {"S": "ipv6", "N": "6"}):
        with pytest.raises((ValueError, tcpproxy.ConfigError), match="dns_family"):
            dynamodb._item_mapping(dict(item, dns_family=bad))


def test_dynamodb_put_and_list_dns_family(aws_env, capsys):
    from tcpproxy_backends import dynamodb
    table, proxy = "fam-%s" % uuid.uuid4().hex[:8], "p-%s" % uuid.uuid4().hex[:8]
    assert dynamodb.cli(["create-table", "--table", table]) == 0
    assert dynamodb.cli(["put", "--table", table, "--proxy", proxy, "--dns-family",
                         "prefer-ipv6", "8002:db.example.test:5432"]) == 0
    assert dynamodb.cli(["put", "--table", table, "--proxy", proxy, "--dns-family", "ipv6",
                         "8003:127.0.0.1:5432"]) == 2              # a literal of the other family
    capsys.readouterr()
    assert dynamodb.cli(["list", "--table", table, "--proxy", proxy]) == 0
    assert capsys.readouterr().out == "8002:db.example.test:5432 dns_family=prefer-ipv6\n"
    from types import SimpleNamespace
    backend = dynamodb.Backend(SimpleNamespace(proxy=proxy, dynamodb=table, region=None))
    assert [m.dns_family for m in backend.fetch()] == ["prefer-ipv6"]


# -- through the proxy -------------------------------------------------------------

def family_proxy(start_proxy, dns_server, name, port, *extra):
    lport = free_port()
    p = start_proxy(spec(lport, name, port),
                    extra=["--resolver", dns_server.nameserver] + list(extra))
    p.addr = (LOOP4, lport)
    return p


@pytest.mark.parametrize("family, banners", [
    ("ipv4", {b"4"}), ("ipv6", {b"6"}), ("prefer-ipv6", {b"6"}), ("prefer-ipv4", {b"4"}),
    (None, {b"4", b"6"}),          # auto: connections rotate over both, as before
])
def test_family_chooses_the_upstream(start_proxy, names, dual_upstreams, family, banners):
    four, _six = dual_upstreams
    extra = ["--dns-family", family] if family else []
    p = family_proxy(start_proxy, names, DUAL, four.port, *extra)
    seen = [banner_via(p.addr) for _ in range(6)]
    assert set(seen) == banners, seen
    if family in ("ipv4", "ipv6"):
        assert counts(names, DUAL) == ((1, 0) if family == "ipv4" else (0, 1))


def test_prefer_falls_back_to_the_other_family(start_proxy, names, dual_upstreams):
    four, six = dual_upstreams
    p = family_proxy(start_proxy, names, DUAL, four.port, "--dns-family", "prefer-ipv6")
    assert banner_via(p.addr) == b"6"
    six.refuse()
    assert [banner_via(p.addr) for _ in range(3)] == [b"4"] * 3
    six.resume()
    assert wait_until(lambda: banner_via(p.addr) == b"6", 10)   # after its hold


def test_no_address_of_the_family_is_logged(start_proxy, names, dual_upstreams):
    four, _six = dual_upstreams
    p = family_proxy(start_proxy, names, V6ONLY, four.port, "--dns-family", "ipv4")
    assert closed_promptly(p.addr, 5), "client not closed while the name has no A record"
    wait_until(lambda: "no A records (--dns-family ipv4)" in p.stderr(), 5,
               message=lambda: "reason not logged:\n" + p.stderr())
    assert p.alive()


def test_yaml_mapping_sets_its_own_family(start_proxy, names, dual_upstreams, tmp_path):
    four, _six = dual_upstreams
    l6, l4, lauto = free_port(), free_port(), free_port()
    config = tmp_path / "mappings.yaml"
    config.write_text(
        "mappings:\n"
        "  - {listen: %d, host: %s, port: %d, dns_family: ipv6}\n"
        "  - {listen: %d, host: %s, port: %d, dns_family: auto}\n"
        "  - {listen: %d, host: %s, port: %d}\n"
        % (l6, DUAL, four.port, l4, DUAL, four.port, lauto, DUAL, four.port))
    start_proxy(extra=["--backend", "file", "--config", str(config), "--resolver",
                       names.nameserver, "--dns-family", "prefer-ipv4"])

    def banner(port):
        try:
            return banner_via((LOOP4, port))
        except OSError:
            return None

    wait_until(lambda: banner(lauto) is not None, 20)
    assert {banner(l6) for _ in range(4)} == {b"6"}
    assert {banner(l4) for _ in range(6)} == {b"4", b"6"}      # its own auto: both
    assert {banner(lauto) for _ in range(4)} == {b"4"}        # --dns-family prefer-ipv4


def test_ipv6_nameserver_is_unaffected():
    """The family is about the targets' records, not how DNS is reached."""
    with DNSServer(host="::1") as v6:
        v6.set(DUAL, ["127.0.0.2", "::1"], ttl=30)
        r = tcpproxy.Resolver(["[::1]:%d" % v6.port], timeout=1.0, family="ipv4")
        assert r.lookup(DUAL) == ["127.0.0.2"]
