"""Hostile inputs (issue 11): empty allow lists fail closed, odd ports,
hosts and DNS answers are refused, proxy loops are refused without a
connection, logs cannot be forged, thousands of idle mappings cost
nothing, and an exposed status server is warned about.

Everything on loopback: the loopback DNS server serves the hostile
answers; waits are on sockets, the DNS server's query counter or
``wait_until`` with a timeout.
"""

import logging
import os
import signal
import threading
import time

import pytest
from helpers import (
    LOOP4,
    EchoServer,
    banner_via,
    closed_promptly,
    connect,
    free_port,
    free_ports,
    http_json,
    run_cli,
    spec,
    wait_until,
)

import tcpproxy
from tcpproxy import ConfigError, Mapping, parse_allow

NAME = "db.example.test"


def control_characters(text):
    """The control characters in *text* other than the newlines that end
    log lines."""
    return sorted({c for c in text if (ord(c) < 32 and c != "\n") or 0x7f <= ord(c) < 0xa0})


# -- 1. fail closed ------------------------------------------------------------

@pytest.mark.parametrize("value", ["", " , ", " ", [], [""], ["", " , "], set()])
def test_parse_allow_given_but_empty_is_an_error(value):
    with pytest.raises(ConfigError) as exc:
        parse_allow(value, "allow (mappings.yaml line 3)")
    assert "allow (mappings.yaml line 3) is empty" in str(exc.value)
    assert "anyone" in str(exc.value)


def test_parse_allow_none_means_no_restriction():
    assert parse_allow(None) == ()
    assert parse_allow(()) == ()           # what parse_allow(None) returns
    assert parse_allow("127.0.0.0/8, ,") == (parse_allow("127.0.0.0/8")[0],)


@pytest.mark.parametrize("allow", ["", " , ", []])
def test_mapping_with_empty_allow_is_an_error(allow):
    with pytest.raises(ConfigError) as exc:
        Mapping(8002, "db.example.com", 5432, allow=allow)
    assert "8002:db.example.com:5432" in str(exc.value) and "empty" in str(exc.value)
    assert Mapping(8002, "db.example.com", 5432).allow == ()


@pytest.mark.parametrize("flag,value", [
    ("--allow", ""), ("--allow", " , "), ("--status-allow", ""), ("--status-allow", " ,"),
])
def test_cli_empty_allow_fails_closed(flag, value):
    r = run_cli(["--connections", "%d:127.0.0.1:1" % free_port(), flag, value,
                 "--status", "off"])
    assert r.returncode == 2, r
    assert "%s is empty" % flag in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) <= 3


@pytest.mark.parametrize("text", ["٢٨٠١٦", "２８０１６", "2801६", "²"])
def test_ports_are_ascii_digits_only(text):
    with pytest.raises(ConfigError):
        tcpproxy.check_port(text)
    with pytest.raises(ConfigError):
        Mapping.parse("%s:db.example.com:5432" % text)
    with pytest.raises(ConfigError):
        Mapping.parse("8002:db.example.com:%s" % text)
    with pytest.raises(ConfigError):
        tcpproxy.check_limit(text)


def test_cli_unicode_digit_port_is_an_error():
    r = run_cli(["--connections", "٢٨٠١٦:127.0.0.1:1", "--status", "off"])
    assert r.returncode == 2 and "٢٨٠١٦" in r.stderr, r.stderr
    r = run_cli(["--connections", "%d:127.0.0.1:1" % free_port(), "--connect-attempts", "٣",
                 "--status", "off"])
    assert r.returncode == 2 and "--connect-attempts" in r.stderr, r.stderr


@pytest.mark.parametrize("target,why", [
    ("0.0.0.0", "means this host"), ("0.1.2.3", "means this host"), ("[::]", "means this host"),
    ("[::ffff:0.0.0.0]", "means this host"), ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"), ("[ff02::1]", "multicast"),
])
def test_unusable_literal_target_is_refused_at_parse(target, why):
    with pytest.raises(ConfigError) as exc:
        Mapping.parse("8002:%s:5432" % target)
    assert why in str(exc.value)
    r = run_cli(["--connections", "%d:%s:5432" % (free_port(), target), "--status", "off"])
    assert r.returncode == 2 and why in r.stderr, r.stderr


