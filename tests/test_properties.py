"""Property-based tests (hypothesis) with arbitrary input: the connection
spec parser, the YAML loader, the command line and the HTTP status endpoints
answer with a clear error or a correct result, never a traceback."""

import contextlib
import io
import ipaddress
import re
import socket

import pytest
from helpers import LOOP4, http
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import tcpproxy

yaml = pytest.importorskip("yaml")
from tcpproxy_backends import file as file_backend

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# -- strategies -------------------------------------------------------------------

# Text that leans towards the characters the parsers care about.
SPEC_ALPHABET = st.sampled_from(list("0123456789:[].-_abcfxAZ ,\t\n%/") + ["\x00", "é", "٣"])
spec_text = st.one_of(
    st.text(max_size=40),
    st.text(SPEC_ALPHABET, max_size=40),
)

ports = st.integers(1, 65535)
label = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,20})", fullmatch=True)
hostnames = st.builds(lambda parts, dot: ".".join(parts) + dot,
                      st.lists(label, min_size=1, max_size=4), st.sampled_from(["", "."]))
hostnames = hostnames.filter(lambda h: len(h) <= 253)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


def bracket(host):
    return "[%s]" % host if ":" in host else host


# -- Mapping.parse / parse_connections --------------------------------------------

def check_mapping(mapping):
    assert isinstance(mapping, tcpproxy.Mapping)
    assert 1 <= mapping.listen_port <= 65535 and 1 <= mapping.port <= 65535
    again = tcpproxy.Mapping.parse(mapping.spec)
    assert again == mapping
    assert again.spec == mapping.spec
    assert str(mapping) == mapping.spec


@FAST
@given(spec_text)
@example("8002:db.example.com:5432")
@example("8002:[::1]:5432")
@example("8002:::1:5432")
@example("99999999999999999999999999:a:1")
@example("1:" + "a" * 300 + ":1")
@example("1:[fe80::1%eth0]:2")
@example("1:a\n:2")
def test_mapping_parse_arbitrary_text(text):
    try:
        mapping = tcpproxy.Mapping.parse(text)
    except tcpproxy.ConfigError as exc:
        assert str(exc)
        return
    check_mapping(mapping)


# Refused since issue 11 (tests/test_hostile.py): a name that is a number
# (127.1) and a target in 0.0.0.0/8, :: or multicast.
usable = st.one_of(hostnames, v4, v6).filter(
    lambda h: not (tcpproxy._unusable_address(h) if tcpproxy._is_ip(h)
                   else tcpproxy._NUMERIC_NAME.fullmatch(h)))


@FAST
@given(ports, usable, ports, st.sampled_from(["", " ", "\t"]))
def test_mapping_parse_valid_specs(lport, host, rport, pad):
    text = "%s%d:%s:%d%s" % (pad, lport, bracket(host), rport, pad)
    mapping = tcpproxy.Mapping.parse(text)
    assert (mapping.listen_port, mapping.port) == (lport, rport)
    if ":" in host or host[0].isdigit():
        try:
            assert ipaddress.ip_address(mapping.host) == ipaddress.ip_address(host)
        except ValueError:
            assert mapping.host == host          # a name made of digits and dots
    else:
        assert mapping.host == host
    check_mapping(mapping)


@FAST
@given(st.lists(spec_text, max_size=5))
@example(["8002:a:1,8003:b:2 8004:[::1]:3"])
@example(["8002:a:1", "8002:b:2"])
def test_parse_connections_arbitrary(values):
    try:
        mappings = tcpproxy.parse_connections(values)
    except tcpproxy.ConfigError as exc:
        assert str(exc)
        return
    listen = [m.listen_port for m in mappings]
    assert len(listen) == len(set(listen))
    for m in mappings:
        check_mapping(m)
    assert tcpproxy.parse_connections([" ".join(m.spec for m in mappings)]) == mappings


# -- the YAML loader ---------------------------------------------------------------

YAML_ALPHABET = st.sampled_from(list("mapingsltert:-[]{},'\"&*!#|>%@` \n\t0123456789.")
                                + ["listen", "target", "host", "port", "allow",
                                   "max_connections", "mappings:", "\n  - ", "x-a: &a",
                                   "*a", "!!binary", "!!python/object", "\x00", "\ufeff"])
