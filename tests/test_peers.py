"""Real clients through the proxy: psql and pgbench to PostgreSQL, redis-cli
to Redis, a client to HAProxy (``send-proxy``) in front of an echo server,
and Prometheus scraping an endpoint of the test.  Proves the peers of
tests/peers.py and the proxy's forwarding with real protocols."""

import re

from helpers import LOOP4, connect, free_port, recv_all, spec, wait_until
from peers import MetricsEndpoint, promtool_check_metrics


def via_proxy(start_proxy, port):
    """Start the proxy CLI with a mapping to 127.0.0.1:``port``: its port."""
    lport = free_port()
    start_proxy(spec(lport, LOOP4, port))
    return lport


def test_psql_and_pgbench_through_the_proxy(start_proxy, postgres):
    lport = via_proxy(start_proxy, postgres.port)
    result = postgres.psql("-c", "select 1", port=lport)
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr

    init = postgres.pgbench("-i", "-s", "1", "-q", port=lport)
    assert init.returncode == 0, init.stderr
    bench = postgres.pgbench("-T", "2", "-c", "4", "-j", "2", port=lport)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert re.search(r"number of failed transactions: 0\b", bench.stdout), bench.stdout
    assert int(re.search(r"number of transactions actually processed: (\d+)",
                         bench.stdout).group(1)) > 0, bench.stdout


def test_redis_cli_through_the_proxy(start_proxy, redis):
    lport = via_proxy(start_proxy, redis.port)
    ping = redis.cli("PING", port=lport)
    assert ping.returncode == 0 and ping.stdout.strip() == "PONG", ping.stdout + ping.stderr

    value = (b"%064x" % 0x7c9d).decode() * (1 << 14)          # 1 MiB
    assert len(value) == 1 << 20
    put = redis.cli("-x", "SET", "big", port=lport, input=value)
    assert put.returncode == 0 and put.stdout.strip() == "OK", put.stdout + put.stderr
    got = redis.cli("GET", "big", port=lport)
    assert got.returncode == 0 and got.stdout == value + "\n", (len(got.stdout), got.stderr)
    assert redis.cli("STRLEN", "big").stdout.strip() == str(1 << 20)


def test_redis_tls_peer_answers(redis_tls):
    """The TLS variant (for later TLS tests) speaks TLS only, with the CA."""
    ping = redis_tls.cli("PING")
    assert ping.returncode == 0 and ping.stdout.strip() == "PONG", ping.stdout + ping.stderr


HAPROXY_CONFIG = """\
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    log-format "client=%%ci:%%cp frontend=%%fi:%%fp"
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen front
    bind %(host)s:%(port)d
    server echo %(host)s:%(echo)d send-proxy
"""


def test_haproxy_send_proxy_and_its_log_through_the_proxy(start_proxy, haproxy, echo):
    hport = free_port()
    server = haproxy(HAPROXY_CONFIG % {"host": LOOP4, "port": hport, "echo": echo.port},
                     [hport])
    lport = via_proxy(start_proxy, hport)
    with connect((LOOP4, lport)) as s:
        client_port = s.getsockname()[1]
        s.sendall(b"hello")
        s.shutdown(1)
        data = recv_all(s)
    # the echo returns haproxy's PROXY v1 line, then the payload
    header, _, rest = data.partition(b"\r\n")
    assert rest == b"hello", data
    m = re.fullmatch(rb"PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 (\d+) %d" % hport, header)
    assert m, header
    # haproxy logs the session when it ends; its client is the proxy's
    # upstream socket until the proxy speaks the PROXY protocol itself
    line = "client=127.0.0.1:%s frontend=127.0.0.1:%d" % (m.group(1).decode(), hport)
    assert wait_until(lambda: line in server.log(), 5), server.log()
    assert int(m.group(1)) != client_port


METRICS = """\
# HELP tcpproxy_test_answer A constant for the scrape test.
# TYPE tcpproxy_test_answer gauge
tcpproxy_test_answer{kind="static"} 42
"""


def test_prometheus_scrapes_a_static_endpoint(prometheus):
    assert promtool_check_metrics(METRICS).returncode == 0
    bad = promtool_check_metrics("no_type_here{ 1\n")
    assert bad.returncode != 0
    with MetricsEndpoint(METRICS) as endpoint:
        server = prometheus(endpoint.target)
        result = server.wait_query('tcpproxy_test_answer{kind="static"}')
        assert result[0]["value"][1] == "42", result
        up = server.query('up{job="target"}')
        assert up and up[0]["value"][1] == "1", up
        assert endpoint.requests >= 1
