"""Per-mapping listen addresses: ``127.0.0.2:PORT:HOST:RPORT``,
``[::1]:PORT:...``, YAML ``listen: IP:PORT``; one port on two addresses for
two targets; conflicts (the same address twice, a wildcard and a specific
address on one port); how /status, /connections and /metrics name such a
mapping.  Real sockets on 127.0.0.0/8 and ::1 only (the wildcard cases are
refused before anything binds)."""

import socket

import pytest
from helpers import (
    LOOP4,
    EchoServer,
    closed_by_peer,
    connect,
    echoes,
    free_port,
    http,
    http_json,
    refused,
    run_cli,
    talk,
    wait_until,
)

import tcpproxy
from tcpproxy import ConfigError, Mapping
from tcpproxy_backends import file as file_backend

A, B, C = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def tag(host, port):
    """The tag of the upstream a new connection to (host, port) reaches, or
    None (refused, or closed without a greeting)."""
    try:
        sock, got = talk(port, timeout=5, host=host)
    except OSError:
        return None
    sock.close()
    return got


def closed_at_once(host, port):
    """True when the proxy closes a new connection to (host, port) without
    a byte (a reset may even come before connect() returns)."""
    try:
        sock = connect((host, port))
    except (BrokenPipeError, ConnectionResetError):
        return True
    with sock:
        return closed_by_peer(sock)


# Parsing #####################################################################

@pytest.mark.parametrize("text,listen_host,key,spec", [
    ("8002:db.example.com:5432", None, 8002, "8002:db.example.com:5432"),
    ("127.0.0.1:8002:db.example.com:5432", "127.0.0.1", "127.0.0.1:8002",
     "127.0.0.1:8002:db.example.com:5432"),
    ("[::1]:8002:db:5432", "::1", "[::1]:8002", "[::1]:8002:db:5432"),
    ("[::1]:8002:[::1]:5432", "::1", "[::1]:8002", "[::1]:8002:[::1]:5432"),
    (" [0:0::1]:8002:db:5432 ", "::1", "[::1]:8002", "[::1]:8002:db:5432"),
    ("10.1.2.3:8002:[2001:db8::1]:5432", "10.1.2.3", "10.1.2.3:8002",
     "10.1.2.3:8002:[2001:db8::1]:5432"),
])
def test_spec_forms_round_trip(text, listen_host, key, spec):
    m = Mapping.parse(text)
    assert (m.listen_host, m.listen_port, m.key, m.spec) == (listen_host, 8002, key, spec)
    assert Mapping.parse(m.spec) == m
    assert tcpproxy.spec_key(text) == key


def test_listen_address_is_part_of_the_mapping():
    assert Mapping.parse("127.0.0.2:8002:db:1") != Mapping.parse("127.0.0.3:8002:db:1")
    assert Mapping.parse("127.0.0.2:8002:db:1") != Mapping.parse("8002:db:1")
    assert Mapping(8002, "db", 1, listen_host="[::1]") == Mapping.parse("[::1]:8002:db:1")


@pytest.mark.parametrize("text,reason", [
    ("::1:8002:db:5432", "must be in brackets"),
    ("8002:::1:5432", "must be in brackets"),
    ("127.0.0.1:8002:5432", "a listen address needs LISTEN_IP:LPORT:HOST:RPORT"),
    ("[::1]:8002:5432", "a listen address needs"),
    ("localhost:8002:db:5432", "'localhost' is not an IP address (write 127.0.0.1 or [::1])"),
    ("db.example.com:8002:db:5432", "'db.example.com' is not an IP address"),
    (":8002:db:5432", "empty listen address"),
    ("[::1:8002:db:5432", "unbalanced brackets"),
    ("127.0.0.1:0x1f:db:5432", "listen port '0x1f' is not a port number"),
    ("a:b", "expected LPORT:HOST:RPORT or LISTEN_IP:LPORT:HOST:RPORT"),
    ("127.0.0.1:8002:db:5432:9", "expected LPORT:HOST:RPORT or LISTEN_IP:LPORT:HOST:RPORT"),
    ("8002:2001:db8::1:5432", "must be in brackets"),
    ("2001:db8::1:8002:db:5432", "must be in brackets"),
])
def test_ambiguous_or_bad_specs_are_named(text, reason):
    with pytest.raises(ConfigError) as err:
        Mapping.parse(text)
    message = str(err.value)
    assert reason in message and repr(text.strip()) in message, message
    assert "\n" not in message