@pytest.mark.parametrize("host,full", [
    ("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
    ("10.1.2", "10.1.0.2"), ("1.2.3.4.5", None), ("db.example.123", None),
])
def test_numeric_host_name_is_refused_at_parse(host, full):
    with pytest.raises(ConfigError) as exc:
        Mapping.parse("8002:%s:5432" % host)
    assert "a number, not a name" in str(exc.value)
    if full:
        assert full in str(exc.value)


def test_ordinary_names_and_addresses_still_work():
    for host in ("db.example.com", "db1", "1db.example.com", "x-123.example.com",
                 "127.0.0.1", "::1", "10.0.0.1", "db.example.com."):
        assert Mapping(8002, host, 5432).host == host


def hostile_upstreams():
    """Echo upstreams on 127.0.0.1:P (banner L: what 0.0.0.0 would reach)
    and 127.0.0.2:P (banner G, the good one)."""
    for _ in range(20):
        local = EchoServer(host=LOOP4, banner=b"L")
        try:
            good = EchoServer(host="127.0.0.2", port=local.port, banner=b"G")
        except OSError:
            local.close()
            continue
        return local, good
    pytest.fail("no common port free on 127.0.0.1 and 127.0.0.2")


def test_dns_answer_with_unusable_addresses_is_skipped(start_proxy, dns_server):
    local, good = hostile_upstreams()
    with local, good:
        dns_server.set(NAME, ["0.0.0.0", "224.0.0.1", "127.0.0.2", "::"], ttl=300)
        lport = free_port()
        p = start_proxy(spec(lport, NAME, local.port),
                        extra=["--resolver", dns_server.nameserver])
        for _ in range(8):
            assert banner_via((LOOP4, lport)) == b"G"
        assert local.accepted == 0, "a connection reached this host through 0.0.0.0 or ::"
        assert wait_until(lambda: "skipped" in p.stderr(), 5), p.stderr()
        out = p.stderr()
        assert "0.0.0.0:%d: 0.0.0.0 means this host" % local.port in out, out
        assert "224.0.0.1 is a multicast address" in out, out


def test_dns_answer_of_only_unusable_addresses_closes_the_client(start_proxy, dns_server):
    local, good = hostile_upstreams()
    with local, good:
        dns_server.set(NAME, ["0.0.0.0"], ttl=300)
        lport = free_port()
        p = start_proxy(spec(lport, NAME, local.port),
                        extra=["--resolver", dns_server.nameserver])
        assert closed_promptly((LOOP4, lport), 5)
        assert local.accepted == 0
        assert wait_until(lambda: "no upstream" in p.stderr(), 5), p.stderr()
        assert "0.0.0.0 means this host" in p.stderr()
        assert wait_until(lambda: http_json(p.status_address, "/status?format=json")
                          ["mappings"][0]["failed"] == 1, 5)


# -- 3. no proxy loops ---------------------------------------------------------

def loop_refused(p, addr, tries=5):
    """Clients to *addr* are closed, each without making a session of its
    own through the loop; the reason is logged once (rate-limited)."""
    for _ in range(tries):
        try:
            with connect(addr) as s:
                s.sendall(b"x")
                s.settimeout(5)
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
        except ConnectionError:
            pass
    assert wait_until(lambda: "proxy loop" in p.stderr(), 5), p.stderr()

    def counts():
        status = http_json(p.status_address, "/status?format=json")
        return next(m for m in status["mappings"] if m["listen"].endswith(":%d" % addr[1]))
    # the client is closed a moment before its failure is counted
    assert wait_until(lambda: counts()["failed"] == tries, 5), counts()
    assert counts()["total"] == tries, "the loop made sessions of its own: %s" % counts()
    assert sum("proxy loop" in line for line in p.stderr().splitlines()) == 1, p.stderr()
    assert p.alive()


def test_proxy_loop_to_itself_is_refused(start_proxy):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, lport))
    loop_refused(p, (LOOP4, lport))


def test_proxy_loop_between_two_mappings_is_refused(start_proxy):
    a, b = free_port(), free_port()
    p = start_proxy(spec(a, LOOP4, b), spec(b, LOOP4, a))
    loop_refused(p, (LOOP4, a))


def test_proxy_loop_through_dns_is_refused(start_proxy, dns_server):
    dns_server.set(NAME, [LOOP4], ttl=300)
    lport = free_port()
    p = start_proxy(spec(lport, NAME, lport), extra=["--resolver", dns_server.nameserver])
    loop_refused(p, (LOOP4, lport))


