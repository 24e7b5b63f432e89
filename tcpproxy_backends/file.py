"""File backend: mappings from a YAML file, re-read when it changes.

``--backend file --config mappings.yaml``::

    mappings:
      - listen: 8002
        target: db.example.com:5432     # or: host: db.example.com / port: 5432
        allow: [10.0.0.0/8]             # optional: clients allowed on this port
        max_connections: 100            # optional: per-mapping limit (0: none)
      - "8003:cache.example.com:6379"   # short form

The file is checked every second (``interval = 1.0``): a poll whose file has
the same device, inode, size and mtime as the last one costs one ``stat()``
and returns the previous answer; anything else re-reads it.  SIGHUP
(``reload()``) re-reads it whatever its stat says, for the edit that keeps
size and mtime (within the file system's timestamp granularity, or by
``touch -r``).  Replacing the file with ``mv`` (atomic) is the safest way to
edit it: a reader never sees half a file.

Errors, decided so that a typo never tears everything down:

* File-level (unreadable, empty, not YAML, several documents, no
  ``mappings`` list, unknown top-level key): fetch() raises BackendError naming
  the line and reason, and the proxy keeps every current mapping.  An empty
  file is such an error: write ``mappings: []`` to remove every mapping.
* One bad entry (unknown key, bad port, bad CIDR, a listen port used by an
  earlier entry): logged with log.error naming its line, skipped; the other
  entries apply.  A mapping whose entry became bad is therefore removed.

Top-level keys starting with ``x-`` are ignored, so they can hold YAML
anchors to reuse (``allow: *office``).
"""

import logging
import os

from tcpproxy import (BackendError, ConfigError, Mapping, ProxyError, check_limit,
                      check_port, parse_allow)

from . import _first_per_port

__all__ = ["Backend", "parse_config"]

log = logging.getLogger(__name__)

ITEM_KEYS = ("listen", "target", "host", "port", "allow", "max_connections")


def _yaml():
    try:
        import yaml
    except ImportError:
        raise BackendError("the file backend needs PyYAML: "
                           "pip install 'tcpproxy[yaml]'") from None
    return yaml


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


def _item_mapping(item):
    """Return the Mapping of one entry of ``mappings``; ValueError/ProxyError if bad."""
    if isinstance(item, str):
        return Mapping.parse(item)
    if not isinstance(item, dict):
        raise ValueError("an entry must be a mapping (listen:, target:) or a "
                         "\"LPORT:HOST:RPORT\" string, not %r" % (item,))
    unknown = [str(k) for k in item if k not in ITEM_KEYS]
    if unknown:
        raise ValueError("unknown key %s (known: %s)"
                         % (", ".join(map(repr, unknown)), ", ".join(ITEM_KEYS)))
    if "listen" not in item:
        raise ValueError("no listen port (listen: PORT)")
    listen = check_port(item["listen"], "listen")
    if "target" in item:
        if "host" in item or "port" in item:
            raise ValueError("give either target: HOST:PORT or host: and port:, not both")
        target = item["target"]
        if not isinstance(target, str) or not target.strip():
            raise ValueError("target must be a HOST:PORT string, not %r" % (target,))
        spec = "%d:%s" % (listen, target.strip())
    elif "host" in item and "port" in item:
        host = item["host"]
        if not isinstance(host, str) or not host.strip():
            raise ValueError("host must be a name or an address, not %r" % (host,))
        host = host.strip()
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host
        spec = "%d:%s:%d" % (listen, host, check_port(item["port"], "port"))
    else:
        raise ValueError("no target (target: HOST:PORT, or host: and port:)")
    options = {}
    allow = parse_allow(item.get("allow"))
    if allow:
        options["allow"] = allow
    maximum = check_limit(item.get("max_connections"))
    if maximum:
        options["max_connections"] = maximum
    return Mapping.parse(spec, **options)


