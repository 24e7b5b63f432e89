#!/usr/bin/env python3
"""tcpproxy: a threaded TCP proxy that obeys DNS TTLs.

Each port mapping ``LPORT:HOST:RPORT`` (``LISTEN_IP:LPORT:HOST:RPORT`` with
a listen address of its own) is served by its own
``socketserver.ThreadingTCPServer``; every accepted client gets a pair of
pump threads that copy bytes both ways.  Target names are resolved with
dnspython and an answer is used only until its TTL expires, so the proxy
follows DNS failover (RDS, Aurora, ElastiCache, ELB) without a restart.
When DNS fails, the last good answer is served (stale) while lookups are
retried with backoff.

Run it::

    python tcpproxy.py --connections 8002:db.example.com:5432 --debug 1

or drive it from Python::

    import tcpproxy
    with tcpproxy.Proxy([tcpproxy.Mapping.parse("8002:db.example.com:5432")]) as proxy:
        ...

The module has no import-time side effects; only ``main()`` configures
logging, signal handlers and resource limits.

Map of this file, in the order a connection's data flows through it:

    Constants and errors   tunables, the errno sets, the ProxyError tree,
                           rate-limited and once-per-change logging, _clip()
                           (escaped, cut text for the log and /status)
    Validation             one function per kind of value: check_port,
                           parse_hostport, parse_allow, check_limit,
                           check_listen_host, parse_listen, mapping_key (a
                           mapping's name: its port, or IP:PORT),
                           listen_conflict, check_unique_ports (CLI,
                           backends and Mapping alike)
    Mapping                Mapping (one [LISTEN_IP:]LPORT:HOST:RPORT), spec_key
                           and parse_connections
    Resolver               TTL-obeying DNS cache that serves stale answers,
                           clamps TTLs, shares lookups under way, prefetches
                           names in use and orders by --dns-family
    Upstream health        UpstreamHealth: addresses that refused or timed
                           out are tried last for a growing hold (passive)
    Registry and Session   the one owner of live sessions and their counters;
                           DnsChangeWatcher (--close-on-dns-change, its hold)
    Threads                _WorkerPool: parked, reusable pump threads
    Connection             one client's life in order: ProxyServer (the
                           mapping's listener: allow list, limits, hand-off;
                           it sleeps until a client or stop), serve_client()
                           (connect_upstream: the address fail-over loop in
                           health order, attempt cap, deadline, no loops;
                           start the pumps; close), pump()
    Linux fast paths       copy buffers, libc recv/send, splice pipes, CPU
                           pinning
    PROXY protocol         read_proxy_header() (--accept-proxy) before the
                           upstream connect, send_proxy_header() after it
    TLS                    tls_accept() (termination), tls_connect()
                           (origination), tls_pump(), TlsContexts
    Status server          StatusServer: /status, /connections, /metrics and
                           what they report
    Proxy                  lifecycle (start, stop, drain) and apply(); owns
                           UpstreamHealth, the housekeeping thread (reaps
                           idle workers) and own_address() (proxy loops)
    Backends               StaticBackend, load_backend, BackendPoller
    CLI                    flags, signals, check, health, sd_notify, main()
"""

__version__ = "1.0.0"
__all__ = [
    "ProxyError", "ConfigError", "BackendError", "ConfigRejected", "ConfigPending",
    "ResolveError",
    "short_repr", "check_port", "parse_hostport", "parse_allow", "check_limit", "check_unique_ports",
    "check_listen_host", "parse_listen", "listen_conflict", "spec_key", "mapping_key",
    "check_tls", "TLS_FIELDS", "TlsContexts",
    "check_proxy_version", "check_flag", "proxy_header", "parse_proxy_header",
    "check_dns_family", "DNS_FAMILIES",
    "Mapping", "parse_connections", "Resolver", "Registry", "Session",
    "ProxyServer", "StatusServer", "Proxy", "BackendPoller", "load_backend",
    "parse_cpus", "pin_cpus", "JsonFormatter", "main",
]

import argparse
import bisect
import collections
import errno
import fcntl
import functools
import http.server
import importlib
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import reprlib
import select
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

try:
    import dns.exception
    import dns.rdatatype
    import dns.resolver
except ImportError:  # pragma: no cover - exercised by a subprocess test
    dns = None

log = logging.getLogger("tcpproxy")

# Constants and errors ########################################################

BACKENDS = ("static", "dynamodb", "elasticache", "file")
DEFAULT_STATUS_ADDRESS = "127.0.0.1:8001"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_DNS_TIMEOUT = 2.0
DEFAULT_POLL_INTERVAL = 60.0
LISTEN_BACKLOG = 4096              # capped by net.core.somaxconn
LARGE_BUFFER = 256 * 1024          # pooled copy buffers and splice pipes
BULK_READ = 64 * 1024              # a read this big switches a pump to splice
FALLBACK_TTL = 5.0                 # re-resolve period without dnspython
HOSTS_TTL = 5.0                    # how long an /etc/hosts answer is used
DNS_BACKOFF_MIN = 0.5
DNS_BACKOFF_MAX = 8.0
SERVE_POLL_INTERVAL = 0.2          # the status server's serve_forever() poll
LISTEN_POLL_INTERVAL = 60.0        # listeners: a safety net, stop wakes them at once
REAP_INTERVAL = 0.2                # the housekeeping thread retires idle workers
DEFAULT_CONNECT_ATTEMPTS = 3       # upstream addresses tried per client
DEFAULT_DNS_MAX_TTL = 3600         # --dns-max-ttl
STATUS_CPU_SHARE = 0.05           # /metrics and /connections: at most this much of a CPU
PROXY_COALESCE_MAX = 16384        # --send-proxy: client bytes sent with the header
DNS_FAMILIES = ("auto", "ipv4", "ipv6", "prefer-ipv4", "prefer-ipv6")   # --dns-family
PREFETCH_SHARE = 0.1               # a name in use is looked up again in the last
PREFETCH_MIN = 1.0                 # max(10% of its TTL, min(1 s, TTL/2))
DNS_CHANGE_HOLD_MIN = 5.0          # --dns-change-hold default: max(TTL, this)
REFRESH_INTERVAL = 1.0             # a connect failure re-resolves a name at most this often
HOLD_MIN = 2.0                     # an address that failed is skipped this long,
HOLD_MAX = 60.0                    # doubling with each further failure up to this
LOCAL_ADDRESS_TTL = 60.0           # how long "is this address ours?" is remembered
TEXT_LIMIT = 300                   # characters of an error text in the log or /status
DRAIN_QUIET = 1.0                  # drain closes a session idle this long between exchanges
DEFAULT_DRAIN_TIMEOUT = 8.0        # below docker stop's 10 s grace period
ACCEPT_BACKOFF = 0.1               # pause after EMFILE/ENFILE or no thread
THREAD_STACK_SIZE = 256 * 1024     # set by main() only
SWITCH_INTERVAL = 0.05             # sys.setswitchinterval(), by main() only
DEBUG_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)
HAVE_SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_TIMEVAL_ZERO = struct.pack("ll", 0, 0)
_LINGER_RESET = struct.pack("ii", 1, 0)     # SO_LINGER on, 0 s: close() resets
PROXY_HEADER_TIMEOUT = 3.0         # --accept-proxy: the whole header within this
PROXY_V1_MAX = 107                 # the longest v1 line, CRLF included (the spec's bound)
PROXY_V2_MAX = 4096                # a longer v2 header (16 + length) is refused
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

# Errors that mean "the peer went away" (or was never there): logged at
# debug level.  Any other errno on a session's socket (EBADF, ENOTCONN,
# EINVAL, ...) means a bug in the proxy and is logged as an error.
NET_ERRS = frozenset((errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT,
                      errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED,
                      errno.ESHUTDOWN))
# accept() failures that mean "out of descriptors or memory".
EXHAUSTION_ERRS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class ProxyError(Exception):
    """A tcpproxy error."""

    def __init__(self, *args):
        super().__init__(*(args or (self.__doc__,)))


class ConfigError(ProxyError):
    """Invalid configuration."""

    def __init__(self, *args, failures=None):
        super().__init__(*args)
        self.failures = dict(failures or {})


class BackendError(ProxyError):
    """The configuration backend failed."""


class ConfigRejected(BackendError):
    """The backend's configuration is invalid; the one in force stays."""


class ConfigPending(ProxyError):
    """The configuration is being changed (a file still being written):
    the poller keeps what is in force and asks again at the next poll."""


class ResolveError(ProxyError):
    """The name has no usable address."""


class _RateLimiter:
    """Log a repeated message at most once per *interval*, with a count of
    what was suppressed in between."""

    def __init__(self, interval=10.0):
        self.interval = interval
        self.lock = threading.Lock()
        self._seen = {}

    def log(self, level, key, msg, *args):
        now = time.monotonic()
        with self.lock:
            last, suppressed = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[key] = (last, suppressed + 1)
                return
            self._seen[key] = (now, 0)
            if len(self._seen) > 10000:
                self._seen.clear()
        if suppressed:
            msg += " (%d similar messages suppressed)" % suppressed
        log.log(level, msg, *args)


_ratelimited = _RateLimiter()


def _clip(text, limit=TEXT_LIMIT):
    """*text* as it may go to the log or /status: control characters (and
    backslashes, so that an escape cannot be forged) shown as Python escapes,
    ``\\x1b`` for ESC, and cut to about *limit* characters."""
    text = str(text)
    head = text[:limit]
    if head.isprintable() and "\\" not in head:
        if len(text) <= limit:
            return text
        return "%s... (%d characters cut)" % (head, len(text) - limit)
    out, size = [], 0
    for i, c in enumerate(head):
        if not c.isprintable() or c == "\\":
            c = "\\\\" if c == "\\" else repr(c)[1:-1]
        size += len(c)
        if size > limit:
            return "%s... (%d characters cut)" % ("".join(out), len(text) - i)
        out.append(c)
    if len(text) > limit:
        out.append("... (%d characters cut)" % (len(text) - limit))
    return "".join(out)


class _OncePerChange:
    """Log a condition when it appears or changes; while it stays the
    same, only a reminder every *remind* seconds saying how often it
    recurred.  clear(key) forgets it (and says whether it was there)."""

    def __init__(self, remind=300.0):
        self.remind = remind
        self.lock = threading.Lock()
        self._last = {}                   # key -> [text, when logged, repeats]

    def log(self, level, key, msg, *args, extra=None):
        text = _clip(msg % args if args else msg)
        now = time.monotonic()
        with self.lock:
            entry = self._last.get(key)
            if entry is not None and entry[0] == text:
                entry[2] += 1
                if now - entry[1] < self.remind:
                    return
                text = "%s (still so: %d times since %s s ago)" % (
                    text, entry[2], int(now - entry[1]))
                entry[1], entry[2] = now, 0
            else:
                self._last[key] = [text, now, 0]
        log.log(level, "%s", text, extra=extra)

    def clear(self, key):
        with self.lock:
            return self._last.pop(key, None) is not None


_once = _OncePerChange()
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def short_repr(value):
    """repr(value), bounded: what a config holds goes into error messages
    this way, so a huge or deeply aliased value cannot flood a log line."""
    return _REPR.repr(value)


def _iso(timestamp):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# Validation ##################################################################
#
# One function per kind of value.  The CLI, the YAML and DynamoDB loaders,
# the ElastiCache backend and Mapping all call these, so a bad value gets
# the same ConfigError wording wherever it came from.

@functools.lru_cache(maxsize=1024)
def _is_ip(text):
    # inet_pton first: ipaddress is slow and nests the interpreter deeply
    # (it runs for every new connection); it is still the judge of scoped
    # IPv6 addresses (fe80::1%eth0), which inet_pton refuses.
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):
            pass
    if "%" not in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")
# A name whose last label is a number (127.1, 2130706433, 0x7f.1): inet_aton()
# and so getaddrinfo() take it as an IPv4 address, not a name to look up.
_NUMERIC_NAME = re.compile(r"(?:.*\.)?(?:[0-9]+|0[xX][0-9A-Fa-f]*)\.?")
_DIGITS = re.compile(r"[0-9]+")


def _ip(address):
    """*address* as an ip_address (without a %scope; an IPv4-mapped IPv6
    address as the IPv4 one), or None if it is not an IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


@functools.lru_cache(maxsize=1024)
def _unusable_address(address):
    """Why *address* (an IP string) can never be an upstream, or None:
    0.0.0.0/8 and :: reach this host itself (a loop, or a surprise), and a
    multicast address takes no TCP connection.  Cached: connect_upstream()
    asks for every address it tries."""
    ip = _ip(address)
    if ip is None:
        return "not an IP address"
    if ip.is_multicast:
        return "%s is a multicast address" % ip
    if ip.version == 4 and ip in _THIS_NETWORK or ip.version == 6 and ip.is_unspecified:
        return "%s means this host (0.0.0.0/8 and :: are not upstream addresses)" % ip
    return None




def _format_hostport(host, port):
    return "[%s]:%s" % (host, port) if ":" in host else "%s:%s" % (host, port)


def check_port(value, what="port", minimum=1):
    """Return *value* (an int, or a string of ASCII digits) as a port
    number from *minimum* to 65535; raise ConfigError naming *what*."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        number = int(value.strip()) if len(value.strip()) < 20 else -1   # int() caps digits
    else:
        raise ConfigError("%s %s is not a port number (%d-65535)"
                          % (what, short_repr(value), minimum))
    if not minimum <= number <= 65535:
        raise ConfigError("%s %s is not a port number (%d-65535)"
                          % (what, short_repr(value), minimum))
    return number


def parse_hostport(text, default_host="127.0.0.1", default_port=None, what="address"):
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (or ``HOST``
    when *default_port* is given); HOST must be an IP address or
    ``localhost``.  Returns ``(host, port)``; raises ConfigError naming
    *text*."""
    text = str(text).strip()
    m = re.match(r"^\[([^\]]+)\](?::([^:]*))?$", text)
    if m:
        host, port = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:            # bare IPv6 literal, no port
        host, port = text, None
    elif _DIGITS.fullmatch(text):
        host, port = "", text
    else:
        host, port = text, None
    if port is None:
        if default_port is None:
            raise ConfigError("invalid %s %r: no port" % (what, text))
        port = default_port
    try:
        port = check_port(port)
    except ConfigError:
        raise ConfigError("invalid %s %r: bad port (1-65535)" % (what, text)) from None
    host = host or default_host
    if not (_is_ip(host) or host == "localhost"):
        raise ConfigError("invalid %s %r: %r is not an IP address" % (what, text, host))
    return host, port


def parse_allow(value, what="allow"):
    """Return a tuple of ip_network objects from CIDR strings (a list, or
    one string separated by commas or white space) or networks.  None, and
    the empty tuple that stands for it in Mapping and Proxy, give ``()``
    (no restriction).  A list or string given but empty (``""``, ``" , "``,
    ``[]``) fails closed: it is a ConfigError, never "anyone".  Raises
    ConfigError naming *what* and the bad entry."""
    if value is None or value == ():
        return ()
    given = value
    if isinstance(value, (str, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        value = [value]
    elif not isinstance(value, (list, tuple, set, frozenset)):
        raise ConfigError("%s must be a list of CIDRs or a comma separated string, not %s"
                          % (what, short_repr(value)))
    nets = []
    for entry in value:
        if isinstance(entry, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            parts = [entry]
        elif isinstance(entry, str):
            parts = [p for p in re.split(r"[,\s]+", entry.strip()) if p]
        else:
            raise ConfigError("%s entry %s is not a CIDR string" % (what, short_repr(entry)))
        for part in parts:
            try:
                net = part if not isinstance(part, str) else ipaddress.ip_network(
                    part, strict=False)
            except ValueError:
                raise ConfigError("%s entry %s is not an IP network"
                                  % (what, short_repr(part))) from None
            if net not in nets:
                nets.append(net)
    if not nets:
        raise ConfigError("%s is empty (%s): give at least one CIDR, or leave it out to "
                          "allow anyone" % (what, short_repr(given)))
    return tuple(nets)


def check_limit(value, what="max_connections"):
    """Return a connection limit (0 = none) from a whole number or a string
    of ASCII digits; None gives 0.  Raises ConfigError naming *what*."""
    if value is None:
        return 0
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()) and len(value.strip()) < 20:
        return int(value.strip())
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and (isinstance(value, int) or math.isfinite(value)) \
            and value == int(value) and value >= 0:
        return int(value)
    raise ConfigError("%s %s is not a whole number of 0 or more" % (what, short_repr(value)))


def check_proxy_version(value, what="send_proxy"):
    """Return the PROXY protocol version to send: "v1", "v2", or "" (off)
    for None, an empty string or False.  Raises ConfigError naming *what*."""
    if value is None or value is False:
        return ""
    if isinstance(value, str) and value.strip().lower() in ("", "v1", "v2"):
        return value.strip().lower()
    raise ConfigError("%s %s is not v1 or v2" % (what, short_repr(value)))


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "")


def check_flag(value, what="flag"):
    """Return True, False or None (not set) from a bool, None or a string
    such as true/false, yes/no, on/off, 1/0; raise ConfigError naming
    *what*."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError("%s %s is not true or false" % (what, short_repr(value)))


def _family_of(address):
    return "ipv6" if ":" in address else "ipv4"


def check_dns_family(value, what="dns_family", host=None):
    """Return the address family to resolve with: one of DNS_FAMILIES, or
    None (not set: the proxy's --dns-family applies) for None or "".  With
    an IP address as *host*, "ipv4" or "ipv6" must be its family.  Raises
    ConfigError naming *what*."""
    if value is None:
        return None
    family = value.strip().lower() if isinstance(value, str) else None
    if family == "":
        return None
    if family not in DNS_FAMILIES:
        raise ConfigError("%s %s is not one of %s" % (what, short_repr(value),
                                                      ", ".join(DNS_FAMILIES)))
    if host and family in ("ipv4", "ipv6") and _is_ip(host) and _family_of(host) != family:
        raise ConfigError("target %s is not an %s address (%s %s)" % (
            host, "IPv6" if family == "ipv6" else "IPv4", what, family))
    return family


LISTEN_FORMS = ("LPORT:HOST:RPORT or LISTEN_IP:LPORT:HOST:RPORT, IPv6 addresses in brackets: "
                "8002:[::1]:5432, [::1]:8002:db:5432")


def check_listen_host(value, what="listen address"):
    """Return a mapping's own listen address (an IP literal, brackets
    optional, normalised: ``0:0::1`` gives ``::1``) or None for "the
    proxy's --listen-address".  A name is refused: what it resolves to
    when the listener binds is no sound key for a mapping."""
    if value is None:
        return None
    text = value.strip() if isinstance(value, str) else None
    if text and text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    if not text or not _is_ip(text):
        hint = " (write 127.0.0.1 or [::1])" if text == "localhost" else ""
        raise ConfigError("%s %s is not an IP address%s" % (what, short_repr(value), hint))
    if "%" not in text:
        text = str(ipaddress.ip_address(text))
    return text


def parse_listen(value, what="listen"):
    """``PORT``, ``IP:PORT`` or ``[IPV6]:PORT`` (a YAML mapping's
    ``listen:``) as ``(listen host or None, port)``; raises ConfigError."""
    if isinstance(value, int) or (isinstance(value, str) and _DIGITS.fullmatch(value.strip())):
        return None, check_port(value, what)
    text = value.strip() if isinstance(value, str) else ""
    m = re.fullmatch(r"(\[[^\[\]]*\]|[^:\[\]]*):([^:\[\]]*)", text)
    if not m:
        raise ConfigError("%s %s is not PORT, IP:PORT or [IPV6]:PORT%s" % (
            what, short_repr(value), " (an IPv6 address goes in brackets and, in YAML, "
            "quotes: \"[::1]:8002\")" if text.count(":") > 1 else ""))
    return (check_listen_host(m.group(1), "%s address" % what),
            check_port(m.group(2), "%s %s: port" % (what, short_repr(value))))


def mapping_key(listen_host, port):
    """A mapping's name in the Registry, /status, /connections, /metrics and
    the logs: its listen port (an int, as before per-mapping addresses) when
    it listens on the proxy's --listen-address, else "IP:PORT"."""
    return port if listen_host is None else _format_hostport(listen_host, port)


def _key_order(key):
    """Sort key for mapping keys (ints and "IP:PORT" strings): by port."""
    if isinstance(key, int):
        return (key, "")
    host, _, port = key.rpartition(":")
    return (int(port), host)


def _by_key(items):
    """(key, value) pairs of a dict keyed by mapping keys, in _key_order."""
    return sorted(items, key=lambda item: _key_order(item[0]))


def _listen_clash(a, b):
    """Why listeners on the addresses *a* and *b* (IP strings; None: the
    proxy's default, not known here) cannot share a port, or None.  On
    Linux a wildcard and a specific address on one port conflict (the
    listener on :: is dual-stack: it takes IPv4 too)."""
    if a == b:
        return "the same address" if a is not None else None
    if a is None or b is None:
        return None
    for wild, other in ((a, b), (b, a)):
        if wild == "::" or (wild == "0.0.0.0" and ":" not in other):
            return "%s takes the port on every %saddress" % (
                wild, "IPv4 " if wild == "0.0.0.0" else "")
    return None


def listen_conflict(a, b, default_host=None):
    """Why the Mappings *a* and *b* cannot both listen, or None: the same
    listen port on the same address, or a wildcard and another address
    (*default_host*: the proxy's --listen-address, when known)."""
    if a.listen_port != b.listen_port or a.listen_port == 0:
        return None
    host_a, host_b = a.listen_host or default_host, b.listen_host or default_host
    if host_a is None and host_b is None:
        return "listen port %d is used twice" % a.listen_port
    reason = _listen_clash(host_a, host_b)
    if reason is None:
        return None
    if host_a == host_b:
        return "listen address %s is used twice" % _format_hostport(host_a, a.listen_port)
    return "listen addresses %s and %s conflict (%s)" % (
        _format_hostport(host_a, a.listen_port), _format_hostport(host_b, b.listen_port), reason)


def check_unique_ports(entries, default_host=None):
    """Raise ConfigError when two of ``[(label, Mapping), ...]`` cannot both
    listen (see listen_conflict), naming both; return the mappings.
    *default_host* is the proxy's --listen-address when known: without it,
    a mapping on the default address and one with its own address on the
    same port pass here and Proxy.apply() judges them."""
    seen = {}                            # listen port -> [(label, mapping)]
    for label, mapping in entries:
        for other_label, other in seen.get(mapping.listen_port, ()):
            reason = listen_conflict(other, mapping, default_host)
            if reason:
                raise ConfigError("%s: %s and %s" % (reason, other_label, label))
        seen.setdefault(mapping.listen_port, []).append((label, mapping))
    return [mapping for _, mapping in entries]


# A mapping's TLS settings (see "TLS" in the Connection section); None means
# "not set here": the proxy's own (the command line's) applies.
TLS_FIELDS = ("upstream_tls", "upstream_ca", "upstream_sni", "upstream_cert", "upstream_key",
              "tls_cert", "tls_key")


def check_file(value, what="file"):
    """Return a file name (a non-empty string) or None; raise ConfigError
    naming *what*.  Whether the file is readable is checked when it is
    loaded."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ConfigError("%s %s is not a file name" % (what, short_repr(value)))
    return value.strip()


def check_server_name(value, what="upstream_sni"):
    """Return a TLS server name (a host name or an IP address) or None."""
    if value is None:
        return None
    name = value.strip().strip("[]") if isinstance(value, str) else None
    if not name or not (_is_ip(name) or _HOSTNAME.match(name)):
        raise ConfigError("%s %s is not a host name or an IP address" % (what, short_repr(value)))
    return name


def check_tls(options):
    """Validate a {TLS_FIELDS name: value} dict (a mapping's, or the
    command line's); return it with normalised values."""
    out = {name: options.get(name) for name in TLS_FIELDS}
    out["upstream_tls"] = check_flag(out["upstream_tls"], "upstream_tls")
    out["upstream_sni"] = check_server_name(out["upstream_sni"])
    for name in ("upstream_ca", "upstream_cert", "upstream_key", "tls_cert", "tls_key"):
        out[name] = check_file(out[name], name)
    for key, cert in (("upstream_key", "upstream_cert"), ("tls_key", "tls_cert")):
        if out[key] and not out[cert]:
            raise ConfigError("%s needs %s" % (key, cert))
    return out


def _allowed(address, networks):
    if not networks:
        return True
    ip = _ip(address)
    return ip is not None and any(ip in net for net in networks)


def _is_loopback(host):
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


def _same_ip(a, b):
    ip = _ip(a)
    return ip is not None and ip == _ip(b)


_LOCAL = {}                              # address -> (is local, when checked)


def _is_local(address, v4_only=False):
    """True when *address* is one of this host's: loopback, or an address
    a socket can bind (checked once a minute per address)."""
    now = time.monotonic()
    cached = _LOCAL.get((address, v4_only))
    if cached is not None and now - cached[1] < LOCAL_ADDRESS_TTL:
        return cached[0]
    ip = _ip(address)
    if ip is None or (v4_only and ip.version != 4):
        local = False
    elif ip.is_loopback:
        local = True
    else:
        try:
            with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                               socket.SOCK_DGRAM) as probe:
                probe.bind((str(ip), 0))
            local = True
        except OSError:
            local = False
    if len(_LOCAL) > 1024:
        _LOCAL.clear()
    _LOCAL[(address, v4_only)] = (local, now)
    return local


