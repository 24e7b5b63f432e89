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
        the poll as a whole failed and ConfigRejected(reason) when the
        configuration is invalid: the proxy then keeps what it has.

    problems = {}, held = set()   (optional, set by fetch())
        Items that are invalid or in conflict ({label: reason}) and the
        listen ports they concern: the poller keeps whatever is in force on
        a held port (None: the port cannot be told, nothing is removed).

    describe() -> dict
        Extra information for /status?format=json.

    reload()   (optional)
        Forget any cached state, so that the next fetch() reads afresh
        (called on SIGHUP).

Backends: ``dynamodb`` (the original's table), ``elasticache`` (the lowest
available node of a cluster) and ``file`` (a YAML file, re-read on change).
Optional dependencies (boto3, PyYAML) are imported only inside the backend
that needs them; ``aws`` holds what the AWS backends share.
"""

__all__ = []
