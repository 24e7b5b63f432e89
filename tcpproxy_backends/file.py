"""File backend: mappings from a YAML file, re-read when it changes.

``--backend file --config mappings.yaml``::

    mappings:
      - listen: 8002                    # or IP:PORT ("[IPV6]:PORT", quoted): its own
        target: db.example.com:5432     # listen address instead of --listen-address
                                        # or: host: db.example.com / port: 5432
        allow: [10.0.0.0/8]             # optional: clients allowed on this port
        max_connections: 100            # optional: per-mapping limit (0: none)
        upstream_tls: true              # optional TLS (see tcpproxy.TLS_FIELDS): also
        upstream_ca: /etc/ssl/ca.pem    # upstream_sni, upstream_cert, upstream_key,
                                        # tls_cert, tls_key
        send_proxy: v2                  # optional: PROXY protocol header upstream (v1, v2)
        accept_proxy: true              # optional: clients start with a PROXY header
        dns_family: prefer-ipv6         # optional: auto, ipv4, ipv6, prefer-ipv4,
                                        # prefer-ipv6 (default: --dns-family)
      - "8003:cache.example.com:6379"   # short form
      - "127.0.0.1:8003:other.example.com:6379"   # the same port on another address

The file is checked every second (``interval = 1.0``): a poll whose file has
the same device, inode, size and mtime as the last one costs one ``stat()``
and returns the previous answer.  SIGHUP (``reload()``) re-reads it whatever
its stat says, for the edit that keeps size and mtime.

A file is applied whole or not at all.  Any error (unreadable, not a regular
file, larger than ``max_bytes``, not UTF-8, not YAML, several documents, a
duplicate key anywhere, an unknown key, a bad value in any entry, two entries
on one listen address and port (or a wildcard listen address and another on
one port: see tcpproxy.listen_conflict), aliases that expand past ``MAX_NODES`` nodes) rejects the
whole file: fetch() raises ConfigRejected naming the file, the line and the
reason, and the proxy keeps the configuration in force, closing nothing.  An
empty file is such an error: write ``mappings: []`` to remove every mapping.

A file caught while it is being written is never applied: a changed file is
read only once its mtime is ``settle`` seconds old, or once the same
changed stat has been seen on two polls in a row, and is re-stat()ed after
the read.  Replacing the file with ``mv`` (atomic) is still the best way to
edit it.

Top-level keys starting with ``x-`` are ignored, so they can hold YAML
anchors to reuse (``allow: *office``).
"""

import logging
import os
import stat
import time

from tcpproxy import (
    TLS_FIELDS,
    BackendError,
    ConfigError,
    ConfigPending,
    ConfigRejected,
    Mapping,
    ProxyError,
    check_dns_family,
    check_flag,
    check_limit,
    check_port,
    check_proxy_version,
    check_unique_ports,
    parse_allow,
    parse_listen,
    short_repr,
)

__all__ = ["Backend", "parse_config", "MAX_BYTES", "MAX_NODES", "SETTLE"]

log = logging.getLogger(__name__)

ITEM_KEYS = ("listen", "target", "host", "port", "allow", "max_connections", "send_proxy",
             "accept_proxy", "dns_family") + TLS_FIELDS
MAX_BYTES = 1024 * 1024      # --config-max-bytes raises it
MAX_NODES = 100000           # YAML nodes after alias expansion
SETTLE = 1.0                 # a changed file is read once its mtime is this old
MAX_REASONS = 10             # entry errors named in one message

def _yaml():
    try:
        import yaml
    except ImportError:
        raise BackendError("the file backend needs PyYAML: pip install pyyaml (or, for "
                           "the installed package, pip install 'tcpproxy[yaml]')") from None
    return yaml


def _loader(yaml, text):
    """A SafeLoader over *text* that refuses a key repeated in one mapping
    (PyYAML silently keeps the last one)."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != \
                        "tag:yaml.org,2002:merge":
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, "found duplicate key %r (first at line %d)" % (
                                key_node.value, seen[key_node.value].line + 1),
                            key_node.start_mark)
                    seen[key_node.value] = key_node.start_mark
            return super().construct_mapping(node, deep)

    return Loader(text)


def _yaml_reason(exc, name):
    """'NAME line L column C: what went wrong' from a PyYAML MarkedYAMLError."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        if context_mark is not None and (mark is None or context_mark.line != mark.line):
            context += " (line %d column %d)" % (context_mark.line + 1, context_mark.column + 1)
        problem = "%s: %s" % (context, problem)
    mark = mark or context_mark
    if mark is None:
        return "%s: %s" % (name, problem)
    return "%s line %d column %d: %s" % (name, mark.line + 1, mark.column + 1, problem)


