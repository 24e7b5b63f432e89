"""PROXY protocol: --send-proxy v1|v2 to a real consumer (HAProxy with
``accept-proxy``, IPv4 and IPv6), off by default; --accept-proxy from a real
producer (HAProxy ``send-proxy`` / ``send-proxy-v2``) with the allow list
judging the real client; hand-built headers (v2 TLVs as an AWS NLB sends,
LOCAL, v1 UNKNOWN, headers in pieces) and refusals (garbage, truncated,
too long, slow, --accept-proxy-from); the flags and the backends' keys."""

import errno
import logging
import re
import socket
import struct
import time

import pytest
from helpers import (
    LOOP4,
    accept,
    closed_by_peer,
    connect,
    echo_once,
    free_port,
    hostport,
    http_json,
    mapping_stats,
    recv_all,
    recv_exact,
    run_cli,
    spec,
    wait_until,
)

import tcpproxy
from tcpproxy import ConfigError, Mapping, Proxy, parse_proxy_header, proxy_header

SIG = tcpproxy.PROXY_V2_SIGNATURE
CLIENT4 = "127.0.0.5"          # a test client's source: not the proxy's 127.0.0.1


def v2(command=1, family=0x11, body=b"", version=2):
    return SIG + bytes([version << 4 | command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp4(src, sport, dst, dport, tlvs=b""):
    return v2(body=socket.inet_aton(src) + socket.inet_aton(dst)
              + struct.pack("!HH", sport, dport) + tlvs)


def tlv(kind, value):
    return struct.pack("!BH", kind, len(value)) + value


# What an AWS NLB adds: the VPC endpoint id (type 0xEA, subtype 0x01), plus
# ALPN and a NOOP pad, all to be skipped.
NLB_TLVS = (tlv(0xEA, b"\x01vpce-0123456789abcdef0") + tlv(0x01, b"h2")
            + tlv(0x04, b"\x00" * 5))


def bound_client(address, source=CLIENT4):
    """A connection to ``address`` from ``source`` (so the real client is
    told apart from the proxy and HAProxy, which use 127.0.0.1)."""
    return connect(address, source=source)


def unread(local_port, remote_port):
    """Bytes waiting in the receive queue of the proxy's socket of that
    IPv4 connection (/proc/net/tcp rx_queue); None when it is not there."""
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            f = line.split()
            if (int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)) == \
                    (local_port, remote_port):
                return int(f[4].split(":")[1], 16)
    return None


def sessions(status_address):
    return http_json(status_address, "/connections")["sessions"]


# -- send: HAProxy with accept-proxy is the real consumer ---------------------

HAPROXY_HEAD = """\
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""

HAPROXY_ACCEPT = HAPROXY_HEAD + """\
frontend front
    bind 127.0.0.1:%(port4)d accept-proxy
    bind [::1]:%(port6)d accept-proxy
    log-format "client=%%ci:%%cp frontend=%%fi:%%fp"
    default_backend echo
backend echo
    server echo 127.0.0.1:%(echo)d
"""


@pytest.fixture
def accepting_haproxy(haproxy, echo):
    port4, port6 = free_port(), free_port("::1")
    server = haproxy(HAPROXY_ACCEPT % {"port4": port4, "port6": port6, "echo": echo.port},
                     [port4, port6])
    server.port4, server.port6 = port4, port6
    return server


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "ipv4-mapped"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_haproxy_sees_the_real_client(start_proxy, accepting_haproxy, version,
                                                 family):
    server = accepting_haproxy
    lport = free_port()
    if family == "ipv4":
        listen, source, target = LOOP4, CLIENT4, (LOOP4, server.port4)
    elif family == "ipv6":     # an IPv6 client and an IPv6 upstream
        listen, source, target = "::1", "::1", ("::1", server.port6)
    else:                      # a dual-stack listener: ::ffff:127.0.0.5 goes as TCP4
        listen, source, target = "::", CLIENT4, ("::1", server.port6)
    start_proxy(spec(lport, *target), extra=["--send-proxy", version], listen=listen)
    with bound_client((source if family == "ipv6" else LOOP4, lport), source) as s:
        cport = s.getsockname()[1]
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"hello"
    # the frontend address is the one the client connected to, on the proxy
    line = "client=%s:%d frontend=%s:%d" % (source, cport, source if family == "ipv6"
                                            else LOOP4, lport)
    assert wait_until(lambda: line in server.log(), 5, message=server.log)


def test_send_proxy_is_off_by_default(start_proxy, listener):
    """Without --send-proxy the upstream's first bytes are the client's
    (PostgreSQL, Redis... must not be fed a header they did not ask for)."""
    lport = free_port()
    start_proxy(spec(lport, *listener.getsockname()))
    with bound_client((LOOP4, lport)) as s:
        s.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")     # a PostgreSQL SSLRequest
        with accept(listener) as upstream:
            assert recv_exact(upstream, 8) == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


# -- accept: HAProxy with send-proxy / send-proxy-v2 is the real producer ------

HAPROXY_SEND = HAPROXY_HEAD + """\
listen front
    bind 127.0.0.1:%(port)d
    server proxy 127.0.0.1:%(lport)d %(option)s
"""


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_accept_proxy_from_haproxy_shows_the_real_client(start_proxy, haproxy, echo, option):
    lport, hport = free_port(), free_port()
    proxy = start_proxy(spec(lport, *echo.address), extra=["--accept-proxy"])
    haproxy(HAPROXY_SEND % {"port": hport, "lport": lport, "option": option}, [hport])
    with bound_client((LOOP4, hport)) as s:
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        live = sessions(proxy.status_address)
        assert [x["client"] for x in live] == ["%s:%d" % (CLIENT4, s.getsockname()[1])]


def test_accept_proxy_allow_list_judges_the_real_client(start_proxy, haproxy, echo):
    """HAProxy (127.0.0.1) is not in --allow; the client it names is."""
    lport, hport = free_port(), free_port()
    proxy = start_proxy(spec(lport, *echo.address),
                        extra=["--accept-proxy", "--allow", "%s/32" % CLIENT4])
    haproxy(HAPROXY_SEND % {"port": hport, "lport": lport, "option": "send-proxy-v2"},
            [hport])
    with bound_client((LOOP4, hport)) as s:
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
    with bound_client((LOOP4, hport), "127.0.0.6") as s:
        s.sendall(b"ping")
        assert closed_by_peer(s)
    stats = wait_until(lambda: mapping_stats(proxy.status_address, lport)["refused"] == 1
                       and mapping_stats(proxy.status_address, lport))
    assert stats["total"] == 2 and echo.accepted == 1
    assert re.search(r"refused client 127\.0\.0\.6 \(via 127\.0\.0\.1\): not in the allow "
                     r"list", proxy.output()), proxy.output()


# -- hand-built headers, in this process ---------------------------------------

@pytest.fixture
def accepting(echo):
    """An in-process proxy: an --accept-proxy mapping to the echo server."""
    started = []

    def start(**options):
        accept_from = options.pop("accept_proxy_from", ())
        allow = options.pop("proxy_allow", ())
        mapping = Mapping(free_port(), LOOP4, echo.port, accept_proxy=True, **options)
        proxy = Proxy([mapping], listen_host=LOOP4, accept_proxy_from=accept_from,
                      allow=allow)
        proxy.start()
        started.append(proxy)
        proxy.address = (LOOP4, mapping.listen_port)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def refused_by(proxy, reason="proxy_protocol"):
    port = proxy.address[1]
    return proxy.registry.stats(details=True).get(port, {}).get("refused_by", {}).get(reason, 0)


ACCEPTED = {
    "v2-tcp4-nlb-tlvs": (v2_tcp4("192.0.2.7", 40001, "10.0.0.5", 5432, NLB_TLVS),
                         "192.0.2.7:40001"),
    "v2-tcp6": (v2(family=0x21, body=socket.inet_pton(socket.AF_INET6, "2001:db8::7")
                   + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
                   + struct.pack("!HH", 40002, 5432)), "[2001:db8::7]:40002"),
    "v1-tcp4": (b"PROXY TCP4 192.0.2.8 10.0.0.5 40003 5432\r\n", "192.0.2.8:40003"),
    "v1-tcp6": (b"PROXY TCP6 2001:db8::8 2001:db8::1 40004 5432\r\n", "[2001:db8::8]:40004"),
    "v2-local": (v2(command=0, family=0x00), None),        # a health check
    "v2-local-with-addresses": (v2(command=0, body=b"\x00" * 12), None),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", None),
    "v1-unknown-with-addresses": (b"PROXY UNKNOWN ::1 ::1 1 2\r\n", None),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
@pytest.mark.parametrize("pieces", [1, 3], ids=["one-send", "in-pieces"])
def test_accept_proxy_hand_built_headers(accepting, case, pieces):
    """The header's client is the session's; the payload sent right behind
    the header (in the same segment) reaches the upstream whole."""
    header, client = ACCEPTED[case]
    proxy = accepting()
    with connect(proxy.address) as s:
        if pieces == 1:
            s.sendall(header + b"payload")
        else:                  # the header in pieces, each read before the next is sent
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cut = [0, 3, len(header) - 1, len(header)]
            for a, b in zip(cut, cut[1:]):
                s.sendall(header[a:b])
                if b < len(header):
                    wait_until(lambda: unread(proxy.address[1], s.getsockname()[1]) == 0)
            s.sendall(b"payload")
        assert recv_exact(s, 7) == b"payload"
        shown = [x["client"] for x in proxy.connections()["sessions"]]
        assert shown == [client or hostport(*s.getsockname())]
    assert refused_by(proxy) == 0


REFUSED = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "began with b'GET / '"),
    "tls-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "began with"),
    "closed-without-header": (b"", "closed before the end of the header (0 bytes)"),
    "truncated-v1": (b"PROXY TCP4 192.0.2.8 10.0.0", "closed before the end"),
    "truncated-v2-address": (v2_tcp4("192.0.2.7", 1, "10.0.0.5", 2)[:22],
                             "closed before the end"),
    "truncated-v2-signature": (SIG[:9], "closed before the end"),
    "v1-too-long": (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "longer than 107 bytes"),
    "v1-bad-address": (b"PROXY TCP4 300.1.1.1 10.0.0.5 1 2\r\n", "malformed v1 line"),
    "v1-bad-port": (b"PROXY TCP4 192.0.2.1 10.0.0.5 1 65536\r\n", "malformed v1 line"),
    "v1-family-mismatch": (b"PROXY TCP4 ::1 ::1 1 2\r\n", "malformed v1 line"),
    "v1-lf-only": (b"PROXY TCP4 192.0.2.1 10.0.0.5 1 2\n", "not ended by CRLF"),
    "v2-too-long": (SIG + b"\x21\x11" + struct.pack("!H", 5000), "at most 4096"),
    "v2-version-3": (v2(version=3, body=b"\x00" * 12), "version 3"),
    "v2-udp": (v2(family=0x12, body=b"\x00" * 12), "command 0x21, family 0x12"),
    "v2-short-tcp4": (v2(body=b"\x00" * 8), "need 12 bytes, the header has 8"),
}


# What a client sees of a reset that comes while it still sends or shuts down.
REFUSED_ERRNOS = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_accept_proxy_refuses_bad_headers(accepting, echo, caplog, case):
    data, reason = REFUSED[case]
    proxy = accepting()
    caplog.set_level(logging.WARNING, "tcpproxy")
    try:
        with connect(proxy.address) as s:
            if data:
                s.sendall(data)
            if not case.startswith(("garbage", "tls", "v1-too", "v2-too")):
                s.shutdown(socket.SHUT_WR)       # the header ends here
            assert closed_by_peer(s)
    except OSError as exc:                       # refused before it was all sent
        assert exc.errno in REFUSED_ERRNOS, exc  # (ENOTCONN: shutdown() after the reset)
    assert wait_until(lambda: refused_by(proxy) == 1 and proxy.registry.active() == 0)
    assert echo.accepted == 0
    lines = [r.getMessage() for r in caplog.records if "PROXY protocol" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines
    assert "refused client 127.0.0.1" in lines[0]


def test_accept_proxy_slow_header_is_cut_at_the_deadline(accepting, echo, monkeypatch, caplog):
    monkeypatch.setattr(tcpproxy, "PROXY_HEADER_TIMEOUT", 1.0)
    proxy = accepting()
    caplog.set_level(logging.WARNING, "tcpproxy")
    with connect(proxy.address) as s:
        started = time.monotonic()
        s.sendall(b"PROXY TCP4 192.0.2.8 ")      # then nothing: a slowloris
        assert closed_by_peer(s, timeout=5)
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 4, elapsed
    assert wait_until(lambda: refused_by(proxy) == 1) and echo.accepted == 0
    assert any("no complete header within 1 s" in r.getMessage() for r in caplog.records)


def test_accept_proxy_deadline_is_3_seconds():
    assert tcpproxy.PROXY_HEADER_TIMEOUT == 3.0


def test_accept_proxy_from_refuses_other_peers(accepting, echo):
    proxy = accepting(accept_proxy_from=["127.0.0.9/32"])
    header = v2_tcp4("192.0.2.7", 40001, "10.0.0.5", 5432, NLB_TLVS)
    try:                                        # from 127.0.0.1: not a trusted balancer
        with connect(proxy.address) as s:
            s.sendall(header + b"x")
            assert closed_by_peer(s)
    except OSError as exc:                      # reset before connect() or sendall() returned
        assert exc.errno in REFUSED_ERRNOS, exc
    assert refused_by(proxy) == 1 and echo.accepted == 0
    with bound_client(proxy.address, "127.0.0.9") as s:
        s.sendall(header + b"x")
        assert recv_exact(s, 1) == b"x"
        assert [x["client"] for x in proxy.connections()["sessions"]] == ["192.0.2.7:40001"]


def test_accept_proxy_allow_applies_after_the_header(accepting, echo):
    proxy = accepting(proxy_allow=["192.0.2.0/24"])
    with connect(proxy.address) as s:            # the peer, 127.0.0.1, is not allowed
        s.sendall(v2_tcp4("192.0.2.7", 1, "10.0.0.5", 2) + b"x")
        assert recv_exact(s, 1) == b"x"
    with connect(proxy.address) as s:
        s.sendall(b"PROXY TCP4 203.0.113.9 10.0.0.5 1 2\r\nx")
        assert closed_by_peer(s)
    assert wait_until(lambda: refused_by(proxy, "allow") == 1)
    assert echo.wait_accepted(1) and echo.accepted == 1


def test_accept_and_send_forward_the_headers_addresses(listener):
    """--accept-proxy with --send-proxy: the upstream hears the client and
    destination the load balancer named, then the payload."""
    mapping = Mapping(free_port(), *listener.getsockname(), accept_proxy=True,
                      send_proxy="v2")
    with Proxy([mapping], listen_host=LOOP4) as proxy:
        with connect((LOOP4, mapping.listen_port)) as s:
            s.sendall(v2_tcp4("192.0.2.7", 40001, "198.51.100.1", 5432, NLB_TLVS) + b"hi")
            with accept(listener) as upstream:
                header = recv_exact(upstream, 28)
                assert header == v2_tcp4("192.0.2.7", 40001, "198.51.100.1", 5432)
                assert recv_exact(upstream, 2) == b"hi"
        assert proxy.registry.stats(details=True)[mapping.listen_port]["refused"] == 0


def test_send_proxy_header_and_first_bytes_go_in_one_send(listener):
    """The client's first bytes, there before the upstream connect (after
    an accepted header they always are), leave in the same send as the
    header: the upstream's first read returns both together."""
    mapping = Mapping(free_port(), *listener.getsockname(), accept_proxy=True,
                      send_proxy="v1")
    payload = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"      # a PostgreSQL SSLRequest
    with Proxy([mapping], listen_host=LOOP4) as proxy:
        for _ in range(5):
            with connect((LOOP4, mapping.listen_port)) as s:
                s.sendall(b"PROXY TCP4 192.0.2.8 10.0.0.5 40003 5432\r\n" + payload)
                with accept(listener) as upstream:
                    upstream.settimeout(5)
                    first = upstream.recv(65536)
                    assert first == b"PROXY TCP4 192.0.2.8 10.0.0.5 40003 5432\r\n" + payload
                    upstream.sendall(b"N")
                    assert recv_exact(s, 1) == b"N"
                    s.sendall(b"more")
                    assert recv_exact(upstream, 4) == b"more"
        assert wait_until(lambda: proxy.registry.active() == 0)
        stats = proxy.registry.stats()[mapping.listen_port]
        assert stats["bytes_up"] == 5 * (len(payload) + 4), stats


