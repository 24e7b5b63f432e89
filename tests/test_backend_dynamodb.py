"""The DynamoDB backend against moto's server on 127.0.0.1, over real HTTP,
with real boto3 clients that find the endpoint through
AWS_ENDPOINT_URL_DYNAMODB, as an operator would point it at a local one."""

import ipaddress
import logging
import socket
import sys
import time
import uuid
from types import SimpleNamespace

import boto3
import pytest
from helpers import (
    LOOP4,
    EchoServer,
    Hammer,
    closed_by_peer,
    echoes,
    free_port,
    free_ports,
    greeting,
    refused,
    talk,
    wait_until,
)

import tcpproxy
from tcpproxy_backends import dynamodb

POLL = 0.2


def run_cli(*argv):
    return dynamodb.cli([str(a) for a in argv])


@pytest.fixture
def table(aws_env):
    name = "proxy-%s" % uuid.uuid4().hex[:8]
    assert run_cli("create-table", "--table", name) == 0
    return name


@pytest.fixture
def proxy_name():
    return "p-%s" % uuid.uuid4().hex[:8]


def client():
    return boto3.client("dynamodb")


def put(table, proxy, configuration, **extra):
    item = {"proxy_name": {"S": proxy}, "proxy_configuration": {"S": configuration}}
    item.update(extra)
    client().put_item(TableName=table, Item=item)


def delete(table, proxy, configuration):
    client().delete_item(TableName=table, Key={"proxy_name": {"S": proxy},
                                               "proxy_configuration": {"S": configuration}})


def options(proxy, table, **extra):
    return SimpleNamespace(proxy=proxy, dynamodb=table, region=None, **extra)


class Running:
    """A started Proxy on 127.0.0.1 fed by a BackendPoller."""

    def __init__(self, proxy, poller):
        self.proxy = proxy
        self.poller = poller

    def wait_polls(self, n, timeout=15.0):
        """Wait until n more polls have finished (whatever their result)."""
        target = self.poller.polls + n
        with self.poller.applied:
            assert self.poller.applied.wait_for(lambda: self.poller.polls >= target, timeout)


@pytest.fixture
def running(table, proxy_name):
    backend = dynamodb.Backend(options(proxy_name, table))
    proxy = tcpproxy.Proxy(listen_host=LOOP4, name=proxy_name, connect_timeout=2.0)
    proxy.start()
    poller = BackendPoller(proxy, backend, interval=POLL).start()
    try:
        yield Running(proxy, poller)
    finally:
        poller.stop()
        assert not poller._thread.is_alive()
        proxy.stop()


BackendPoller = tcpproxy.BackendPoller


# Backend on its own ##########################################################

def test_endpoint_comes_from_the_standard_variables(aws_env, monkeypatch, table):
    backend = dynamodb.Backend(options("x", table))
    assert backend.describe()["endpoint"] == aws_env.url
    assert backend.fetch() == []
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB")
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env.url)
    backend = dynamodb.Backend(options("x", table))
    assert backend.describe()["endpoint"] == aws_env.url
    assert backend.fetch() == []


def test_region_flag_overrides_the_chain(aws_env):
    backend = dynamodb.Backend(SimpleNamespace(proxy="x", dynamodb=None, region="eu-west-1"))
    assert backend.client.meta.region_name == "eu-west-1"
    assert backend.table == "classic-proxy"


def test_short_retries_unless_configured(aws_env, monkeypatch):
    config = dynamodb.Backend(options("x", "t")).client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert config.connect_timeout == dynamodb.CONNECT_TIMEOUT
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "9")
    config = dynamodb.Backend(options("x", "t")).client.meta.config
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 9}


def test_missing_proxy_is_a_config_error(aws_env):
    with pytest.raises(tcpproxy.ConfigError, match="--proxy"):
        dynamodb.Backend(SimpleNamespace())