def _where(name, node):
    return "%s line %d" % (name, node.start_mark.line + 1)


def _expanded_size(yaml, root, limit):
    """How many nodes *root* stands for once aliases are expanded (stops
    counting past *limit*); linear in the number of distinct nodes.  A node
    that contains itself (``&a [*a]``) counts as unbounded."""
    sizes, open_nodes = {}, set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [n for pair in node.value for n in pair] \
            if isinstance(node, yaml.MappingNode) else list(node.value)
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes.get(id(c), 0) for c in children))
            continue
        if any(id(c) in open_nodes or c is node for c in children):
            return limit + 1                  # recursive: it would never end
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _item_mapping(item):
    """Return the Mapping of one entry of ``mappings``; ValueError/ProxyError if bad."""
    if isinstance(item, str):
        return Mapping.parse(item)
    if not isinstance(item, dict):
        # ValueError, not TypeError: the caller reports it as a bad entry
        raise ValueError("an entry must be a mapping (listen:, target:) or a "  # noqa: TRY004
                         "\"LPORT:HOST:RPORT\" string, not %s" % short_repr(item))
    unknown = [str(k) for k in item if k not in ITEM_KEYS]
    if unknown:
        raise ValueError("unknown key %s (known: %s)"
                         % (", ".join(short_repr(k) for k in unknown), ", ".join(ITEM_KEYS)))
    if "listen" not in item:
        raise ValueError("no listen port (listen: PORT, or listen: IP:PORT)")
    host, port = parse_listen(item["listen"])
    listen = "%d" % port if host is None else ("[%s]:%d" if ":" in host else "%s:%d") % (
        host, port)
    if "target" in item:
        if "host" in item or "port" in item:
            raise ValueError("give either target: HOST:PORT or host: and port:, not both")
        target = item["target"]
        if not isinstance(target, str) or not target.strip():
            raise ValueError("target must be a HOST:PORT string, not %s" % short_repr(target))
        spec = "%s:%s" % (listen, target.strip())
    elif "host" in item and "port" in item:
        host = item["host"]
        if not isinstance(host, str) or not host.strip():
            raise ValueError("host must be a name or an address, not %s" % short_repr(host))
        host = host.strip()
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host
        spec = "%s:%s:%d" % (listen, host, check_port(item["port"], "port"))
    else:
        raise ValueError("no target (target: HOST:PORT, or host: and port:)")
    options = {"max_connections": check_limit(item.get("max_connections"))}
    if "allow" in item:              # given: empty (even "allow:" alone) is an error
        options["allow"] = parse_allow("" if item["allow"] is None else item["allow"], "allow")
    options.update((name, item[name]) for name in TLS_FIELDS if name in item)
    if "send_proxy" in item:
        options["send_proxy"] = check_proxy_version(item["send_proxy"])
    if "accept_proxy" in item:
        options["accept_proxy"] = bool(check_flag(item["accept_proxy"], "accept_proxy"))
    if "dns_family" in item:
        options["dns_family"] = check_dns_family(item["dns_family"])
    return Mapping.parse(spec, **options)