def test_proxy_loop_to_the_status_port_is_refused(proxy_cli):
    lport, sport = free_port(), free_port()
    p = proxy_cli(["--listen-address", LOOP4, "--status", "%s:%d" % (LOOP4, sport),
                   "--connections", spec(lport, LOOP4, sport)],
                  ports=[lport], status=(LOOP4, sport))
    p.status_address = (LOOP4, sport)
    loop_refused(p, (LOOP4, lport))


def test_own_address_knows_wildcard_listeners():
    """A wildcard listener (0.0.0.0 or ::) is every local address on its
    port; a specific one only its own (checked without binding one)."""
    proxy = tcpproxy.Proxy([])
    proxy.own_ports = {9: ("0.0.0.0",), 10: ("::",), 11: ("127.0.0.7",)}
    assert proxy.own_address("127.0.0.5", 9)
    assert proxy.own_address("::ffff:127.0.0.5", 9)
    assert not proxy.own_address("::1", 9)          # 0.0.0.0 is IPv4 only
    assert proxy.own_address("::1", 10) and proxy.own_address("127.0.0.9", 10)
    assert proxy.own_address("127.0.0.7", 11) and not proxy.own_address("127.0.0.8", 11)
    assert not proxy.own_address("127.0.0.5", 12)
    assert not proxy.own_address("192.0.2.1", 9)    # TEST-NET: not this host's


# -- 4. logs are safe ----------------------------------------------------------

def test_clip_escapes_and_truncates():
    clip = tcpproxy._clip
    assert clip("plain text, é") == "plain text, é"
    assert clip("a\rb\nc\x1b[31m\x00\u202e\\") == "a\\rb\\nc\\x1b[31m\\x00\\u202e\\\\"
    long = clip("x" * 100000)
    assert len(long) < tcpproxy.TEXT_LIMIT + 40 and long.endswith("characters cut)")
    assert not control_characters(clip("".join(map(chr, range(0x110)))))


FORGED = "2026-01-01 00:00:00,000 ERROR MainThread: FORGED LINE"


@pytest.mark.parametrize("request_bytes", [
    b"GET /x\r" + FORGED.encode() + b"\r\n\r\n",                  # 400: bad request line
    b"GET /x\x1b[2J\x1b[H\r" + FORGED.replace(" ", "_").encode() + b" HTTP/1.0\r\n\r\n",
    b"GET /x HTTP/1.0\r\nHost: a\rb\r\n\r\n",
    b"\x00\x01\x02\x7f\x9b\r\n\r\n",
], ids=["bad-request-line", "escape-sequences", "header", "binary"])
def test_status_request_lines_cannot_forge_log_lines(start_proxy, echo, request_bytes):
    lport = free_port()
    p = start_proxy(spec(lport, LOOP4, echo.port), extra=["--debug", "2"])
    with connect(p.status_address) as s:
        s.sendall(request_bytes)
        s.settimeout(5)
        while s.recv(4096):
            pass
    assert wait_until(lambda: "status 127.0.0.1" in p.stderr(), 5), p.stderr()
    out = p.stderr()
    assert not control_characters(out), (control_characters(out), out)
    assert not any(line.startswith(FORGED[:24]) for line in out.splitlines()), out


class _FailingBackend:
    name = "hostile"
    interval = 60

    def __init__(self, message):
        self.message = message

    def fetch(self):
        raise tcpproxy.BackendError(self.message)

    def describe(self):
        return {}


def test_backend_error_text_is_clipped_in_log_and_status(caplog):
    message = "bad file: " + "\x1b[31m\r\nFORGED " * 20000
    with tcpproxy.Proxy([], listen_host=LOOP4) as proxy:
        poller = tcpproxy.BackendPoller(proxy, _FailingBackend(message))
        with caplog.at_level(logging.WARNING, logger="tcpproxy"):
            assert not poller.poll_once()
        error = proxy.status()["backend"]["error"]
        assert len(error) < tcpproxy.TEXT_LIMIT + 100 and not control_characters(error)
        logged = [r.getMessage() for r in caplog.records if "bad file" in r.getMessage()]
        assert logged, caplog.text
        for line in logged:
            assert len(line) < tcpproxy.TEXT_LIMIT + 200 and not control_characters(line)


