"""ElastiCache backend: one listener forwarding to the lowest available node.

Every poll calls DescribeCacheClusters(CacheClusterId=--elasticache-cluster-id,
ShowCacheNodeInfo=True) and picks, among the nodes whose CacheNodeStatus is
``available``, the one with the lowest numeric CacheNodeId ("0001" is 1).  The
result is the single mapping ``--elasticache-port:NODE_ADDRESS:NODE_PORT``,
with the node's own endpoint address and port; its DNS name is resolved by the
proxy's TTL-obeying resolver like any other target.  When that node goes away
or stops being available, the next poll moves the mapping to the next node:
the listener stays, new connections go to the new node (open ones are left
alone, as for any target change on the same port).

A cluster with no available node keeps the current target (the last good
answer) and says so in /status (``warning``); if there has never been one,
the poll fails (BackendError) and is retried.
"""

import logging

from tcpproxy import BackendError, ConfigError, Mapping, ProxyError, check_port

from .aws import aws_reason, import_boto3, make_client

__all__ = ["Backend"]

log = logging.getLogger(__name__)

AVAILABLE = "available"


class Backend:
    """The lowest available node of one ElastiCache cluster.

    Methods for the caller: fetch(), describe().  Options read:
    elasticache_cluster_id, elasticache_port (both required), region.
    """

    name = "elasticache"
    interval = None

    def __init__(self, options, client=None):
        self.cluster_id = getattr(options, "elasticache_cluster_id", None)
        port = getattr(options, "elasticache_port", None)
        if not self.cluster_id:
            raise ConfigError("no cluster id: --backend elasticache needs "
                              "--elasticache-cluster-id ID")
        if port is None or port == -1:
            raise ConfigError("no local port: --backend elasticache needs "
                              "--elasticache-port PORT")
        port = check_port(port if isinstance(port, int) else str(port), "--elasticache-port")
        self.listen_port = port
        self.region = getattr(options, "region", None)
        self._boto3, self._botocore = import_boto3("elasticache")
        self.client = client if client is not None else make_client("elasticache",
                                                                     self.region)
        self.node = None            # CacheNodeId of the current target
        self.mappings = None        # last good answer
        self.warning = None
        self.nodes = {}             # CacheNodeId -> CacheNodeStatus, last poll

    def _describe_cluster(self):
        try:
            response = self.client.describe_cache_clusters(
                CacheClusterId=self.cluster_id, ShowCacheNodeInfo=True)
        except (self._botocore.exceptions.BotoCoreError,
                self._botocore.exceptions.ClientError) as exc:
            raise BackendError("DescribeCacheClusters %s failed: %s"
                               % (self.cluster_id, aws_reason(exc))) from exc
        clusters = response.get("CacheClusters")
        if not isinstance(clusters, list):
            raise BackendError("DescribeCacheClusters %s: malformed answer "
                               "(no CacheClusters list)" % self.cluster_id)
        for cluster in clusters:
            if isinstance(cluster, dict) and cluster.get("CacheClusterId") == self.cluster_id:
                return cluster
        raise BackendError("DescribeCacheClusters: cluster %s is not in the answer"
                           % self.cluster_id)

    def _candidates(self, cluster):
        """[(numeric id, CacheNodeId, Mapping)] of the available nodes."""
        candidates = []
        self.nodes = {}
        for node in cluster.get("CacheNodes") or ():
            node_id = node.get("CacheNodeId")
            status = node.get("CacheNodeStatus")
            self.nodes[str(node_id)] = status
            if status != AVAILABLE:
                log.debug("cluster %s node %s is %s", self.cluster_id, node_id, status)
                continue
            try:
                number = int(node_id)
                endpoint = node["Endpoint"]
                mapping = Mapping(self.listen_port, str(endpoint["Address"]),
                                  int(endpoint["Port"]))
                if not endpoint["Address"] or not 1 <= mapping.port <= 65535:
                    raise ValueError("bad endpoint %r" % (endpoint,))
            except (KeyError, TypeError, ValueError, ProxyError) as exc:
                log.error("skipping cluster %s node %r: %s", self.cluster_id, node_id, exc)
                continue
            candidates.append((number, node_id, mapping))
        candidates.sort(key=lambda c: c[0])
        return candidates

    def fetch(self):
        cluster = self._describe_cluster()
        candidates = self._candidates(cluster)
        if not candidates:
            states = ", ".join("%s %s" % item for item in sorted(self.nodes.items())) \
                or "no nodes"
            reason = "cluster %s has no available node (%s)" % (self.cluster_id, states)
            if self.mappings is None:
                raise BackendError(reason)
            if self.warning != reason:
                log.warning("%s: keeping node %s", reason, self.node)
            self.warning = reason
            return list(self.mappings)
        _number, node_id, mapping = candidates[0]
        if node_id != self.node or [mapping] != self.mappings:
            log.info("cluster %s: node %s %s:%d is the target", self.cluster_id,
                     node_id, mapping.host, mapping.port)
        self.node, self.mappings, self.warning = node_id, [mapping], None
        return [mapping]

    def describe(self):
        info = {"cluster": self.cluster_id, "node": self.node, "nodes": dict(self.nodes)}
        if self.mappings:
            info["target"] = "%s:%d" % (self.mappings[0].host, self.mappings[0].port)
        if self.warning:
            info["warning"] = self.warning
        return info
