"""The status endpoints of the command: /status, /status?format=json,
/connections, methods and unknown paths, and slow HTTP clients."""

import json
import socket

import pytest
from helpers import (
    LOOP4,
    connect,
    echo_once,
    free_port,
    http,
    http_json,
    json_values,
    roundtrip,
    spec,
    wait_until,
    walk,
)

import tcpproxy

# The JSON of /status?format=json and /connections, in one place; a field
# the proxy gains is added here.  A schema is one of:
#   a type, or a tuple of types: the value's type is one of them, exactly
#     (True is a bool, not an int);
#   [schema]: a list whose every item matches schema;
#   {key: schema, ...}: an object with exactly these keys;
#   {str: schema}: an object with any string keys, every value matching.
NONE = type(None)
SESSION = {                                # Session.to_dict(), one per connection
    # "mapping": the listen port, or "IP:PORT" for a mapping with its own
    # listen address; "listen": where its listener is bound
    "id": int, "mapping": (int, str), "listen": str, "target": str, "client": str, "upstream": (str, NONE),
    "state": str, "started": str, "seconds": float, "bytes_up": int, "bytes_down": int,
    "tls": (dict, NONE),                   # {"client": TLS_SIDE or None, "upstream": ...}
}
TLS_SETTINGS = {                           # a mapping's TLS settings (TLS_FIELDS)
    "upstream_tls": bool, "upstream_ca": (str, NONE), "upstream_sni": (str, NONE),
    "upstream_cert": (str, NONE), "upstream_key": (str, NONE), "tls_cert": (str, NONE),
    "tls_key": (str, NONE),
}
MAPPING = {                                # Proxy.status()["mappings"][i]
    "mapping": (int, str), "spec": str, "listen": str, "target": str, "listening": bool,
    "addresses": [str], "expires_in": (float, NONE), "stale": bool, "dns_error": (str, NONE),
    "dns_family": str,
    "allow": [str], "max_connections": int, "tls": TLS_SETTINGS,
    "active": int, "total": int, "bytes_up": int, "bytes_down": int, "refused": int,
    "failed": int, "failing": int,
    "upstreams": [{"address": str, "up": bool, "down_until": (str, NONE), "failures": int}],
}
STATIC_BACKEND = {"name": str, "ok": bool}  # --connections: nothing is polled
POLLED_BACKEND = {                         # BackendPoller's state
    "name": str, "ok": bool, "polls": int, "interval": (int, float),
    "last_poll_ok": (str, NONE), "last_error": (str, NONE), "next_poll": (str, NONE),
    "error": (str, NONE), "rejected": (str, NONE), "last_poll_failed": bool,
    "errors": int, "last_success": (float, NONE),
}
FILE_BACKEND = dict(POLLED_BACKEND, config=str)


def status_schema(backend):
    return {                               # Proxy.status()
        "ok": bool, "reason": str, "warnings": [str], "version": str, "name": (str, NONE),
        "uptime": float,
        "state": str, "backend": backend, "active": int, "mappings": [MAPPING],
        "failed_mappings": {str: str}, "resolver": [str],
    }


CONNECTIONS = {"name": (str, NONE), "connections": [str], "sessions": [SESSION]}
CONNECTIONS_NONE = dict(CONNECTIONS, error=str)     # no mapping at all


def check_schema(value, schema, where="$"):
    """Assert that ``value`` (parsed JSON) matches ``schema`` (see above)."""
    if isinstance(schema, list):
        assert type(value) is list, "%s: %r is not a list" % (where, value)
        for i, item in enumerate(value):
            check_schema(item, schema[0], "%s[%d]" % (where, i))
    elif isinstance(schema, dict):
        assert type(value) is dict, "%s: %r is not an object" % (where, value)
        if list(schema) == [str]:
            for key, item in value.items():
                check_schema(item, schema[str], "%s[%r]" % (where, key))
            return
        assert set(value) == set(schema), "%s: keys %s; unexpected %s, missing %s" % (
            where, sorted(value), sorted(set(value) - set(schema)),
            sorted(set(schema) - set(value)))
        for key, item in schema.items():
            check_schema(value[key], item, "%s.%s" % (where, key))
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        assert type(value) in types, "%s: %r is a %s, not %s" % (
            where, value, type(value).__name__, " or ".join(t.__name__ for t in types))


@pytest.fixture
def proxied(start_proxy, make_echo):
    e1, e2 = make_echo(), make_echo()
    l1, l2 = free_port(), free_port()
    specs = [spec(l1, LOOP4, e1.port), spec(l2, LOOP4, e2.port)]
    p = start_proxy(",".join(specs))
    p.specs = specs
    p.listen = (l1, l2)
    p.echoes = (e1, e2)
    return p


def test_status_ok(proxied):
    status, headers, body = http(proxied.status_address, "GET", "/status")
    assert status == 200
    assert body.strip() == b"OK"
    assert headers.get("content-type", "").startswith("text/plain")