def test_send_proxy_v1_from_this_process(listener):
    mapping = Mapping(free_port(), *listener.getsockname(), send_proxy="v1")
    with Proxy([mapping], listen_host=LOOP4), bound_client((LOOP4, mapping.listen_port)) as s:
            s.sendall(b"hi")
            with accept(listener) as upstream:
                line = b"PROXY TCP4 %s 127.0.0.1 %d %d\r\nhi" % (
                    CLIENT4.encode(), s.getsockname()[1], mapping.listen_port)
                assert recv_exact(upstream, len(line)) == line


# -- the header's bytes ----------------------------------------------------------

def test_proxy_header_formats():
    assert proxy_header("v1", ("192.0.2.1", 1), ("10.0.0.1", 2)) == \
        b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n"
    assert proxy_header("v1", ("::ffff:192.0.2.1", 1, 0, 0), ("::ffff:10.0.0.1", 2, 0, 0)) \
        == b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n"
    assert proxy_header("v1", ("2001:db8::1", 1, 0, 0), ("fe80::1%lo", 2, 0, 1)) == \
        b"PROXY TCP6 2001:db8::1 fe80::1 1 2\r\n"
    four = proxy_header("v2", ("192.0.2.1", 1), ("10.0.0.1", 2))
    assert four[:16] == SIG + b"\x21\x11\x00\x0c" and len(four) == 28
    six = proxy_header("v2", ("2001:db8::1", 1), ("2001:db8::2", 2))
    assert six[:16] == SIG + b"\x21\x21\x00\x24" and len(six) == 52
    for header in (four, six):
        assert parse_proxy_header(header)[0][1] == 1
    assert proxy_header("v1", ("2001:db8::1", 1), ("10.0.0.1", 2)) == b"PROXY UNKNOWN\r\n"
    assert proxy_header("v2", ("2001:db8::1", 1), ("10.0.0.1", 2)) == SIG + b"\x21\x00\x00\x00"
    assert parse_proxy_header(SIG + b"\x21\x00\x00\x00") == (None, None)