yaml_text = st.one_of(st.text(max_size=200), st.lists(YAML_ALPHABET, max_size=40).map("".join))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 70000),
                    st.floats(allow_nan=True), st.text(max_size=20), ports, v4, v6,
                    st.sampled_from(["127.0.0.1/8", "::1/128", "10.0.0.0/8, ::/0", "bad/99"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
items = st.one_of(
    st.fixed_dictionaries({"listen": st.one_of(ports, scalars)}, optional={
        "target": st.one_of(st.builds(lambda h, p: "%s:%d" % (bracket(h), p),
                                      st.one_of(hostnames, v4, v6), ports), scalars),
        "host": st.one_of(hostnames, v4, v6, scalars),
        "port": st.one_of(ports, scalars),
        "allow": values,
        "max_connections": values,
        "tagret": scalars,
    }),
    st.builds(lambda lp, h, rp: "%d:%s:%d" % (lp, bracket(h), rp), ports,
              st.one_of(hostnames, v4, v6), ports),
    values,
)
documents = st.one_of(
    st.fixed_dictionaries({"mappings": st.lists(items, max_size=5)},
                          optional={"x-office": values, "other": values}),
    values,
)


def check_loaded(result):
    mappings, skipped = result
    assert isinstance(skipped, list)
    listen = [m.listen_port for m in mappings]
    assert len(listen) == len(set(listen))
    for m in mappings:
        check_mapping(m)


@FAST
@given(yaml_text)
@example("mappings: []\n")
@example("mappings: &a [*a]\n")
@example("mappings:\n  - ? [a, b]\n    : 1\n")
@example("mappings: [{listen: !!binary aGk=, target: 'a:1'}]\n")
@example("mappings: [{listen: 1, target: 'a:1', max_connections: .inf}]\n")
@example("mappings: [{listen: 1, target: 'a:1', max_connections: .nan}]\n")
@example("mappings: [{listen: 1, target: 'a:1', allow: [1, 2]}]\n")
@example("mappings: [{listen: 2001-01-01, target: 'a:1'}]\n")
@example("mappings:\n- !!python/object:os.system [echo]\n")
@example("\ufeffmappings: []\n")
def test_yaml_loader_arbitrary_text(text):
    try:
        result = file_backend.parse_config(text, "m.yaml")
    except (tcpproxy.BackendError, tcpproxy.ConfigError) as exc:
        assert str(exc)
        return
    check_loaded(result)


@FAST
@given(documents)
def test_yaml_loader_arbitrary_documents(doc):
    text = yaml.safe_dump(doc, allow_unicode=True)
    try:
        result = file_backend.parse_config(text, "m.yaml")
    except (tcpproxy.BackendError, tcpproxy.ConfigError) as exc:
        assert str(exc)
        return
    check_loaded(result)
    # a list of short forms: the first entry per listen port, in order
    if (isinstance(doc, dict) and set(doc) <= {"mappings", "x-office"}
            and all(isinstance(item, str) for item in doc["mappings"])):
        first = {}
        for item in doc["mappings"]:
            try:
                m = tcpproxy.Mapping.parse(item)
            except tcpproxy.ConfigError:
                continue                        # skipped by the loader too
            first.setdefault(m.listen_port, m)
        assert result[0] == list(first.values())


# -- the command line --------------------------------------------------------------

def _options():
    parser = tcpproxy.build_parser()
    return sorted({s for a in parser._actions for s in a.option_strings})


OPTIONS = _options()
arg = st.one_of(
    st.sampled_from(OPTIONS),
    st.sampled_from(OPTIONS).map(lambda o: o[1:] if o.startswith("--") else o),   # -debug
    st.builds(lambda o, v: "%s=%s" % (o, v), st.sampled_from(OPTIONS), st.text(max_size=12)),
    st.sampled_from(["0", "1", "2", "-1", "3", "nan", "inf", "1e9", "0.5", "", " ", "off",
                     "static", "file", "dynamodb", "elasticache", "bogus", "::", "::1",
                     "127.0.0.1", "0.0.0.0", "[::1]:53", "10.0.0.0/8", "bad/cidr",
                     "8002:127.0.0.1:5432", "8002:[::1]:5432", "8002:a:1,8003:b:2",
                     "70000:a:1", "dynamodb", "-", "--", "-x", "\udcff", "٣"]),
    st.text(max_size=16),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(arg, max_size=8))
@example(["--help"])
@example(["--version"])
@example(["--connections", "8002:127.0.0.1:1", "--drain-timeout", "0"])
@example(["--connections", "8002:127.0.0.1:1", "--status", "[::1"])
@example(["--connections", "8002:127.0.0.1:1", "--elasticache-port", "٣"])
@example(["--connections", "8002:127.0.0.1:1", "--allow", "::/0,1.2.3.4/33"])
@example(["--connections", "8002:127.0.0.1:1", "--idle-timeout", "9" * 5000])
def test_cli_arbitrary_argv(argv):
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = tcpproxy.parse_args(argv)
    except SystemExit as exc:
        assert exc.code in (0, 2), (exc.code, argv, err.getvalue())
        if exc.code == 2:
            message = err.getvalue()
            assert message.startswith("tcpproxy: error: "), message
            assert "Traceback" not in message, message
        return
    assert args.backend in tcpproxy.BACKENDS
    assert args.debug in (0, 1, 2)
    if args.backend == "static":
        assert args.mappings
    for m in args.mappings:
        check_mapping(m)


# -- the HTTP endpoints -------------------------------------------------------------

# 505: http.server's answer to HTTP/2.0 and later request lines.
STATUSES = {200, 400, 404, 405, 414, 431, 501, 503, 505}

methods = st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
                                     "TRACE", "CONNECT", "PATCH", "get", "GET\x00", ""]),
                    st.text(max_size=10))