# Mapping #####################################################################

@dataclass(frozen=True)
class Mapping:
    """One port mapping: listen on *listen_port*, forward to (*host*, *port*).

    *listen_host* (an IP address) is the mapping's own listen address;
    None, the default, listens on the proxy's (--listen-address).
    *allow* (CIDR strings or networks) limits which clients may connect;
    *max_connections* (0 = unlimited) caps concurrent clients; the
    TLS_FIELDS turn on TLS to the upstream or for clients.
    *send_proxy* ("v1", "v2" or "": off) sends a PROXY protocol header
    upstream; *accept_proxy* requires one from every client.
    *dns_family* (one of DNS_FAMILIES; None: the proxy's --dns-family)
    chooses the address records the target is resolved to.  Mappings
    are values: two equal mappings mean the same thing, and a
    configuration change is a difference of sets keyed by *key* (the
    listen port, or "IP:PORT" with a listen address of its own).
    """

    listen_port: int
    host: str
    port: int
    allow: tuple = field(default=(), compare=True)
    max_connections: int = 0
    # TLS (see TLS_FIELDS; None: the proxy's setting applies)
    upstream_tls: bool = None
    upstream_ca: str = None
    upstream_sni: str = None
    upstream_cert: str = None
    upstream_key: str = None
    tls_cert: str = None
    tls_key: str = None
    send_proxy: str = ""
    accept_proxy: bool = False
    dns_family: str = None
    listen_host: str = None

    def __post_init__(self):
        spec = "%s:%s" % (self.listen_port, _format_hostport(str(self.host), self.port))
        if self.listen_host is not None:
            spec = "%s:%s" % (str(self.listen_host), spec)
        try:
            object.__setattr__(self, "listen_host", check_listen_host(self.listen_host))
            object.__setattr__(self, "listen_port",
                               check_port(self.listen_port, "listen port", minimum=0))
            object.__setattr__(self, "port", check_port(self.port, "target port"))
            object.__setattr__(self, "allow", parse_allow(self.allow))
            object.__setattr__(self, "max_connections", check_limit(self.max_connections))
            for name, value in check_tls({n: getattr(self, n) for n in TLS_FIELDS}).items():
                object.__setattr__(self, name, value)          # TLS
            object.__setattr__(self, "send_proxy", check_proxy_version(self.send_proxy))
            object.__setattr__(self, "accept_proxy",
                               bool(check_flag(self.accept_proxy, "accept_proxy")))
        except ConfigError as exc:
            raise ConfigError("invalid connection %s: %s" % (short_repr(spec), exc)) from None
        host = str(self.host or "").strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not (_is_ip(host) or _HOSTNAME.match(host)):
            raise ConfigError("invalid connection %s: bad host %s" % (short_repr(spec),
                                                                     short_repr(self.host)))
        if _is_ip(host):
            reason = _unusable_address(host)
            if reason:
                raise ConfigError("invalid connection %s: bad target: %s" % (short_repr(spec), reason))
        elif _NUMERIC_NAME.fullmatch(host):
            try:
                hint = ": %s" % socket.inet_ntoa(socket.inet_aton(host))
            except OSError:
                hint = ""
            raise ConfigError("invalid connection %s: bad host %r: a number, not a name "
                              "(write the IP address in full%s)" % (short_repr(spec), host, hint))
        object.__setattr__(self, "host", host)
        try:
            object.__setattr__(self, "dns_family", check_dns_family(self.dns_family, host=host))
        except ConfigError as exc:
            raise ConfigError("invalid connection %s: %s" % (short_repr(spec), exc)) from None

    @classmethod
    def parse(cls, spec, **options):
        """Parse ``LPORT:HOST:RPORT``, ``LISTEN_IP:LPORT:HOST:RPORT`` or
        ``[LISTEN_IPV6]:LPORT:HOST:RPORT`` (an IPv6 target in brackets too:
        ``8002:[::1]:5432``)."""
        text = str(spec).strip()
        fields = _spec_fields(text)
        if fields is None:
            raise ConfigError("invalid connection %s: unbalanced brackets (expected %s)"
                              % (short_repr(text), LISTEN_FORMS))
        listen_host = None
        if len(fields) == 4:
            listen_host = fields.pop(0)
            if not listen_host:
                raise ConfigError("invalid connection %s: empty listen address (leave it "
                                  "out for --listen-address)" % short_repr(text))
        elif len(fields) != 3:
            reason = ("an IPv6 address must be in brackets, e.g. [::1]:8002:[::1]:5432"
                      if _bare_ipv6(fields) else "expected %s" % LISTEN_FORMS)
            raise ConfigError("invalid connection %s: %s" % (short_repr(text), reason))
        elif fields[0].startswith("[") or _is_ip(fields[0]):
            raise ConfigError("invalid connection %s: a listen address needs "
                              "LISTEN_IP:LPORT:HOST:RPORT" % short_repr(text))
        lport, host, rport = fields
        if host.startswith("["):
            host = host[1:-1]
        if not host:
            raise ConfigError("invalid connection %s: missing host" % short_repr(text))
        try:
            lport = check_port(lport, "listen port")
            rport = check_port(rport, "target port")
        except ConfigError as exc:
            raise ConfigError("invalid connection %s: %s" % (short_repr(text), exc)) from None
        return cls(lport, host, rport, listen_host=listen_host, **options)

    @property
    def spec(self):
        target = _format_hostport(self.host, self.port)
        if self.listen_host is None:
            return "%d:%s" % (self.listen_port, target)
        return "%s:%s" % (_format_hostport(self.listen_host, self.listen_port), target)

    @property
    def key(self):
        """The mapping's name (see mapping_key): its listen port, or
        "IP:PORT" when it has a listen address of its own."""
        return mapping_key(self.listen_host, self.listen_port)

    @property
    def target(self):
        return (self.host, self.port)

    def __str__(self):
        return self.spec


def spec_key(text):
    """The key (see Mapping.key) that a spec such as
    ``127.0.0.1:8002:db:5432`` names, even when the rest of it is bad; None
    when its listen address and port cannot be told."""
    fields = _spec_fields(str(text).strip())
    if not fields or len(fields) not in (3, 4):
        return None
    try:
        host = check_listen_host(fields[0]) if len(fields) == 4 else None
        return mapping_key(host, check_port(fields[-3].strip()))
    except ConfigError:
        return None


_SPEC_FIELD = re.compile(r"\[[^\[\]]*\]|[^:\[\]]*")


def _bare_ipv6(fields):
    """True when some run of *fields* (a spec split on colons) joined with
    colons is an IPv6 address: one written without brackets."""
    if len(fields) > 12:                 # 8 groups and 4 fields at most
        return False
    return any(_is_ip(":".join(fields[i:j])) and ":" in ":".join(fields[i:j])
               for i in range(len(fields)) for j in range(i + 3, len(fields) + 1))


def _spec_fields(text):
    """*text* split on the colons outside brackets (a bracketed field keeps
    its brackets), or None when a bracket is unbalanced."""
    fields, pos = [], 0
    while True:
        m = _SPEC_FIELD.match(text, pos)
        fields.append(m.group())
        pos = m.end()
        if pos == len(text):
            return fields
        if text[pos] != ":":
            return None
        pos += 1


def parse_connections(values, default_host=None, **options):
    """Parse ``--connections`` values: each is split on commas and white
    space; *options* are given to every Mapping.  Raises ConfigError on a
    bad spec or two mappings that cannot both listen (*default_host*: the
    --listen-address, see check_unique_ports)."""
    entries = []
    for value in values or ():
        for spec in re.split(r"[,\s]+", str(value).strip()):
            if spec:
                entries.append((repr(spec), Mapping.parse(spec, **options)))
    return check_unique_ports(entries, default_host)


# Resolver ####################################################################

class _Entry:
    """Cached answer for one name; guarded by its condition."""

    __slots__ = ("cond", "only", "addresses", "expires", "prefetch_at", "retry_at",
                 "backoff", "busy", "prefetching", "error", "stale", "updated", "source",
                 "ttl", "serial", "refreshed", "lookups_ok", "lookups_failed", "changes",
                 "prefetches")

    def __init__(self, only=None):
        self.cond = threading.Condition(threading.Lock())
        self.only = only                # "ipv4" or "ipv6": that record type alone
        self.addresses = ()
        self.ttl = None
        self.serial = 0                 # lookups finished, to share the one under way
        self.refreshed = None           # last refresh() (a connect failure asked)
        self.expires = 0.0
        self.prefetch_at = float("inf")  # a lookup() from then on looks up again
        self.retry_at = 0.0
        self.backoff = 0.0
        self.busy = False
        self.prefetching = False        # the lookup under way is a prefetch
        self.error = None
        self.stale = False
        self.updated = None
        self.source = None
        self.lookups_ok = self.lookups_failed = self.changes = self.prefetches = 0


def prefetch_window(ttl):
    """The last part of a TTL in which a name in use is looked up again in
    the background: max(10%, min(1 s, half)); 0 for TTL 0 (no prefetch)."""
    if ttl <= 0:
        return 0.0
    return max(PREFETCH_SHARE * ttl, min(PREFETCH_MIN, ttl / 2.0))


def _ordered(addresses, family):
    """*addresses* (a sequence) as a list, the preferred family first for
    prefer-ipv4 / prefer-ipv6 (stable: DNS order within a family)."""
    if family not in ("prefer-ipv4", "prefer-ipv6"):
        return list(addresses)
    preferred = family[len("prefer-"):]
    return ([a for a in addresses if _family_of(a) == preferred]
            + [a for a in addresses if _family_of(a) != preferred])


def _rotated(addresses, turn, family):
    """*addresses* (ordered by _ordered) from a rotating start: with
    prefer-ipv4 / prefer-ipv6 each family rotates on its own, the
    preferred one still first."""
    if family in ("prefer-ipv4", "prefer-ipv6") and len(addresses) > 1:
        split = sum(1 for a in addresses if _family_of(a) == family[len("prefer-"):])
        if 0 < split < len(addresses):
            return (_rotated(addresses[:split], turn, None)
                    + _rotated(addresses[split:], turn, None))
    start = turn % len(addresses)
    return addresses[start:] + addresses[:start]


_RECORD = {"ipv4": "A", "ipv6": "AAAA"}
# getaddrinfo() errors that mean "the name has no address of that family"
_NO_ADDRESS_OF_FAMILY = {getattr(socket, name) for name in ("EAI_NODATA", "EAI_ADDRFAMILY")
                         if hasattr(socket, name)}