# -- configuration: Mapping, flags, backends -----------------------------------

def test_mapping_options_are_validated():
    m = Mapping(8002, "db", 5432, send_proxy="V2 ", accept_proxy="true")
    assert (m.send_proxy, m.accept_proxy) == ("v2", True)
    assert Mapping(8002, "db", 5432) == Mapping(8002, "db", 5432, send_proxy=None)
    for bad in ({"send_proxy": "v3"}, {"send_proxy": 2}, {"accept_proxy": "maybe"},
                {"accept_proxy": 1}):
        with pytest.raises(ConfigError, match="invalid connection '8002:db:5432'"):
            Mapping(8002, "db", 5432, **bad)


def test_cli_flags():
    args = tcpproxy.parse_args(["--connections", "8002:db:5432,8003:db:6379",
                                "--send-proxy", "v1", "--accept-proxy",
                                "--accept-proxy-from", "10.0.0.0/16"])
    assert [(m.send_proxy, m.accept_proxy) for m in args.mappings] == [("v1", True)] * 2
    assert [str(n) for n in args.accept_proxy_from_networks] == ["10.0.0.0/16"]
    assert tcpproxy.StaticBackend(args).fetch() == args.mappings
    plain = tcpproxy.parse_args(["--connections", "8002:db:5432"])
    assert (plain.mappings[0].send_proxy, plain.mappings[0].accept_proxy) == ("", False)
    for argv, named in ((["--send-proxy", "v3"], "argument --send-proxy: send_proxy 'v3'"),
                        (["--accept-proxy-from", "10.0.0.300/8"], "--accept-proxy-from"),
                        (["--backend", "file", "--config", "x.yaml", "--accept-proxy"],
                         "per mapping")):
        if "--backend" not in argv:
            argv = ["--connections", "8002:db:5432"] + argv
        result = run_cli(argv)
        assert result.returncode == 2 and named in result.stderr, result.stderr