def test_alias_bomb_is_not_expanded_into_the_error():
    """A YAML alias bomb under allow: (9 levels of 9 references) reaches
    parse_allow as a nested list; its error message stays short and quick."""
    bomb = ["lol"]
    for _ in range(9):
        bomb = [bomb] * 9
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as exc:
        parse_allow(bomb, "allow")
    assert time.monotonic() - t0 < 1
    assert len(str(exc.value)) < 1000


def test_mapping_errors_quote_values_briefly():
    with pytest.raises(ConfigError) as exc:
        Mapping(8002, "db.example.com", "9" * 100000)
    assert len(str(exc.value)) < 1000
    with pytest.raises(ConfigError) as exc:
        Mapping(8002, "x\r\n" * 10000, 1)
    assert len(str(exc.value)) < 1000 and "\r" not in str(exc.value)


# -- 5. many mappings are cheap -----------------------------------------------

def proc_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_mappings_cost(proxy_cli, n, seconds):
    """Start *n* idle mappings; return (CPU share over *seconds*, seconds
    from SIGTERM to exit)."""
    ports = free_ports(n)
    p = proxy_cli(["--listen-address", LOOP4, "--status", "off", "--connections"]
                  + ["%d:127.0.0.1:9" % port for port in ports],
                  ports=ports, timeout=60 + n / 200)
    cpu0, t0 = proc_cpu_seconds(p.pid), time.monotonic()
    # A measurement window, not a synchronisation: nothing happens, which
    # is the point, so the wait is on an Event nobody sets.
    threading.Event().wait(seconds)
    assert p.alive()
    share = (proc_cpu_seconds(p.pid) - cpu0) / (time.monotonic() - t0)
    t0 = time.monotonic()
    assert p.stop(signal.SIGTERM, timeout=30) == 0, p.output()
    return share, time.monotonic() - t0


def test_a_thousand_idle_mappings_cost_nothing(proxy_cli):
    share, stop = idle_mappings_cost(proxy_cli, 1000, 5)
    assert share < 0.05, "1,000 idle mappings took %.1f%% of a CPU" % (100 * share)
    assert stop < 5, "SIGTERM took %.1fs" % stop


@pytest.mark.perf
def test_ten_thousand_idle_mappings_cost_nothing(proxy_cli):
    share, stop = idle_mappings_cost(proxy_cli, 10000, 10)
    assert share < 0.05, "10,000 idle mappings took %.1f%% of a CPU" % (100 * share)
    assert stop < 5, "SIGTERM took %.1fs" % stop


def test_stopping_many_listeners_is_prompt():
    """In-process: 300 listeners stop at once (no wake-up per poll interval)."""
    ports = free_ports(300)
    proxy = tcpproxy.Proxy([Mapping(port, LOOP4, 9) for port in ports], listen_host=LOOP4)
    proxy.start()
    servers = list(proxy.servers.values())
    t0 = time.monotonic()
    proxy.stop()
    assert time.monotonic() - t0 < 2
    assert all(s.socket.fileno() == -1 for s in servers)


def test_listeners_refuse_new_clients_once_draining(echo):
    lport = free_port()
    proxy = tcpproxy.Proxy([Mapping(lport, LOOP4, echo.port)], listen_host=LOOP4)
    with proxy:
        held = connect((LOOP4, lport))
        try:
            assert wait_until(lambda: proxy.registry.active() == 1, 5)
            proxy._stop_accepting_all()
            with pytest.raises(ConnectionRefusedError):
                connect((LOOP4, lport)).close()
            assert proxy.status()["mappings"][0]["listening"] is False
        finally:
            held.close()


# -- 7. status exposure --------------------------------------------------------

def test_status_beyond_loopback_without_allow_is_warned():
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        warning = tcpproxy.status_exposure((host, 8001), ())
        assert "/connections" in warning and "--status-allow" in warning
        assert "client" in warning and "upstream" in warning
    assert tcpproxy.status_exposure(("0.0.0.0", 8001), parse_allow("10.0.0.0/8")) is None
    for host in ("127.0.0.1", "127.0.0.9", "::1", "localhost"):
        assert tcpproxy.status_exposure((host, 8001), ()) is None


def test_status_on_loopback_is_not_warned(start_proxy, echo):
    p = start_proxy(spec(free_port(), LOOP4, echo.port))
    assert "open to anyone" not in p.stderr()