class Resolver:
    """Resolve names to addresses (A and AAAA), honouring TTLs.

    Methods for the caller:

    - lookup(host, family=None) -> list of address strings
    - refresh(host, family=None): look again now, in the background (a
      connect failed)
    - info(host, family=None) -> dict describing the cached answer
    - expires_in(host, family=None) -> seconds, or None
    - add_listener(callback): callback(host, old, new) on every changed answer
    - close(timeout): join the background lookups

    An answer is used until its TTL expires (the smallest TTL along a CNAME
    chain), clamped to *min_ttl*..*max_ttl*; TTL 0 means a lookup per call.
    A name in use is prefetched: a lookup() in the last part of its TTL
    (prefetch_window) starts a lookup in the background and returns the
    cached answer, so that while DNS answers no caller waits for it (an
    answer that expires while its prefetch is still under way is served
    until that lookup ends, within the DNS timeout).
    Concurrent callers share one lookup: a caller that finds a lookup under
    way waits for it and takes its answer, even with TTL 0.  When a lookup
    fails the last good answer is served (stale) and lookups are retried
    with backoff, so callers do not each wait for a DNS timeout.  Names in
    the hosts file are answered from it; without dnspython the system
    resolver is used and answers are kept for FALLBACK_TTL seconds.

    *family* (one of DNS_FAMILIES; a call's own *family* overrides it):
    "auto" asks for A then AAAA records (without dnspython: the system's
    order); "prefer-ipv4" / "prefer-ipv6" ask for both and return the
    preferred family first (they share the cached answer of "auto");
    "ipv4" / "ipv6" ask for A or AAAA records only (a cache entry of their
    own), and an answer without them is a failure.
    """

    def __init__(self, nameservers=None, *, timeout=DEFAULT_DNS_TIMEOUT,
                 hosts_file="/etc/hosts", clock=time.monotonic, min_ttl=0,
                 max_ttl=DEFAULT_DNS_MAX_TTL, family="auto"):
        if not 0 <= min_ttl <= max_ttl:
            raise ConfigError("--dns-min-ttl %s and --dns-max-ttl %s: need 0 <= min <= max"
                              % (short_repr(min_ttl), short_repr(max_ttl)))
        self.family = check_dns_family(family, "--dns-family") or "auto"
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.timeout = timeout
        self.hosts_file = hosts_file
        self.clock = clock
        self.lock = threading.Lock()
        self._entries = {}
        self._listeners = []
        self._hosts = {}
        self._hosts_stamp = None
        self._threads = set()
        self._resolver = None
        if dns is None:
            if nameservers:
                raise ConfigError("--resolver needs dnspython: pip install dnspython")
            log.warning("dnspython is not installed: DNS TTLs cannot be read; names "
                        "are re-resolved through the system every %ds", FALLBACK_TTL)
            return
        servers = [parse_hostport(s, default_port=53, what="resolver")
                   if isinstance(s, str) else tuple(s) for s in (nameservers or ())]
        try:
            resolver = dns.resolver.Resolver(configure=not servers)
        except dns.exception.DNSException as exc:
            log.warning("cannot read the system resolver configuration (%s); "
                        "falling back to the system resolver", exc)
            return
        if servers:
            try:
                nameserver = importlib.import_module("dns.nameserver")
                resolver.nameservers = [nameserver.Do53Nameserver(h, p)
                                        for h, p in servers]
            except ImportError:        # dnspython < 2.4: one port for all
                resolver.nameservers = [h for h, _ in servers]
                resolver.port = servers[0][1]
        else:
            resolver.use_search_by_default = True
        resolver.cache = None          # our own cache serves stale answers
        resolver.lifetime = timeout
        resolver.timeout = min(timeout, 2.0)
        self._resolver = resolver

    @property
    def nameservers(self):
        if self._resolver is None:
            return ["system"]
        return [str(getattr(ns, "address", ns)) + (":%s" % ns.port if hasattr(ns, "port") else "")
                for ns in self._resolver.nameservers]

    def add_listener(self, callback):
        with self.lock:
            self._listeners.append(callback)

    def _entry(self, host, family=None):
        """The cache entry of *host* for *family*: "ipv4" and "ipv6" have
        their own; the others share the one keyed by *host* alone."""
        only = family if family in _RECORD else None
        key = host if only is None else (host, only)
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(only)
            return entry

    def _literal(self, host, family):
        """[host] for an IP address *host*; ResolveError when *family*
        ("ipv4" or "ipv6") is not its family."""
        if family in _RECORD and _family_of(host) != family:
            raise ResolveError("cannot resolve %s: not an %s address (--dns-family %s)"
                               % (host, "IPv6" if family == "ipv6" else "IPv4", family))
        return [host]

    def lookup(self, host, family=None):
        """Return the addresses of *host*, a list of IP strings, in the
        order of *family* (None: the resolver's)."""
        family = family or self.family
        if _is_ip(host):
            return self._literal(host, family)
        entry = self._entry(host, family)
        addresses = self._cached(host, entry)
        if family == "prefer-ipv6" or family == "prefer-ipv4":
            return _ordered(addresses, family)
        return addresses

    def _cached(self, host, entry):
        """*entry*'s addresses: fresh from the cache (prefetching in its
        last part), shared with a lookup under way, stale while DNS fails,
        or looked up now."""
        with entry.cond:
            shared = None                # the serial of the lookup we wait for
            while True:
                now = self.clock()
                if shared is not None and entry.serial != shared:
                    # The lookup under way when we came has ended (or we
                    # waited as long as it may take): its answer is as
                    # fresh as one of our own, whatever its TTL.
                    if entry.addresses:
                        return list(entry.addresses)
                    raise ResolveError("cannot resolve %s: %s"
                                       % (host, entry.error or "timed out"))
                if entry.addresses:
                    if now < entry.expires:
                        if now >= entry.prefetch_at and not entry.busy \
                                and now >= entry.retry_at:
                            self._prefetch(host, entry)
                        return list(entry.addresses)
                    if entry.stale or entry.prefetching:
                        # DNS is failing, or slower than the prefetch window:
                        # serve the last good answer at once (the prefetch
                        # ends within the DNS timeout) and retry in the
                        # background when the backoff allows.
                        if not entry.busy and now >= entry.retry_at:
                            entry.busy = True
                            self._refresh_in_background(host, entry)
                        return list(entry.addresses)
                elif now < entry.retry_at:
                    raise ResolveError("cannot resolve %s: %s" % (host, entry.error))
                if entry.busy:
                    shared = entry.serial
                    if not entry.cond.wait(self.timeout + 1.0):
                        shared = -1          # as long as a lookup may take
                    continue
                entry.busy = True
                break
        return self._refresh(host, entry)

    def _prefetch(self, host, entry):
        """The cached answer is in its last part (the caller holds
        entry.cond): look *host* up again in the background.  Until the
        answer expires a failure only means a retry after the backoff."""
        entry.busy = entry.prefetching = True
        entry.prefetches += 1
        log.debug("prefetching %s: its answer expires in %.2fs", host,
                  entry.expires - self.clock())
        self._refresh_in_background(host, entry)

    def refresh(self, host, family=None):
        """Look *host* up again now, in the background: a connect to one of
        its addresses failed, and DNS may have moved on before the TTL ran
        out (a failover).  Callers meanwhile get the cached answer.  At most
        one lookup at a time and one refresh per REFRESH_INTERVAL per name."""
        if _is_ip(host):
            return
        entry = self._entry(host, family or self.family)
        with entry.cond:
            now = self.clock()
            if entry.busy or (entry.refreshed is not None
                              and now - entry.refreshed < REFRESH_INTERVAL):
                return
            entry.refreshed = now
            entry.busy = True
            log.debug("re-resolving %s now: a connect to its address failed", host)
            self._refresh_in_background(host, entry)

    def _refresh_in_background(self, host, entry):
        def retry():
            try:
                self._refresh(host, entry)
            except ResolveError:
                pass
            finally:
                with self.lock:
                    self._threads.discard(threading.current_thread())
        thread = threading.Thread(target=retry, name="tcpproxy-dns-%s" % host)
        with self.lock:
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:              # no thread: retry on a later call
            with self.lock:
                self._threads.discard(thread)
            entry.busy = entry.prefetching = False

    def close(self, timeout=5.0):
        """Join background retries (they end within the DNS timeout)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _refresh(self, host, entry):
        """Look *host* up now (the caller set entry.busy) and update *entry*."""
        old = entry.addresses
        started = self.clock()
        try:
            addresses, ttl, source = self._query(host, entry.only)
        except Exception as exc:  # noqa: BLE001 - every failure serves stale
            reason = self._describe(exc)
            with entry.cond:
                entry.busy = entry.prefetching = False
                entry.lookups_failed += 1
                entry.backoff = min(max(entry.backoff * 2, DNS_BACKOFF_MIN), DNS_BACKOFF_MAX)
                entry.retry_at = self.clock() + entry.backoff
                first = entry.error is None or not entry.stale
                entry.error = reason
                entry.stale = bool(entry.addresses)
                entry.serial += 1
                entry.cond.notify_all()
                addresses = list(entry.addresses)
            if addresses:
                if first:
                    log.warning("DNS lookup of %s failed (%s): serving the last good "
                                "answer %s and retrying", host, reason, ", ".join(addresses))
                else:
                    log.debug("DNS lookup of %s failed again (%s); retry in %.1fs",
                              host, reason, entry.backoff)
                return addresses
            _once.log(logging.WARNING, ("dns", host), "cannot resolve %s: %s", host, reason)
            raise ResolveError("cannot resolve %s: %s" % (host, reason)) from None
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        with entry.cond:
            entry.busy = entry.prefetching = False
            entry.lookups_ok += 1
            if old and set(old) != set(addresses):
                entry.changes += 1
            entry.addresses = tuple(addresses)
            entry.ttl = ttl
            entry.serial += 1
            entry.expires = started + ttl
            entry.prefetch_at = entry.expires - prefetch_window(ttl) if ttl > 0 \
                else float("inf")
            entry.retry_at = 0.0
            entry.backoff = 0.0
            recovered = entry.stale
            entry.error = None
            entry.stale = False
            entry.updated = time.time()
            entry.source = source
            entry.cond.notify_all()
        if _once.clear(("dns", host)) or recovered:
            log.warning("DNS lookup of %s works again: %s", host, ", ".join(addresses))
        if set(old) != set(addresses):
            fields = {"event": "dns_change", "host": host, "old": list(old),
                      "new": list(addresses), "ttl": ttl}
            if old:
                log.info("DNS answer for %s changed: %s -> %s (ttl %gs)", host,
                         ", ".join(old), ", ".join(addresses), ttl, extra=fields)
            else:
                log.info("DNS answer for %s: %s (ttl %gs)", host, ", ".join(addresses), ttl,
                         extra=fields)
            with self.lock:
                listeners = list(self._listeners)
            for callback in listeners:
                callback(host, old, tuple(addresses))
        else:
            log.debug("DNS answer for %s: %s (ttl %gs)", host, ", ".join(addresses), ttl)
        return list(addresses)

    def expires_in(self, host, family=None):
        """Seconds until the cached answer of *host* expires (None if none)."""
        if _is_ip(host):
            return None
        entry = self._entry(host, family or self.family)
        with entry.cond:
            if not entry.addresses:
                return None
            return entry.expires - self.clock()

    def info(self, host, family=None):
        """A snapshot of what is cached for *host* (for *family*; None:
        the resolver's)."""
        family = family or self.family
        if _is_ip(host):
            return {"addresses": [host], "expires_in": None, "stale": False,
                    "error": None, "source": "literal", "ttl": None, "lookups_ok": 0,
                    "lookups_failed": 0, "changes": 0, "prefetches": 0, "family": family}
        entry = self._entry(host, family)
        with entry.cond:
            expires_in = entry.expires - self.clock() if entry.addresses else None
            return {"addresses": _ordered(entry.addresses, family),
                    "expires_in": None if expires_in is None else round(max(expires_in, 0.0), 3),
                    "stale": entry.stale, "error": entry.error, "source": entry.source,
                    "ttl": entry.ttl, "lookups_ok": entry.lookups_ok,
                    "lookups_failed": entry.lookups_failed, "changes": entry.changes,
                    "prefetches": entry.prefetches, "family": family}

    @staticmethod
    def _describe(exc):
        if dns is not None:
            if isinstance(exc, dns.resolver.NXDOMAIN):
                return "NXDOMAIN (no such name)"
            if isinstance(exc, dns.resolver.NoNameservers):
                return "no nameserver answered (SERVFAIL or REFUSED)"
            if isinstance(exc, dns.exception.Timeout):
                return "timed out"
        return _clip(str(exc) or exc.__class__.__name__)

    def _hosts_lookup(self, host):
        try:
            st = os.stat(self.hosts_file)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None
        if stamp != self._hosts_stamp:
            table = {}
            try:
                with open(self.hosts_file, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        fields = line.split("#", 1)[0].split()
                        if len(fields) >= 2 and _is_ip(fields[0].split("%")[0]):
                            for name in fields[1:]:
                                table.setdefault(name.lower().rstrip("."), []).append(fields[0])
            except OSError:
                return None
            self._hosts, self._hosts_stamp = table, stamp
        return self._hosts.get(host.lower().rstrip("."))

    def _query(self, host, only=None):
        """Return (addresses, ttl, source); raise on failure.  *only*
        ("ipv4" or "ipv6"): addresses of that family alone."""
        addresses = self._hosts_lookup(host)
        if addresses and only is not None:
            addresses = [a for a in addresses if _family_of(a) == only]
        if addresses:
            return addresses, HOSTS_TTL, "hosts"
        if self._resolver is None:
            return self._system_query(host, only), FALLBACK_TTL, "system"
        found, expiration = [], None
        for rdtype in (_RECORD[only],) if only is not None else ("A", "AAAA"):
            try:
                answer = self._resolver.resolve(host, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                if rdtype == "AAAA" and found:
                    break
                raise
            except dns.exception.DNSException:
                if rdtype == "AAAA" and found:
                    log.debug("AAAA lookup of %s failed; using the A answer", host)
                    break
                raise
            if answer.rrset is not None:
                found.extend(rr.address for rr in answer.rrset)
                expiration = answer.expiration if expiration is None else min(expiration, answer.expiration)
        if not found:
            if only is not None:
                raise ResolveError("no %s records (--dns-family %s)" % (_RECORD[only], only))
            raise ResolveError("no A or AAAA records")
        ttl = max(0, round(expiration - time.time()))
        return found, ttl, "dns"

    @staticmethod
    def _system_query(host, only):
        """getaddrinfo()'s addresses of *host* (of the family *only*), in
        its order, without repeats."""
        family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(only, socket.AF_UNSPEC)
        try:
            infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if only is not None and exc.errno in _NO_ADDRESS_OF_FAMILY:
                raise ResolveError("no %s records (--dns-family %s)"
                                   % (_RECORD[only], only)) from None
            raise
        found = []
        for info in infos:
            address = info[4][0]
            if address not in found:
                found.append(address)
        return found


# Upstream health #############################################################

class UpstreamHealth:
    """Passive health of upstream addresses: which ``(address, port)``
    refused or timed out lately.

    A failed connect holds the address down for *hold_min* seconds,
    doubling with every further failure up to *hold_max*.  New connections
    try the addresses that are up first and the held ones last (best
    first: the hold that ends soonest), so a held address is only tried
    when every other one failed too.  When its hold ends it goes back into
    the rotation, and the first connection that comes to it claims it (a
    live connect is the probe; the trial holds it for *trial* seconds
    more, so that concurrent connections do not all try it): success marks
    it up, failure holds it longer.

    Methods for the caller: order(addresses, port), claim(address, port),
    failed(address, port, reason), succeeded(address, port),
    snapshot(addresses, port).  ``down``
    is empty while every upstream is healthy: connect_upstream() tests it
    without a lock and calls nothing else then.
    """

    def __init__(self, hold_min=HOLD_MIN, hold_max=HOLD_MAX, trial=DEFAULT_CONNECT_TIMEOUT,
                 clock=time.monotonic):
        self.hold_min = hold_min
        self.hold_max = hold_max
        self.trial = trial
        self.clock = clock
        self.lock = threading.Lock()
        self.down = {}                  # (address, port) -> [until, failures]

    def order(self, addresses, port):
        """*addresses* (in rotation order) as a connection should try them,
        and how many of them come first: the ones that are up or whose
        hold ended, in rotation order, then the held ones, best first."""
        now = self.clock()
        first, held = [], []
        with self.lock:
            for address in addresses:
                state = self.down.get((address, port))
                if state is None or state[0] <= now:
                    first.append(address)
                else:
                    held.append((state[0], address))
        held.sort()
        return first + [address for _, address in held], len(first)

    def claim(self, address, port):
        """May a connection try (*address*, *port*) now?  Yes when it is up;
        when its hold ended, yes for one connection (it holds the address
        for *trial* seconds more, so concurrent ones do not all try it)."""
        now = self.clock()
        with self.lock:
            state = self.down.get((address, port))
            if state is None:
                return True
            if state[0] <= now:
                state[0] = now + self.trial
                return True
            return False

    def failed(self, address, port, reason, at_least=0.0):
        """Hold (*address*, *port*) down, longer with each failure in a row,
        starting from *at_least* seconds if more than *hold_min* (always up
        to *hold_max*): connect_upstream()
        holds an address that timed out for as long as trying every address
        of the answer at the connect timeout takes, so that clients coming
        one at a time have tried all the others before it is tried again."""
        now = self.clock()
        with self.lock:
            state = self.down.get((address, port))
            if state is None:
                if len(self.down) >= 10000:       # addresses long gone from DNS
                    self.down = {k: v for k, v in self.down.items()
                                 if v[0] > now - self.hold_max}
                state = self.down[(address, port)] = [now, 0]
            state[1] += 1
            hold = min(max(self.hold_min, at_least) * 2 ** min(state[1] - 1, 30),
                       self.hold_max)
            state[0] = now + hold
            failures = state[1]
        _ratelimited.log(logging.WARNING, ("down", address, port),
                         "upstream %s is down (%s, %d failure(s) in a row): new connections "
                         "try it last for %gs", _format_hostport(address, port), reason,
                         failures, hold)

    def succeeded(self, address, port):
        """Mark (*address*, *port*) up (a connect to it worked)."""
        with self.lock:
            state = self.down.pop((address, port), None)
        if state is not None:
            _ratelimited.log(logging.WARNING, ("up", address, port), "upstream %s is up again "
                             "after %d failure(s)", _format_hostport(address, port), state[1])

    def snapshot(self, addresses, port):
        """[{address, up, down_until, failures}] for /status: an address is
        up until a connect fails and again once one works; down_until is
        when new connections try it again."""
        now, wall = self.clock(), time.time()
        out = []
        with self.lock:
            for address in addresses:
                until, failures = self.down.get((address, port), (None, 0))
                out.append({"address": _format_hostport(address, port), "up": until is None,
                            "down_until": None if until is None else _iso(wall + until - now),
                            "failures": failures})
        return out


# Registry and Session ########################################################

class Session:
    """One proxied client connection and its upstream.

    Pump threads write only their own direction's counters and times;
    abort() may be called from any thread and only shuts sockets down (the
    last pump closes them), so a descriptor is never closed under another
    thread's feet.
    """

    __slots__ = ("id", "listen_port", "listen", "target", "client", "upstream_address",
                 "started", "opened", "connected", "last_up", "last_down", "bytes_up",
                 "bytes_down", "lock", "client_sock", "upstream_sock", "closed_reason",
                 "state", "pumps", "tls", "tls_ends", "proxy_protocol", "json_head")

    def __init__(self, sid, listen_port, target, client, client_sock, listen=None):
        self.id = sid
        # The mapping's key (see mapping_key): its listen port, or "IP:PORT"
        # when it has a listen address of its own; *listen* is where its
        # listener is bound ("0.0.0.0:8002"), for /connections.
        self.listen_port = listen_port
        self.listen = listen
        self.target = target
        self.client = client
        self.client_sock = client_sock
        self.upstream_sock = None
        self.upstream_address = None
        self.started = time.time()
        # time.monotonic(): accepted, upstream connected, last bytes each way
        self.opened = self.last_up = self.last_down = time.monotonic()
        self.connected = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.lock = threading.Lock()
        self.closed_reason = None
        self.state = "connecting"
        self.pumps = 2
        self.tls = None                  # TLS: {"client": ..., "upstream": ...} (see _tls_info)
        self.tls_ends = None             # TLS: {"client"/"upstream": _TlsEnd}
        self.proxy_protocol = None       # a _ProxyProtocol when the mapping uses it
        self.json_head = None            # to_json(): what no longer changes once open

    @property
    def last_active(self):
        """When bytes last moved either way (time.monotonic())."""
        return max(self.last_up, self.last_down)

    def between_exchanges(self, quiet, now):
        """True when nothing moved for *quiet* seconds and the last bytes
        went upstream -> client: the reply was delivered and no request is
        waiting for one, so closing cannot cut an exchange short."""
        return now - self.last_up >= quiet and self.last_down >= self.last_up

    def pump_ended(self):
        """Count a finished pump; True for the last one."""
        with self.lock:
            self.pumps -= 1
            return self.pumps == 0

    def abort(self, reason, reset=False):
        """Ask both pumps to stop: shut both sockets down (RST if *reset*)."""
        with self.lock:
            if self.closed_reason is None:
                self.closed_reason = reason
            for sock in (self.client_sock, self.upstream_sock):
                if sock is None:
                    continue
                try:
                    if reset:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self, libc=None):
        with self.lock:
            for sock in (self.client_sock, self.upstream_sock):
                if sock is None:
                    continue
                if libc is not None:
                    libc.close(sock)
                else:
                    sock.close()

    def to_dict(self):
        return {"id": self.id, "mapping": self.listen_port, "listen": self.listen,
                "target": _format_hostport(*self.target),
                "client": _format_hostport(*self.client[:2]),
                "upstream": (_format_hostport(*self.upstream_address[:2])
                             if self.upstream_address else None),
                "state": self.state,
                "started": _iso(self.started),
                "seconds": round(time.time() - self.started, 3),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "tls": self.tls}

    def to_json(self, now):
        """to_dict() as JSON text (*now*: time.time()).  What no longer
        changes once the session is open is formatted once: /connections
        lists thousands of sessions per request, and the pumps must not
        wait for it (see _connections_json)."""
        head = self.json_head
        if head is None:
            upstream = self.upstream_address
            head = '"client": %s, "id": %d, "listen": %s, "mapping": %s, "started": "%s", ' \
                   '"target": %s, "tls": %s, "upstream": %s' % (
                       json.dumps(_format_hostport(*self.client[:2])), self.id,
                       json.dumps(self.listen), json.dumps(self.listen_port), _iso(self.started),
                       json.dumps(_format_hostport(*self.target)), json.dumps(self.tls),
                       json.dumps(_format_hostport(*upstream[:2]) if upstream else None))
            if self.state == "open":
                self.json_head = head
        return '{"bytes_down": %d, "bytes_up": %d, %s, "seconds": %.3f, "state": %s}' % (
            self.bytes_down, self.bytes_up, head, now - self.started, json.dumps(self.state))


CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)


class _Stats:
    """One mapping's counters (guarded by the Registry's lock)."""

    __slots__ = ("active", "total", "bytes_up", "bytes_down", "refused", "failed",
                 "refused_by", "failed_by", "connect_counts", "connect_sum")
    REPORTED = ("active", "total", "bytes_up", "bytes_down", "refused", "failed")

    def __init__(self):
        self.active = self.total = self.bytes_up = self.bytes_down = 0
        self.refused = self.failed = 0
        self.refused_by = {}                 # reason -> count
        self.failed_by = {}
        self.connect_counts = [0] * (len(CONNECT_BUCKETS) + 1)   # the last: +Inf
        self.connect_sum = 0.0

    def to_dict(self):
        return {name: getattr(self, name) for name in self.REPORTED}

    def details(self):
        """to_dict() plus what /metrics shows: counts by reason, the
        accept-to-connected histogram."""
        return dict(self.to_dict(), refused_by=dict(self.refused_by),
                    failed_by=dict(self.failed_by), connect_counts=list(self.connect_counts),
                    connect_sum=self.connect_sum)


class Registry:
    """The one record of live sessions, and per-mapping counters.

    A session is registered when its client is accepted and unregistered
    when it is closed; nothing else counts sessions.  Every method takes
    ``self.lock``; snapshots are copies, so /status and /connections never
    iterate the live structures.

    Methods for the caller: open(), close(), count_refused(), count_failed(),
    sessions(port) (in id order), active(port), wait_idle(port, deadline),
    forget(port), stats(), snapshot().  A "port" here is a mapping's key
    (see mapping_key): its listen port, or "IP:PORT" for a mapping with a
    listen address of its own.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self._waiters = 0
        self._sessions = {}
        self._stats = {}
        self._ids = itertools.count(1)

    def open(self, listen_port, target, client, client_sock, limit=0, global_limit=0,
             listen=None):
        """Register a session (*listen_port*: the mapping's key, see
        mapping_key; *listen*: its listener's address as text); returns
        None when a limit is reached."""
        with self.lock:
            stats = self._stats_of(listen_port)
            if ((limit and stats.active >= limit)
                    or (global_limit and len(self._sessions) >= global_limit)):
                stats.refused += 1
                stats.refused_by["limit"] = stats.refused_by.get("limit", 0) + 1
                return None
            session = Session(next(self._ids), listen_port, target, client, client_sock, listen)
            self._sessions[session.id] = session
            stats.active += 1
            stats.total += 1
            return session

    def _stats_of(self, listen_port):
        stats = self._stats.get(listen_port)
        if stats is None:
            stats = self._stats[listen_port] = _Stats()
        return stats

    def count_refused(self, listen_port, reason="allow"):
        """A client refused (*reason*: allow, limit or draining)."""
        with self.lock:
            stats = self._stats_of(listen_port)
            stats.refused += 1
            stats.refused_by[reason] = stats.refused_by.get(reason, 0) + 1

    def count_failed(self, listen_port, reason="other"):
        """A client closed for want of an upstream (*reason*: resolve,
        refused, timeout, unreachable, tls, other)."""
        with self.lock:
            stats = self._stats_of(listen_port)
            stats.failed += 1
            stats.failed_by[reason] = stats.failed_by.get(reason, 0) + 1

    def close(self, session):
        """Unregister *session*; False if it was not registered."""
        with self.lock:
            if self._sessions.pop(session.id, None) is None:
                return False
            stats = self._stats_of(session.listen_port)
            stats.active -= 1
            stats.bytes_up += session.bytes_up
            stats.bytes_down += session.bytes_down
            if session.connected:
                seconds = session.connected - session.opened
                stats.connect_counts[bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1
                stats.connect_sum += seconds
            if self._waiters:
                self._changed.notify_all()
            return True

    def sessions(self, listen_port=None):
        with self.lock:
            return [s for s in self._sessions.values()
                    if listen_port is None or s.listen_port == listen_port]

    def active(self, listen_port=None):
        with self.lock:
            if listen_port is None:
                return len(self._sessions)
            stats = self._stats.get(listen_port)
            return stats.active if stats is not None else 0

    def wait_idle(self, listen_port=None, deadline=None):
        """Wait until no session is open (on *listen_port*, or at all) or
        *deadline* (time.monotonic(); None: no limit) passes; True if idle."""
        def idle():
            if listen_port is None:
                return not self._sessions
            stats = self._stats.get(listen_port)
            return stats is None or not stats.active
        with self.lock:
            self._waiters += 1
            try:
                while not idle():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._changed.wait(remaining)
                return True
            finally:
                self._waiters -= 1

    def forget(self, listen_port):
        with self.lock:
            self._stats.pop(listen_port, None)

    def stats(self, details=False):
        """{mapping key: counters dict}, with the bytes of open sessions
        (*details*: with _Stats.details()).  For the status server: it
        sleeps briefly every 200 sessions (see _paced)."""
        with self.lock:
            sessions = list(self._sessions.values())
            stats = {port: s.details() if details else s.to_dict()
                     for port, s in self._stats.items()}
        for session in _paced(sessions, 200):
            entry = stats.get(session.listen_port)
            if entry is None:
                entry = stats[session.listen_port] = (_Stats().details() if details
                                                      else _Stats().to_dict())
            entry["bytes_up"] += session.bytes_up
            entry["bytes_down"] += session.bytes_down
        return stats

    def snapshot(self):
        """Return (sessions as dicts, {mapping key: stats dict})."""
        return [s.to_dict() for s in self.sessions()], self.stats()


def _pace():
    """Block for a moment, so that waiting pumps get the CPU and the GIL.
    A pure-Python loop keeps the GIL for up to the switch interval (50 ms)
    whenever a pump wants it, and under SCHED_BATCH a woken pump does not
    preempt it; a sleep gives both away."""
    time.sleep(0.00005)


def _paced(items, chunk):
    """Iterate *items*, calling _pace() after every *chunk* of them: for
    the status server's loops over thousands of sessions."""
    for index, item in enumerate(items):
        if index and not index % chunk:
            _pace()
        yield item


class DnsChangeWatcher:
    """--close-on-dns-change: re-resolve the names live mappings use when
    their answers expire, and close the sessions whose upstream address has
    been out of the answer for *hold* seconds (None: the answer's TTL, at
    least DNS_CHANGE_HOLD_MIN).  Mere rotation between live addresses (an
    address leaves the answer and comes back within the hold) closes
    nothing; a failover closes within TTL + hold.  Methods for the caller:
    start(), stop(deadline)."""

    def __init__(self, proxy, hold=None):
        self.proxy = proxy
        self.hold = hold
        self.lock = threading.Lock()
        self._gone = {}                 # (host, address) -> when it left the answer
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcpproxy-dns-watch")

    def start(self):
        self.proxy.resolver.add_listener(self.changed)
        self._thread.start()

    def stop(self, deadline):
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def changed(self, host, old, new):
        """A Resolver listener: note which addresses left the answer and
        which came back; the thread closes sessions when a hold ends."""
        if not old:
            return
        now = time.monotonic()
        with self.lock:
            for address in set(old) - set(new):
                self._gone.setdefault((host, address), now)
            for address in new:
                self._gone.pop((host, address), None)
        self._wake.set()

    def _hold(self, host):
        if self.hold is not None:
            return self.hold
        resolver = self.proxy.resolver
        families = {family for name, family in self._names() if name == host}
        ttls = [resolver.info(host, family)["ttl"] or 0
                for family in families | {resolver.family}]
        return max(ttls + [DNS_CHANGE_HOLD_MIN])

    def _names(self):
        """{(host, family)} of the live mappings' target names."""
        default = self.proxy.resolver.family
        return {(s.mapping.host, s.mapping.dns_family or default)
                for s in self.proxy.servers.values() if not _is_ip(s.mapping.host)}

    def close_due(self, now):
        """Close the sessions on addresses gone for their hold; return the
        seconds until the next hold ends (None: none pending)."""
        with self.lock:
            gone = dict(self._gone)
        if not gone:
            return None
        holds = {host: self._hold(host) for host, _ in gone}
        due, next_due = {}, None
        for (host, address), since in gone.items():
            left = since + holds[host] - now
            if left <= 0:
                due[(host, address)] = now - since
            elif next_due is None or left < next_due:
                next_due = left
        if due:
            for session in self.proxy.registry.sessions():
                upstream = session.upstream_address
                gone_for = upstream and due.get((session.target[0], upstream[0]))
                if gone_for is not None and session.closed_reason is None:
                    log.warning("%s: closing %s: %s has not resolved to %s for %gs",
                                session.listen_port, _format_hostport(*session.client[:2]),
                                session.target[0], upstream[0], round(gone_for, 1))
                    session.abort("DNS changed", reset=True)
            with self.lock:             # a minute on, no late session can be left
                for key, gone_for in due.items():
                    if gone_for > holds[key[0]] + 60 and self._gone.get(key) == gone[key]:
                        del self._gone[key]
        return next_due

    def _run(self):
        resolver = self.proxy.resolver
        while not self._stop.is_set():
            self._wake.clear()
            wait = 5.0
            for host, family in self._names():
                remaining = resolver.expires_in(host, family)
                if remaining is None or remaining <= 0:
                    try:
                        resolver.lookup(host, family)
                    except ResolveError:
                        pass
                    remaining = resolver.expires_in(host, family)
                if remaining is not None:
                    wait = min(wait, max(remaining, 0.5))
            due = self.close_due(time.monotonic())
            if due is not None:
                wait = min(wait, max(due, 0.05))
            self._wake.wait(wait)


# Threads #####################################################################

class _Worker(threading.Thread):
    """A pool thread.  run() is overridden rather than given a target:
    Thread.run() calls its target with *args, which nests the C interpreter
    loop once more, and a thread keeps every stack page it ever touched."""

    def __init__(self, pool, name):
        super().__init__(name=name)
        self.pool = pool

    def run(self):
        self.pool._run()


class _WorkerPool:
    """Reusable threads: a task given to submit() starts at once, on an
    idle worker or on a new thread.  reserve() takes a parked worker out
    of the pool for a task to come: run_on() starts it, give_back() parks
    it again.  reap(), called by every listener's serve_forever() loop,
    retires workers idle for *idle_timeout* seconds (or beyond *keep* idle
    ones) a few at a time: thousands of threads ending at once make
    CPython's GIL thrash for seconds.  close() wakes idle and reserved
    workers and joins them all.

    Creating two threads per connection costs more than the connection
    itself under churn; parked workers cost a little memory instead.
    """

    def __init__(self, name="tcpproxy-worker", idle_timeout=5.0, keep=512, reap_batch=64):
        self.name = name
        self.idle_timeout = idle_timeout
        self.keep = keep
        self.reap_batch = reap_batch
        self.lock = threading.Lock()
        self._idle = collections.deque()  # parked workers, oldest on the left
        self._reserved = set()
        self._all = set()
        self._ids = itertools.count(1)
        self._closed = False

    def submit(self, func, *args):
        """Run func(*args) on a worker; RuntimeError if no thread can start."""
        self.run_on(self.reserve(), func, *args)

    def reserve(self):
        """A parked worker set aside for run_on() or give_back(); RuntimeError
        if no thread can start.  Starting a thread touches one more page
        (4 KiB) of the starting thread's stack for good, so listeners
        reserve the worker of each connection's second pump, rather than
        leaving the first pump's thread to start it."""
        with self.lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = _Worker(self, name="%s-%d" % (self.name, next(self._ids)))
                worker.task = None
                worker.wake = threading.Lock()   # held while parked; release() wakes
                worker.wake.acquire()
                self._all.add(worker)
            self._reserved.add(worker)
        if not worker.is_alive():
            try:
                worker.start()
            except RuntimeError:
                with self.lock:
                    self._all.discard(worker)
                    self._reserved.discard(worker)
                raise
        return worker

    def run_on(self, worker, func, *args):
        """Start func(*args) on a reserved worker; RuntimeError once closed."""
        with self.lock:
            if worker not in self._reserved:
                raise RuntimeError("worker pool is closed")
            self._reserved.discard(worker)
        worker.task = (func, args)
        worker.wake.release()

    def give_back(self, worker):
        """Park a reserved worker that was not used (no-op for any other)."""
        with self.lock:
            if worker not in self._reserved:
                return
            self._reserved.discard(worker)
            if not self._closed:
                worker.parked = time.monotonic()
                self._idle.append(worker)
                return
        worker.wake.release()            # closed: its task is None, it ends

    def _run(self):
        me = threading.current_thread()
        base = me.name
        try:
            while True:
                me.wake.acquire()            # parked until run_on(), reap() or close()
                task, me.task = me.task, None
                if task is None:
                    return
                func, args = task
                try:
                    func(*args) if args else func()   # func(): no nested C loop
                except Exception:                   # a worker must survive its task
                    log.exception("unexpected error in %s", me.name)
                me.name = base
                with self.lock:
                    if self._closed:
                        return
                    me.parked = time.monotonic()
                    self._idle.append(me)
        finally:
            with self.lock:
                self._all.discard(me)

    def reap(self):
        """Retire a few workers idle for too long (or beyond *keep*)."""
        limit = time.monotonic() - self.idle_timeout
        with self.lock:
            for _ in range(self.reap_batch):
                if not self._idle or (self._idle[0].parked > limit
                                      and len(self._idle) <= self.keep):
                    break
                worker = self._idle.popleft()
                worker.task = None
                worker.wake.release()

    def idle(self):
        with self.lock:
            return len(self._idle)

    def threads(self):
        with self.lock:
            return list(self._all)

    def close(self, deadline):
        """Stop parked and reserved workers and join every worker until *deadline*."""
        with self.lock:
            self._closed = True
            parked = list(self._idle) + list(self._reserved)
            self._idle, self._reserved = collections.deque(), set()
        for worker in parked:
            worker.task = None
            worker.wake.release()
        for worker in self.threads():
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            self._all = {t for t in self._all if t.is_alive()}
            return list(self._all)


# Connection ##################################################################
#
# One client's life, top to bottom.  The mapping's listener (ProxyServer)
# accepts it, checks the allow list (verify_request), registers its
# Session and hands it to serve_client() on a pooled worker thread, with a
# second worker reserved for the other direction.
# serve_client() connects upstream (connect_upstream: the address
# fail-over loop), starts the upstream -> client pump on the reserved
# worker and pumps client -> upstream itself.  EOF on one side becomes
# shutdown(SHUT_WR) on the other (half-close); a reset on either side
# resets the other; whichever pump ends last closes the session
# (finish_session), so neither waits for the other.
#
# A pump waits with poll() (not select(), which breaks above descriptor
# 1024), then moves what is there.  Idle connections hold no buffer and no
# pipe: buffers (copy) and pipes (splice) come from pools only while bytes
# are moving, so memory per idle connection is the two sockets and the two
# parked threads.

class ProxyServer(socketserver.ThreadingTCPServer):
    """Listen for one mapping: admit each client (allow lists, limits),
    register its Session and hand it to serve_client() on the Proxy's
    worker pool.

    Methods for the caller: serve_forever(), stop_accepting(),
    server_close(), set_mapping(mapping), port; attributes key (the
    mapping's, see mapping_key) and listen (the "IP:PORT" it is bound to).
    Overridden hooks: server_bind(), get_request(), verify_request(), process_request(),
    shutdown_request(), handle_error(); and serve_forever() itself, which
    sleeps until a client comes or stop_accepting() wakes it.
    """

    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = False
    block_on_close = False            # the Registry says when sessions end
    _pp_admitted = None               # PROXY protocol: set by admit_proxied_peer()

    def __init__(self, mapping, proxy, listen_host="0.0.0.0"):
        self.mapping = mapping
        self.proxy = proxy
        self.rotation = itertools.count()  # where connect_upstream() starts
        self.failing = 0                   # connects failed since the last success
        self.address_family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
        self._stopping = threading.Event()
        self.tls = proxy.tls.settings(mapping, load=True)    # TLS: None for plain TCP
        super().__init__((listen_host, mapping.listen_port), None)
        # The mapping's name in the Registry, /status, /metrics and the logs
        # (see mapping_key), and where it listens, as text: both fixed now.
        self.key = mapping_key(mapping.listen_host, self.server_address[1])
        self.listen = _format_hostport(*self.server_address[:2])

    @property
    def port(self):
        return self.server_address[1]

    def set_mapping(self, mapping):
        self.tls = self.proxy.tls.settings(mapping)          # TLS
        self.mapping = mapping

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        _tune(self.socket)                # accepted sockets inherit both options
        super().server_bind()

    def get_request(self):
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in EXHAUSTION_ERRS:
                _ratelimited.log(logging.ERROR, ("accept", self.key), "%s: cannot accept "
                                 "(%s): shedding a client and backing off", self.key,
                                 exc.strerror)
                self.proxy.spare.shed(self.socket)
                self._stopping.wait(ACCEPT_BACKOFF)
            raise

    def verify_request(self, request, client_address):
        """The allow lists (--allow and the mapping's own)."""
        proxy, mapping = self.proxy, self.mapping
        if mapping.accept_proxy:          # PROXY protocol: allow lists after the header
            return admit_proxied_peer(self, mapping, client_address)
        if not (proxy.allow or mapping.allow) or (
                _allowed(client_address[0], proxy.allow)
                and _allowed(client_address[0], mapping.allow)):
            return True
        proxy.registry.count_refused(self.key)
        _ratelimited.log(logging.WARNING, ("acl", self.key),
                         "%s: refused client %s: not in the allow list",
                         self.key, client_address[0])
        return False

    def process_request(self, request, client_address):
        """Register the client (or refuse it at a connection limit) and
        start serve_client() on a worker, reserving a second worker for
        its other pump (see _WorkerPool.reserve)."""
        proxy, mapping = self.proxy, self.mapping   # a snapshot: apply() may swap it
        # PROXY protocol: the mapping verify_request() admitted a header under wins.
        pp = self._pp_admitted or (mapping if mapping.send_proxy else None)
        if pp is not None:
            self._pp_admitted = None
        session = proxy.registry.open(self.key, mapping.target, client_address, request,
                                      mapping.max_connections, proxy.max_connections, self.listen)
        if session is None:
            _ratelimited.log(logging.WARNING, ("limit", self.key),
                             "%s: refused client %s: connection limit reached",
                             self.key, _format_hostport(*client_address[:2]))
            _reset_close(request)
            return
        if pp is not None:                # PROXY protocol
            session.proxy_protocol = _ProxyProtocol(pp)
        workers = proxy.workers
        partner = None
        try:
            partner = workers.reserve()
            # A closure, not submit(func, *args): a call with *args nests
            # the C interpreter loop once more (see _Worker).
            workers.submit(lambda: serve_client(proxy, self, session, partner))
        except RuntimeError as exc:     # can't start new thread
            if partner is not None:
                workers.give_back(partner)
            _ratelimited.log(logging.ERROR, ("thread", self.key),
                             "%s: cannot start a thread (%s): closing client %s", self.key,
                             exc, _format_hostport(*client_address[:2]))
            session.abort("no thread", reset=True)
            finish_session(proxy, session)
            self._stopping.wait(ACCEPT_BACKOFF)

    def shutdown_request(self, request):
        # socketserver's path for a client that verify_request() refused.
        _reset_close(request)

    def handle_error(self, request, client_address):
        log.exception("%s: error handling %s", self.key, client_address)

    def serve_forever(self, poll_interval=LISTEN_POLL_INTERVAL):
        """Accept clients until stop_accepting().  socketserver's loop
        wakes every *poll_interval* to see whether shutdown() was called;
        with thousands of mappings those wake-ups alone take a CPU.  This
        one sleeps in poll() until a client comes or stop_accepting() shuts
        the listening socket down, which wakes it at once (*poll_interval*
        is only a safety net).  socketserver's shutdown() does not apply."""
        poller = select.poll()
        poller.register(self.socket, select.POLLIN)
        timeout = int(poll_interval * 1000)
        stopping = self._stopping
        while not stopping.is_set():
            if poller.poll(timeout) and not stopping.is_set():
                self._handle_request_noblock()

    def stop_accepting(self):
        """Refuse new clients and wake serve_forever(), which returns: shut
        the listening socket down (the port refuses connections from now
        on).  Does not wait, so that thousands of listeners stop at once;
        join the serve_forever() thread, then server_close()."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _SpareDescriptor:
    """One descriptor held in reserve for when the process runs out: a
    listener whose accept() fails with EMFILE gives it up to accept one
    client and reset it (shed), so that the queue moves and the listener
    does not spin; then takes it back."""

    def __init__(self):
        self.lock = threading.Lock()
        self._fd = None

    def take(self):
        with self.lock:
            if self._fd is None:
                try:
                    self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self._fd = None

    def release(self):
        with self.lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def lend(self, listening_socket):
        """Give the descriptor up to accept one client; return its
        (socket, address), or None.  take() it back when that client is
        done."""
        with self.lock:
            if self._fd is None:
                return None
            os.close(self._fd)
            self._fd = None
            try:
                return listening_socket.accept()
            except OSError:
                return None

    def shed(self, listening_socket):
        with self.lock:
            if self._fd is None:
                return
            os.close(self._fd)
            self._fd = None
            try:
                conn, _ = listening_socket.accept()
                _reset_close(conn)
            except OSError:
                pass
        self.take()


def serve_client(proxy, listener, session, partner):
    """Connect *session* upstream and pump it both ways, on a worker thread.
    *partner* is a worker reserved for the upstream -> client pump; it is
    given back if the session ends before the pumps start."""
    me = threading.current_thread()
    me.name = "tcpproxy-%s-%s" % (session.listen_port, session.client[1])
    upstream = None
    try:
        if proxy.state != "running":
            proxy.registry.count_refused(session.listen_port, "draining")
            session.abort("proxy is stopping")
        elif session.proxy_protocol is not None and not read_proxy_header(proxy, session):
            pass                          # PROXY protocol: refused (logged, counted)
        elif listener.tls is None or tls_accept(proxy, listener, session):   # TLS: client
            upstream = connect_upstream(proxy, listener, session)
            if upstream is not None and session.proxy_protocol is not None:  # PROXY protocol
                upstream = send_proxy_header(proxy, session, upstream, listener.tls is None)
            if listener.tls is not None:                                      # TLS: upstream
                upstream = tls_connect(proxy, listener, session, upstream)
            if upstream is None:
                listener.failing += 1
            else:
                session.connected = time.monotonic()
                if listener.failing:
                    listener.failing = 0
    finally:
        if upstream is None:
            proxy.workers.give_back(partner)
            finish_session(proxy, session)
    if upstream is None:
        return
    session.state = "open"
    if log.isEnabledFor(logging.INFO):
        peer, address = (_format_hostport(*session.client[:2]),
                         _format_hostport(*session.upstream_address[:2]))
        log.info("%s: %s connected to %s via %s", session.listen_port, peer, address,
                 session.target[0], extra={
                     "event": "session_open", "session": session.id,
                     "mapping": session.listen_port, "client": peer, "upstream": address,
                     "target": _format_hostport(*session.target)})
    client = session.client_sock
    name = me.name
    copy = pump if session.tls is None else tls_pump       # TLS

    def down():
        threading.current_thread().name = name + "-down"
        try:
            copy(session, upstream, client, False, proxy)
        finally:
            if session.pump_ended():
                finish_session(proxy, session)

    try:
        proxy.workers.run_on(partner, down)
    except RuntimeError as exc:      # the pool is closing
        _ratelimited.log(logging.ERROR, "pump-thread", "cannot start a pump thread (%s): "
                         "closing %s", exc, _format_hostport(*session.client[:2]))
        session.abort("no thread")
        finish_session(proxy, session)
        return
    try:
        copy(session, client, upstream, True, proxy)
    finally:
        if session.pump_ended():
            finish_session(proxy, session)


def connect_upstream(proxy, listener, session):
    """Connect *session* to its target: try the addresses of the name from
    a rotating start, the ones held down by UpstreamHealth last, at most
    ``proxy.connect_attempts`` of them and for ``proxy.connect_deadline``
    seconds in all, skipping addresses that cannot be an upstream (see
    _unusable_address) or are this proxy's own listeners (a loop).  Return
    the socket or None (reason logged, the session aborted).  The mapping's
    dns_family (or --dns-family) chooses the addresses and their order."""
    host, port = session.target
    listen_port = session.listen_port
    family = listener.mapping.dns_family or proxy.resolver.family
    try:
        addresses = proxy.resolver.lookup(host, family)
    except ResolveError as exc:
        _ratelimited.log(logging.WARNING, ("resolve", listen_port),
                         "%s: closing client %s: %s", listen_port,
                         _format_hostport(*session.client[:2]), exc)
        proxy.registry.count_failed(listen_port, "resolve")
        session.abort("cannot resolve %s" % host)
        return None
    addresses = _rotated(addresses, next(listener.rotation), family)
    health = proxy.health
    fallback = len(addresses)            # from here on: held down, tried anyway
    if health.down:                      # some upstream failed lately
        addresses, fallback = health.order(addresses, port)
    errors, skipped = [], []
    attempts = 0
    kind = "other"                       # why the last attempt failed, for /metrics
    limit, timeval = proxy.first_connect_timeout, proxy.connect_timeval
    deadline = time.monotonic() + proxy.connect_deadline
    for i, address in enumerate(addresses):
        if session.closed_reason is not None:
            return None
        refusal = _unusable_address(address) or (
            port in proxy.own_ports and proxy.own_address(address, port))
        if refusal:
            skipped.append("%s: %s" % (_format_hostport(address, port), refusal))
            continue
        if attempts:
            remaining = deadline - time.monotonic()
            if attempts >= proxy.connect_attempts or remaining <= 0:
                errors.append("gave up after %d attempt(s) in %gs (--connect-attempts %d, "
                              "--connect-deadline %g)" % (
                                  attempts, round(proxy.connect_deadline - remaining, 1),
                                  proxy.connect_attempts, proxy.connect_deadline))
                break
            if remaining < limit:
                limit, timeval = remaining, _timeval(remaining)
        if i < fallback and health.down and not health.claim(address, port):
            addresses.append(address)    # another connection is trying it: last
            continue
        attempts += 1
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            errors.append("%s: %s" % (address, exc.strerror or exc))
            break
        with session.lock:               # abort() may now interrupt connect()
            if session.closed_reason is not None:
                sock.close()
                return None
            session.upstream_sock = sock
        try:
            # SO_SNDTIMEO bounds a blocking connect() (EINPROGRESS when it
            # expires): two syscalls instead of settimeout()'s four fcntl.
            _socket_timeout(proxy.libc, sock, timeval)
            sock.connect((address, port))
            _socket_timeout(proxy.libc, sock, _TIMEVAL_ZERO)
        except OSError as exc:
            with session.lock:
                session.upstream_sock = None
                sock.close()
            if session.closed_reason is not None:
                return None
            timed_out = isinstance(exc, socket.timeout) or exc.errno in (errno.EINPROGRESS,
                                                                         errno.EAGAIN)
            if timed_out:
                kind, reason = "timeout", "timed out after %gs" % round(limit, 3)
            else:
                kind, reason = _FAILURE_KINDS.get(exc.errno, "other"), exc.strerror or str(exc)
            errors.append("%s: %s" % (_format_hostport(address, port), reason))
            log.info("%s: connect to %s failed: %s", listen_port,
                     _format_hostport(address, port), reason)
            if timed_out or exc.errno in NET_ERRS:   # the upstream's fault, not ours
                health.failed(address, port, reason,
                              limit * len(addresses) if timed_out else 0.0)
                if attempts == 1:        # DNS may know better than its TTL says
                    proxy.resolver.refresh(host, family)
            continue
        _tune(sock)
        if health.down:
            health.succeeded(address, port)
        for reason in skipped:
            _ratelimited.log(logging.WARNING, ("skipped", listen_port, reason),
                             "%s: skipped %s", listen_port, reason)
        if session.closed_reason is not None:
            return None                   # finish_session() closes it
        session.upstream_address = (address, port)
        return sock
    _ratelimited.log(logging.WARNING, ("connect", listen_port),
                     "%s: closing client %s: no upstream for %s:%s accepted (%s)",
                     listen_port, _format_hostport(*session.client[:2]), listen_port,
                     _format_hostport(host, port), _clip("; ".join(skipped + errors))
                     or "no address")
    proxy.registry.count_failed(listen_port, kind if attempts else "unusable")
    session.abort("upstream unreachable", reset=True)
    return None


def _timeval(seconds):
    """struct timeval for SO_SNDTIMEO/SO_RCVTIMEO (at least 1 ms: 0 would
    mean never)."""
    seconds = max(seconds, 0.001)
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


def _socket_timeout(libc, sock, timeval, option=socket.SO_SNDTIMEO):
    """Set SO_SNDTIMEO or SO_RCVTIMEO (through libc when it is there: see
    _LibcIO.setsockopt)."""
    if libc is not None:
        libc.setsockopt(sock, socket.SOL_SOCKET, option, timeval)
    else:
        sock.setsockopt(socket.SOL_SOCKET, option, timeval)


# Why the last connect attempt failed, for /metrics.
_FAILURE_KINDS = {errno.ECONNREFUSED: "refused", errno.ETIMEDOUT: "timeout",
                  errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable"}


def finish_session(proxy, session):
    """Close *session* for good: log, unregister, close both sockets."""
    if log.isEnabledFor(logging.INFO) and session.state == "open":
        peer, reason = _format_hostport(*session.client[:2]), session.closed_reason or "done"
        log.info("%s: %s closed (%s), %d bytes up, %d bytes down", session.listen_port,
                 peer, reason, session.bytes_up, session.bytes_down, extra={
                     "event": "session_close", "session": session.id,
                     "mapping": session.listen_port, "client": peer,
                     "upstream": _format_hostport(*session.upstream_address[:2]),
                     "bytes_up": session.bytes_up, "bytes_down": session.bytes_down,
                     "duration_s": round(time.time() - session.started, 3),
                     "reason": reason})
    proxy.registry.close(session)
    session.close(proxy.libc)


def pump(session, src, dst, up, proxy):
    """Move bytes from *src* to *dst* until EOF or error.

    The pump waits with poll(), then moves what is there.  Small reads
    (requests, replies) are copied through a pooled buffer: recv + send,
    through libc with the GIL held (see _LibcIO) or with
    socket.recv_into() and sendall().  A read of BULK_READ bytes or more
    switches to os.splice() through a pooled pipe, so that bulk transfers
    never enter Python; the pump goes back to copying when a splice returns
    less.  Without splice (Python 3.9, not Linux, TCPPROXY_SPLICE=0) it
    always copies.
    """
    idle_timeout = proxy.idle_timeout
    wait_ms = int(min(idle_timeout, 5.0) * 1000) if idle_timeout else None
    poller = select.poll()
    poller.register(src, select.POLLIN | select.POLLPRI)
    poll = poller.poll
    buffers, pipes, libc = proxy.buffers, proxy.pipes, proxy.libc
    get_buffer, put_buffer, size = buffers.get, buffers.put, buffers.size
    recv_into, sendall = src.recv_into, dst.sendall
    sfd, dfd = src.fileno(), dst.fileno()
    if libc is not None:
        crecv, csend, get_errno = libc.recv, libc.send, libc.get_errno
        recv_flags, send_flags = libc.FLAGS_RECV, libc.FLAGS_SEND
    splice = getattr(os, "splice", None)
    from_side, to_side = ("client", "upstream") if up else ("upstream", "client")
    monotonic = time.monotonic
    bulk = False
    while True:
        if not poll(wait_ms):
            if monotonic() - session.last_active >= idle_timeout:
                session.abort("idle timeout")
                return
            continue
        if bulk:
            try:
                pipe = pipes.get()
            except OSError as exc:           # out of descriptors: copy instead
                _ratelimited.log(logging.WARNING, "pipe", "cannot create a pipe (%s); "
                                 "copying through memory", exc.strerror)
                bulk = False
                continue
            try:
                n = splice(sfd, pipe[1], pipes.size, flags=SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            except (BlockingIOError, InterruptedError):
                pipes.put(pipe)
                continue
            except OSError as exc:
                pipes.put(pipe)
                _failed(session, exc, from_side)
                return
            left = n
            try:
                while left:
                    left -= splice(pipe[0], dfd, left, flags=SPLICE_F_MOVE)
            except OSError as exc:
                pipes.discard(pipe)           # bytes may be left in it
                _failed(session, exc, to_side)
                return
            pipes.put(pipe)
            bulk = n >= BULK_READ
        else:
            entry = get_buffer()
            buf = entry[0]
            try:
                if libc is None:
                    n = recv_into(buf)
                else:
                    n = crecv(sfd, entry[1], size, recv_flags)
                    if n < 0:                # EAGAIN, EINTR: see the excepts
                        raise _errno_error(get_errno())
            except (BlockingIOError, InterruptedError):
                put_buffer(entry)
                continue
            except OSError as exc:
                put_buffer(entry)
                _failed(session, exc, from_side)
                return
            if n:
                try:
                    sent = 0
                    if libc is not None:
                        sent = csend(dfd, entry[1], n, send_flags)
                        if sent < 0:
                            err = get_errno()
                            if err not in (errno.EAGAIN, errno.EINTR):
                                raise _errno_error(err)
                            sent = 0
                    if sent < n:             # the rest waits for the reader
                        sendall(memoryview(buf)[sent:n])
                except OSError as exc:
                    put_buffer(entry)
                    _failed(session, exc, to_side)
                    return
            put_buffer(entry)
            bulk = pipes is not None and n >= BULK_READ
        if not n:
            _end_of_stream(session, dst, libc)
            return
        if up:
            session.bytes_up += n
            session.last_up = monotonic()
        else:
            session.bytes_down += n
            session.last_down = monotonic()


def _end_of_stream(session, dst, libc):
    # Half-close: pass EOF on.  When the other pump has ended already, the
    # close() that follows sends the FIN by itself.
    if session.closed_reason is None and session.pumps > 1:
        if libc is not None:
            libc.shutdown(dst, socket.SHUT_WR)
            return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _errno_error(err):
    return OSError(err, os.strerror(err))


def _failed(session, exc, side):
    """A pump's socket call failed: reset the session (quietly when the
    peer went away, as an error naming the session otherwise)."""
    if session.closed_reason is not None:       # we are already closing it
        return
    if exc.errno in NET_ERRS:
        log.debug("session %d: %s: %s", session.id, side, exc)
    else:
        log.error("session %d: unexpected error from %s: %s", session.id, side, exc)
    session.abort("%s reset (%s)" % (side, os.strerror(exc.errno) if exc.errno else exc),
                  reset=True)


def _tune(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


def _reset_close(sock):
    """Close *sock* with a reset (a refused client)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


# Linux fast paths ############################################################
#
# Optional speed-ups that the connection path uses when present: the C
# library's recv/send with the GIL held, splice() through pooled pipes,
# pooled copy buffers, and binding the process to one CPU (main() only).

class _BufferPool:
    """Reusable copy buffers for the pumps (list append/pop are atomic).
    Only *keep* are kept between bursts: they count in every idle
    connection's share of memory.  An entry is ``(bytearray, address)``;
    the address (for libc I/O) is None when *libc* is None."""

    def __init__(self, size=LARGE_BUFFER, keep=16, libc=None):
        self.size = size
        self.keep = keep
        self.libc = libc
        self._free = []

    def get(self):
        try:
            return self._free.pop()
        except IndexError:
            buf = bytearray(self.size)
            return buf, (self.libc.address(buf) if self.libc is not None else None)

    def put(self, entry):
        if len(self._free) < self.keep:
            self._free.append(entry)


class _LibcIO:
    """recv() and send() called straight from the C library, with the GIL held.

    Python's socket methods release the GIL around every system call.
    With many busy connections each release hands the GIL to another
    thread and costs a context switch, which makes a 64-byte request
    cost several of them.  A pump calls recv() only after poll() said
    the socket is readable, and both calls use MSG_DONTWAIT, so they
    never block: holding the GIL through them is safe and halves the
    CPU per request.  A send() that would block (the reader is slow)
    falls back to socket.sendall(), which waits with the GIL released.

    Used only on Linux, through ctypes.PyDLL (the library already
    loaded; nothing is compiled).  TCPPROXY_LIBC_IO=0 or
    Proxy(libc_io=False) turns it off.
    """

    FLAGS_RECV = int(getattr(socket, "MSG_DONTWAIT", 0x40))
    FLAGS_SEND = FLAGS_RECV | int(getattr(socket, "MSG_NOSIGNAL", 0x4000))

    def __init__(self):
        import ctypes  # only when used: it costs 3 ms to import
        libc = ctypes.PyDLL(None)
        self._ctypes = ctypes
        # No argtypes: converting each argument through them costs more
        # than the call.  Buffers are passed as c_void_p objects, all the
        # rest as Python ints (C ints, widened by libffi; sizes are far
        # below 2**31).
        self.recv, self.send = libc.recv, libc.send
        self.recv.restype = self.send.restype = ctypes.c_ssize_t
        self._shutdown, self._close = libc.shutdown, libc.close
        self._setsockopt = libc.setsockopt
        self._shutdown.restype = self._close.restype = self._setsockopt.restype = ctypes.c_int
        # errno is read from the C library's own per-thread variable: ctypes'
        # use_errno copy would cost every pump thread a dictionary (0.4 KiB
        # per idle connection).  Only integers are made between the failed
        # call and the read, so nothing else can change errno meanwhile.
        errno_location = getattr(libc, "__errno_location")   # no name mangling
        errno_location.restype = ctypes.POINTER(ctypes.c_int)
        self.get_errno = lambda: errno_location()[0]

    def address(self, buf):
        """A pointer to a bytearray's storage (it is never resized)."""
        ctypes = self._ctypes
        return ctypes.c_void_p(ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)))

    def setsockopt(self, sock, level, name, value):
        """sock.setsockopt(level, name, value) for a bytes *value*.  Python's
        own tries to parse an int first and fails, which takes a page more
        of the thread's stack, for good (4 KiB per connection)."""
        if self._setsockopt(sock.fileno(), level, name, value, len(value)) != 0:
            err = self.get_errno()
            raise OSError(err, os.strerror(err))

    def shutdown(self, sock, how):
        """sock.shutdown(how), errors ignored: it never blocks."""
        self._shutdown(sock.fileno(), how)

    def close(self, sock):
        """sock.close(): it does not block, as the proxy never sets a
        SO_LINGER timeout (only an immediate reset)."""
        fd = sock.detach()
        if fd >= 0:
            self._close(fd)

    @classmethod
    @functools.cache
    def load(cls):
        """The shared instance, or None where it is not available."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            return cls()
        except (ImportError, OSError, AttributeError) as exc:
            log.debug("libc I/O is not available (%s): using socket methods", exc)
            return None


class _PipePool:
    """Reusable pipes for the splice pump; a pipe goes back only when empty."""

    def __init__(self, size=LARGE_BUFFER, keep=64):
        self.size = size
        self.keep = keep
        self.lock = threading.Lock()
        self._free = []
        self._closed = False

    def get(self):
        try:
            return self._free.pop()
        except IndexError:
            pass
        r, w = os.pipe2(os.O_CLOEXEC) if hasattr(os, "pipe2") else os.pipe()
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            pass
        return r, w

    def put(self, pipe):
        with self.lock:
            if not self._closed and len(self._free) < self.keep:
                self._free.append(pipe)
                return
        self.discard(pipe)

    @staticmethod
    def discard(pipe):
        for fd in pipe:
            os.close(fd)

    def close(self):
        with self.lock:
            self._closed = True
            free, self._free = self._free, []
        for pipe in free:
            self.discard(pipe)


def _fast_paths(splice=None, libc_io=None):
    """(libc, buffers, pipes) for a Proxy.  *splice* None means "where
    available" (Linux, Python 3.10+, TCPPROXY_SPLICE not 0); *libc_io*
    None means unless TCPPROXY_LIBC_IO=0.  pipes is None without splice."""
    if splice is None:
        splice = HAVE_SPLICE and os.environ.get("TCPPROXY_SPLICE", "1") != "0"
    if splice and not HAVE_SPLICE:
        raise ConfigError("splice needs Linux and Python 3.10 or newer")
    if libc_io is None:
        libc_io = os.environ.get("TCPPROXY_LIBC_IO", "1") != "0"
    libc = _LibcIO.load() if libc_io else None
    # With splice, bulk reads bypass the buffers, so small ones will do.
    buffers = _BufferPool(BULK_READ if splice else LARGE_BUFFER, libc=libc)
    return libc, buffers, (_PipePool() if splice else None)


def parse_cpus(text):
    """--cpus: 'auto', 'all' or a list such as '3' or '0,2-3' -> 'auto', None or a set."""
    text = text.strip().lower()
    if text in ("auto", "all"):
        return None if text == "all" else "auto"
    cpus = set()
    try:
        for part in text.split(","):
            low, dash, high = part.partition("-")
            low, high = int(low), int(high if dash else low)
            if low < 0 or high < low:
                raise ValueError
            cpus.update(range(low, high + 1))
    except ValueError:
        raise ValueError("invalid CPU list %r: use auto, all or numbers such as 1 or 0,2-3"
                         % text) from None
    return cpus


def pin_cpus(spec):
    """Bind this process to the CPUs *spec* names (a parse_cpus() result or
    its text); return them.

    'auto' picks one CPU, the last one the process may use.  Python runs
    one thread at a time (the GIL), so a proxy cannot use more than about
    one CPU; spread over several, every hand-over of the GIL between pump
    threads becomes a cross-CPU wake-up, which costs more than the work
    itself (2-2.5x the CPU per request and per connection, measured).
    The process also switches to the SCHED_BATCH policy: a pump thread
    woken by its socket then waits for the running one to block instead
    of preempting it only to find the GIL taken.  None ('all') leaves
    affinity and policy alone.  Call it before starting any thread:
    threads inherit both from the thread that starts them.
    """
    if isinstance(spec, str):
        spec = parse_cpus(spec)
    if spec is None or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if spec == "auto":
        cpus = {allowed[-1]}
    else:
        cpus = set(spec) & set(allowed)
        if not cpus:
            raise ConfigError("--cpus %s: this process may only use CPUs %s" % (
                ",".join(map(str, sorted(spec))), ",".join(map(str, allowed))))
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        raise ConfigError("cannot bind to CPUs %s: %s" % (
            ",".join(map(str, sorted(cpus))), exc.strerror)) from None
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.debug("cannot use SCHED_BATCH: %s", exc)
    return cpus



# PROXY protocol ##############################################################
#
# --accept-proxy: a load balancer (HAProxy, AWS NLB) starts every connection
# with a header naming the real client.  serve_client() reads it before it
# connects upstream: only the header's bytes (exact lengths, and MSG_PEEK for
# the v1 line's end), within PROXY_HEADER_TIMEOUT and a size bound; the allow
# lists then judge the real client, which /connections and the logs show.
# --send-proxy: after the upstream connect, one send of a v1 or v2 header
# naming the client and the address it connected to, with the client's
# first bytes if they are there already (plain TCP on both sides).  Mappings without
# either option pay one attribute check per connection.
# Specification: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt

class _ProxyProtocol:
    """A session's PROXY protocol state: its mapping (as admitted) and the
    destination a received header named (forwarded by --send-proxy)."""

    __slots__ = ("mapping", "local")

    def __init__(self, mapping):
        self.mapping = mapping
        self.local = None


def admit_proxied_peer(server, mapping, client_address):
    """verify_request() of an --accept-proxy mapping: the peer (the load
    balancer) must be in --accept-proxy-from; the allow lists wait for the
    header (read_proxy_header)."""
    networks = server.proxy.accept_proxy_from
    if not networks or _allowed(client_address[0], networks):
        server._pp_admitted = mapping
        return True
    _refuse_proxied(server.proxy, server.key, client_address[0], "not in --accept-proxy-from")
    return False


def _refuse_proxied(proxy, port, peer, reason):
    proxy.registry.count_refused(port, "proxy_protocol")
    _ratelimited.log(logging.WARNING, ("proxy_protocol", port),
                     "%s: refused client %s: PROXY protocol: %s", port, peer, reason)


def read_proxy_header(proxy, session):
    """Read and apply the client's PROXY header when the session's mapping
    accepts one, then apply the allow lists to the real client; True when
    the session goes on.  A refusal is logged (rate-limited), counted and
    aborts the session."""
    state = session.proxy_protocol
    mapping = state.mapping
    if not mapping.accept_proxy:
        return True
    port, peer = session.listen_port, session.client[0]
    try:
        source, destination = parse_proxy_header(
            _recv_proxy_header(session.client_sock, time.monotonic() + PROXY_HEADER_TIMEOUT))
    except (ValueError, OSError) as exc:
        if session.closed_reason is None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            _refuse_proxied(proxy, port, peer, reason)
            session.abort("PROXY protocol: %s" % reason, reset=True)
        return False
    if source is not None:                # LOCAL, UNKNOWN: the peer's own address
        session.client, state.local = source, destination
    client = session.client[0]
    if (proxy.allow or mapping.allow) and not (
            _allowed(client, proxy.allow) and _allowed(client, mapping.allow)):
        proxy.registry.count_refused(port)
        _ratelimited.log(logging.WARNING, ("acl", port), "%s: refused client %s (via %s): "
                         "not in the allow list", port, client, peer)
        session.abort("not in the allow list", reset=True)
        return False
    return True


def _recv_proxy_header(sock, deadline):
    """The header's bytes from *sock*, and not one byte more; ValueError
    when it is missing, too long, cut short or late."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)

    def take(size, flags=0):              # up to size bytes, waiting for the first
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise ValueError("no complete header within %g s" % PROXY_HEADER_TIMEOUT)
        data = sock.recv(size, flags | socket.MSG_DONTWAIT)
        if not data:
            raise ValueError("closed before the end of the header (%d bytes)" % len(head))
        return data

    def exact(size):
        data = b""
        while len(data) < size:
            data += take(size - len(data))
        return data

    head = b""
    while len(head) < 6 and (b"PROXY ".startswith(head)
                             or PROXY_V2_SIGNATURE.startswith(head)):
        head += take(6 - len(head))
    if head == b"PROXY ":                 # v1: a line; peek for its end
        while len(head) < PROXY_V1_MAX:
            peeked = take(PROXY_V1_MAX - len(head), socket.MSG_PEEK)
            end = peeked.find(b"\n")
            head += exact(len(peeked) if end < 0 else end + 1)
            if end >= 0:
                return head
        raise ValueError("v1 line longer than %d bytes" % PROXY_V1_MAX)
    if head != PROXY_V2_SIGNATURE[:6]:
        raise ValueError("no header: the connection began with %r" % head)
    head += exact(10)
    if head[:12] != PROXY_V2_SIGNATURE:
        raise ValueError("no header: the connection began with %r" % head)
    length = struct.unpack("!H", head[14:16])[0]
    if 16 + length > PROXY_V2_MAX:
        raise ValueError("v2 header of %d bytes (at most %d)" % (16 + length, PROXY_V2_MAX))
    return head + exact(length)