def test_check_prints_the_options():
    result = run_cli(["check", "--connections", "8002:db:5432", "--send-proxy", "v2",
                      "--accept-proxy"])
    assert result.returncode == 0, result.stderr
    assert "8002:db:5432 send_proxy=v2 accept_proxy=true" in result.stdout


def test_file_backend_keys():
    pytest.importorskip("yaml")
    from tcpproxy_backends import file as backend
    mappings, _ = backend.parse_config(
        "mappings:\n"
        "  - {listen: 8002, target: 'db:5432', send_proxy: v2, accept_proxy: true}\n"
        "  - {listen: 8003, target: 'db:5433'}\n")
    assert [(m.send_proxy, m.accept_proxy) for m in mappings] == [("v2", True), ("", False)]
    for bad, why in (("send_proxy: v9", "send_proxy 'v9' is not v1 or v2"),
                     ("accept_proxy: perhaps", "accept_proxy 'perhaps'")):
        with pytest.raises(tcpproxy.ConfigRejected, match=why):
            backend.parse_config("mappings:\n  - {listen: 8002, target: 'db:5432', %s}\n"
                                 % bad)


def test_dynamodb_item_attributes():
    from tcpproxy_backends import dynamodb as backend
    key = {"proxy_name": {"S": "p"}, "proxy_configuration": {"S": "8002:db:5432"}}
    for extra, expected in (({"send_proxy": {"S": "v1"}, "accept_proxy": {"BOOL": True}},
                             ("v1", True)),
                            ({"accept_proxy": {"S": "true"}}, ("", True)),
                            ({"send_proxy": {"NULL": True}, "accept_proxy": {"BOOL": False}},
                             ("", False))):
        m = backend._item_mapping(dict(key, **extra))
        assert (m.send_proxy, m.accept_proxy) == expected
    for bad in ({"send_proxy": {"N": "2"}}, {"send_proxy": {"S": "v3"}},
                {"accept_proxy": {"N": "1"}}):
        mappings, problems, held = backend._check_items([dict(key, **bad)])
        assert mappings == [] and held == {8002} and problems, problems


def test_plain_mapping_never_touches_the_proxy_protocol(echo, monkeypatch):
    """A mapping without the options reads no header and sends none."""
    calls = []
    for name in ("read_proxy_header", "send_proxy_header", "admit_proxied_peer"):
        monkeypatch.setattr(tcpproxy, name, lambda *a, _n=name: calls.append(_n))
    mapping = Mapping(free_port(), *echo.address)
    with Proxy([mapping], listen_host=LOOP4):
        assert echo_once((LOOP4, mapping.listen_port)) == b"hello"
    assert calls == []