def parse_config(text, name="<config>", logger=log):
    """Return the mappings of the YAML document ``text``.

    Raises BackendError naming ``name``, the line and the reason when the
    document as a whole is unusable; logs and skips a bad entry.  Returns
    ``(mappings, skipped)`` where skipped lists the labels of skipped entries.
    """
    yaml = _yaml()
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            raise BackendError("%s is empty (write 'mappings: []' for no mappings)" % name)
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        before = text[:exc.position]
        raise BackendError("%s line %d column %d: character %#x is not allowed in YAML"
                           % (name, before.count("\n") + 1,
                              len(before) - before.rfind("\n"), exc.character)) from None
    except yaml.YAMLError as exc:
        raise BackendError(_yaml_reason(exc, name)) from None
    except RecursionError:
        raise BackendError("%s: nested too deeply" % name) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise BackendError("%s: expected a mapping with a 'mappings' list at the top, "
                           "found %s" % (_where(name, node), type(data).__name__))
    items_node = None
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key == "mappings":
            items_node = value_node
        elif not (isinstance(key, str) and key.startswith("x-")):
            raise BackendError("%s: unknown top-level key %r (expected 'mappings')"
                               % (_where(name, key_node), key))
    if items_node is None:
        raise BackendError("%s: no 'mappings' list" % name)
    items = data.get("mappings")
    if not isinstance(items, list) or not isinstance(items_node, yaml.SequenceNode):
        raise BackendError("%s: 'mappings' must be a list (write 'mappings: []' for no "
                           "mappings), not %s" % (_where(name, items_node),
                                                  "empty" if items is None
                                                  else type(items).__name__))
    entries, skipped = [], []
    for index, (item, item_node) in enumerate(zip(items, items_node.value), 1):
        label = "%s (entry %d)" % (_where(name, item_node), index)
        try:
            mapping = _item_mapping(item)
        except (ValueError, TypeError, ProxyError) as exc:
            logger.error("skipping %s: %s", label, exc)
            skipped.append(label)
            continue
        entries.append((label, mapping))
    mappings = _first_per_port(entries, logger)
    if len(mappings) != len(entries):
        ports = {m.listen_port: m for m in mappings}
        skipped.extend(label for label, m in entries if ports[m.listen_port] is not m)
    return mappings, skipped


class Backend:
    """Mappings from a YAML file (--config), re-read when it changes.

    Methods for the caller: fetch(), describe(), reload().
    """

    name = "file"
    interval = 1.0

    def __init__(self, options, client=None):
        path = getattr(options, "config", None)
        if not path:
            raise ConfigError("no config file: --backend file needs --config FILE")
        _yaml()
        self.path = os.path.abspath(os.fspath(path))
        self._signature = None
        self._mappings = None
        self._error = None
        self._skipped = []

    @staticmethod
    def _stat_signature(st):
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self):
        """Make the next fetch() re-read the file even if it looks unchanged."""
        self._signature = None

    def fetch(self):
        try:
            signature = self._stat_signature(os.stat(self.path))
        except OSError as exc:
            self._signature = None
            raise BackendError("cannot read %s: %s" % (self.path, exc.strerror or exc)) from None
        if signature == self._signature:
            if self._error is not None:
                raise BackendError(self._error)
            return list(self._mappings)
        try:
            with open(self.path, "rb") as f:
                signature = self._stat_signature(os.fstat(f.fileno()))
                raw = f.read()
        except OSError as exc:
            self._signature = None
            raise BackendError("cannot read %s: %s" % (self.path, exc.strerror or exc)) from None
        self._signature = signature
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error = "%s is not UTF-8 text (byte %d)" % (self.path, exc.start)
            raise BackendError(self._error) from None
        try:
            mappings, skipped = parse_config(text, self.path)
        except BackendError as exc:
            self._error = str(exc)
            raise
        log.info("read %s: %d mappings%s", self.path, len(mappings),
                 ", %d entries skipped" % len(skipped) if skipped else "")
        self._mappings, self._skipped, self._error = mappings, skipped, None
        return list(mappings)

    def describe(self):
        info = {"config": self.path}
        if self._skipped:
            info["skipped"] = list(self._skipped)
        return info
