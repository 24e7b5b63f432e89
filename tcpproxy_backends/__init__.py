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

import ipaddress
import logging

__all__ = []

log = logging.getLogger(__name__)


def _parse_allow(value):
    """Return a tuple of normalised CIDR strings from a list or a comma string.

    None or an empty value gives ``()`` (no per-mapping restriction).  Raises
    ValueError naming the bad entry.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        entries = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple, set, frozenset)):
        entries = []
        for entry in value:
            if not isinstance(entry, str):
                raise ValueError("allow entry %r is not a string" % (entry,))
            entries.extend(entry.replace(",", " ").split())
    else:
        raise ValueError("allow must be a list of CIDRs or a comma separated "
                         "string, not %r" % (value,))
    networks = []
    for entry in entries:
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError("allow entry %r is not an IP network" % (entry,)) from None
        if str(network) not in networks:
            networks.append(str(network))
    return tuple(networks)


def _parse_max_connections(value):
    """Return a non-negative int from an int, an integral number or a digit string.

    None gives 0 (no per-mapping limit).  Raises ValueError.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError("max_connections must be a number, not %r" % (value,))
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise ValueError("max_connections %r is not a whole number" % (value,))
        number = int(text)
    else:
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):   # OverflowError: .inf
            raise ValueError("max_connections %r is not a whole number" % (value,)) from None
        if number != value:
            raise ValueError("max_connections %r is not a whole number" % (value,))
    if number < 0:
        raise ValueError("max_connections %r is negative" % (value,))
    return number


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
