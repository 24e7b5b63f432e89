"""/metrics: the Prometheus text format checked by promtool, a real
Prometheus server scraping a running proxy and reading counters back
through its HTTP API, access rules, and the cost of a scrape."""

import os
import socket
import time

from helpers import LOOP4, free_port, http, many_sessions, recv_exact, spec, wait_until
from peers import promtool_check_metrics


def traffic(port, payload, times=1):
    for _ in range(times):
        with socket.create_connection((LOOP4, port), timeout=5) as sock:
            sock.sendall(payload)
            assert recv_exact(sock, len(payload)) == payload


def metrics(proxy):
    status, headers, body = http(proxy.status_address, path="/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return body.decode("utf-8")


def process_cpu_seconds(pid):
    """User + system CPU seconds of process *pid*, from /proc."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(text, name, **labels):
    """The value of one sample of *text*."""
    want = ",".join('%s="%s"' % item for item in labels.items())
    prefix = "%s{%s} " % (name, want) if labels else name + " "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, text)
    return float(lines[0].rsplit(" ", 1)[1])


def test_metrics_pass_promtool_and_count_what_happened(start_proxy, echo):
    lport, dead, nobody = free_port(), free_port(), free_port()
    proxy = start_proxy(spec(lport, LOOP4, echo.port), spec(dead, LOOP4, nobody),
                        extra=["--allow", "127.0.0.1/32"])
    traffic(lport, b"x" * 1000, times=3)
    with socket.create_connection((LOOP4, dead), timeout=5) as sock:   # refused upstream
        assert sock.recv(10) == b""
    with socket.socket() as sock:                                      # not allowed
        sock.bind(("127.0.0.2", 0))
        sock.connect((LOOP4, lport))
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    assert wait_until(lambda: sample(metrics(proxy), "tcpproxy_connections_active",
                                     mapping=lport) == 0, 5)
    text = metrics(proxy)
    check = promtool_check_metrics(text)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sample(text, "tcpproxy_connections_total", mapping=lport) == 3
    assert sample(text, "tcpproxy_bytes_total", mapping=lport, direction="up") == 3000
    assert sample(text, "tcpproxy_bytes_total", mapping=lport, direction="down") == 3000
    assert sample(text, "tcpproxy_connections_refused_total", mapping=lport,
                  reason="allow") == 1
    assert sample(text, "tcpproxy_upstream_connect_failures_total", mapping=dead,
                  reason="refused") == 1
    assert sample(text, "tcpproxy_mapping_failing", mapping=dead) == 1
    # passive health holds the refusing address down
    assert sample(text, "tcpproxy_upstream_address_up", mapping=dead,
                  address="127.0.0.1:%d" % nobody) == 0
    assert sample(text, "tcpproxy_upstream_address_up", mapping=lport,
                  address="127.0.0.1:%d" % echo.port) == 1
    assert sample(text, "tcpproxy_connect_seconds_count", mapping=lport) == 3
    assert sample(text, "tcpproxy_connect_seconds_bucket", mapping=lport, le="+Inf") == 3
    assert sample(text, "tcpproxy_build_info", version=__import__("tcpproxy").__version__) == 1
    assert sample(text, "tcpproxy_draining") == 0
    assert sample(text, "process_open_fds") > 0
    assert sample(text, "process_threads") >= 2
    assert sample(text, "process_resident_memory_bytes") > 1e6
    assert abs(sample(text, "process_start_time_seconds") - time.time()) < 120


def test_metrics_follow_status_allow(start_proxy, echo):
    proxy = start_proxy(spec(free_port(), LOOP4, echo.port),
                        extra=["--status-allow", "127.0.0.2/32"])
    assert http(proxy.status_address, path="/metrics")[0] == 200    # 127.0.0.1: always


def test_prometheus_scrapes_a_running_proxy(start_proxy, echo, prometheus):
    lport = free_port()
    proxy = start_proxy(spec(lport, LOOP4, echo.port))
    server = prometheus("%s:%d" % proxy.status_address)
    traffic(lport, b"y" * 4096, times=5)
    expr = 'tcpproxy_bytes_total{mapping="%d",direction="down"}' % lport
    result = wait_until(lambda: [r for r in server.query(expr) if float(r["value"][1]) == 20480],
                        30, interval=0.2, message=lambda: "%s: %s" % (expr, server.query(expr)))
    assert result[0]["metric"]["job"] == "target"
    up = server.wait_query('up{job="target"}')
    assert up[0]["value"][1] == "1"
    total = server.wait_query('tcpproxy_connections_total{mapping="%d"}' % lport)
    assert float(total[0]["value"][1]) == 5


def test_a_scrape_with_2000_sessions_is_cheap(start_proxy, echo):
    lport = free_port()
    proxy = start_proxy(spec(lport, LOOP4, echo.port))
    with many_sessions(lport, 2000):
        assert wait_until(lambda: sample(metrics(proxy), "tcpproxy_connections_active",
                                         mapping=lport) == 2000, 30)
        # The cost is the proxy's CPU per scrape (back-to-back scrapes are
        # paced by the status server's CPU budget, so their wall time says
        # little): 20 scrapes within 0.2 s of CPU (ticks of 10 ms).
        cpu_before = process_cpu_seconds(proxy.pid)
        times = []
        for _ in range(20):
            started = time.perf_counter()
            metrics(proxy)
            times.append(time.perf_counter() - started)
        cpu = process_cpu_seconds(proxy.pid) - cpu_before
        assert cpu < 0.2, "%.2f s of CPU for 20 scrapes" % cpu
        assert max(times) < 1.0, times