def parse_config(text, name="<config>", default_host=None):
    """Return ``(mappings, [])`` for the YAML document *text*
    (*default_host*: the proxy's --listen-address, when known, for
    tcpproxy.check_unique_ports).

    Raises ConfigRejected naming *name*, the line and the reason when any
    part of the document is unusable: a file is applied whole or not at
    all.  (The empty second item is kept for callers of the old API, which
    skipped bad entries.)
    """
    yaml = _yaml()
    loader = None
    try:
        loader = _loader(yaml, text)
        node = loader.get_single_node()
        if node is None:
            raise ConfigRejected("%s is empty (write 'mappings: []' for no mappings)" % name)
        if _expanded_size(yaml, node, MAX_NODES) > MAX_NODES:
            raise ConfigRejected("%s: more than %d YAML nodes once aliases are expanded "
                                 "(or an alias inside itself)" % (name, MAX_NODES))
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        before = text[:exc.position]
        raise ConfigRejected("%s line %d column %d: character %#x is not allowed in YAML"
                             % (name, before.count("\n") + 1,
                                len(before) - before.rfind("\n"), exc.character)) from None
    except yaml.YAMLError as exc:
        raise ConfigRejected(_yaml_reason(exc, name)) from None
    except RecursionError:
        raise ConfigRejected("%s: nested too deeply" % name) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigRejected("%s: expected a mapping with a 'mappings' list at the top, "
                             "found %s" % (_where(name, node), type(data).__name__))
    items_node = None
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key == "mappings":
            items_node = value_node
        elif not (isinstance(key, str) and key.startswith("x-")):
            raise ConfigRejected("%s: unknown top-level key %s (expected 'mappings')"
                                 % (_where(name, key_node), short_repr(key)))
    if items_node is None:
        raise ConfigRejected("%s: no 'mappings' list" % name)
    items = data.get("mappings")
    if not isinstance(items, list) or not isinstance(items_node, yaml.SequenceNode):
        raise ConfigRejected("%s: 'mappings' must be a list (write 'mappings: []' for no "
                             "mappings), not %s" % (_where(name, items_node),
                                                    "empty" if items is None
                                                    else type(items).__name__))
    entries, errors = [], []
    for index, (item, item_node) in enumerate(zip(items, items_node.value), 1):
        label = "%s (entry %d)" % (_where(name, item_node), index)
        try:
            entries.append((label, _item_mapping(item)))
        except (ValueError, TypeError, ProxyError) as exc:
            errors.append("%s: %s" % (label, exc))
    try:
        mappings = check_unique_ports(entries, default_host)
    except ConfigError as exc:
        errors.append(str(exc))
    if errors:
        more = len(errors) - MAX_REASONS
        raise ConfigRejected("; ".join(errors[:MAX_REASONS])
                             + ("; and %d more" % more if more > 0 else "")
                             + " (nothing applied: the configuration in force stays)")
    return mappings, []


class Backend:
    """Mappings from a YAML file (--config), re-read when it changes.

    Methods for the caller: fetch(), describe(), reload().  Attributes:
    settle (seconds; 0 reads a changed file at once), max_bytes,
    listen_address (options.listen_address: the proxy's default, to judge
    a mapping on it against one with its own address on the same port).
    """

    name = "file"
    interval = 1.0

    def __init__(self, options, client=None):
        path = getattr(options, "config", None)
        if not path:
            raise ConfigError("no config file: --backend file needs --config FILE")
        _yaml()
        self.path = os.path.abspath(os.fspath(path))
        self.max_bytes = getattr(options, "config_max_bytes", None) or MAX_BYTES
        self.listen_address = getattr(options, "listen_address", None)
        self.settle = SETTLE
        self._signature = None         # of the file last read
        self._pending = None           # a changed stat seen once, not read yet
        self._mappings = None
        self._error = None

    @staticmethod
    def _stat_signature(st):
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self):
        """Make the next fetch() re-read the file even if it looks unchanged."""
        self._signature = None

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError as exc:
            self._signature = None
            raise BackendError("cannot read %s: %s" % (self.path, exc.strerror or exc)) from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigRejected("%s is not a regular file" % self.path)
        if st.st_size > self.max_bytes:
            raise ConfigRejected("%s is %d bytes, more than the %d allowed "
                                 "(--config-max-bytes)" % (self.path, st.st_size, self.max_bytes))
        return st

    def _settling(self, st, signature):
        """True while a changed file may still be being written."""
        if self.settle <= 0 or time.time() - st.st_mtime >= self.settle \
                or signature == self._pending:
            self._pending = None
            return False
        self._pending = signature
        return True

    def fetch(self):
        st = self._stat()
        signature = self._stat_signature(st)
        if signature == self._signature:
            if self._error is not None:
                raise ConfigRejected(self._error)
            return list(self._mappings)
        if self._settling(st, signature):
            raise ConfigPending("%s changed less than %gs ago: reading it once the write "
                                "is over" % (self.path, self.settle))
        try:
            with open(self.path, "rb") as f:
                raw = f.read(self.max_bytes + 1)
                after = self._stat_signature(os.fstat(f.fileno()))
        except OSError as exc:
            self._signature = None
            raise BackendError("cannot read %s: %s" % (self.path, exc.strerror or exc)) from None
        if after != signature or len(raw) != st.st_size:
            self._pending = None
            raise ConfigPending("%s changed while it was read" % self.path)
        self._signature = signature
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error = "%s is not UTF-8 text (byte %d)" % (self.path, exc.start)
            raise ConfigRejected(self._error) from None
        try:
            mappings, _ = parse_config(text, self.path, self.listen_address)
        except ConfigRejected as exc:
            self._error = str(exc)
            raise
        log.info("read %s: %d mappings", self.path, len(mappings))
        self._mappings, self._error = mappings, None
        return list(mappings)

    def describe(self):
        return {"config": self.path}
