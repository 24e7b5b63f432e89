"""The ElastiCache backend with botocore's Stubber on a real boto3 client
(moto models no cache nodes): every answer is checked against the service
model, and the node endpoints are echo servers on 127.0.0.1."""

import logging
import sys
from types import SimpleNamespace

import boto3
import pytest
from botocore.stub import Stubber
from helpers import (
    LOOP4,
    EchoServer,
    Hammer,
    echoes,
    free_port,
    greeting,
    talk,
    wait_until,
)

import tcpproxy
from tcpproxy_backends import elasticache

CLUSTER = "docker-registry"


def node(node_id, port, status="available", address=LOOP4):
    entry = {"CacheNodeId": node_id, "CacheNodeStatus": status}
    if port is not None:
        entry["Endpoint"] = {"Address": address, "Port": port}
    return entry


def answer(*nodes, cluster=CLUSTER):
    return {"CacheClusters": [{"CacheClusterId": cluster, "CacheClusterStatus": "available",
                               "Engine": "redis", "NumCacheNodes": len(nodes),
                               "CacheNodes": list(nodes)}]}


EXPECTED = {"CacheClusterId": CLUSTER, "ShowCacheNodeInfo": True}


@pytest.fixture
def stubbed():
    client = boto3.client("elasticache", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def backend_for(client, port=5000):
    options = SimpleNamespace(elasticache_cluster_id=CLUSTER, elasticache_port=port,
                              region=None)
    return elasticache.Backend(options, client=client)


# Backend on its own ##########################################################

def test_lowest_numeric_available_node_is_the_target(stubbed):
    client, stubber = stubbed
    stubber.add_response("describe_cache_clusters", answer(
        node("0010", 7010), node("0009", 7009), node("0002", 7002, status="creating"),
        node("0003", 7003, status="rebooting cache cluster nodes")), EXPECTED)
    backend = backend_for(client)
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7009)]
    info = backend.describe()
    assert info["cluster"] == CLUSTER and info["node"] == "0009"
    assert info["target"] == "%s:7009" % LOOP4
    assert "warning" not in info


def test_node_ids_compare_as_numbers(stubbed):
    client, stubber = stubbed
    stubber.add_response("describe_cache_clusters", answer(node("10", 7010), node("9", 7009)),
                         EXPECTED)
    assert backend_for(client).fetch() == [tcpproxy.Mapping(5000, LOOP4, 7009)]


def test_moves_when_the_node_goes_away_or_stops_being_available(stubbed):
    client, stubber = stubbed
    backend = backend_for(client)
    stubber.add_response("describe_cache_clusters",
                         answer(node("0001", 7001), node("0002", 7002)), EXPECTED)
    stubber.add_response("describe_cache_clusters",
                         answer(node("0001", 7001, status="deleting"), node("0002", 7002)),
                         EXPECTED)
    stubber.add_response("describe_cache_clusters", answer(node("0002", 7002),
                                                           node("0003", None, "creating")),
                         EXPECTED)
    stubber.add_response("describe_cache_clusters", answer(node("0003", 7003)), EXPECTED)
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7001)]
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7002)]
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7002)]
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7003)]
    assert backend.describe()["node"] == "0003"


def test_no_available_node_keeps_the_target_and_warns(stubbed, caplog):
    client, stubber = stubbed
    backend = backend_for(client)
    stubber.add_response("describe_cache_clusters", answer(node("0001", 7001)), EXPECTED)
    stubber.add_response("describe_cache_clusters",
                         answer(node("0001", 7001, status="rebooting cache cluster nodes")),
                         EXPECTED)
    stubber.add_response("describe_cache_clusters", answer(), EXPECTED)
    stubber.add_response("describe_cache_clusters", answer(node("0001", 7001)), EXPECTED)
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7001)]
    with caplog.at_level(logging.WARNING, logger="tcpproxy_backends"):
        assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7001)]
    info = backend.describe()
    assert "no available node" in info["warning"] and info["node"] == "0001"
    assert "0001 rebooting" in info["warning"]
    assert "no available node" in caplog.text
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7001)]     # zero nodes
    assert "no nodes" in backend.describe()["warning"]
    assert backend.fetch() == [tcpproxy.Mapping(5000, LOOP4, 7001)]
    assert "warning" not in backend.describe()


def test_no_available_node_on_the_first_poll_is_a_backend_error(stubbed):
    client, stubber = stubbed
    stubber.add_response("describe_cache_clusters",
                         answer(node("0001", None, status="creating")), EXPECTED)
    with pytest.raises(tcpproxy.BackendError, match="no available node"):
        backend_for(client).fetch()


def test_api_errors_are_backend_errors_with_the_reason(stubbed):
    client, stubber = stubbed
    stubber.add_client_error("describe_cache_clusters", "CacheClusterNotFound",
                             "CacheCluster not found: %s" % CLUSTER, 404,
                             expected_params=EXPECTED)
    stubber.add_client_error("describe_cache_clusters", "Throttling", "Rate exceeded", 400,
                             expected_params=EXPECTED)
    backend = backend_for(client)
    with pytest.raises(tcpproxy.BackendError, match="CacheClusterNotFound: CacheCluster not"):
        backend.fetch()
    with pytest.raises(tcpproxy.BackendError, match="Throttling: Rate exceeded"):
        backend.fetch()


