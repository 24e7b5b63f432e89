"""Fixtures: loopback upstreams, the loopback DNS server, the proxy as a
subprocess (with a chosen pump), moto with its AWS environment, and a
thread/descriptor baseline check around every test."""

import gc
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import DNSServer
from helpers import (
    LOOP4,
    PUMPS,
    EchoServer,
    MotoEndpoint,
    ProxyProcess,
    echo_pair,
    free_port,
    run_proxy_cli,
    wait_until,
)

# Real PostgreSQL, Redis, HAProxy and Prometheus servers (tests/peers.py).
pytest_plugins = ["peers"]


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def _fds_back(baseline):
    if _fd_count() <= baseline:
        return True
    # dnspython < 2.8 leaves a selector to the garbage collector: not a leak
    gc.collect()
    return _fd_count() <= baseline


@pytest.fixture(autouse=True)
def no_leaks():
    """Threads and file descriptors of the test process return to their
    baseline after each test (after every other fixture is torn down)."""
    threads = threading.active_count()
    fds = _fd_count()
    yield
    wait_until(lambda: threading.active_count() <= threads, 5, message=lambda: (
        "leftover threads: %s" % [t.name for t in threading.enumerate()]))
    wait_until(lambda: _fds_back(fds), 5, message=lambda: (
        "leaked descriptors: %d > %d" % (_fd_count(), fds)))


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


@pytest.fixture
def make_echo():
    servers = []

    def make(**kw):
        s = EchoServer(**kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def upstream_pair():
    """Echo upstreams on 127.0.0.2:P (banner b"A") and 127.0.0.3:P (b"B"):
    one target port, two addresses, to tell which address a connection
    reached."""
    a, b = echo_pair(("127.0.0.2", b"A"), ("127.0.0.3", b"B"))
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def dns_server():
    with DNSServer() as server:
        yield server


@pytest.fixture
def proxy_cli():
    """Factory: start ``python tcpproxy.py ARGS``; ``ports`` are waited for
    (LISTEN state), ``status`` (host, port) waited for with a TCP connect.
    Every process still running at teardown is killed."""
    procs = []

    def start(args, ports=(), status=None, env=None, nofile=None, wait=True, timeout=10.0):
        if not wait:
            p = ProxyProcess(args, env=env, nofile=nofile)
        else:
            p = run_proxy_cli(args, ports, status, timeout, env=env, nofile=nofile)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


@pytest.fixture
def pump():
    """The pump the proxy runs with: None, the one it picks by itself.  A
    test that moves bytes is marked ``@helpers.each_pump``, which gives each
    name in ``helpers.PUMPS`` in turn."""
    return


@pytest.fixture
def start_proxy(proxy_cli, pump):
    """Factory: ``start_proxy("LPORT:HOST:RPORT", ..., extra=[...],
    status=True)`` runs the CLI on 127.0.0.1 with a free status port (or
    ``--status off``), with the ``pump`` fixture's pump, and waits for every
    listen port.  The returned process has ``.status_address`` and
    ``.ports``."""
    pump_env = PUMPS[pump] if pump is not None else {}

    def start(*specs, extra=(), status=True, env=None, nofile=None, listen=LOOP4):
        env = dict(env or {}, **pump_env)
        args = ["--listen-address", listen]
        if specs:
            args += ["--connections"] + list(specs)
        status_address = None
        if status:
            status_address = (LOOP4, free_port())
            args += ["--status", "%s:%d" % status_address]
        else:
            args += ["--status", "off"]
        args += list(extra)
        ports = [int(s.split(":", 1)[0]) for spec in specs for s in spec.replace(",", " ").split()]
        p = proxy_cli(args, ports=ports, status=status_address, env=env, nofile=nofile)
        p.status_address = status_address
        p.ports = ports
        return p

    return start


@pytest.fixture(scope="module")
def moto_server():
    """moto's DynamoDB server on 127.0.0.1, one per test module (tables are
    named per test).  Tests reach it through ``aws_env``."""
    pytest.importorskip("moto.server")
    endpoint = MotoEndpoint()
    endpoint.start()
    yield endpoint
    endpoint.stop()


@pytest.fixture
def aws_env(moto_server, monkeypatch, tmp_path):
    """The AWS environment boto3 and the DynamoDB backend see: dummy
    credentials, no ~/.aws files, no instance metadata, nothing inherited
    that changes endpoints, regions or retries, and
    AWS_ENDPOINT_URL_DYNAMODB on moto.  Returns the MotoEndpoint, running
    (started again if an earlier test left it stopped)."""
    pytest.importorskip("boto3")
    if moto_server.server is None:
        moto_server.start()
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_REGION",
                 "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto_server.url)
    return moto_server


@pytest.fixture
def listener():
    """A bare upstream listening socket; the test accepts and scripts it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((LOOP4, 0))
    s.listen(64)
    s.settimeout(5)
    yield s
    s.close()