@pytest.mark.parametrize("specs,default,reason", [
    (["127.0.0.2:8002:a:1", "127.0.0.2:8002:b:1"], None, "listen address 127.0.0.2:8002 is used twice"),
    (["8002:a:1", "8002:b:1"], None, "listen port 8002 is used twice"),
    (["0.0.0.0:8002:a:1", "127.0.0.2:8002:b:1"], None,
     "listen addresses 0.0.0.0:8002 and 127.0.0.2:8002 conflict (0.0.0.0 takes the port"),
    (["[::]:8002:a:1", "[::1]:8002:b:1"], None, "(:: takes the port on every address)"),
    (["[::]:8002:a:1", "127.0.0.2:8002:b:1"], None, "conflict"),
    (["8002:a:1", "127.0.0.2:8002:b:1"], "0.0.0.0", "0.0.0.0:8002 and 127.0.0.2:8002 conflict"),
    (["8002:a:1", "127.0.0.1:8002:b:1"], "127.0.0.1", "listen address 127.0.0.1:8002 is used twice"),
])
def test_listen_conflicts(specs, default, reason):
    entries = [(s, Mapping.parse(s)) for s in specs]
    with pytest.raises(ConfigError, match=reason.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        tcpproxy.check_unique_ports(entries, default)


@pytest.mark.parametrize("specs,default", [
    (["127.0.0.2:8002:a:1", "127.0.0.3:8002:b:1"], None),
    (["0.0.0.0:8002:a:1", "[::1]:8002:b:1"], None),     # 0.0.0.0 takes IPv4 only
    (["8002:a:1", "127.0.0.2:8002:b:1"], None),         # the default is not known here
    (["8002:a:1", "127.0.0.2:8002:b:1"], "127.0.0.1"),
    (["127.0.0.2:8002:a:1", "8003:b:1"], "0.0.0.0"),
])
def test_listen_without_conflict(specs, default):
    entries = [(s, Mapping.parse(s)) for s in specs]
    assert tcpproxy.check_unique_ports(entries, default) == [m for _, m in entries]


def test_yaml_listen_forms():
    mappings, _ = file_backend.parse_config(
        "mappings:\n"
        "  - listen: 127.0.0.2:8002\n    target: db:5432\n"
        "  - listen: '[::1]:8002'\n    host: ::1\n    port: 5432\n"
        "  - listen: 8002\n    target: other:1\n"
        "  - 127.0.0.3:8002:db:1\n")
    assert [m.spec for m in mappings] == ["127.0.0.2:8002:db:5432", "[::1]:8002:[::1]:5432",
                                          "8002:other:1", "127.0.0.3:8002:db:1"]


@pytest.mark.parametrize("text,reason", [
    ("  - listen: 127.0.0.2:8002\n    target: a:1\n  - 127.0.0.2:8002:b:1\n",
     ("listen address 127.0.0.2:8002 is used twice: <config> line 2 (entry 1) and "
     "<config> line 4 (entry 2)")),
    ("  - listen: 0.0.0.0:8002\n    target: a:1\n  - 127.0.0.2:8002:b:1\n",
     "listen addresses 0.0.0.0:8002 and 127.0.0.2:8002 conflict"),
    ("  - listen: ::1:8002\n    target: a:1\n",
     "an IPv6 address goes in brackets and, in YAML, quotes"),
    ("  - listen: db:8002\n    target: a:1\n", "listen address 'db' is not an IP address"),
    ("  - listen: 127.0.0.2:http\n    target: a:1\n",
     "listen '127.0.0.2:http': port 'http' is not a port number"),
])
def test_yaml_listen_errors(text, reason):
    with pytest.raises(tcpproxy.ConfigRejected) as err:
        file_backend.parse_config("mappings:\n" + text)
    assert reason in str(err.value)


# Serving #####################################################################

@pytest.fixture
def upstreams():
    with EchoServer(tag="A") as a, EchoServer(tag="B") as b, EchoServer(tag="C") as c:
        yield a, b, c


def test_one_port_two_addresses_two_targets(upstreams):
    a, b, c = upstreams
    port = free_port()
    mappings = [Mapping.parse("%s:%d:%s" % (A, port, a.hostport)),
                Mapping.parse("%s:%d:%s" % (B, port, b.hostport)),
                Mapping.parse("%d:%s" % (port, c.hostport))]        # --listen-address
    with tcpproxy.Proxy(mappings, listen_host=LOOP4, status_address=(LOOP4, 0)) as proxy:
        assert [tag(h, port) for h in (A, B, LOOP4, C)] == ["A", "B", "C", None]
        wait_until(lambda: proxy.registry.active() == 0)      # the probes' sessions ended
        sock, _ = talk(port, host=B)
        try:
            st = proxy.status_address
            # /connections: the session names its mapping and its listener
            sessions = http_json(st, "/connections")["sessions"]
            assert [(s["mapping"], s["listen"], s["target"]) for s in sessions] == [
                ("%s:%d" % (B, port), "%s:%d" % (B, port), b.hostport)]
            assert sorted(http_json(st, "/connections")["connections"]) == sorted(
                m.spec for m in mappings)
            # /status?format=json: mapping (port, or IP:PORT), listen, spec
            status = http_json(st, "/status?format=json")
            assert [(m["mapping"], m["listen"], m["spec"], m["total"], m["active"])
                    for m in status["mappings"]] == [
                (port, "%s:%d" % (LOOP4, port), mappings[2].spec, 1, 0),
                ("%s:%d" % (A, port), "%s:%d" % (A, port), mappings[0].spec, 1, 0),
                ("%s:%d" % (B, port), "%s:%d" % (B, port), mappings[1].spec, 2, 1)]
            # /metrics: the mapping label is IP:PORT, the plain port on --listen-address
            metrics = http(st, path="/metrics")[2].decode()
            for label, total in (("%s:%d" % (A, port), 1), ("%s:%d" % (B, port), 2),
                                 ("%d" % port, 1)):
                line = 'tcpproxy_connections_total{mapping="%s"} %d' % (label, total)
                assert line in metrics, metrics
            assert 'tcpproxy_connections_active{mapping="%s:%d"} 1' % (B, port) in metrics
            assert echoes(sock)
        finally:
            sock.close()


def test_ipv6_listen_address(upstreams):
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    a, b, _ = upstreams
    port = free_port("::1")
    mappings = [Mapping.parse("[::1]:%d:%s" % (port, a.hostport)),
                Mapping.parse("%s:%d:%s" % (A, port, b.hostport))]
    with tcpproxy.Proxy(mappings, listen_host=LOOP4) as proxy:
        assert tag("::1", port) == "A" and tag(A, port) == "B"
        assert tag(LOOP4, port) is None
        assert sorted(proxy.servers, key=str) == ["%s:%d" % (A, port), "[::1]:%d" % port]
        assert proxy.status()["mappings"][1]["listen"] == "[::1]:%d" % port


def test_moving_a_mapping_to_another_address_on_the_same_port(upstreams):
    a, b, _ = upstreams
    port = free_port()
    at_a = Mapping.parse("%s:%d:%s" % (A, port, a.hostport))
    stays = Mapping.parse("%s:%d:%s" % (B, port, b.hostport))
    with tcpproxy.Proxy([at_a, stays], listen_host=LOOP4) as proxy:
        old, _ = talk(port, host=A)
        kept, _ = talk(port, host=B)
        try:
            moved = Mapping.parse("%s:%d:%s" % (C, port, a.hostport))
            proxy.apply([moved, stays])
            assert refused(port, A) and tag(C, port) == "A"
            assert closed_by_peer(old)                  # its mapping was removed
            assert echoes(kept)                         # the other address is untouched
            assert proxy.mappings == [stays, moved]          # by port, then address
            assert set(proxy.own_ports[port]) == {B, C}
        finally:
            old.close()
            kept.close()


def test_wildcard_and_specific_address_on_one_port_is_refused_before_binding(upstreams):
    a, _, _ = upstreams
    port = free_port()
    keep = Mapping.parse("%s:%d:%s" % (A, port, a.hostport))
    # --listen-address 0.0.0.0 is known here: the default and 127.0.0.2 conflict
    with tcpproxy.Proxy([], listen_host="0.0.0.0") as proxy:
        with pytest.raises(ConfigError, match=r"listen addresses 0\.0\.0\.0:%d and "
                           r"127\.0\.0\.2:%d conflict" % (port, port)):
            proxy.apply([Mapping.parse("%d:db:1" % port), keep])
        assert proxy.mappings == []
    with tcpproxy.Proxy([keep], listen_host=LOOP4) as proxy:
        with pytest.raises(ConfigError, match="0.0.0.0 takes the port on every IPv4 address"):
            proxy.apply([keep, Mapping.parse("0.0.0.0:%d:db:1" % port)])
        assert proxy.mappings == [keep] and tag(A, port) == "A"    # nothing changed


def test_proxy_loops_are_found_per_address(upstreams):
    a, _, _ = upstreams
    port = free_port()
    mappings = [Mapping.parse("%s:%d:%s" % (A, port, a.hostport)),
                Mapping.parse("%s:%d:%s:%d" % (B, port, A, port))]   # into the other one
    with tcpproxy.Proxy(mappings, listen_host=LOOP4) as proxy:
        assert proxy.own_address(A, port) and proxy.own_address(B, port)
        assert proxy.own_address(C, port) is None
        assert tag(A, port) == "A"
        # 127.0.0.3 forwards to 127.0.0.2, a listener of this proxy: refused as a loop
        assert closed_at_once(B, port)
        wait_until(lambda: proxy.registry.stats(details=True).get("%s:%d" % (B, port), {})
                   .get("failed_by") == {"unusable": 1})
        assert a.accepted == 1                          # only the greeting probe above


# The command line ############################################################

def test_cli_serves_one_port_on_two_addresses(proxy_cli, upstreams):
    a, b, _ = upstreams
    port, sport = free_port(), free_port()
    proxy_cli(["--listen-address", LOOP4, "--status", "%s:%d" % (LOOP4, sport),
               "--connections", "%s:%d:%s,%s:%d:%s" % (A, port, a.hostport, B, port, b.hostport)],
              ports=[port], status=(LOOP4, sport))
    wait_until(lambda: tag(A, port) == "A" and tag(B, port) == "B")
    assert refused(port, LOOP4)
    listens = sorted(m["listen"] for m in http_json((LOOP4, sport), "/status?format=json")
                     ["mappings"])
    assert listens == ["%s:%d" % (A, port), "%s:%d" % (B, port)]


@pytest.mark.parametrize("argv,message", [
    (["--listen-address", "0.0.0.0", "--connections", "47001:127.0.0.1:9",
      "127.0.0.2:47001:127.0.0.1:9"],
     "listen addresses 0.0.0.0:47001 and 127.0.0.2:47001 conflict"),
    (["--listen-address", LOOP4, "--connections", "47001:127.0.0.1:9,127.0.0.1:47001:127.0.0.1:10"],
     "listen address 127.0.0.1:47001 is used twice"),
    (["--listen-address", LOOP4, "--connections", "::1:47001:127.0.0.1:9"],
     "an IPv6 address must be in brackets"),
])
def test_cli_conflicts_are_one_line(argv, message):
    result = run_cli(argv + ["--status", "off"], timeout=15)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("tcpproxy: error: argument --connections: ")
    assert message in result.stderr.splitlines()[0], result.stderr


def test_check_judges_the_file_against_the_listen_address(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("mappings:\n  - listen: 8002\n    target: a:1\n"
                    "  - listen: 127.0.0.2:8002\n    target: b:1\n")
    ok = run_cli(["check", "--backend", "file", "--config", path, "--listen-address", LOOP4])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[:2] == ["8002:a:1", "127.0.0.2:8002:b:1"]
    bad = run_cli(["check", "--backend", "file", "--config", path])     # 0.0.0.0
    assert bad.returncode == 2
    assert "listen addresses 0.0.0.0:8002 and 127.0.0.2:8002 conflict" in bad.stderr


def test_help_names_the_listen_address_form():
    out = " ".join(run_cli(["--help"]).stdout.split())
    assert "[LISTEN_IP:]LPORT:HOST:RPORT" in out and "unless they name their own" in out