def test_a_node_with_a_bad_id_is_skipped(stubbed, caplog):
    client, stubber = stubbed
    stubber.add_response("describe_cache_clusters",
                         answer(node("primary", 7000), node("0004", 7004)), EXPECTED)
    with caplog.at_level(logging.ERROR, logger="tcpproxy_backends"):
        assert backend_for(client).fetch() == [tcpproxy.Mapping(5000, LOOP4, 7004)]
    assert "'primary'" in caplog.text


@pytest.mark.parametrize("changes, match", [
    ({"elasticache_cluster_id": None}, "--elasticache-cluster-id"),
    ({"elasticache_port": None}, "--elasticache-port"),
    ({"elasticache_port": -1}, "--elasticache-port"),
    ({"elasticache_port": 0}, "--elasticache-port"),
    ({"elasticache_port": 70000}, "--elasticache-port"),
])
def test_missing_or_bad_flags_are_config_errors(changes, match):
    values = {"elasticache_cluster_id": CLUSTER, "elasticache_port": 5000, "region": "us-east-1"}
    values.update(changes)
    with pytest.raises(tcpproxy.ConfigError, match=match):
        elasticache.Backend(SimpleNamespace(**values), client=object())


def test_missing_boto3_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    options = SimpleNamespace(elasticache_cluster_id=CLUSTER, elasticache_port=5000)
    with pytest.raises(tcpproxy.BackendError, match=r"pip install 'tcpproxy\[aws\]'"):
        elasticache.Backend(options)


def test_loaded_by_name(stubbed):
    client, _ = stubbed
    options = SimpleNamespace(elasticache_cluster_id=CLUSTER, elasticache_port=5000)
    backend = tcpproxy.load_backend("elasticache", options, client=client)
    assert backend.name == "elasticache"


# With a running proxy ########################################################

@pytest.fixture
def nodes():
    with EchoServer(tag="node1") as n1, EchoServer(tag="node2") as n2, \
            EchoServer(tag="node3") as n3:
        yield {"0001": n1, "0002": n2, "0003": n3}


def test_proxy_follows_the_lowest_available_node(stubbed, nodes):
    client, stubber = stubbed
    port = free_port()
    backend = backend_for(client, port)
    n1, n2, n3 = nodes["0001"], nodes["0002"], nodes["0003"]

    def poll(*answer_nodes):
        stubber.add_response("describe_cache_clusters", answer(*answer_nodes), EXPECTED)
        assert poller.poll_once()

    with tcpproxy.Proxy(listen_host=LOOP4, name=CLUSTER, connect_timeout=2.0) as proxy:
        poller = tcpproxy.BackendPoller(proxy, backend, interval=3600)
        poll(node("0003", n3.port), node("0002", n2.port), node("0001", n1.port))
        assert greeting(port) == "node1"
        conn, _ = talk(port)
        try:
            with Hammer(port) as hammer:
                # node 1 is rebooting: the next lowest available, without refusing clients
                poll(node("0001", n1.port, "rebooting cache cluster nodes"),
                     node("0002", n2.port), node("0003", n3.port))
                wait_until(lambda: hammer.seen("node2"))
                count = len(hammer.tags)
                # node 2 is gone
                poll(node("0001", n1.port, "rebooting cache cluster nodes"),
                     node("0003", n3.port))
                wait_until(lambda: hammer.seen("node3"))
                after = len(hammer.tags)
                # nothing available: keep node 3, and say so in /status
                poll(node("0001", n1.port, "rebooting cache cluster nodes"),
                     node("0003", n3.port, "modifying"))
                wait_until(lambda: len(hammer.tags) >= after + 10)
                status = proxy.status()
                assert "no available node" in status["backend"]["warning"]
                assert status["backend"]["node"] == "0003"
                # node 1 is back: the lowest id wins again
                poll(node("0001", n1.port), node("0003", n3.port))
                wait_until(lambda: hammer.seen("node1") and hammer.tags[-1] == "node1")
            assert hammer.failures == []
            assert "node1" not in hammer.tags[count:after + 10]
            assert "node2" not in hammer.tags[after:]
            assert [m.spec for m in proxy.mappings] == ["%d:%s:%d" % (port, LOOP4, n1.port)]
            assert "warning" not in proxy.status()["backend"]
            assert echoes(conn)       # opened on node 1 before the moves, left alone
        finally:
            conn.close()


def test_first_poll_without_a_node_leaves_the_proxy_waiting(stubbed, nodes):
    client, stubber = stubbed
    port = free_port()
    backend = backend_for(client, port)
    with tcpproxy.Proxy(listen_host=LOOP4, connect_timeout=2.0) as proxy:
        poller = tcpproxy.BackendPoller(proxy, backend, interval=3600)
        stubber.add_response("describe_cache_clusters",
                             answer(node("0001", None, "creating")), EXPECTED)
        assert not poller.poll_once()
        assert proxy.mappings == []
        status = proxy.status()
        assert not status["ok"] and "no available node" in status["reason"]
        stubber.add_response("describe_cache_clusters",
                             answer(node("0001", nodes["0001"].port)), EXPECTED)
        assert poller.poll_once()
        assert greeting(port) == "node1"
        assert proxy.status()["ok"]
