"""Live configuration backends for tcpproxy.

Each module in this package is a backend, loaded by name with
``importlib.import_module("tcpproxy_backends." + name)`` when the proxy is
started with ``--backend NAME``.  A module defines one class, ``Backend``:

    name = "dynamodb"           the backend's name, shown in /status
    interval = None             poll interval in seconds, or None for --poll-interval

    Backend(options, client=None)
        options is the argparse.Namespace of the command line (attributes it
        does not have count as None); client is an already built API client,
        injected by tests.  Raises ConfigError naming a missing or bad flag,
        BackendError when an optional dependency is not installed.

    fetch() -> list[Mapping]
        The full desired set of mappings.  Raises BackendError(reason) when
        the poll as a whole failed; the proxy then keeps what it has.  A
        single bad item is logged with log.error, naming it, and skipped.
        Of two items with the same listen port the first is kept.

    describe() -> dict
        Extra information for /status?format=json.

    reload()   (optional)
        Forget any cached state, so that the next fetch() reads afresh
        (called on SIGHUP).

Backends: ``dynamodb`` (the original's table), ``elasticache`` (the lowest
available node of a cluster) and ``file`` (a YAML file, re-read on change).
Optional dependencies (boto3, PyYAML) are imported only inside the backend
that needs them.
"""

import logging

__all__ = []

log = logging.getLogger(__name__)


def _first_per_port(entries, logger):
    """Keep the first mapping per listen port from ``[(label, Mapping), ...]``.

    Later ones are logged as errors, naming both items, and dropped.
    """
    kept = {}
    labels = {}
    for label, mapping in entries:
        port = mapping.listen_port
        if port in kept:
            logger.error("skipping %s: listen port %d is already used by %s",
                         label, port, labels[port])
            continue
        kept[port] = mapping
        labels[port] = label
    return list(kept.values())