def parse_proxy_header(data):
    """Return ``((client ip, port), (destination ip, port))`` from a whole
    v1 line or v2 header, or ``(None, None)`` for a v2 LOCAL command, v1
    UNKNOWN or an address family without addresses (use the peer's own).
    v2 TLVs are skipped.  Raises ValueError naming what is wrong."""
    if data.startswith(PROXY_V2_SIGNATURE):
        body = data[16:16 + struct.unpack("!H", data[14:16])[0]]
        version, command, family, transport = data[12] >> 4, data[12] & 15, \
            data[13] >> 4, data[13] & 15
        if version != 2:
            raise ValueError("v2 header with version %d" % version)
        if command == 0:                  # LOCAL: the balancer's own (health check)
            return None, None
        if command != 1 or transport > 1 or family > 3:
            raise ValueError("v2 header with command %#x, family %#04x" % (data[12], data[13]))
        if family in (0, 3):              # UNSPEC, UNIX
            return None, None
        af, size = (socket.AF_INET, 4) if family == 1 else (socket.AF_INET6, 16)
        if len(body) < 2 * size + 4:
            raise ValueError("v2 %s addresses need %d bytes, the header has %d"
                             % ("TCP4" if family == 1 else "TCP6", 2 * size + 4, len(body)))
        sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
        return ((socket.inet_ntop(af, body[:size]), sport),
                (socket.inet_ntop(af, body[size:2 * size]), dport))
    if not data.endswith(b"\r\n"):
        raise ValueError("v1 line not ended by CRLF: %r" % data)
    parts = data[:-2].split(b" ")
    if parts[:2] == [b"PROXY", b"UNKNOWN"]:
        return None, None
    try:
        if len(parts) != 6 or parts[0] != b"PROXY" or parts[1] not in (b"TCP4", b"TCP6") \
                or not all(_DIGITS.fullmatch(p.decode()) for p in parts[4:]):
            raise ValueError
        af = socket.AF_INET if parts[1] == b"TCP4" else socket.AF_INET6
        src, dst = (socket.inet_ntop(af, socket.inet_pton(af, p.decode())) for p in parts[2:4])
        sport, dport = int(parts[4]), int(parts[5])
        if sport > 65535 or dport > 65535:
            raise ValueError
    except (ValueError, OSError, UnicodeDecodeError):
        raise ValueError("malformed v1 line %r" % data) from None
    return (src, sport), (dst, dport)