paths = st.one_of(st.sampled_from(["/status", "/status?format=json", "/connections",
                                   "/connections?x=%ff", "/", "*", "//status",
                                   "http://x/status", "/status?format=json&format=x",
                                   "/%00", "/status#frag", "/../status", ""]),
                  st.text(max_size=60))
versions = st.one_of(st.sampled_from(["HTTP/1.0", "HTTP/1.1", "HTTP/0.9", "HTTP/2.0",
                                      "HTTP/1", "HTTP/a.b", "HTTP/1.0 x", "", "http/1.0",
                                      "HTTP/01.01", "HTTP/1.1000000000000000000000"]),
                     st.text(max_size=12))
headers = st.lists(st.tuples(st.one_of(st.sampled_from(["Host", "Connection", "Expect",
                                                         "Content-Length", "X"]),
                                       st.text(max_size=12)),
                             st.one_of(st.sampled_from(["keep-alive", "close", "100-continue",
                                                        "5", "-1", ""]),
                                       st.text(max_size=30))),
                   max_size=8)
seps = st.sampled_from([" ", "  ", "\t"])


def build_request(method, path, version, hdrs, sep):
    line = sep.join([method, path] + ([version] if version else []))
    lines = [line] + ["%s: %s" % kv for kv in hdrs]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass")


def read_answer(addr, request, timeout=5.0):
    """(bytes until the server closes, whether it ended with a reset)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        data = b""
        try:
            s.sendall(request)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data, False
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return data, True


TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def check_answer(answer, request):
    """Assert that ``answer`` is nothing (closed) or a well-formed HTTP/1.x
    response with an expected status; return the status (None if closed)."""
    data, reset = answer
    if not data:
        return None                             # closed without an answer: allowed
    status_line = data.split(b"\r\n", 1)[0]
    m = re.match(rb"^HTTP/1\.[01] (\d{3}) [^\r\n]*$", status_line)
    assert m, "not an HTTP response to %r: %r" % (request[:80], data[:120])
    code = int(m.group(1))
    assert code in STATUSES, (code, request[:80])
    if reset:
        return code                             # cut short: the status line must do
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, "no end of headers: %r" % data[:200]
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        assert colon and TOKEN.match(name), "bad header line %r" % line
        fields[name.lower()] = value.strip()
    if b"content-length" in fields and body:
        assert len(body) == int(fields[b"content-length"]), (fields, len(body))
    return code


@pytest.fixture
def live_status(make_echo):
    echo = make_echo()
    mapping = tcpproxy.Mapping(0, LOOP4, echo.port)
    with tcpproxy.Proxy([mapping], listen_host=LOOP4, status_address=(LOOP4, 0)) as proxy:
        yield proxy.status_address


HTTP_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def test_http_arbitrary_requests(live_status):
    addr = live_status
    seen = set()

    @HTTP_SETTINGS
    @given(methods, paths, versions, headers, seps)
    @example("GET", "/status", "HTTP/1.0", [], " ")
    @example("HEAD", "/connections", "HTTP/1.1", [("Host", "x")], " ")
    @example("GET", "/nope", "HTTP/1.0", [], " ")
    @example("POST", "/status", "HTTP/1.0", [("Content-Length", "5")], " ")
    @example("GET", "/status", "", [], " ")                      # HTTP/0.9 simple request
    @example("GET", "/status", "HTTP/2.0", [], " ")
    @example("\x16\x03\x01", "\x00", "", [], " ")
    @example("GET", "/status", "HTTP/1.0", [("X", "y")] * 120, " ")
    @example("GET", "/", "HTTP/1.1", [("Expect", "100-continue")], " ")
    def check(method, path, version, hdrs, sep):
        request = build_request(method, path, version, hdrs, sep)
        assume(len(request) < 60000)
        seen.add(check_answer(read_answer(addr, request), request))
        status, _, body = http(addr, "GET", "/status", timeout=5)   # still serving
        assert (status, body) == (200, b"OK")

    check()
    assert {200, 400, 404, 405} <= seen, seen


def test_http_arbitrary_bytes(live_status):
    addr = live_status

    @HTTP_SETTINGS
    @given(st.binary(max_size=300))
    @example(b"")
    @example(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
    @example(b"GET /status HTTP/1.0\r\nX: y\r\n\x00")
    def check(data):
        request = data + b"\r\n\r\n"
        check_answer(read_answer(addr, request), request)
        assert http(addr, "GET", "/status", timeout=5)[0] == 200

    check()