def test_no_region_is_a_config_error(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(tcpproxy.ConfigError, match="--region"):
        dynamodb.Backend(options("x", "t"))


def test_missing_boto3_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(tcpproxy.BackendError, match=r"pip install 'tcpproxy\[aws\]'"):
        dynamodb.Backend(options("x", "t"))


def test_missing_table_is_a_backend_error_with_the_reason(aws_env):
    backend = dynamodb.Backend(options("x", "no-such-table"))
    with pytest.raises(tcpproxy.BackendError, match="ResourceNotFoundException"):
        backend.fetch()


def test_endpoint_down_is_a_backend_error(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", "http://%s:%d" % (LOOP4, free_port()))
    backend = dynamodb.Backend(options("x", "t"))
    with pytest.raises(tcpproxy.BackendError, match="Could not connect"):
        backend.fetch()


def test_items_with_options_become_mappings(table, proxy_name):
    put(table, proxy_name, "8002:db.example.com:5432",
        allow={"L": [{"S": "10.0.0.0/8"}, {"S": "192.168.1.7/24"}]},
        max_connections={"N": "100"})
    put(table, proxy_name, "8003:cache.example.com:6379",
        allow={"S": "127.0.0.1, 127.0.0.2/31"})
    put(table, proxy_name, "8004:[::1]:22", allow={"SS": ["::1/128"]})
    put(table, "another-proxy", "8005:elsewhere.example.com:1")
    got = dynamodb.Backend(options(proxy_name, table)).fetch()
    assert got == [
        tcpproxy.Mapping(8002, "db.example.com", 5432, allow=("10.0.0.0/8", "192.168.1.0/24"),
                         max_connections=100),
        tcpproxy.Mapping(8003, "cache.example.com", 6379,
                         allow=("127.0.0.1/32", "127.0.0.2/31")),
        tcpproxy.Mapping(8004, "::1", 22, allow=("::1/128",)),
    ]
    assert got[0].allow == (ipaddress.ip_network("10.0.0.0/8"),
                            ipaddress.ip_network("192.168.1.0/24"))


def test_bad_or_conflicting_items_hold_their_port_and_are_named(table, proxy_name):
    put(table, proxy_name, "8002:good.example.com:5432")
    put(table, proxy_name, "not-a-spec")
    put(table, proxy_name, "99999:toolarge.example.com:1")
    put(table, proxy_name, "8002:duplicate.example.com:5432")
    put(table, proxy_name, "8003:badallow.example.com:1", allow={"L": [{"S": "nonsense"}]})
    put(table, proxy_name, "8004:badmax.example.com:1", max_connections={"S": "many"})
    put(table, proxy_name, "8005:typed.example.com:1", max_connections={"BOOL": True})
    put(table, proxy_name, "8006:also-good.example.com:1")
    backend = dynamodb.Backend(options(proxy_name, table))
    got = backend.fetch()
    # no silent winner on 8002; the bad items' ports are held, not removed
    assert [m.spec for m in got] == ["8006:also-good.example.com:1"]
    assert backend.held == {8002, 8003, 8004, 8005, None}     # None: "not-a-spec"
    text = " ".join("%s %s" % item for item in backend.problems.items())
    for bad in ("not-a-spec", "99999:toolarge.example.com:1", "8002:good.example.com:5432",
                "8002:duplicate.example.com:5432", "8003:badallow.example.com:1",
                "nonsense", "8004:badmax.example.com:1", "8005:typed.example.com:1"):
        assert bad in text
    assert "listen port 8002 has 2 items" in text
    assert len(backend.problems) == 7


def test_results_are_capped_with_a_clear_error(table, proxy_name, monkeypatch):
    for i in range(5):
        put(table, proxy_name, "%d:host%02d.example.com:1" % (9100 + i, i))
    monkeypatch.setattr(dynamodb, "MAX_ITEMS", 3)
    backend = dynamodb.Backend(options(proxy_name, table))
    backend.page_limit = 2
    with pytest.raises(tcpproxy.ConfigRejected, match="more than 3 items"):
        backend.fetch()
    monkeypatch.setattr(dynamodb, "MAX_ITEMS", 100)
    monkeypatch.setattr(dynamodb, "MAX_BYTES", 100)
    with pytest.raises(tcpproxy.ConfigRejected, match="or 100 bytes"):
        backend.fetch()


def test_query_follows_every_page(table, proxy_name):
    for i in range(23):
        put(table, proxy_name, "%d:host%02d.example.com:%d" % (9000 + i, i, 1000 + i))
    backend = dynamodb.Backend(options(proxy_name, table))
    backend.page_limit = 4
    calls = []
    backend.client.meta.events.register("before-call.dynamodb.Query",
                                        lambda params, **kw: calls.append(params))
    got = backend.fetch()
    assert len(got) == 23
    assert sorted(m.listen_port for m in got) == list(range(9000, 9023))
    assert len(calls) == 6                       # 4+4+4+4+4+3, the last without a key
    assert b"ExclusiveStartKey" not in calls[0]["body"]
    assert all(b"ExclusiveStartKey" in call["body"] for call in calls[1:])
    assert backend.describe()["items"] == 23


# Operator helper #############################################################

def test_cli_create_put_list_delete(aws_env, proxy_name, capsys):
    name = "cli-%s" % uuid.uuid4().hex[:8]
    assert run_cli("create-table", "--table", name) == 0
    assert "ACTIVE" in capsys.readouterr().out
    assert run_cli("create-table", "--table", name) == 0        # idempotent
    described = client().describe_table(TableName=name)["Table"]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert {(k["AttributeName"], k["KeyType"]) for k in described["KeySchema"]} == {
        ("proxy_name", "HASH"), ("proxy_configuration", "RANGE")}
    capsys.readouterr()

    assert run_cli("put", "--proxy", proxy_name, "--table", name,
                   "8002:blue.example.com:5432", "8003:cache.example.com:6379") == 0
    assert run_cli("put", "--proxy", proxy_name, "--table", name, "--allow", "10.0.0.0/8",
                   "--max-connections", "5", "8004:x.example.com:1") == 0
    capsys.readouterr()
    assert run_cli("list", "--proxy", proxy_name, "--table", name) == 0
    assert capsys.readouterr().out.splitlines() == [
        "8002:blue.example.com:5432", "8003:cache.example.com:6379",
        "8004:x.example.com:1 allow=10.0.0.0/8 max_connections=5"]
    got = dynamodb.Backend(options(proxy_name, name)).fetch()
    assert got[2] == tcpproxy.Mapping(8004, "x.example.com", 1, allow=("10.0.0.0/8",),
                                      max_connections=5)

    # blue-green: one transaction puts green and deletes blue
    assert run_cli("put", "--proxy", proxy_name, "--table", name, "--replace",
                   "8002:green.example.com:5432") == 0
    out = capsys.readouterr().out
    assert "put 8002:green.example.com:5432" in out
    assert "deleted 8002:blue.example.com:5432" in out
    assert run_cli("list", "--proxy", proxy_name, "--table", name) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "8002:green.example.com:5432", "8003:cache.example.com:6379"]

    assert run_cli("delete", "--proxy", proxy_name, "--table", name,
                   "8003:cache.example.com:6379") == 0
    assert run_cli("delete", "--proxy", proxy_name, "--table", name, "8004") == 0
    capsys.readouterr()
    assert run_cli("list", "--proxy", proxy_name, "--table", name) == 0
    assert capsys.readouterr().out.splitlines() == ["8002:green.example.com:5432"]

    # errors: nothing to delete, a bad spec, a missing table, usage
    assert run_cli("delete", "--proxy", proxy_name, "--table", name, "9999") == 1
    assert run_cli("put", "--proxy", proxy_name, "--table", name, "nonsense") == 2
    assert run_cli("list", "--proxy", proxy_name, "--table", "no-such-table") == 1
    assert run_cli("put", "--table", name, "8002:a:1") == 2          # no --proxy
    assert run_cli() == 2


def test_cli_is_reached_through_tcpproxy_main(table, proxy_name, capsys):
    assert tcpproxy.main(["dynamodb", "put", "--proxy", proxy_name, "--table", table,
                          "8002:a.example.com:1"]) == 0
    assert tcpproxy.main(["dynamodb", "list", "--proxy", proxy_name, "--table", table]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "8002:a.example.com:1"


# With a running proxy ########################################################

def test_item_added_is_listening_within_one_poll(running, table, proxy_name):
    port = free_port()
    with EchoServer(tag="A") as a:
        backend = running.poller.backend
        fetches = []                                 # (started, specs) of every poll

        def recording_fetch(fetch=backend.fetch):
            started = time.monotonic()
            result = fetch()
            fetches.append((started, [m.spec for m in result]))
            return result

        backend.fetch = recording_fetch
        running.wait_polls(1)
        assert running.proxy.mappings == []
        spec = "%d:%s:%d" % (port, LOOP4, a.port)
        put(table, proxy_name, spec)
        written = time.monotonic()
        wait_until(lambda: greeting(port) == "A", timeout=10)
        # the first poll that began after the write found the item (a poll already
        # running during the write may have missed it): listening within one poll
        wait_until(lambda: any(started > written for started, _ in list(fetches)))
        first = next(specs for started, specs in list(fetches) if started > written)
        assert first == [spec]
        assert [m.spec for m in running.proxy.mappings] == [spec]
        status = running.proxy.status()
        assert status["ok"] and status["backend"]["table"] == table
        assert running.proxy.connections()["name"] == proxy_name


def test_item_deleted_stops_listening_and_closes_its_connections(running, table, proxy_name):
    keep_port, drop_port = free_ports(2)
    with EchoServer(tag="A") as a:
        drop = "%d:%s:%d" % (drop_port, LOOP4, a.port)
        put(table, proxy_name, drop)
        put(table, proxy_name, "%d:%s:%d" % (keep_port, LOOP4, a.port))
        wait_until(lambda: greeting(drop_port) == "A" and greeting(keep_port) == "A")
        dropped, _ = talk(drop_port)
        kept, _ = talk(keep_port)
        try:
            delete(table, proxy_name, drop)
            wait_until(lambda: refused(drop_port), timeout=10)
            assert closed_by_peer(dropped, timeout=5)
            assert echoes(kept)                          # the other mapping is untouched
            assert [m.listen_port for m in running.proxy.mappings] == [keep_port]
        finally:
            dropped.close()
            kept.close()


def test_changed_target_switches_without_refusing(running, table, proxy_name, capsys):
    port = free_port()
    with EchoServer(tag="A") as a, EchoServer(tag="B") as b:
        put(table, proxy_name, "%d:%s:%d" % (port, LOOP4, a.port))
        wait_until(lambda: greeting(port) == "A")
        old, _ = talk(port)
        try:
            with Hammer(port) as hammer:
                wait_until(lambda: hammer.seen("A"))
                # the helper's blue-green switch: put B and delete A in one transaction
                assert run_cli("put", "--proxy", proxy_name, "--table", table, "--replace",
                               "%d:%s:%d" % (port, LOOP4, b.port)) == 0
                wait_until(lambda: hammer.seen("B"), timeout=10)
                count = len(hammer.tags)
                wait_until(lambda: len(hammer.tags) >= count + 20)
            assert hammer.failures == []
            assert "A" not in hammer.tags[count:]
            assert echoes(old)             # a connection opened before the switch stays on A
        finally:
            old.close()


def test_conflicting_or_invalid_items_keep_the_mapping_in_force(running, table, proxy_name):
    port, other = free_ports(2)
    with EchoServer(tag="A") as a, EchoServer(tag="B") as b:
        spec_a = "%d:%s:%d" % (port, LOOP4, a.port)
        put(table, proxy_name, spec_a)
        put(table, proxy_name, "%d:%s:%d" % (other, LOOP4, a.port))
        wait_until(lambda: greeting(port) == "A" and greeting(other) == "A")
        conn, _ = talk(port)
        try:
            # a second item on the port (put straight into the table, no --replace)
            put(table, proxy_name, "%d:%s:%d" % (port, LOOP4, b.port))
            # and an invalid item on the other port
            put(table, proxy_name, "%d:%s:%d" % (other, LOOP4, b.port),
                allow={"L": [{"S": "not-a-network"}]})
            running.wait_polls(3)
            assert greeting(port) == "A" and greeting(other) == "A"    # no silent winner
            assert echoes(conn)                                        # nothing closed
            status = running.proxy.status()
            assert status["ok"]
            warnings = " ".join(status["warnings"])
            assert "config rejected" in warnings
            assert "listen port %d has 2 items" % port in warnings
            assert "not-a-network" in warnings
            # resolved: B wins on port, the invalid item goes
            delete(table, proxy_name, spec_a)
            delete(table, proxy_name, "%d:%s:%d" % (other, LOOP4, b.port))
            wait_until(lambda: greeting(port) == "B", timeout=10)
            wait_until(lambda: not running.proxy.status()["warnings"], timeout=10)
        finally:
            conn.close()


def test_put_refuses_a_second_target_without_replace(table, proxy_name, caplog):
    assert run_cli("put", "--proxy", proxy_name, "--table", table, "8002:blue:5432") == 0
    with caplog.at_level(logging.ERROR):
        assert run_cli("put", "--proxy", proxy_name, "--table", table, "8002:green:5432") == 1
    assert "8002:blue:5432" in caplog.text and "--replace" in caplog.text
    items = client().query(TableName=table, KeyConditionExpression="proxy_name = :p",
                           ExpressionAttributeValues={":p": {"S": proxy_name}})["Items"]
    assert [i["proxy_configuration"]["S"] for i in items] == ["8002:blue:5432"]
    # the same item again (new options) is fine, and --replace switches
    assert run_cli("put", "--proxy", proxy_name, "--table", table, "--max-connections", "5",
                   "8002:blue:5432") == 0
    assert run_cli("put", "--proxy", proxy_name, "--table", table, "--replace",
                   "8002:green:5432") == 0


def test_no_botocore_chatter_at_debug_1(table, proxy_name, aws_env):
    from helpers import ProxyProcess
    put(table, proxy_name, "%d:127.0.0.1:9" % free_port())
    proxy = ProxyProcess(["--backend", "dynamodb", "--proxy", proxy_name, "--dynamodb", table,
                          "--listen-address", LOOP4, "--status", "off", "--debug", "1",
                          "--poll-interval", "0.5"])
    try:
        wait_until(lambda: "applying" in proxy.stderr(), 20, message=proxy.output)
        assert proxy.stop() == 0
        log = proxy.stderr()
    finally:
        proxy.close()
    assert "Found credentials" not in log and "botocore" not in log, log


def test_endpoint_down_keeps_serving_and_recovers(running, table, proxy_name, aws_env):
    port, later = free_ports(2)
    with EchoServer(tag="A") as a:
        put(table, proxy_name, "%d:%s:%d" % (port, LOOP4, a.port))
        wait_until(lambda: greeting(port) == "A")
        conn, _ = talk(port)
        try:
            aws_env.stop()
            try:
                failed = running.poller.polls
                with running.poller.applied:
                    assert running.poller.applied.wait_for(
                        lambda: running.poller.polls > failed
                        and running.poller.last_error is not None
                        and "Could not connect" in running.poller.last_error, timeout=30)
                backend = running.proxy.status()["backend"]
                assert "Could not connect" in backend["error"]
                # the mapping serves on: new connections and the open one
                assert greeting(port) == "A"
                assert echoes(conn)
                assert [m.listen_port for m in running.proxy.mappings] == [port]
            finally:
                aws_env.start()
            put(table, proxy_name, "%d:%s:%d" % (later, LOOP4, a.port))
            wait_until(lambda: greeting(later) == "A", timeout=30)
            assert greeting(port) == "A"
            assert echoes(conn)
            wait_until(lambda: running.proxy.status()["backend"]["error"] is None)
            assert running.proxy.status()["ok"]
        finally:
            conn.close()


def test_more_items_than_one_page_all_apply(running, table, proxy_name):
    ports = free_ports(30)
    running.poller.backend.page_limit = 7
    with EchoServer(tag="A") as a:
        for port in ports:
            put(table, proxy_name, "%d:%s:%d" % (port, LOOP4, a.port))
        wait_until(lambda: len(running.proxy.mappings) == 30, timeout=15)
        assert sorted(m.listen_port for m in running.proxy.mappings) == sorted(ports)
        assert all(greeting(port) == "A" for port in ports)
        assert running.poller.backend.items == 30


def test_item_allow_list_is_enforced(running, table, proxy_name):
    port = free_port()
    with EchoServer(tag="A") as a:
        put(table, proxy_name, "%d:%s:%d" % (port, LOOP4, a.port),
            allow={"L": [{"S": "127.0.0.2/32"}]})
        wait_until(lambda: running.proxy.mappings)
        # 127.0.0.1 is not in the list: closed before any upstream connection
        assert greeting(port) is None
        assert a.accepted == 0
        sock = socket.create_connection((LOOP4, port), timeout=5,
                                                      source_address=("127.0.0.2", 0))
        try:
            assert sock.recv(2) == b"A\n"
        finally:
            sock.close()


# Failures that moto does not produce, with botocore's Stubber ###############

@pytest.mark.parametrize("code, message", [
    ("ProvisionedThroughputExceededException", ("The level of configured provisioned "
                                               "throughput for the table was exceeded")),
    ("ThrottlingException", "Rate of requests exceeds the allowed throughput"),
    ("AccessDeniedException", "User is not authorized to perform: dynamodb:Query"),
])
def test_throttling_and_access_denied_are_backend_errors(code, message):
    from botocore.stub import Stubber
    stubbed = boto3.client("dynamodb", region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing")
    backend = dynamodb.Backend(options("x", "t"), client=stubbed)
    with Stubber(stubbed) as stubber:
        stubber.add_client_error("query", code, message, 400)
        with pytest.raises(tcpproxy.BackendError, match="%s: %s" % (code, message)):
            backend.fetch()
        stubber.add_response("query", {"Count": 0, "ScannedCount": 0})
        with pytest.raises(tcpproxy.BackendError, match="malformed answer"):
            backend.fetch()


# Per-mapping listen addresses ################################################

def test_items_with_a_listen_address(table, proxy_name):
    put(table, proxy_name, "127.0.0.2:9002:a.example.com:1")
    put(table, proxy_name, "127.0.0.3:9002:b.example.com:1")
    put(table, proxy_name, "[::1]:9002:[::1]:1")
    put(table, proxy_name, "9002:d.example.com:1")          # --listen-address: judged by apply()
    put(table, proxy_name, "0.0.0.0:9003:x.example.com:1")     # conflict: wildcard + 127.0.0.2
    put(table, proxy_name, "127.0.0.2:9003:y.example.com:1")
    put(table, proxy_name, "127.0.0.2:9004:x.example.com:1")   # one address, two items
    put(table, proxy_name, "127.0.0.2:9004:y.example.com:1")
    put(table, proxy_name, "127.0.0.2:9005:x.example.com:99999")   # invalid: its key is held
    backend = dynamodb.Backend(options(proxy_name, table))
    got = backend.fetch()
    assert [m.spec for m in got] == ["9002:d.example.com:1", "127.0.0.2:9002:a.example.com:1",
                                     "127.0.0.3:9002:b.example.com:1", "[::1]:9002:[::1]:1"]
    assert backend.held == {"0.0.0.0:9003", "127.0.0.2:9003", "127.0.0.2:9004",
                            "127.0.0.2:9005"}
    problems = backend.problems
    assert len(problems) == 5
    assert problems["item proxy_configuration='0.0.0.0:9003:x.example.com:1'"].startswith(
        "listen addresses 0.0.0.0:9003 and 127.0.0.2:9003 conflict (0.0.0.0 takes the port "
        "on every IPv4 address) (with item proxy_configuration='127.0.0.2:9003:y.example.com:1')")
    assert "listen address 127.0.0.2:9004 has 2 items" in \
        problems["item proxy_configuration='127.0.0.2:9004:y.example.com:1'"]
    assert "99999" in problems["item proxy_configuration='127.0.0.2:9005:x.example.com:99999'"]
    # told the proxy's --listen-address (the CLI's): 0.0.0.0:9002 conflicts with the
    # IPv4 addresses on 9002, not with ::1
    backend = dynamodb.Backend(options(proxy_name, table, listen_address="0.0.0.0"))
    assert [m.spec for m in backend.fetch()] == ["[::1]:9002:[::1]:1"]
    assert {9002, "127.0.0.2:9002", "127.0.0.3:9002"} <= backend.held
    problem = backend.problems["item proxy_configuration='9002:d.example.com:1'"]
    assert "0.0.0.0:9002" in problem and "conflict (0.0.0.0 takes the port" in problem


def test_cli_put_replace_and_delete_by_listen_address(table, proxy_name, capsys, caplog):
    def items():
        capsys.readouterr()
        assert run_cli("list", "--proxy", proxy_name, "--table", table) == 0
        return sorted(capsys.readouterr().out.splitlines())

    assert run_cli("put", "--proxy", proxy_name, "--table", table,
                   "127.0.0.2:8002:blue:5432", "127.0.0.3:8002:blue:5432") == 0
    # another target on 127.0.0.2:8002 needs --replace; 127.0.0.4:8002 does not
    with caplog.at_level(logging.ERROR):
        assert run_cli("put", "--proxy", proxy_name, "--table", table,
                       "127.0.0.2:8002:green:5432") == 1
    assert "127.0.0.2:8002:blue:5432" in caplog.text and "--replace" in caplog.text
    assert run_cli("put", "--proxy", proxy_name, "--table", table,
                   "127.0.0.4:8002:green:5432") == 0
    assert run_cli("put", "--proxy", proxy_name, "--table", table, "--replace",
                   "127.0.0.2:8002:green:5432") == 0
    assert items() == ["127.0.0.2:8002:green:5432", "127.0.0.3:8002:blue:5432",
                       "127.0.0.4:8002:green:5432"]
    # LISTEN_IP:LPORT deletes the item on that address; a bare LPORT all on the port
    assert run_cli("delete", "--proxy", proxy_name, "--table", table, "127.0.0.3:8002") == 0
    assert items() == ["127.0.0.2:8002:green:5432", "127.0.0.4:8002:green:5432"]
    assert run_cli("delete", "--proxy", proxy_name, "--table", table, "8002") == 0
    assert items() == []
    # two specs that cannot both listen are refused before anything is written
    assert run_cli("put", "--proxy", proxy_name, "--table", table,
                   "0.0.0.0:8002:a:1", "127.0.0.2:8002:b:1") == 2
    assert items() == []


def test_one_port_on_two_addresses_from_items(running, table, proxy_name):
    port = free_port()
    with EchoServer(tag="A") as a, EchoServer(tag="B") as b:
        spec_a = "127.0.0.2:%d:%s:%d" % (port, LOOP4, a.port)
        put(table, proxy_name, spec_a)
        put(table, proxy_name, "127.0.0.3:%d:%s:%d" % (port, LOOP4, b.port))
        wait_until(lambda: greeting(port, host="127.0.0.2") == "A"
                   and greeting(port, host="127.0.0.3") == "B", timeout=10)
        assert refused(port)                             # not on --listen-address
        kept, _ = talk(port, host="127.0.0.3")
        try:
            # the mapping moves from 127.0.0.2 to 127.0.0.4, same port
            delete(table, proxy_name, spec_a)
            put(table, proxy_name, "127.0.0.4:%d:%s:%d" % (port, LOOP4, a.port))
            wait_until(lambda: greeting(port, host="127.0.0.4") == "A", timeout=10)
            wait_until(lambda: refused(port, "127.0.0.2"), timeout=10)
            assert echoes(kept)
            assert sorted(m["mapping"] for m in running.proxy.status()["mappings"]) == [
                "127.0.0.3:%d" % port, "127.0.0.4:%d" % port]
        finally:
            kept.close()