def _plain_ip(address):
    """An address as the header carries it: no scope, IPv4-mapped as IPv4."""
    address = address.split("%", 1)[0]
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def proxy_header(version, source, destination):
    """The PROXY header ("v1" or "v2") for a TCP connection from *source*
    to *destination* ((ip, port, ...) tuples); an IPv4-mapped address is
    sent as TCP4.  When the families differ: v1 UNKNOWN, v2 UNSPEC."""
    src, dst = _plain_ip(source[0]), _plain_ip(destination[0])
    six = ":" in src
    if six != (":" in dst):
        return b"PROXY UNKNOWN\r\n" if version == "v1" else \
            PROXY_V2_SIGNATURE + b"\x21\x00\x00\x00"
    if version == "v1":
        return ("PROXY %s %s %s %d %d\r\n" % ("TCP6" if six else "TCP4", src, dst,
                                              source[1], destination[1])).encode()
    af = socket.AF_INET6 if six else socket.AF_INET
    return (PROXY_V2_SIGNATURE + (b"\x21\x21\x00\x24" if six else b"\x21\x11\x00\x0c")
            + socket.inet_pton(af, src) + socket.inet_pton(af, dst)
            + struct.pack("!HH", source[1], destination[1]))


def send_proxy_header(proxy, session, upstream, coalesce=True):
    """--send-proxy: write the header on the just connected *upstream*,
    before any client byte; return *upstream*, or None when it failed (the
    session aborted).  With *coalesce* (no TLS on either side) what the
    client has sent already (a PostgreSQL startup packet, a Redis command)
    goes in the same send: peeked, sent with the header, then consumed."""
    state = session.proxy_protocol
    version = state.mapping.send_proxy
    if not version:
        return upstream
    try:
        client = session.client_sock
        local = state.local or client.getsockname()
        header = proxy_header(version, session.client, local)
        first = b""
        if coalesce:
            try:
                first = client.recv(PROXY_COALESCE_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:              # nothing yet, or an error the pump will meet
                first = b""
        upstream.sendall(header + first)
        if first:
            client.recv(len(first))      # the peeked bytes: all there, this thread alone reads
            session.bytes_up += len(first)
            session.last_up = time.monotonic()
        return upstream
    except OSError as exc:
        if session.closed_reason is None:
            _ratelimited.log(logging.WARNING, ("send_proxy", session.listen_port),
                             "%s: closing client %s: cannot send the PROXY header to %s: %s",
                             session.listen_port, _format_hostport(*session.client[:2]),
                             _format_hostport(*session.upstream_address[:2]),
                             exc.strerror or exc)
            proxy.registry.count_failed(session.listen_port, "other")
            session.abort("upstream reset (PROXY header)", reset=True)
        return None


# TLS #########################################################################
#
# Standard library ssl only.  Origination (upstream_tls): once
# connect_upstream() has a socket, tls_connect() does the handshake (TLS
# 1.2+, the system CAs or upstream_ca, SNI and the hostname check on the
# target name or upstream_sni), bounded by the connect timeout.
# Termination (tls_cert): tls_accept() wraps the accepted socket on the
# worker thread, bounded by TLS_HANDSHAKE_TIMEOUT.  A session with TLS on
# either side is copied by tls_pump(): no splice.  The TLS runs in memory
# (ssl.SSLObject over two MemoryBIOs, a _TlsEnd): the sockets stay plain
# (read and written with their own methods), and OpenSSL only ever sees
# bytes in memory.  OpenSSL forbids two threads in one SSL object, even one
# reading and one writing, so every call on it holds its end's ``lock``,
# which is never held over a system call.  Contexts are built once per set
# of files (TlsContexts) and re-built, on either side, when those files
# change and on SIGHUP.

TLS_HANDSHAKE_TIMEOUT = 10.0       # a client's handshake (termination)
TLS_RECORD = 16 * 1024             # the largest TLS record's payload
TLS_HANDSHAKE_READ = 64 * 1024     # a recv() during the handshake
TLS_READ = 64 * 1024               # a tls_pump() recv()
TLS_CLOSE_WAIT = 0.05              # the longest pause of a close_notify waiting (see _tls_end_of_stream)
TLS_CHECK_INTERVAL = 1.0           # how often a connection stat()s the certificate files
TLS_FAILURE_REASONS = ("verify", "protocol", "timeout", "closed", "config")
TlsSettings = collections.namedtuple("TlsSettings", TLS_FIELDS)
_NO_TLS = TlsSettings(False, None, None, None, None, None, None)


# No renegotiation (a write must never need a read); a peer's FIN without
# close_notify is an EOF, not a fatal error answered with an alert.
_TLS_OPTIONS = getattr(ssl, "OP_NO_RENEGOTIATION", 0) | getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


def _client_context(ca, cert, key):
    """An origination context: TLS 1.2+, verify against *ca* (None: the
    system CAs), optional client certificate."""
    try:
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= _TLS_OPTIONS
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = _tls_load_problem(exc, ((ca, "certificate"), (cert, "certificate"),
                                         (key or cert, "key")))
        raise ConfigError("cannot load the upstream TLS files (CA %s, certificate %s): %s"
                          % (ca or "system", cert or "none", reason)) from None
    return context


def _server_context(cert, key):
    """A termination context: TLS 1.2+, *cert* and *key*."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= _TLS_OPTIONS
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = _tls_load_problem(exc, ((cert, "certificate"), (key or cert, "key")))
        raise ConfigError("cannot load TLS certificate %s (key %s): %s"
                          % (cert, key or cert, reason)) from None
    return context


_PEM_MARKERS = {"certificate": b"-----BEGIN CERTIFICATE-----", "key": b"PRIVATE KEY-----"}


def _tls_load_problem(exc, files):
    """Why loading TLS *files* ((name, "certificate" or "key") pairs; a
    None name is skipped) failed with *exc*, naming the file: the first
    that cannot be read or holds no PEM of its kind, else OpenSSL's
    reason (whose "PEM lib" says neither which file nor what)."""
    for name, kind in files:
        if not name:
            continue
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as error:
            return "%s: %s" % (name, error.strerror or error)
        if _PEM_MARKERS[kind] not in data:
            return "%s: no PEM %s in it" % (name, "private key" if kind == "key" else kind)
    if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
        return "the key does not match the certificate"
    return str(exc)


def _tls_files_text(side, files):
    """What the log says of a context's *files* re-read on *side*."""
    if side == "client":
        return "certificate %s" % files[0]
    return "upstream CA %s, certificate %s" % (files[0] or "system", files[1] or "none")


def _files_signature(*names):
    """(size, mtime) of each file; None for one that cannot be stat()ed."""
    out = []
    for name in names:
        try:
            st = os.stat(name) if name else None
        except OSError:
            st = None
        out.append(st and (st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class TlsContexts:
    """The proxy's TLS contexts and counters: the one owner of both.

    Methods for the caller: settings(mapping) (a TlsSettings, the
    mapping's own over the command line's, or None for plain TCP),
    client_context(settings), server_context(settings), reload()
    (SIGHUP), count_failure(), failures(), warnings().  Client contexts
    are keyed by (CA, certificate, key), server contexts by (certificate,
    key): built once, shared by every mapping and connection using them.
    Both follow their files the same way: stat()ed at most every
    TLS_CHECK_INTERVAL when a connection needs the context, re-read when
    they changed and on SIGHUP; a new context serves new connections only
    (open ones keep theirs).  A file that does not load keeps the context
    in force, logged once and shown as a warning in /status.
    """

    def __init__(self, defaults=None):
        self.defaults = {k: v for k, v in check_tls(defaults or {}).items() if v}
        self.lock = threading.Lock()
        self._clients = {}             # (ca, cert, key) -> [SSLContext, signature, checked]
        self._servers = {}             # (cert, key) -> [SSLContext, signature, checked]
        self._failures = {}            # (port, side, reason) -> count
        self._warnings = {}            # (side, files) -> text

    def settings(self, mapping, load=False):
        """*mapping*'s TLS settings, None when it has none.  *load*: build
        its contexts now (ConfigError when a file does not load)."""
        values = {name: getattr(mapping, name) for name in TLS_FIELDS}
        for name, value in self.defaults.items():
            if values[name] is None:
                values[name] = value
        if not (values["upstream_tls"] or values["tls_cert"]):
            return None
        settings = TlsSettings(**values)
        if load:
            if settings.upstream_tls:
                self.client_context(settings)
            if settings.tls_cert:
                self.server_context(settings)
        return settings

    def client_context(self, settings, force=False):
        """The origination context for *settings* (its CA, client
        certificate and key); *force*: re-read the files now."""
        files = (settings.upstream_ca, settings.upstream_cert, settings.upstream_key)
        return self._context("upstream", files, force)

    def server_context(self, settings, force=False):
        """The termination context for *settings* (certificate, key)."""
        return self._context("client", (settings.tls_cert, settings.tls_key), force)

    def _context(self, side, files, force):
        """The context for *files* on *side* ("upstream": a client context,
        "client": a server one), re-built when the files changed (checked at
        most every TLS_CHECK_INTERVAL) or when *force*d.  A first load that
        fails raises ConfigError; a later one keeps the context in force."""
        cache = self._clients if side == "upstream" else self._servers
        entry = cache.get(files)
        now = time.monotonic()
        if entry is not None and not force and now - entry[2] < TLS_CHECK_INTERVAL:
            return entry[0]
        with self.lock:
            entry = cache.get(files)
            if entry is not None and not force and now - entry[2] < TLS_CHECK_INTERVAL:
                return entry[0]
            signature = _files_signature(*files)
            if entry is not None and not force and signature == entry[1]:
                entry[2] = now
                return entry[0]
            try:
                context = _client_context(*files) if side == "upstream" else \
                    _server_context(*files)
            except ConfigError as exc:
                if entry is None:
                    raise
                entry[1:] = [signature, now]
                self._kept(side, files, exc)
                return entry[0]
            if entry is not None:
                log.info("TLS: re-read %s", _tls_files_text(side, files))
            if self._warnings.pop((side, files), None) is not None:
                _once.clear(("tls-files", side, files))
            cache[files] = [context, signature, now]
            return context

    def _kept(self, side, files, exc):
        """A re-read of *files* failed: warn (in /status, and in the log
        once per change) that the context in force stays."""
        text = "%s; the %s in force stays" % (
            exc, "certificate" if side == "client" else "CA and certificate")
        self._warnings[(side, files)] = text
        _once.log(logging.ERROR, ("tls-files", side, files), "%s", text)

    def reload(self):
        """SIGHUP: re-read every certificate, CA and key now, both sides."""
        for files in list(self._servers):
            self._context("client", files, force=True)
        for files in list(self._clients):
            self._context("upstream", files, force=True)

    def count_failure(self, port, side, reason):
        with self.lock:
            key = (port, side, reason)
            self._failures[key] = self._failures.get(key, 0) + 1

    def failures(self):
        """{(port, side, reason): handshakes failed}, a copy."""
        with self.lock:
            return dict(self._failures)

    def warnings(self):
        with self.lock:
            return sorted(self._warnings.values())

    @staticmethod
    def describe(settings):
        """What /status shows of a mapping's TLS settings."""
        out = (settings or _NO_TLS)._asdict()
        out["upstream_tls"] = bool(out["upstream_tls"])
        return dict(out)


class _TlsEnd:
    """One side's TLS: an ssl.SSLObject between two MemoryBIOs, over that
    side's plain socket.  ``lock`` guards every call on the SSL object and
    the BIOs; ``send_lock`` keeps what leaves ``outgoing`` in order, held by
    the one thread sending it (see _tls_flush).  ``sslobj`` is the C object
    under ``obj`` (its read() and write() are a frame less)."""

    __slots__ = ("obj", "sslobj", "incoming", "outgoing", "lock", "send_lock")

    def __init__(self, wrap):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = wrap(self.incoming, self.outgoing)
        self.sslobj = self.obj._sslobj
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()


def _tls_info(obj):
    cipher = obj.cipher()
    return {"version": obj.version(), "cipher": cipher[0] if cipher else None}


def _tls_reason(exc):
    """A handshake failure's reason, for /metrics."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "verify"
    if isinstance(exc, ConfigError):
        return "config"
    if isinstance(exc, socket.timeout):
        return "timeout"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)) \
            or not isinstance(exc, ssl.SSLError):
        return "closed"
    return "protocol"


def _bio_handshake(end, sock, timeout):
    """The TLS handshake of *end* over the blocking *sock*, within
    *timeout* seconds.  What the peer sent after it stays in
    ``end.incoming`` for tls_pump()."""
    deadline = time.monotonic() + timeout
    obj, incoming, outgoing = end.obj, end.incoming, end.outgoing
    while True:
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError:
            _send_quietly(sock, outgoing.read())   # the alert saying why
            raise
        if outgoing.pending:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(outgoing.read())
        if done:
            sock.settimeout(None)                  # tls_pump: blocking, like pump()
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("the TLS handshake timed out")
        sock.settimeout(remaining)
        data = sock.recv(TLS_HANDSHAKE_READ)
        if not data:
            raise ConnectionAbortedError(errno.ECONNABORTED,
                                         "the peer closed the connection in the handshake")
        incoming.write(data)


def _send_quietly(sock, data):
    """One non-blocking send() of *data*, errors ignored (an alert, a
    close_notify before the close)."""
    if data:
        try:
            sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass


def _tls_handshake(proxy, session, side, wrap, timeout, name=None):
    """Do the TLS handshake on the session's socket on *side* ("client" or
    "upstream") through a _TlsEnd made by *wrap*(incoming, outgoing),
    within *timeout*; return the _TlsEnd (also in ``session.tls_ends``),
    or None (the reason logged and counted, the session aborted).  *name*:
    the server name checked, for the log."""
    port = session.listen_port
    try:
        sock = getattr(session, side + "_sock")
        if session.closed_reason is not None or sock is None:
            return None
        end = _TlsEnd(wrap)
        _bio_handshake(end, sock, timeout)
    except (OSError, ValueError, ConfigError) as exc:
        if session.closed_reason is not None:
            return None
        reason = _tls_reason(exc)
        proxy.tls.count_failure(port, side, reason)
        text = exc
        if reason == "verify":
            text = "certificate verify failed: %s (name checked: %s)" % (
                exc.verify_message, name)
        level = logging.INFO if side == "client" and reason == "closed" else logging.WARNING
        _ratelimited.log(level, ("tls", side, port), "%s: closing client %s: TLS handshake "
                         "with the %s failed (%s): %s", port,
                         _format_hostport(*session.client[:2]), side, reason, text)
        session.abort("%s TLS handshake failed" % side, reset=True)
        return None
    ends = dict(session.tls_ends or {})
    ends[side] = end
    session.tls_ends = ends
    tls = dict(session.tls or {"client": None, "upstream": None})
    tls[side] = _tls_info(end.obj)
    session.tls = tls
    return end


def tls_accept(proxy, listener, session):
    """Termination: the client's TLS handshake, when the mapping has
    tls_cert.  True when the session may go on."""
    settings = listener.tls
    if settings is None or not settings.tls_cert:
        return True
    try:
        context = proxy.tls.server_context(settings)
    except ConfigError as exc:
        proxy.tls.count_failure(session.listen_port, "client", "config")
        _ratelimited.log(logging.ERROR, ("tls-config", session.listen_port),
                         "%s: closing client %s: %s", session.listen_port,
                         _format_hostport(*session.client[:2]), exc)
        session.abort("no TLS certificate", reset=True)
        return False
    return _tls_handshake(proxy, session, "client", lambda incoming, outgoing: context.wrap_bio(
        incoming, outgoing, server_side=True), TLS_HANDSHAKE_TIMEOUT) is not None


def tls_connect(proxy, listener, session, sock):
    """Origination: the TLS handshake on the connected upstream *sock*
    when the mapping has upstream_tls; return the socket to pump (None:
    failed, counted as a failed upstream)."""
    settings = listener.tls
    if sock is None or settings is None or not settings.upstream_tls:
        return sock
    name = settings.upstream_sni or session.target[0]

    def wrap(incoming, outgoing):
        return proxy.tls.client_context(settings).wrap_bio(
            incoming, outgoing, server_hostname=name)

    if _tls_handshake(proxy, session, "upstream", wrap, proxy.connect_timeout, name) is None:
        if session.closed_reason == "upstream TLS handshake failed":
            proxy.registry.count_failed(session.listen_port, "tls")
        return None
    return sock


def tls_pump(session, src, dst, up, proxy):
    """pump() for a session with TLS on either side.  It waits in a
    blocking recv() itself: one system call where pump() makes two
    (poll(), then recv() or splice()), a seventh less CPU per 64-byte
    request (tests/perf/tls_duel.py); the idle timeout is the socket's
    SO_RCVTIMEO.  Its sends are the
    socket's own, which let the GIL go: through libc with the GIL held
    (see _LibcIO) they cost a quarter more, OpenSSL's work being in the
    same threads.  A TLS side passes through its _TlsEnd: what was read
    goes into ``incoming`` and the records complete in it are decrypted
    into a pooled buffer (up to the buffer's size: then the rest is
    decrypted before the next read), what is written is encrypted into
    ``outgoing`` and sent.  EOF becomes close_notify or a FIN (see
    _tls_end_of_stream); a TLS error resets the session."""
    idle_timeout = proxy.idle_timeout
    if idle_timeout:
        try:
            _socket_timeout(proxy.libc, src, _timeval(min(idle_timeout, 5.0)), socket.SO_RCVTIMEO)
        except OSError:
            pass                             # closed already: the recv() says so
    from_side, to_side = ("client", "upstream") if up else ("upstream", "client")
    src_end, dst_end = session.tls_ends.get(from_side), session.tls_ends.get(to_side)
    recv = src.recv
    send = dst.sendall if dst_end is None else _tls_sender(dst_end, dst)
    more = src_end is not None and src_end.incoming.pending > 0   # sent with the handshake's end
    get_buffer, put_buffer = proxy.buffers.get, proxy.buffers.put
    monotonic = time.monotonic
    while True:
        data = b""
        if not more:
            try:
                data = recv(TLS_READ)
            except (BlockingIOError, InterruptedError):      # SO_RCVTIMEO: nothing came
                if monotonic() - session.last_active >= idle_timeout:
                    session.abort("idle timeout")
                    return
                continue
            except OSError as exc:
                _tls_failed(session, exc, from_side)
                return
            if not data:                     # a FIN, with or without close_notify
                _tls_end_of_stream(session, dst, dst_end)
                return
        eof = False
        entry = None
        if src_end is not None:
            entry = get_buffer()
            try:
                data, more, eof = _tls_decrypt(src_end, data, entry[0], src)
            except OSError as exc:
                put_buffer(entry)
                _tls_failed(session, exc, from_side)
                return
        try:
            if data:
                send(data)
        except OSError as exc:
            _tls_failed(session, exc, to_side)
            return
        finally:
            if entry is not None:
                put_buffer(entry)
        if eof:                              # close_notify
            _tls_end_of_stream(session, dst, dst_end)
            return
        if up:
            session.bytes_up += len(data)
            session.last_up = monotonic()
        else:
            session.bytes_down += len(data)
            session.last_down = monotonic()


def _tls_decrypt(end, data, buf, sock):
    """Put *data* (what was read) into *end*'s ``incoming`` and decrypt
    what is complete there into the pooled buffer *buf*, while a whole
    record fits.  Returns (a memoryview of what was decrypted, more left
    in ``incoming``, EOF: close_notify).  A read that made OpenSSL write
    (a key update's answer) sends it on *sock* if no one else is sending
    (see _tls_flush)."""
    incoming, outgoing, read = end.incoming, end.outgoing, end.sslobj.read
    size = len(buf)
    eof = False
    got = 0
    view = memoryview(buf)
    with end.lock:
        if data:
            incoming.write(data)
        written = outgoing.pending
        try:
            got = read(size, view)
            if not got:
                eof = True
            else:
                while incoming.pending and size - got >= TLS_RECORD:
                    n = read(size - got, view[got:])
                    if not n:
                        eof = True
                        break
                    got += n
        except ssl.SSLWantReadError:
            pass                             # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            eof = True
        more = incoming.pending > 0 and not eof
        written = outgoing.pending > written
    if written:
        _tls_flush(end, sock.sendall, False)
    return view[:got], more, eof


def _tls_flush(end, sendall, wait=True):
    """Send what OpenSSL wrote into *end*'s ``outgoing``, in order: one
    thread at a time holds ``send_lock`` and sends until it is empty.
    *wait* False (a reader): when another thread holds it, leave the bytes
    to that one, which looks again once it lets go."""
    outgoing, lock, send_lock = end.outgoing, end.lock, end.send_lock
    while outgoing.pending:
        if not send_lock.acquire(wait):
            return
        try:
            while outgoing.pending:
                with lock:
                    data = outgoing.read()
                sendall(data)
        finally:
            send_lock.release()


def _tls_sender(end, sock):
    """send(data) through *end*: encrypt *data* into ``outgoing`` (in
    memory: it never waits) and send it, holding ``send_lock`` (see
    _tls_flush) from the one to the other."""
    write, lock, sendall = end.sslobj.write, end.lock, sock.sendall
    send_lock, outgoing = end.send_lock, end.outgoing

    def send(data):
        with send_lock:
            with lock:
                write(data)
                data = outgoing.read()
            sendall(data)
        if outgoing.pending:                 # a reader's, left to us (see _tls_flush)
            _tls_flush(end, sendall)
    return send


def _tls_end_of_stream(session, dst, end):
    """_end_of_stream() where *dst* may have TLS (*end*): its half-close is
    close_notify (the TLS 1.3 half-close; a TLS 1.2 peer usually closes),
    sent at once: it is written in memory, under the lock, when no record
    of the peer's is left in ``incoming`` (so SSL_shutdown(), which reads
    after writing, finds none to drop) and the peer may go on sending.
    Once the other way is done too, close_notify ends the TLS before the
    close."""
    if session.closed_reason is not None:
        return
    last = session.pumps <= 1
    if end is None:
        if not last:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return
    pause, delay = None, 0.001
    while session.closed_reason is None:
        with end.lock:
            if last or not end.incoming.pending:
                try:
                    end.obj.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass                     # written; the peer's comes with its EOF
                except (OSError, ValueError):
                    return
                break
        # The other pump is decrypting (a moment), or waits for its reader
        # to take what it decrypted: look again, less and less often.
        pause = pause or threading.Event()
        pause.wait(delay)
        delay = min(delay * 2, TLS_CLOSE_WAIT)
    else:
        return
    if last:
        with end.lock:
            _send_quietly(dst, end.outgoing.read())
        return
    try:
        _tls_flush(end, dst.sendall)
    except OSError:
        pass                                 # the other pump sees the error


def _tls_failed(session, exc, side):
    """_failed() for TLS errors: the session (only) is reset, the reason
    logged (at debug level when the peer just went away)."""
    if not isinstance(exc, ssl.SSLError):
        _failed(session, exc, side)
        return
    if session.closed_reason is not None:
        return
    _ratelimited.log(logging.DEBUG if isinstance(exc, ssl.SSLEOFError) else logging.WARNING,
                     ("tls-error", session.listen_port), "%s: session %d: TLS error from "
                     "the %s: %s; resetting it", session.listen_port, session.id, side, exc)
    session.abort("%s TLS error (%s)" % (side, getattr(exc, "reason", None) or exc), reset=True)


# Status server ###############################################################

class _DeadlineSocketIO(socket.SocketIO):
    """A raw reader over the status client's socket that gives the whole
    request until *deadline* (monotonic), however slowly bytes trickle in."""

    def __init__(self, sock, deadline):
        super().__init__(sock, "rb")
        self._deadline = deadline

    def readinto(self, b):
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("request took too long")
        self._sock.settimeout(remaining)
        return super().readinto(b)


class _CpuBudget:
    """Keep the status server's costly answers (/metrics, /connections)
    within *share* of one CPU: each is built in turn, and the next one
    waits until the CPU time this one took (its thread's, not its sleeps)
    is *share* of the time since it started.  A scraper reading in a loop
    would otherwise hold the GIL as much as its loop allows, and the pumps
    wait for it; Prometheus every 15 s, or a person, never waits here.
    /status is not paced: health checks never wait."""

    def __init__(self, share=STATUS_CPU_SHARE):
        self.share = share
        self.lock = threading.Lock()
        self._next = 0.0

    def run(self, func, *args):
        with self.lock:
            delay = self._next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            started = time.thread_time()
            try:
                return func(*args)
            finally:
                spent = time.thread_time() - started
                self._next = time.monotonic() + spent * (1.0 / self.share - 1.0)


class StatusHandler(http.server.BaseHTTPRequestHandler):
    """Serve GET/HEAD /status and /connections; other methods get 405.

    A request must arrive whole within ``request_timeout`` seconds and its
    headers are capped (http.server: 64 KiB a line, 100 lines), so a slow
    or garbage client cannot hold a thread for long.
    """

    server_version = "tcpproxy/" + __version__
    timeout = 5                        # per socket operation
    request_timeout = 5                # for the whole request
    protocol_version = "HTTP/1.0"

    def send_response_only(self, code, message=None):
        # http.server answers HTTP/0.9 style (a bare body, no status line or
        # headers) to a request line it could not parse and to any request
        # that is, or says it is, HTTP/0.9: always send a status line.
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        super().send_response_only(code, message)

    def setup(self):
        super().setup()
        self.rfile.close()
        timeout = getattr(threading.current_thread(), "request_timeout", self.request_timeout)
        self.rfile = io.BufferedReader(_DeadlineSocketIO(
            self.connection, time.monotonic() + timeout))

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self):
        self._send(405, "method not allowed\n", "text/plain", True, {"Allow": "GET, HEAD"})

    def _serve(self, body):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        proxy = self.server.proxy
        if url.path not in self.server.public_paths and \
                not _allowed(self.client_address[0], self.server.allow):
            self._send(403, "forbidden: not in --status-allow\n", "text/plain", body)
            return
        if url.path == "/status":
            status = status_report(proxy)
            code = 200 if status["ok"] else 503
            if query.get("format", [""])[0] == "json":
                self._send(code, json.dumps(status, sort_keys=True) + "\n",
                           "application/json", body)
            else:
                self._send(code, "OK" if status["ok"] else status["reason"] + "\n",
                           "text/plain; charset=utf-8", body)
        elif url.path == "/metrics":
            self._send(200, self.server.budget.run(metrics_text, proxy),
                       "text/plain; version=0.0.4; charset=utf-8", body)
        elif url.path == "/connections":
            try:
                limit = check_limit(query.get("limit", [None])[0], "limit") or None
            except ConfigError as exc:
                self._send(400, "%s\n" % exc, "text/plain; charset=utf-8", body)
                return
            self._send(200, self.server.budget.run(_connections_json, proxy, limit),
                       "application/json", body)
        else:
            self._send(404, "not found\n", "text/plain", body)

    def _send(self, code, text, ctype, body, headers=None):
        data = text.encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format, *args):      # http.server's names
        # The request line is the client's: escaped, as http.server's own
        # log_message() does, so that it cannot forge log lines.
        log.debug("status %s: %s", self.client_address[0], _clip(format % args))

    def log_error(self, format, *args):
        self.log_message(format, *args)


class StatusServer(http.server.ThreadingHTTPServer):
    """The /status and /connections endpoint of a Proxy.

    Each request gets a named thread that is tracked, so that stop() can
    join every one with a deadline (socketserver's own join has none).
    Capacity: *max_threads* requests at once, *max_per_client* from one
    address, each given *request_timeout* seconds to arrive; beyond that a
    reserve of *reserve_threads* (*reserve_per_client* per address) gives
    a request only *reserve_timeout* seconds, so slow or abusive clients
    cannot keep a health check out for longer than that.  Loopback clients
    may always read the *public_paths* (on-box and in-container health
    checks), whatever --status-allow says; /connections, which shows
    client and upstream addresses, follows --status-allow.  Two descriptors are held in reserve so that
    /status still answers when the process has run out of them.
    """

    allow_reuse_address = True
    request_queue_size = 128
    daemon_threads = False
    block_on_close = False            # join() below, with a deadline
    max_threads = 32
    max_per_client = 8
    request_timeout = StatusHandler.request_timeout
    reserve_threads = 8
    reserve_per_client = 2
    reserve_timeout = 1.0
    spare_descriptors = 2
    public_paths = ("/status", "/metrics")

    def __init__(self, address, proxy, allow=()):
        self.proxy = proxy
        self.allow = allow
        self.budget = _CpuBudget()
        self._tracked = set()
        self._tracked_lock = threading.Lock()
        self._stopping = threading.Event()
        self._spares = [_SpareDescriptor() for _ in range(self.spare_descriptors)]
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, StatusHandler)
        for spare in self._spares:
            spare.take()

    def verify_request(self, request, client_address):
        # Loopback may ask for the public paths whatever --status-allow
        # says; StatusHandler refuses it the others.
        if _allowed(client_address[0], self.allow) or _is_host_client(client_address[0]):
            return True
        _ratelimited.log(logging.WARNING, "status-acl",
                         "status: refused %s: not in --status-allow", client_address[0])
        return False

    def _capacity(self, client):
        """The request timeout for a new request from *client* (None: refuse)."""
        threads = self.threads()
        normal = [t for t in threads if not t.reserve]
        if len(normal) < self.max_threads and \
                sum(1 for t in normal if t.client == client) < self.max_per_client:
            return self.request_timeout, False
        reserve = [t for t in threads if t.reserve]
        if len(reserve) < self.reserve_threads and \
                sum(1 for t in reserve if t.client == client) < self.reserve_per_client:
            return self.reserve_timeout, True
        return None, None

    def process_request(self, request, client_address):
        timeout, reserve = self._capacity(client_address[0])
        if timeout is None:
            _ratelimited.log(logging.WARNING, ("status-busy", client_address[0]),
                             "status: refused %s: too many requests in progress",
                             client_address[0])
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._process, args=(request, client_address),
                                  name="tcpproxy-status-%s" % client_address[1])
        thread.client = client_address[0]
        thread.reserve = reserve
        thread.request_timeout = timeout
        with self._tracked_lock:
            self._tracked.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:     # can't start new thread
            with self._tracked_lock:
                self._tracked.discard(thread)
            _ratelimited.log(logging.ERROR, "status-thread", "status: cannot start a "
                             "thread (%s): closing client %s", exc,
                             _format_hostport(*client_address[:2]))
            _reset_close(request)
            self._stopping.wait(ACCEPT_BACKOFF)

    def _process(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._tracked_lock:
                self._tracked.discard(threading.current_thread())
            for spare in self._spares:
                spare.take()              # again, if it was lent

    def threads(self):
        with self._tracked_lock:
            return list(self._tracked)

    def join(self, deadline):
        """Join request threads until *deadline* (monotonic); return stragglers."""
        for thread in self.threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for t in self.threads() if t.is_alive()]

    def get_request(self):
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno not in EXHAUSTION_ERRS:
                raise
            for spare in self._spares:
                accepted = spare.lend(self.socket)
                if accepted is not None:
                    return accepted
            # No descriptor for the client: it stays queued and the listener
            # stays readable, so back off instead of spinning.
            _ratelimited.log(logging.ERROR, "status-accept", "status: cannot accept "
                             "(%s): backing off", exc.strerror)
            self._stopping.wait(ACCEPT_BACKOFF)
            raise

    def handle_error(self, request, client_address):
        # socketserver calls this inside its except block
        log.debug("status: error serving %s", client_address, exc_info=sys.exc_info())

    def server_close(self):
        super().server_close()
        for spare in self._spares:
            spare.release()


def _is_host_client(address):
    """127.0.0.1 or ::1 (an IPv4-mapped one too): the host's own clients."""
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def status_exposure(address, allow):
    """The warning for a status server on *address* (host, port) beyond
    loopback with no allow list, or None."""
    host, port = address
    if allow or _is_loopback(host):
        return None
    return ("status on %s is open to anyone who can reach it: /connections shows every "
            "client's and upstream's address, /status the mappings and their DNS answers; "
            "set --status-allow CIDR (or --status 127.0.0.1:%d)"
            % (_format_hostport(host, port), port))


_EMPTY_STATS = _Stats().to_dict()


def connections_report(proxy, limit=None):
    """What GET /connections returns (at most *limit* sessions, oldest first)."""
    return json.loads(_connections_json(proxy, limit))


def _connections_json(proxy, limit=None, chunk=10):
    """/connections as JSON text, built from a snapshot in chunks of
    *chunk* sessions with a short sleep in between (_pace): thousands of
    sessions must not stall the pumps."""
    sessions = proxy.registry.sessions()
    total = len(sessions)
    if limit is not None:
        sessions = sessions[:limit]
    specs = [m.spec for m in proxy.mappings]
    head = {"name": proxy.name, "connections": specs}
    if not specs:
        head["error"] = "No connections!"
    if limit is not None:
        head["total"] = total
    parts = []
    for start in range(0, len(sessions), chunk):
        if start:
            _pace()
        now = time.time()
        parts.append(", ".join(s.to_json(now) for s in sessions[start:start + chunk]))
    text = json.dumps(head, sort_keys=True)
    return '%s, "sessions": [%s]}\n' % (text[:-1], ", ".join(p for p in parts if p))


class _Exposition:
    """Prometheus text exposition format 0.0.4, built family by family."""

    def __init__(self):
        self.lines = []

    @staticmethod
    def _labels(labels):
        if not labels:
            return ""
        return "{%s}" % ",".join('%s="%s"' % (key, str(value).replace("\\", "\\\\")
                                              .replace("\n", "\\n").replace('"', '\\"'))
                                 for key, value in labels)

    def family(self, name, kind, help_text, samples):
        """*samples*: [(labels as ((key, value), ...), value), ...]; the
        family is written only when it has samples."""
        if not samples:
            return
        self.lines.append("# HELP %s %s" % (name, help_text))
        self.lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            if isinstance(value, float) and value != int(value):
                text = repr(value)
            else:
                text = str(int(value))
            self.lines.append("%s%s %s" % (name, self._labels(labels), text))

    def histogram(self, name, help_text, series):
        """*series*: [(labels, bucket counts (the last: +Inf), sum), ...]."""
        if not series:
            return
        self.lines.append("# HELP %s %s" % (name, help_text))
        self.lines.append("# TYPE %s histogram" % name)
        for labels, counts, total in series:
            running = 0
            for bound, count in zip(CONNECT_BUCKETS + (None,), counts):
                running += count
                le = "+Inf" if bound is None else repr(bound)
                self.lines.append("%s_bucket%s %d" % (name, self._labels(labels + (("le", le),)),
                                                      running))
            self.lines.append("%s_sum%s %r" % (name, self._labels(labels), float(total)))
            self.lines.append("%s_count%s %d" % (name, self._labels(labels), running))

    def text(self):
        return "\n".join(self.lines) + "\n"


REFUSAL_REASONS = ("allow", "limit", "draining")
FAILURE_REASONS = ("resolve", "refused", "timeout", "unreachable", "unusable", "tls",
                   "other")


def metrics_text(proxy):
    """GET /metrics: what Prometheus scrapes (standard library only)."""
    stats = proxy.registry.stats(details=True)
    servers = proxy.servers
    backend = proxy.backend_state()
    out = _Exposition()
    ports = sorted(set(stats) | set(servers), key=_key_order)

    def per_port(key):
        return [((("mapping", port),), stats.get(port, {}).get(key, 0)) for port in ports]

    out.family("tcpproxy_build_info", "gauge", "tcpproxy's version.",
               [((("version", __version__),), 1)])
    out.family("tcpproxy_draining", "gauge", "1 while the proxy drains or stops.",
               [((), int(proxy.is_draining()))])
    out.family("tcpproxy_connections_active", "gauge", "Client sessions open now.",
               per_port("active"))
    out.family("tcpproxy_connections_total", "counter", "Client sessions accepted.",
               per_port("total"))
    out.family("tcpproxy_connections_refused_total", "counter",
               "Clients refused, by reason (allow list, connection limit, draining).",
               [((("mapping", port), ("reason", reason)),
                 stats.get(port, {}).get("refused_by", {}).get(reason, 0))
                for port in ports for reason in REFUSAL_REASONS])
    out.family("tcpproxy_upstream_connect_failures_total", "counter",
               "Clients closed for want of an upstream, by reason.",
               [((("mapping", port), ("reason", reason)),
                 stats.get(port, {}).get("failed_by", {}).get(reason, 0))
                for port in ports for reason in FAILURE_REASONS])
    out.family("tcpproxy_bytes_total", "counter",
               "Bytes forwarded: up is client to upstream, down upstream to client.",
               [((("mapping", port), ("direction", direction)),
                 stats.get(port, {}).get("bytes_" + direction, 0))
                for port in ports for direction in ("up", "down")])
    empty = [0] * (len(CONNECT_BUCKETS) + 1)
    out.histogram("tcpproxy_connect_seconds",
                  "Seconds from accepting a client to its upstream connected.",
                  [((("mapping", port),), stats.get(port, {}).get("connect_counts", empty),
                    stats.get(port, {}).get("connect_sum", 0.0)) for port in ports])
    dns = []
    for port, server in _by_key(servers.items()):
        host = server.mapping.host
        if not _is_ip(host):
            dns.append((port, host, proxy.resolver.info(host, server.mapping.dns_family)))
    out.family("tcpproxy_dns_answer_expires_seconds", "gauge",
               "Seconds until the cached DNS answer expires.",
               [((("mapping", port), ("host", host)), info["expires_in"])
                for port, host, info in dns if info["expires_in"] is not None])
    out.family("tcpproxy_dns_stale", "gauge",
               "1 while the last good DNS answer is served because lookups fail.",
               [((("mapping", port), ("host", host)), int(info["stale"]))
                for port, host, info in dns])
    out.family("tcpproxy_dns_answer_changes_total", "counter",
               "Times the DNS answer changed.",
               [((("mapping", port), ("host", host)), info["changes"])
                for port, host, info in dns])
    out.family("tcpproxy_dns_lookups_total", "counter", "DNS lookups, by result.",
               [((("mapping", port), ("host", host), ("result", result)),
                 info["lookups_" + result]) for port, host, info in dns
                for result in ("ok", "failed")])
    out.family("tcpproxy_dns_prefetches_total", "counter",
               "Lookups started in the background because a name in use neared the "
               "end of its TTL (also counted in tcpproxy_dns_lookups_total).",
               [((("mapping", port), ("host", host)), info["prefetches"])
                for port, host, info in dns])
    tls_failures = proxy.tls.failures()               # TLS
    out.family("tcpproxy_tls_handshake_failures_total", "counter",
               "TLS handshakes failed, by side (client, upstream) and reason.",
               [((("mapping", port), ("side", side), ("reason", reason)),
                 tls_failures.get((port, side, reason), 0))
                for port, server in _by_key(servers.items()) if server.tls is not None
                for side, on in (("client", server.tls.tls_cert),
                                 ("upstream", server.tls.upstream_tls)) if on
                for reason in TLS_FAILURE_REASONS])
    out.family("tcpproxy_upstream_address_up", "gauge",
               "1 while an upstream address takes connections, 0 while it is held down "
               "after failures (passive health).",
               [((("mapping", port), ("address", entry["address"])), int(entry["up"]))
                for port, server in _by_key(servers.items())
                for entry in proxy.health.snapshot(
                    proxy.resolver.info(server.mapping.host,
                                        server.mapping.dns_family)["addresses"],
                    server.mapping.port)])
    out.family("tcpproxy_mapping_failing", "gauge",
               "Connection attempts failed since the last success.",
               [((("mapping", port),), server.failing)
                for port, server in _by_key(servers.items())])
    if "polls" in backend:
        out.family("tcpproxy_backend_last_success_timestamp_seconds", "gauge",
                   "When the backend was last read successfully (Unix time).",
                   [((("backend", backend["name"]),), backend.get("last_success") or 0)])
        out.family("tcpproxy_backend_errors_total", "counter",
                   "Backend polls that failed or were rejected.",
                   [((("backend", backend["name"]),), backend.get("errors", 0))])
    out.family("tcpproxy_config_rejected", "gauge",
               "1 while the backend's configuration is rejected (the last good one stays).",
               [((("backend", backend.get("name", "static")),), int(bool(backend.get("rejected"))))])
    _process_metrics(out)
    return out.text()


class _OpenFdCounter:
    """len(os.listdir("/proc/self/fd")), at most once per *every* seconds.
    Listing 4,000 descriptors costs ~10 ms of CPU, much of it with the GIL
    (taken back after every entry): a scraper reading /metrics in a loop
    must not make the pumps wait for it.  Prometheus scrapes every 15 s
    or so; a value up to a second old is as good."""

    def __init__(self, every=1.0):
        self.every = every
        self.lock = threading.Lock()
        self._value = None
        self._when = None

    def count(self):
        with self.lock:
            now = time.monotonic()
            if self._when is None or now - self._when >= self.every:
                self._value = len(os.listdir("/proc/self/fd"))
                self._when = now
            return self._value


_open_fds = _OpenFdCounter()


def _process_metrics(out):
    """The process_* metrics a Python exporter gives, from /proc."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, StopIteration, IndexError):
        return
    out.family("process_cpu_seconds_total", "counter", "CPU time used (user and system).",
               [((), (int(fields[11]) + int(fields[12])) / ticks)])
    out.family("process_resident_memory_bytes", "gauge", "Resident memory.", [((), rss)])
    out.family("process_start_time_seconds", "gauge", "Start time (Unix time).",
               [((), boot + int(fields[19]) / ticks)])
    out.family("process_threads", "gauge", "Threads.", [((), int(fields[17]))])
    try:
        out.family("process_open_fds", "gauge",
                   "Open file descriptors (counted at most once a second).",
                   [((), _open_fds.count())])
    except OSError:
        pass
    try:
        import resource
        out.family("process_max_fds", "gauge", "The descriptor limit.",
                   [((), resource.getrlimit(resource.RLIMIT_NOFILE)[0])])
    except (ImportError, OSError):
        pass


def status_report(proxy):
    """What GET /status?format=json returns.  "ok" (200 or 503) says
    whether the proxy serves; "warnings" lists everything an operator
    should look at (a rejected config, a failing backend, a stale DNS
    answer, an upstream refusing every attempt, a mapping that could not
    start), "ok" or not."""
    stats = proxy.registry.stats()
    backend = proxy.backend_state()
    state = proxy.state
    failures = proxy.failed_mappings
    mappings = []
    reasons = []
    warnings = []
    if state == "draining":
        reasons.append("draining")
    elif state != "running":
        reasons.append(state)
    for port, server in _by_key(proxy.servers.items()):
        mapping = server.mapping
        dns_info = proxy.resolver.info(mapping.host, mapping.dns_family)
        listening = server.socket.fileno() != -1
        if not listening and state == "running":
            reasons.append("listener %s is down" % port)
        if dns_info["stale"]:
            warnings.append("%s: DNS answer for %s is stale (%s)"
                            % (port, mapping.host, dns_info["error"]))
        elif dns_info["error"] and not dns_info["addresses"]:
            warnings.append("%s: cannot resolve %s (%s)"
                            % (port, mapping.host, dns_info["error"]))
        if server.failing:
            warnings.append("%s: the last %d connection attempt(s) to %s failed"
                            % (port, server.failing,
                               _format_hostport(mapping.host, mapping.port)))
        mappings.append({
            **stats.get(port, _EMPTY_STATS),
            "mapping": port, "spec": mapping.spec, "listen": server.listen,
            "target": _format_hostport(mapping.host, mapping.port),
            "listening": listening, "addresses": dns_info["addresses"],
            "expires_in": dns_info["expires_in"], "stale": dns_info["stale"],
            "dns_error": dns_info["error"], "dns_family": dns_info["family"],
            "failing": server.failing,
            "upstreams": proxy.health.snapshot(dns_info["addresses"], mapping.port),
            "allow": [str(n) for n in mapping.allow],
            "max_connections": mapping.max_connections,
            "tls": TlsContexts.describe(server.tls)})
    for spec, reason in sorted(failures.items()):
        reasons.append("%s: %s" % (spec, reason))
    if not backend.get("ok", True):
        reasons.append("backend: %s" % (backend.get("error") or "no successful poll yet"))
    else:
        if backend.get("rejected"):
            warnings.append("config rejected: %s" % backend["rejected"])
        elif backend.get("last_poll_failed") and backend.get("last_error"):
            warnings.append("backend failing: %s" % backend["last_error"])
        if backend.get("warning"):
            warnings.append("backend: %s" % backend["warning"])
    warnings.extend(proxy.tls.warnings())             # TLS: certificates that did not load
    return {"ok": not reasons, "reason": "; ".join(reasons) or "OK",
            "warnings": reasons + warnings,
            "version": __version__, "name": proxy.name,
            "uptime": round(time.time() - proxy.started, 3) if proxy.started else 0,
            "state": state, "backend": backend,
            "active": proxy.registry.active(), "mappings": mappings,
            "failed_mappings": failures,
            "resolver": proxy.resolver.nameservers}


# Proxy #######################################################################

class Proxy:
    """A set of port mappings served by ProxyServers, plus status.

    Methods for the caller: start(), apply(mappings), mappings, servers,
    connections(), status(), stop(timeout, drain), end_drain(),
    set_backend_state(), own_address(address, port); use it as a context
    manager to start and stop it.  Keyword arguments are the command
    line's options (see build_parser()); *splice* and *libc_io* choose the
    fast paths (default: where available); *tls* is a {TLS_FIELDS name:
    value} dict that applies to every mapping that does not set its own.
    It owns the passive health of upstreams (*health*, an UpstreamHealth)
    and one housekeeping thread that retires idle workers.
    """

    def __init__(self, mappings=(), *, listen_host="0.0.0.0", resolver=None,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT, close_on_dns_change=False,
                 name=None, status_address=None, status_allow=(), backend_info=None,
                 idle_timeout=None, allow=(), max_connections=0, splice=None,
                 libc_io=None, tls=None, accept_proxy_from=(), connect_deadline=None,
                 connect_attempts=DEFAULT_CONNECT_ATTEMPTS, dns_change_hold=None):
        self.listen_host = listen_host
        self.resolver = resolver if resolver is not None else Resolver()
        self.connect_timeout = connect_timeout
        self.connect_deadline = (2 * connect_timeout if connect_deadline is None
                                 else connect_deadline)
        self.connect_attempts = check_limit(connect_attempts, "--connect-attempts")
        if not self.connect_attempts or not self.connect_deadline > 0:
            raise ConfigError("--connect-attempts %s and --connect-deadline %s must be more "
                              "than 0" % (short_repr(connect_attempts), short_repr(connect_deadline)))
        self.first_connect_timeout = min(connect_timeout, self.connect_deadline)
        self.connect_timeval = _timeval(self.first_connect_timeout)
        self.health = UpstreamHealth(trial=self.first_connect_timeout)
        self.own_ports = {}             # port -> hosts this proxy listens on (loops)
        self.close_on_dns_change = close_on_dns_change
        self.dns_change_hold = dns_change_hold
        self.name = name
        self.idle_timeout = idle_timeout or None
        self.allow = parse_allow(allow, "--allow")
        self.max_connections = check_limit(max_connections, "--max-connections")
        self.accept_proxy_from = parse_allow(accept_proxy_from, "--accept-proxy-from")
        self.registry = Registry()
        self.tls = TlsContexts(tls)      # TLS: *tls* is the command line's TLS_FIELDS
        self.workers = _WorkerPool()
        self.spare = _SpareDescriptor()
        self.libc, self.buffers, self.pipes = _fast_paths(splice, libc_io)
        self.splice = self.pipes is not None
        self.state = "new"
        self.started = None
        self.failed_mappings = {}        # spec -> reason, for /status
        self._status_address = status_address
        self._status_allow = parse_allow(status_allow, "--status-allow")
        self._status_server = None
        self._initial = check_unique_ports([(str(m), m) for m in mappings], listen_host)
        self._servers = {}              # mapping key (see mapping_key) -> ProxyServer
        self._server_threads = {}       # mapping key -> serve_forever thread
        self._lock = threading.RLock()  # serialises start/apply/stop
        self._backend = dict(backend_info or {"name": "static", "ok": True})
        self._backend_lock = threading.Lock()
        self._watcher = None
        self._drain_cut = threading.Event()
        self._housekeeping = None
        self._housekeeping_stop = threading.Event()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def status_address(self):
        if self._status_server is None:
            return None
        return self._status_server[0].server_address[:2]

    @property
    def mappings(self):
        """The live mappings, in listen port order."""
        return [s.mapping for _, s in _by_key(self.servers.items())]

    @property
    def servers(self):
        """{mapping key: ProxyServer} (the key: the listen port, or "IP:PORT"
        for a mapping with a listen address of its own, see mapping_key);
        a copy, taken without the apply/stop lock so that /status answers
        while a drain holds it."""
        return dict(self._servers)

    def own_address(self, address, port):
        """Why connecting to (*address*, *port*) would loop back into this
        proxy (one of its listeners or its status server, a wildcard
        listener meaning every local address), or None."""
        for host in self.own_ports.get(port, ()):
            if host in ("0.0.0.0", "::"):
                if _is_local(address, v4_only=host == "0.0.0.0"):
                    return "this proxy listens on port %d of every local address " \
                           "(a proxy loop)" % port
            elif _same_ip(host, address):
                return "this proxy listens there (a proxy loop)"
        return None

    def _own(self, port, host, add=True):
        # Connections read own_ports without a lock: one get() at a time
        # (atomic), and the value is a tuple that is replaced, never changed.
        hosts = tuple(h for h in self.own_ports.get(port, ()) if h != host)
        hosts += (host,) if add else ()
        if hosts:
            self.own_ports[port] = hosts
        else:
            self.own_ports.pop(port, None)

    def is_draining(self):
        """True from the start of a drain on (also stopping and stopped)."""
        return self.state in ("draining", "stopping", "stopped")

    def set_backend_state(self, info):
        """Record the backend's state for /status ("ok" False answers 503
        with "error" as the reason); replaces what was there."""
        with self._backend_lock:
            self._backend = dict(info)

    def backend_state(self):
        with self._backend_lock:
            return dict(self._backend)

    def connections(self):
        """What GET /connections returns."""
        return connections_report(self)

    def status(self):
        """What GET /status?format=json returns."""
        return status_report(self)

    def start(self):
        """Bind every listener and the status server, then serve."""
        with self._lock:
            if self.state != "new":
                raise ProxyError("proxy already started")
            self.started = time.time()
            self.spare.take()
            try:
                for mapping in self._initial:
                    self._start_server(mapping)
                if self._status_address is not None:
                    self._start_status()
            except BaseException:
                self.state = "running"
                self.stop(timeout=1.0)
                raise
            if self.close_on_dns_change:
                self._watcher = DnsChangeWatcher(self, self.dns_change_hold)
                self._watcher.start()
            self._housekeeping = threading.Thread(target=self._housekeep,
                                                  name="tcpproxy-housekeeping")
            self._housekeeping.start()
            self.state = "running"
            log.info("tcpproxy %s started: %s", __version__,
                     ", ".join(m.spec for m in self.mappings) or "no mappings yet",
                     extra={"event": "start", "mappings": [m.spec for m in self.mappings]})
        return self

    def apply(self, mappings, timeout=5.0):
        """Make *mappings* the live set: removed mappings stop (their
        sessions are closed), new ones start, a changed target on the same
        listen address and port keeps listening (open connections stay on
        the old target).  Raises ConfigError, changing nothing, when two
        mappings cannot both listen (see listen_conflict), and listing the
        mappings that could not start."""
        mappings = check_unique_ports([(str(m), m) for m in mappings], self.listen_host)
        wanted = {m.key: m for m in mappings}
        failures = {}
        with self._lock:
            if self.state != "running":
                raise ProxyError("proxy is not running")
            deadline = time.monotonic() + timeout
            for port in sorted(set(self._servers) - set(wanted), key=_key_order):
                self._stop_server(port, deadline, "mapping removed")
            for port, mapping in _by_key(wanted.items()):
                server = self._servers.get(port)
                if server is None:
                    try:
                        self._start_server(mapping)
                        _once.clear(("listen", port))
                    except ConfigError as exc:
                        failures[mapping.spec] = _clip(exc)
                        _once.log(logging.ERROR, ("listen", port), "%s", exc)
                elif server.mapping != mapping:
                    log.info("%s: mapping changed: %s -> %s (open connections stay "
                             "on the old target)", port, server.mapping, mapping)
                    server.set_mapping(mapping)
            self.failed_mappings = failures
        if failures:
            raise ConfigError("%d mapping(s) could not start: %s"
                              % (len(failures), "; ".join(failures.values())),
                              failures=failures)

    def stop(self, timeout=5.0, drain=0.0):
        """Stop listening, close every session and join every thread.

        With *drain* > 0, listeners close at once but open connections may
        finish for up to *drain* seconds before they are closed.
        """
        with self._lock:
            if self.state in ("stopped", "new"):
                self.state = "stopped"
                return
            if drain and self.registry.active():
                self.state = "draining"
                log.warning("draining: waiting up to %gs for %d connection(s)",
                            drain, self.registry.active(), extra={"event": "drain"})
                self._stop_accepting_all()
                if not self._drain(drain):
                    log.warning("drain timeout: closing %d connection(s)",
                                self.registry.active())
            self.state = "stopping"
            deadline = time.monotonic() + timeout
            self._stop_accepting_all()
            for port in sorted(self._servers, key=_key_order):
                self._stop_server(port, deadline, "proxy stopping")
            if self._watcher is not None:
                self._watcher.stop(deadline)
            self.resolver.close(max(0.0, deadline - time.monotonic()))
            if self._status_server is not None:
                server, thread = self._status_server
                server.shutdown()
                thread.join(max(0.0, deadline - time.monotonic()))
                server.server_close()
                server.join(deadline)
                self._status_server = None
            if self._housekeeping is not None:
                self._housekeeping_stop.set()
                self._housekeeping.join(max(0.0, deadline - time.monotonic()))
            leftover = self.workers.close(deadline)
            if leftover:
                log.warning("%d worker thread(s) did not end in time: %s", len(leftover),
                            ", ".join(t.name for t in leftover))
            if self.pipes is not None:
                self.pipes.close()
            self.spare.release()
            self.state = "stopped"
            log.info("tcpproxy stopped")

    def end_drain(self):
        """Cut a drain in progress (or the next one) short: stop() then
        closes what is still open at once.  Safe from a signal handler."""
        self._drain_cut.set()

    def _drain(self, drain):
        """Let sessions finish for up to *drain* seconds.  A session is
        closed early only when it is between exchanges (Session.
        between_exchanges: quiet for DRAIN_QUIET seconds after the last
        reply was delivered), such as an idle pooled database connection,
        which never ends by itself; a request still waiting for its reply
        (a running query, a blocking pop) is left alone until the deadline."""
        deadline = time.monotonic() + drain
        while not self._drain_cut.is_set():
            now = time.monotonic()
            for session in self.registry.sessions():
                if session.state == "open" and session.between_exchanges(DRAIN_QUIET, now):
                    log.info("%s: closing %s: idle between exchanges while draining",
                             session.listen_port, _format_hostport(*session.client[:2]))
                    session.abort("idle while draining")
            if now >= deadline:
                return not self.registry.active()
            if self.registry.wait_idle(deadline=min(deadline, now + DRAIN_QUIET / 4)):
                return True
        log.warning("drain cut short")
        return not self.registry.active()

    def _start_status(self):
        host, port = self._status_address
        try:
            server = StatusServer((host, port), self, self._status_allow)
        except OSError as exc:
            raise ConfigError("cannot serve status on %s: %s (another tcpproxy on this "
                              "host? give each its own --status HOST:PORT, or --status off)"
                              % (_format_hostport(host, port), exc.strerror or exc)) from None
        thread = threading.Thread(target=server.serve_forever, name="tcpproxy-status",
                                  kwargs={"poll_interval": SERVE_POLL_INTERVAL})
        thread.start()
        self._status_server = (server, thread)
        self._own(server.server_address[1], server.server_address[0])
        log.info("status on http://%s/status", _format_hostport(*server.server_address[:2]))
        warning = status_exposure(server.server_address[:2], self._status_allow)
        if warning:
            log.warning("%s", warning)

    def _start_server(self, mapping):
        host = mapping.listen_host or self.listen_host
        try:
            server = ProxyServer(mapping, self, host)
        except OSError as exc:
            raise ConfigError("cannot listen on %s for %s: %s" % (
                _format_hostport(host, mapping.listen_port), mapping,
                exc.strerror or exc)) from None
        key = server.key
        thread = threading.Thread(target=server.serve_forever, name="tcpproxy-listen-%s" % key)
        thread.start()
        self._servers[key] = server
        self._server_threads[key] = thread
        self._own(server.port, server.server_address[0])
        log.info("listening on %s for %s", server.listen, mapping)
        return server

    def _stop_server(self, port, deadline, reason):
        server = self._servers.pop(port)
        thread = self._server_threads.pop(port)
        self._own(server.port, server.server_address[0], add=False)
        server.stop_accepting()
        thread.join(max(0.0, deadline - time.monotonic()))
        for session in self.registry.sessions(port):
            session.abort(reason)
        if not self.registry.wait_idle(port, deadline):
            log.warning("%s: %d connection(s) did not end in time", port,
                        self.registry.active(port))
        server.server_close()
        self.registry.forget(port)
        log.info("stopped listening on %s (%s)", port, reason)

    def _stop_accepting_all(self, timeout=5.0):
        """Close every listener: wake them all (stop_accepting() does not
        wait), then join their threads and close their sockets."""
        deadline = time.monotonic() + timeout
        for server in self._servers.values():
            server.stop_accepting()
        for port, server in self._servers.items():
            self._server_threads[port].join(max(0.0, deadline - time.monotonic()))
            server.socket.close()

    def _housekeep(self):
        # One thread for the whole proxy, not a wake-up per listener.
        while not self._housekeeping_stop.wait(REAP_INTERVAL):
            self.workers.reap()


# Backends ####################################################################

class StaticBackend:
    """The ``--connections`` list; nothing to poll."""

    name = "static"
    interval = None

    def __init__(self, options, client=None):
        self.mappings = parse_connections(getattr(options, "connections", None) or (),
                                          **_mapping_options(options))

    def fetch(self):
        return list(self.mappings)

    def describe(self):
        return {}


def load_backend(name, options, client=None):
    """Return a Backend instance for *name* ("static" is built in; the rest
    live in the tcpproxy_backends package)."""
    name = (name or "").strip().lower()
    if not name:
        raise ConfigError("blank backend specified")
    if name == "static":
        return StaticBackend(options)
    if name not in BACKENDS:
        raise ConfigError("unknown backend %r (choose from %s)" % (name, ", ".join(BACKENDS)))
    try:
        module = importlib.import_module("tcpproxy_backends." + name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("tcpproxy_backends"):
            raise BackendError("the %s backend cannot load: %s" % (name, exc)) from None
        raise BackendError(
            "the %s backend lives in the tcpproxy_backends package, which is not "
            "installed: put the tcpproxy_backends folder next to tcpproxy.py, or "
            "pip install 'tcpproxy[%s]'" % (name, "yaml" if name == "file" else "aws")) from None
    return module.Backend(options, client=client) if client is not None else module.Backend(options)


class BackendPoller:
    """A thread that polls a backend and applies its mappings to a Proxy.

    A failed poll, or a rejected configuration (ConfigRejected), keeps the
    mappings in force and is retried with backoff capped at the interval;
    poke() (SIGHUP) polls at once.  A backend may also name mapping keys
    (listen ports, or "IP:PORT": see mapping_key) whose items are invalid
    or in conflict (``backend.held``, with ``backend.problems`` saying
    why): whatever is in force there stays, the rest applies (a None in
    held: nothing is removed).  Every
    error is logged once per change, with a reminder while it lasts.
    """

    def __init__(self, proxy, backend, interval=DEFAULT_POLL_INTERVAL):
        self.proxy = proxy
        self.backend = backend
        self.interval = getattr(backend, "interval", None) or interval
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._thread = None
        self.polls = 0
        self.errors = 0
        self.last_ok = None
        self.last_error = None
        self.rejected = None
        self._next_poll = None
        self._info = {}
        self._problems = {}
        self.applied = threading.Condition()

    def start(self):
        self._thread = threading.Thread(target=self._run, name="tcpproxy-backend-%s"
                                        % self.backend.name)
        self._thread.start()
        return self

    def poke(self):
        """Poll now (SIGHUP): the backend's reload(), if it has one, makes
        it re-read even what looks unchanged."""
        reload = getattr(self.backend, "reload", None)
        if reload is not None:
            reload()
        self._poke.set()

    def stop(self, timeout=5.0):
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poll_once(self):
        """Fetch and apply once; return True on success."""
        now = time.time()
        self.polls += 1
        try:
            mappings = self.backend.fetch()
        except ConfigPending as exc:
            log.debug("backend %s: %s", self.backend.name, exc)
            self._publish(error=self._info.get("error"), rejected=self.rejected,
                          last_poll_failed=self._info.get("last_poll_failed", False))
            return True                   # nothing changes until it settles
        except ConfigRejected as exc:
            return self._record(False, str(exc), rejected=True)
        except ProxyError as exc:
            return self._record(False, "poll failed: %s" % exc)
        except Exception as exc:            # a poller must survive anything
            log.debug("backend %s failed", self.backend.name, exc_info=True)
            return self._record(False, "poll failed: %s: %s" % (exc.__class__.__name__, exc))
        problems = dict(getattr(self.backend, "problems", None) or {})
        mappings = self._hold(mappings, getattr(self.backend, "held", None) or ())
        self._report_problems(problems)
        if set(mappings) != set(self.proxy.mappings):
            log.info("backend %s: applying %s", self.backend.name,
                     ", ".join(m.spec for m in mappings) or "no mappings",
                     extra={"event": "config_applied", "backend": self.backend.name,
                            "mappings": [m.spec for m in mappings]})
        partial = None
        try:
            self.proxy.apply(mappings)
        except ConfigError as exc:
            partial = str(exc)
        self.last_ok = now
        listed = ["%s: %s" % (label, _clip(reason, 200))
                  for label, reason in sorted(problems.items())[:5]]
        if len(problems) > 5:
            listed.append("and %d more" % (len(problems) - 5))
        rejected = "; ".join(listed) or None
        return self._record(True, None, partial=partial, rejected=rejected)

    def _hold(self, mappings, held):
        """*mappings*, with what is in force kept on the *held* mapping keys
        (listen ports, or "IP:PORT", see mapping_key)."""
        if not held:
            return mappings
        current = {m.key: m for m in self.proxy.mappings}
        wanted = {m.key: m for m in mappings if m.key not in held}
        for port in held:
            if port is None:
                for other, mapping in current.items():
                    wanted.setdefault(other, mapping)
            elif port in current:
                wanted[port] = current[port]
        return list(wanted.values())

    def _report_problems(self, problems):
        for label in set(self._problems) - set(problems):
            _once.clear(("problem", label))
            log.info("backend %s: %s is fine again", self.backend.name, label)
        for label, reason in problems.items():
            _once.log(logging.ERROR, ("problem", label), "backend %s: %s: %s",
                      self.backend.name, label, reason)
        self._problems = problems

    def _record(self, ok, error, partial=None, rejected=None):
        key = ("backend", self.backend.name)
        if ok:
            self.rejected = rejected
            if _once.clear(key):
                log.info("backend %s: poll OK again", self.backend.name)
        else:
            self.errors += 1
            self.last_error = error = _clip(error)
            if rejected:
                self.rejected = error
            _once.log(logging.ERROR, key, "backend %s: %s; keeping the configuration in "
                      "force", self.backend.name, error, extra={
                          "event": "config_rejected" if rejected else "backend_error",
                          "backend": self.backend.name, "reason": error})
        self._publish(error=error if not ok else partial, rejected=self.rejected,
                      last_poll_failed=not ok)
        with self.applied:
            self.applied.notify_all()
        return ok

    def _publish(self, **extra):
        info = {"name": self.backend.name, "ok": self.last_ok is not None,
                "polls": self.polls, "errors": self.errors, "interval": self.interval,
                "last_success": self.last_ok,
                "last_poll_ok": self.last_ok and _iso(self.last_ok),
                "last_error": self.last_error, "next_poll": self._next_poll}
        info.update(extra)
        if not info["ok"] and not info.get("error"):
            info["error"] = "no successful poll yet"
        try:
            info.update(self.backend.describe() or {})
        except Exception:                   # reporting must not break polling
            log.debug("backend %s: describe() failed", self.backend.name, exc_info=True)
        self._info = info
        self.proxy.set_backend_state(info)

    def _run(self):
        backoff = 0.0
        while not self._stop.is_set():
            ok = self.poll_once()
            if ok:
                backoff = 0.0
                wait = self.interval
            else:
                backoff = min(max(backoff * 2, 1.0), self.interval)
                wait = backoff
            self._next_poll = _iso(time.time() + wait)
            self.proxy.set_backend_state(dict(self._info, next_poll=self._next_poll))
            self._poke.wait(wait)
            self._poke.clear()


# CLI #########################################################################

EPILOG = """\
examples:
  tcpproxy --connections 8002:db.example.com:5432
  tcpproxy --connections 8002:db.example.com:5432,6380:cache.example.com:6379 --debug 1
  tcpproxy --connections 8002:[2001:db8::10]:5432 --listen-address ::
  tcpproxy --connections 8002:db.example.com:5432 --dns-family prefer-ipv6
  tcpproxy --backend dynamodb --proxy realtime --region us-east-1
  tcpproxy --backend elasticache --elasticache-cluster-id docker-registry --elasticache-port 5000
  tcpproxy --backend file --config mappings.yaml
  tcpproxy check --backend file --config mappings.yaml   (validate, print, bind nothing)
  tcpproxy health                     (exit 0 if the running proxy is healthy)
  tcpproxy dynamodb --help            (manage the DynamoDB table)

status: GET http://127.0.0.1:8001/status and /connections (--status ADDR, env STATUS_ADDRESS)
"""

_OFF = ("off", "none", "no", "false", "")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _arg_type(func):
    """An argparse type from a function raising ValueError or ConfigError:
    argparse then reports "argument --FLAG: MESSAGE" and exits 2."""
    def convert(text):
        try:
            return func(text)
        except (ValueError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = func.__name__
    return convert


def _seconds(text, zero=False):
    """A positive number of seconds (0 too when *zero*), in plain decimal."""
    text = text.strip()
    if not _NUMBER.fullmatch(text) or not (zero or float(text) > 0):
        raise ValueError("%r is not a %s number of seconds" % (
            text, "non-negative" if zero else "positive"))
    return float(text)


def _seconds_or_zero(text):
    return _seconds(text, zero=True)


def _attempts(text):
    value = check_limit(text.strip(), "value")
    if not value:
        raise ValueError("%r is not a whole number of 1 or more" % text)
    return value


def _non_negative_int(text):
    return check_limit(text.strip(), "value")


def _status_address(text):
    if text.strip().lower() in _OFF:
        return None
    return parse_hostport(text, default_host="0.0.0.0" if text.strip().startswith(":")
                          else "127.0.0.1", what="status address")


def _listen_address(text):
    text = text.strip().strip("[]")
    if text in ("", "*"):
        return "0.0.0.0"
    if not _is_ip(text):
        raise ValueError("invalid listen address %r: not an IP address" % text)
    return text


def _resolver_address(text):
    return parse_hostport(text, default_port=53, what="resolver")


def _dns_family(text):
    return check_dns_family(text, "--dns-family") or "auto"


def _backend_name(text):
    name = text.strip().lower()
    if name not in BACKENDS:
        raise ValueError("unknown backend %r (choose from %s)" % (text, ", ".join(BACKENDS)))
    return name


def _debug_level(text):
    if text.strip() not in ("0", "1", "2"):
        raise ValueError("invalid debug level %r: use 0, 1 or 2" % text)
    return int(text)


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line plus a hint."""

    def error(self, message):
        self.exit(2, "%s: error: %s\nTry '%s --help' for more.\n"
                  % (self.prog, message, self.prog))


def build_parser(environ=None):
    """The command line's parser; defaults read *environ* (os.environ)."""
    environ = os.environ if environ is None else environ
    parser = _ArgumentParser(
        prog="tcpproxy", description="A TCP proxy that obeys DNS TTLs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--version", action="version", version="tcpproxy " + __version__)
    add("--connections", action="extend", nargs="+", default=[],
        metavar="[LISTEN_IP:]LPORT:HOST:RPORT",
        help="mappings, separated by commas or spaces; may be repeated.  LISTEN_IP "
             "(IPv6 in brackets: [::1]:8002:db:5432) is the mapping's own listen address "
             "instead of --listen-address, so one port can serve two targets")
    add("--backend", type=_arg_type(_backend_name), default="static",
        help="where mappings come from: %s (default static)" % ", ".join(BACKENDS))
    add("--check", action="store_true",
        help="load the configuration once, print the mappings and exit (binds nothing)")
    add("--status", "--status-address", dest="status",
        default=environ.get("STATUS_ADDRESS") or DEFAULT_STATUS_ADDRESS, metavar="ADDR",
        help="HOST:PORT of /status and /connections, or 'off' (default %s; env "
             "STATUS_ADDRESS)" % DEFAULT_STATUS_ADDRESS)
    add("--status-allow", action="append", default=[], metavar="CIDR",
        help="clients allowed to read the status endpoints besides loopback "
             "(default: anyone who can reach it)")
    add("--listen-address", type=_arg_type(_listen_address), default="0.0.0.0", metavar="IP",
        help="address the mappings listen on unless they name their own (default "
             "0.0.0.0; '::' for dual stack)")
    add("--resolver", action="append", type=_arg_type(_resolver_address), default=[],
        metavar="IP[:PORT]", help="DNS server to ask (repeatable; default: /etc/resolv.conf)")
    add("--dns-timeout", type=_arg_type(_seconds), default=DEFAULT_DNS_TIMEOUT,
        metavar="SECONDS", help="how long one DNS lookup may take (default %g)"
        % DEFAULT_DNS_TIMEOUT)
    add("--connect-timeout", type=_arg_type(_seconds), default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS", help="per upstream address attempt (default %g)"
        % DEFAULT_CONNECT_TIMEOUT)
    # TLS: defaults for every mapping (a YAML or DynamoDB mapping may set its own)
    add("--upstream-tls", action="store_true", default=None,
        help="TLS to the upstream (verified: system CAs or --upstream-ca; the target "
             "name is the SNI and the name checked)")
    add("--upstream-ca", metavar="FILE", help="CA certificates (PEM) to verify upstreams "
        "with, instead of the system's (re-read on change and on SIGHUP)")
    add("--upstream-sni", metavar="NAME", help="server name to send and verify instead of "
        "the target's")
    add("--upstream-cert", metavar="FILE", help="client certificate (PEM) for the upstream "
        "(mutual TLS; re-read on change and on SIGHUP)")
    add("--upstream-key", metavar="FILE", help="its key (default: in --upstream-cert)")
    add("--tls-cert", metavar="FILE", help="serve clients TLS with this certificate chain "
        "(PEM; re-read on change and on SIGHUP)")
    add("--tls-key", metavar="FILE", help="its key (default: in --tls-cert)")
    add("--close-on-dns-change", action="store_true",
        help="close connections whose upstream address left the DNS answer")
    add("--connect-deadline", type=_arg_type(_seconds), default=None,
        metavar="SECONDS", help="for all attempts to connect one client together "
        "(default twice --connect-timeout)")
    add("--connect-attempts", type=_arg_type(_attempts), default=DEFAULT_CONNECT_ATTEMPTS,
        metavar="N", help="upstream addresses tried per client at most (default %d)"
        % DEFAULT_CONNECT_ATTEMPTS)
    add("--dns-min-ttl", type=_arg_type(_seconds_or_zero), default=0, metavar="SECONDS",
        help="keep a DNS answer at least this long (default 0: its TTL)")
    add("--dns-max-ttl", type=_arg_type(_seconds_or_zero), default=DEFAULT_DNS_MAX_TTL,
        metavar="SECONDS", help="keep a DNS answer at most this long (default %d)"
        % DEFAULT_DNS_MAX_TTL)
    add("--dns-family", type=_arg_type(_dns_family), default=None, metavar="FAMILY",
        help="address records to use: auto (A then AAAA, as DNS gives them), ipv4 or "
             "ipv6 (A or AAAA only), prefer-ipv4 or prefer-ipv6 (both, that family "
             "tried first); a YAML or DynamoDB mapping may set its own dns_family "
             "(default auto)")
    add("--dns-change-hold", type=_arg_type(_seconds_or_zero), default=None,
        metavar="SECONDS", help="--close-on-dns-change closes a connection once its "
        "address has been out of the answer this long (default: the TTL, at least %g)"
        % DNS_CHANGE_HOLD_MIN)
    add("--allow", action="append", default=[], metavar="CIDR",
        help="only these clients may connect (repeatable; default: anyone)")
    add("--max-connections", type=_arg_type(_non_negative_int), default=0, metavar="N",
        help="at most N concurrent clients in all (default 0: no limit)")
    add("--idle-timeout", type=_arg_type(_seconds), default=None, metavar="SECONDS",
        help="close connections with no traffic either way for this long (default off)")
    add("--send-proxy", type=_arg_type(check_proxy_version), default="", metavar="{v1,v2}",
        help="send a PROXY protocol header naming the client to the upstreams of the "
             "--connections mappings (default off)")
    add("--accept-proxy", action="store_true",
        help="the --connections mappings' clients must start with a PROXY protocol v1 or "
             "v2 header (from a load balancer); the allow lists see the client it names")
    add("--accept-proxy-from", action="append", default=[], metavar="CIDR",
        help="only these peers may send PROXY headers (repeatable; default: anyone)")
    add("--drain-timeout", type=_arg_type(_seconds_or_zero),
        default=DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
        help="on SIGTERM, let open connections finish for up to this long; a second "
             "signal ends the drain at once (default %g)" % DEFAULT_DRAIN_TIMEOUT)
    add("--cpus", type=_arg_type(parse_cpus), default=environ.get("TCPPROXY_CPUS", "auto"),
        metavar="LIST", help="CPUs to run on: auto (one CPU: the fastest for a Python "
        "proxy), all (no binding) or a list such as 1 or 0,2-3 (default auto; env "
        "TCPPROXY_CPUS)")
    add("--debug", type=_arg_type(_debug_level), default=0, metavar="{0,1,2}",
        help="0 warnings and errors, 1 adds connections, DNS and config changes, 2 everything")
    add("--log-format", choices=("text", "json"),
        default=environ.get("TCPPROXY_LOG_FORMAT", "text"),
        help="text (default) or json: one object per line (env TCPPROXY_LOG_FORMAT)")
    aws = parser.add_argument_group("backends")
    aws.add_argument("--proxy", help="proxy name (dynamodb: the items' proxy_name)")
    aws.add_argument("--dynamodb", default="classic-proxy", metavar="TABLE",
                     help="DynamoDB table (default classic-proxy)")
    aws.add_argument("--region", default=None,
                     help="AWS region (default: the AWS configuration chain)")
    aws.add_argument("--elasticache-cluster-id", metavar="ID")
    aws.add_argument("--elasticache-port", type=_arg_type(check_port), metavar="PORT",
                     help="local port that forwards to the cluster's node")
    aws.add_argument("--config", metavar="FILE", help="YAML mappings file (--backend file)")
    aws.add_argument("--config-max-bytes", type=_arg_type(
        lambda t: check_limit(t, "--config-max-bytes") or 1), default=None, metavar="N",
        help="a larger --config file is rejected (default 1 MiB)")
    aws.add_argument("--poll-interval", type=_arg_type(_seconds),
                     default=DEFAULT_POLL_INTERVAL, metavar="SECONDS",
                     help="backend poll interval (default %g)" % DEFAULT_POLL_INTERVAL)
    return parser


def _normalise_argv(argv, parser):
    """Accept the original Go tool's single-dash long flags (``-debug 2``)."""
    longs = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    out = []
    for arg in argv:
        if re.match(r"^-[a-z][a-z-]+(=|$)", arg) and "-" + arg.split("=", 1)[0] in longs:
            arg = "-" + arg
        out.append(arg)
    return out


def parse_args(argv=None, environ=None):
    """Parse and check the command line; a bad value exits 2 with one line
    naming the flag."""
    parser = build_parser(environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_normalise_argv(argv, parser))
    try:
        args.status_address = _status_address(args.status)
    except (ValueError, ConfigError) as exc:
        parser.error("argument --status: %s" % exc)
    try:
        args.mappings = parse_connections(args.connections, args.listen_address,
                                          **_mapping_options(args))
    except ConfigError as exc:
        parser.error("argument --connections: %s" % exc)
    try:
        args.allow_networks = parse_allow(args.allow or None, "--allow")
        args.status_allow_networks = parse_allow(args.status_allow or None, "--status-allow")
        args.accept_proxy_from_networks = parse_allow(args.accept_proxy_from or None,
                                                      "--accept-proxy-from")
    except ConfigError as exc:
        parser.error(str(exc))
    try:                                                   # TLS
        args.tls = check_tls({name: getattr(args, name) for name in TLS_FIELDS})
    except ConfigError as exc:
        parser.error("argument --%s" % str(exc).replace("_", "-"))
    if isinstance(args.cpus, set) and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        if not args.cpus & allowed:
            parser.error("argument --cpus: %s: this process may only use CPUs %s" % (
                ",".join(map(str, sorted(args.cpus))), ",".join(map(str, sorted(allowed)))))
    if args.backend == "static" and not args.mappings:
        parser.error("the static backend needs --connections LPORT:HOST:RPORT")
    if args.backend != "static" and args.mappings:
        parser.error("--connections is for the static backend, not %s" % args.backend)
    if args.backend != "static" and (args.send_proxy or args.accept_proxy):
        parser.error("--send-proxy and --accept-proxy are for --connections; with the %s "
                     "backend set send_proxy / accept_proxy per mapping" % args.backend)
    return args


def _mapping_options(args):
    """The Mapping options that the command line gives every --connections
    mapping (PROXY protocol, --dns-family)."""
    return {"send_proxy": getattr(args, "send_proxy", ""),
            "accept_proxy": getattr(args, "accept_proxy", False),
            "dns_family": getattr(args, "dns_family", None)}


def _raise_nofile_limit():
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("raised the descriptor limit from %d to %d", soft, hard)
    except (ImportError, ValueError, OSError) as exc:
        log.debug("cannot raise the descriptor limit: %s", exc)


class _Signals:
    """SIGTERM/SIGINT ask for a stop; a second one ends the drain at once
    (Proxy.end_drain()); SIGHUP asks for a reload.  The handlers only set
    events, never raise: a burst of signals at any moment (start, run,
    drain, stop) cannot interrupt stop() half-way."""

    def __init__(self):
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.proxy = None

    def install(self):
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum, frame):
        if self.stop.is_set() and self.proxy is not None:
            self.proxy.end_drain()
        self.stop.set()

    def _on_hup(self, signum, frame):
        self.reload.set()


class _SystemdNotifier:
    """The sd_notify protocol, when systemd set NOTIFY_SOCKET (a path, or
    an abstract socket name starting with '@'): READY=1, RELOADING=1,
    STOPPING=1, STATUS=... and WATCHDOG=1 every half WATCHDOG_USEC."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or ""
        self.address = "\0" + address[1:] if address.startswith("@") else address
        try:
            usec = int(environ.get("WATCHDOG_USEC") or 0)
            pid = int(environ.get("WATCHDOG_PID") or os.getpid())
        except ValueError:
            usec, pid = 0, 0
        self.watchdog = usec / 2e6 if usec > 0 and pid == os.getpid() else None
        self._next_ping = 0.0

    def notify(self, *lines):
        if not self.address or not hasattr(socket, "AF_UNIX"):
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall("\n".join(lines).encode("utf-8", "replace"))
        except OSError as exc:
            _ratelimited.log(logging.WARNING, "sd_notify", "cannot notify systemd at %r: %s",
                             self.address, exc)

    def ping(self):
        """WATCHDOG=1, when it is due."""
        now = time.monotonic()
        if self.watchdog is not None and now >= self._next_ping:
            self._next_ping = now + self.watchdog
            self.notify("WATCHDOG=1")

    def wait(self, default):
        """How long the main loop may sleep."""
        return min(default, self.watchdog) if self.watchdog is not None else default


def _fail(message, status=2):
    """Report a startup error as the command line does; return *status*."""
    sys.stderr.write("tcpproxy: error: %s\n" % message)
    sys.stderr.flush()
    return status


class JsonFormatter(logging.Formatter):
    """--log-format json: one JSON object per line with stable keys: ts
    (RFC 3339, UTC), level, logger, thread, msg, and the event's fields
    where it has them (event: start, session_open, session_close,
    dns_change, config_applied, config_rejected, backend_error, drain,
    stop; mapping, client, upstream, target, session, bytes_up,
    bytes_down, duration_s, reason, host, old, new, ttl, backend,
    mappings), plus exc with a traceback."""

    FIELDS = ("event", "mapping", "client", "upstream", "target", "session", "bytes_up",
              "bytes_down", "duration_s", "reason", "host", "old", "new", "ttl", "backend",
              "mappings")

    def format(self, record):
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + ".%03dZ" % (record.msecs % 1000),
               "level": record.levelname, "logger": record.name,
               "thread": record.threadName, "msg": record.getMessage()}
        for key in self.FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _setup_logging(debug, log_format="text"):
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(threadName)s: %(message)s"))
    logging.basicConfig(level=DEBUG_LEVELS[debug], handlers=[handler])
    # boto3 and botocore log credential lookups and retries at INFO: only
    # at --debug 2.
    for name in ("boto3", "botocore", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug >= 2 else logging.WARNING)


def _summary(proxy):
    return "%d mapping(s), %d connection(s)%s" % (
        len(proxy.servers), proxy.registry.active(),
        " (draining)" if proxy.state == "draining" else "")


def main(argv=None):
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dynamodb":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            from tcpproxy_backends import dynamodb
        except ImportError as exc:
            return _fail("the dynamodb helper is not installed (put the tcpproxy_backends "
                         "folder next to tcpproxy.py, or pip install 'tcpproxy[aws]'): %s"
                         % exc)
        return dynamodb.cli(argv[1:])
    if argv and argv[0] == "health":
        return health(argv[1:])
    check = bool(argv) and argv[0] == "check"
    signals = _Signals()
    if not check:
        signals.install()          # first: a signal at any later moment exits cleanly
    args = parse_args(argv[1:] if check else argv)
    if check or args.check:
        return check_config(args)
    _setup_logging(args.debug, args.log_format)
    _raise_nofile_limit()
    try:
        cpus = pin_cpus(args.cpus)
    except ConfigError as exc:
        return _fail(exc)
    if cpus:
        log.info("running on CPU %s", ",".join(map(str, sorted(cpus))))
    try:
        threading.stack_size(THREAD_STACK_SIZE)
    except (ValueError, RuntimeError):
        pass
    # Thousands of threads waking at once (every client sending, or closing)
    # each wait for the GIL with a timeout of the switch interval; at the
    # default 5 ms their timeouts alone burn the CPU.  Pumps release the GIL
    # at every syscall, so a longer interval costs them nothing.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        status = _serve(args, signals)
    finally:
        # Done: a late signal must not kill the exiting process (Python
        # puts the default handlers back while it finalizes).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logging.shutdown()
    leftover = [t for t in threading.enumerate()
                if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if leftover:      # never hang in interpreter shutdown waiting for them
        sys.stderr.write("tcpproxy: %d thread(s) did not end: exiting anyway\n" % len(leftover))
        sys.stderr.flush()
        os._exit(status)
    return status


def _serve(args, signals):
    """Run the proxy until a signal; return the exit status."""
    notifier = _SystemdNotifier()
    proxy = poller = None
    try:
        resolver = Resolver(args.resolver or None, timeout=args.dns_timeout,
                            min_ttl=args.dns_min_ttl, max_ttl=args.dns_max_ttl,
                            family=args.dns_family or "auto")
        backend = load_backend(args.backend, args)
        proxy = Proxy(backend.fetch() if args.backend == "static" else (),
                      listen_host=args.listen_address, resolver=resolver,
                      connect_timeout=args.connect_timeout,
                      close_on_dns_change=args.close_on_dns_change, name=args.proxy,
                      status_address=args.status_address,
                      status_allow=args.status_allow_networks,
                      backend_info={"name": "static", "ok": True} if args.backend == "static" else {
                          "name": args.backend, "ok": False,
                          "error": "no successful poll yet"},
                      idle_timeout=args.idle_timeout, allow=args.allow_networks,
                      max_connections=args.max_connections, tls=args.tls,
                      accept_proxy_from=args.accept_proxy_from_networks,
                      connect_deadline=args.connect_deadline,
                      connect_attempts=args.connect_attempts,
                      dns_change_hold=args.dns_change_hold)
        signals.proxy = proxy
        if not signals.stop.is_set():
            proxy.start()
            if args.backend != "static":
                poller = BackendPoller(proxy, backend, args.poll_interval).start()
            notifier.notify("READY=1", "STATUS=" + _summary(proxy))
        while not signals.stop.wait(notifier.wait(1.0 if poller is None else 0.5)):
            notifier.ping()
            if signals.reload.is_set():
                signals.reload.clear()
                proxy.tls.reload()                         # TLS: certificates
                _reload(poller, notifier, args.backend)
                notifier.notify("READY=1", "STATUS=" + _summary(proxy))
        log.warning("stopping (signal received)", extra={"event": "stop"})
        notifier.notify("STOPPING=1", "STATUS=draining " + _summary(proxy))
        if poller is not None:
            poller.stop()
            poller = None
        proxy.stop(timeout=2.0, drain=args.drain_timeout)
        return 0
    except ConfigError as exc:
        return _fail(exc)
    except ProxyError as exc:
        return _fail(exc, 1)
    finally:
        if poller is not None:
            poller.stop()
        if proxy is not None:
            proxy.stop(timeout=2.0)


def _reload(poller, notifier, backend):
    """SIGHUP: poll the backend now and wait (briefly) for it to apply."""
    notifier.notify("RELOADING=1", "MONOTONIC_USEC=%d" % (time.monotonic() * 1e6))
    if poller is None:
        log.info("SIGHUP: the static backend has nothing to reload")
        return
    log.info("SIGHUP: polling the %s backend now", backend)
    polls = poller.polls
    poller.poke()
    with poller.applied:
        poller.applied.wait_for(lambda: poller.polls > polls, 10.0)


def check_config(args):
    """``tcpproxy check [flags]`` (or ``--check``): load the configured
    backend once and print the mappings it would serve, with their TLS
    settings (whose files are loaded, as the proxy would); bind nothing.
    Returns 0, or 2 with the same error lines the proxy would log."""
    logging.basicConfig(level=logging.ERROR if args.debug == 0 else DEBUG_LEVELS[args.debug],
                        format="tcpproxy: %(levelname)s: %(message)s")
    try:
        backend = load_backend(args.backend, args)
        if hasattr(backend, "settle"):
            backend.settle = 0.0         # read the file as it is now
        mappings = backend.fetch()
        problems = getattr(backend, "problems", None) or {}
        check_unique_ports([(m.spec, m) for m in mappings], args.listen_address)
    except ProxyError as exc:
        return _fail(exc)
    problems = dict(problems)
    tls = TlsContexts(args.tls)
    for mapping in sorted(mappings, key=lambda m: _key_order(m.key)):
        extra = []
        if mapping.allow:
            extra.append("allow=" + ",".join(map(str, mapping.allow)))
        if mapping.max_connections:
            extra.append("max_connections=%d" % mapping.max_connections)
        if mapping.send_proxy:
            extra.append("send_proxy=" + mapping.send_proxy)
        if mapping.accept_proxy:
            extra.append("accept_proxy=true")
        if mapping.dns_family:
            extra.append("dns_family=" + mapping.dns_family)
        settings = tls.settings(mapping)                   # TLS
        extra.extend(_tls_check_fields(mapping, settings))
        try:
            tls.settings(mapping, load=True)
        except ConfigError as exc:
            problems[mapping.spec] = str(exc)
        sys.stdout.write(" ".join([mapping.spec] + extra) + "\n")
    for label, reason in sorted(problems.items()):
        sys.stderr.write("tcpproxy: error: %s: %s\n" % (label, reason))
    sys.stdout.write("%s backend: %d mapping(s)%s\n" % (
        args.backend, len(mappings), ", %d problem(s)" % len(problems) if problems else ""))
    return 2 if problems else 0


def _tls_check_fields(mapping, settings):
    """What ``check`` prints of a mapping's TLS *settings* (none for plain
    TCP): origination on or off with its CA, server name and client
    certificate; termination's certificate and key."""
    if settings is None:
        return []
    out = ["upstream_tls=%s" % ("on" if settings.upstream_tls else "off")]
    if settings.upstream_tls:
        out.append("upstream_ca=%s" % (settings.upstream_ca or "system"))
        out.append("upstream_sni=%s" % (settings.upstream_sni or mapping.host))
        if settings.upstream_cert:
            out.append("upstream_cert=%s" % settings.upstream_cert)
        if settings.upstream_key:
            out.append("upstream_key=%s" % settings.upstream_key)
    if settings.tls_cert:
        out.append("tls_cert=%s" % settings.tls_cert)
        out.append("tls_key=%s" % (settings.tls_key or settings.tls_cert))
    return out


def health(argv):
    """``tcpproxy health``: exit 0 when the running proxy is healthy, 1
    when not (2 on bad flags).  It finds the status address as the proxy
    does (--status, then STATUS_ADDRESS, then the default), reading the
    proxy's own command line and environment from /proc/PID (PID 1 by
    default: the container's entry point) so that ``--status :9001`` on
    the proxy's command line is obeyed.  With ``--status off`` it checks
    that the process lives and, for --connections, listens on every port.
    """
    parser = _ArgumentParser(prog="tcpproxy health", description=health.__doc__.split(
        "\n\n")[0].replace("``", ""))
    parser.add_argument("--status", metavar="ADDR",
                        help="the status address to check (default: the proxy's own)")
    parser.add_argument("--pid", type=_arg_type(lambda t: check_limit(t, "--pid")),
                        default=None, help="the proxy's process (default 1 when it is "
                        "tcpproxy)")
    parser.add_argument("--timeout", type=_arg_type(_seconds), default=4.0,
                        metavar="SECONDS", help="how long to wait for /status (default 4)")
    opts = parser.parse_args(argv)
    pid, their_argv, their_env = _find_proxy(opts.pid)
    if opts.pid and pid is None:
        sys.stdout.write("unhealthy: no tcpproxy process %d\n" % opts.pid)
        return 1
    if opts.status is not None:
        target = argparse.Namespace(status_address=None, mappings=[], backend="static")
        try:
            target.status_address = _status_address(opts.status)
        except ConfigError as exc:
            parser.error("argument --status: %s" % exc)
    else:
        try:
            with open(os.devnull, "w") as devnull:   # their flags' errors are not ours
                stderr, sys.stderr = sys.stderr, devnull
                try:
                    target = parse_args(their_argv or [], their_env)
                finally:
                    sys.stderr = stderr
        except SystemExit:
            target = argparse.Namespace(status_address=_status_address(
                their_env.get("STATUS_ADDRESS") or DEFAULT_STATUS_ADDRESS),
                mappings=[], backend="static")
    if target.status_address is None:
        return _health_without_status(pid, target)
    host, port = target.status_address
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = "http://%s/status" % _format_hostport(host, port)
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=opts.timeout) as response:
            body = response.read(512).decode("utf-8", "replace").strip()
            sys.stdout.write("healthy: %s answered %d %s\n" % (url, response.status, body))
            return 0
    except urllib.error.HTTPError as exc:
        body = exc.read(512).decode("utf-8", "replace").strip()
        sys.stdout.write("unhealthy: %s answered %d %s\n" % (url, exc.code, body))
    except (OSError, ValueError) as exc:
        sys.stdout.write("unhealthy: %s: %s\n" % (url, getattr(exc, "reason", exc)))
    return 1