def test_head(proxied):
    for path in ("/status", "/connections", "/status?format=json"):
        status, _headers, body = http(proxied.status_address, "HEAD", path)
        assert status == 200, path
        assert body == b""


def test_status_json(proxied):
    l1, _ = proxied.listen
    with connect((LOOP4, l1)) as c:
        assert roundtrip(c, b"x" * 1000) == b"x" * 1000
    assert proxied.echoes[0].wait_idle(5)

    def counted():
        data = http_json(proxied.status_address, "/status?format=json")
        return data if 1000 in list(json_values(data)) else None

    data = wait_until(counted, 5, message=lambda: "no byte count of 1000 in %s" % http_json(
        proxied.status_address, "/status?format=json"))
    assert data["version"] == tcpproxy.__version__
    keys = {k for k, _ in walk(data)}
    assert any("uptime" in k for k in keys), keys
    assert any("backend" in k for k in keys), keys
    assert "static" in json.dumps(data)
    text = json.dumps(data)
    for s in proxied.specs:
        assert s.split(":", 1)[1].rsplit(":", 1)[1] in text      # target port
        assert s.split(":", 1)[0] in text                        # listen port
    assert any("stale" in k for k in keys), keys
    assert any("expire" in k for k in keys), keys


def test_connections_json(proxied):
    l1, l2 = proxied.listen
    data = http_json(proxied.status_address, "/connections")
    assert data["name"] is None
    assert sorted(data["connections"]) == sorted(proxied.specs)
    assert data["sessions"] == []
    c1, c2 = connect((LOOP4, l1)), connect((LOOP4, l2))
    try:
        assert roundtrip(c1, b"one") == b"one"
        assert roundtrip(c2, b"two!") == b"two!"
        data = http_json(proxied.status_address, "/connections")
        sessions = data["sessions"]
        assert len(sessions) == 2, sessions
        text = json.dumps(sessions)
        for c in (c1, c2):
            assert str(c.getsockname()[1]) in text, "client address missing: %s" % text
        for e in proxied.echoes:
            assert str(e.port) in text, "upstream address missing: %s" % text
        for s in sessions:
            assert isinstance(s, dict) and len(s) >= 5, s
        assert len({json.dumps(s.get("id")) for s in sessions}) == 2, "ids not distinct"
    finally:
        c1.close()
        c2.close()
    assert wait_until(lambda: http_json(proxied.status_address, "/connections")["sessions"] == [],
                      5)


def test_status_and_connections_schema(proxied):
    l1, l2 = proxied.listen
    with connect((LOOP4, l1)) as c:
        assert roundtrip(c, b"schema") == b"schema"
        status = http_json(proxied.status_address, "/status?format=json")
        connections = http_json(proxied.status_address, "/connections")
    check_schema(status, status_schema(STATIC_BACKEND))
    check_schema(connections, CONNECTIONS)
    # the lists were not empty: their items were checked too
    assert sorted(m["listen"] for m in status["mappings"]) == sorted(
        "%s:%d" % (LOOP4, port) for port in (l1, l2))
    assert all(m["addresses"] == [LOOP4] for m in status["mappings"]), status["mappings"]
    assert [s["mapping"] for s in connections["sessions"]] == [l1], connections


def test_schema_of_a_polled_backend_without_mappings(proxy_cli, tmp_path):
    config = tmp_path / "mappings.yaml"
    config.write_text("mappings: []\n")
    st = (LOOP4, free_port())
    proxy_cli(["--listen-address", LOOP4, "--backend", "file", "--config", str(config),
               "--status", "%s:%d" % st], status=st)

    def polled():                          # 503 until the first poll succeeded
        data = json.loads(http(st, "GET", "/status?format=json")[2])
        return data if data["backend"].get("polls") else None

    status = wait_until(polled, 10)
    check_schema(status, status_schema(FILE_BACKEND))
    check_schema(http_json(st, "/connections"), CONNECTIONS_NONE)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_405(proxied, method):
    for path in ("/status", "/connections"):
        status, _, _ = http(proxied.status_address, method, path)
        assert status == 405, (method, path, status)


@pytest.mark.parametrize("path", ["/", "/nope", "/status/extra", "/connectionsx"])
def test_unknown_path_404(proxied, path):
    assert http(proxied.status_address, "GET", path)[0] == 404
    assert http(proxied.status_address, "HEAD", path)[0] == 404


def test_slow_http_client_does_not_stall(proxied):
    l1, _ = proxied.listen
    idle = socket.create_connection(proxied.status_address, timeout=5)
    partial = socket.create_connection(proxied.status_address, timeout=5)
    try:
        partial.sendall(b"GET /sta")
        for i in range(5):
            assert http(proxied.status_address, "GET", "/status", timeout=3)[0] == 200
            assert echo_once((LOOP4, l1), b"go%d" % i, timeout=3) == b"go%d" % i
    finally:
        idle.close()
        partial.close()
    assert http(proxied.status_address, "GET", "/status")[0] == 200