def _find_proxy(pid):
    """(pid, argv, environ) of the running proxy: *pid*, or PID 1 when it
    runs tcpproxy; (None, None, os.environ) when there is none."""
    for candidate in ([pid] if pid else [1]):
        try:
            with open("/proc/%d/cmdline" % candidate, "rb") as f:
                words = [w.decode("utf-8", "replace") for w in f.read().split(b"\0") if w]
            with open("/proc/%d/environ" % candidate, "rb") as f:
                environ = dict(w.decode("utf-8", "replace").partition("=")[::2]
                               for w in f.read().split(b"\0") if w)
        except OSError:
            continue
        for index, word in enumerate(words):
            if os.path.basename(word) in ("tcpproxy", "tcpproxy.py"):
                return candidate, words[index + 1:], environ
            if word == "-m" and words[index + 1:index + 2] == ["tcpproxy"]:
                return candidate, words[index + 2:], environ
    return None, None, os.environ


def _health_without_status(pid, target):
    if pid is None:
        sys.stdout.write("unhealthy: the status endpoint is off and no tcpproxy process "
                         "was found (use --pid)\n")
        return 1
    if not os.path.exists("/proc/%d" % pid):
        sys.stdout.write("unhealthy: process %d is gone\n" % pid)
        return 1
    wanted = {m.listen_port for m in target.mappings}
    listening = _listening_ports(pid)
    missing = sorted(wanted - listening)
    if missing:
        sys.stdout.write("unhealthy: process %d does not listen on %s\n"
                         % (pid, ", ".join(map(str, missing))))
        return 1
    sys.stdout.write("healthy: process %d listens on %s (status endpoint off)\n"
                     % (pid, ", ".join(map(str, sorted(listening))) or "no port yet"))
    return 0


def _listening_ports(pid):
    """The TCP ports that process *pid* listens on, from /proc."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, table)) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


if __name__ == "__main__":
    # Run as a script, this module is __main__; backends import "tcpproxy".
    # Make both names one module so that they raise the classes main() catches.
    sys.modules.setdefault("tcpproxy", sys.modules[__name__])
    sys.exit(main())
