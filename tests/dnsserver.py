"""A loopback DNS nameserver for tests, built on dnspython.

Modelled on dnspython's ``tests/nanonameserver.py``: the UDP and TCP sockets
are bound in ``__enter__`` before the serving thread starts (so there is no
race with a client that queries at once), and ``__exit__`` wakes the thread
through a socketpair and joins it.

Usage::

    with DNSServer() as dns_server:
        dns_server.set("db.example.test", ["127.0.0.2"], ttl=1)
        dns_server.set("alias.example.test", ttl=5, cname="db.example.test")
        resolver_flag = dns_server.nameserver          # "127.0.0.1:PORT"
        ...
        dns_server.mode = "timeout"                    # drop every query
        assert dns_server.wait_queries(3, "db.example.test", timeout=5)

Records live in one dict guarded by one lock; tests change them while the
server runs.  Every answer is authoritative (AA).  A name that is not set gives
NXDOMAIN; a set name without records of the asked type gives NOERROR with no
answer.  Both negative answers carry an SOA whose TTL and minimum are
``negative_ttl`` (1 s by default), so a caching resolver retries soon.

Every received query is counted per (name, type) and logged with its time and
what was answered; ``wait_queries()`` blocks on a condition variable until the
N-th query for a name arrives, or a timeout.
"""

import collections
import heapq
import ipaddress
import itertools
import selectors
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DNSServer", "QueryRecord"]

MODES = ("ok", "servfail", "refused", "timeout", "nxdomain")

QueryRecord = collections.namedtuple(
    "QueryRecord", "monotonic wall name rdtype transport mode rcode addresses"
)
"""One received query: when, for what, and what was answered (rcode None when
the query was dropped, ``addresses`` the A/AAAA values in the answer)."""

_Entry = collections.namedtuple("_Entry", "addresses ttl cname")


def _name(name):
    if isinstance(name, dns.name.Name):
        return name
    return dns.name.from_text(name)


def _rdtype(rdtype):
    if rdtype is None:
        return None
    if isinstance(rdtype, str):
        return dns.rdatatype.from_text(rdtype)
    return dns.rdatatype.RdataType.make(rdtype)


class DNSServer:
    """Threaded UDP+TCP nameserver on one loopback port.

    Methods for the caller:
      set(name, addresses=(), ttl=60, cname=None)  add or replace a name
      remove(name)                                 the name becomes NXDOMAIN
      mode = "ok"|"servfail"|"refused"|"timeout"|"nxdomain"
      delay = seconds                              hold every answer that long
      queries(name=None, rdtype=None) -> int
      wait_queries(n, name=None, rdtype=None, timeout=5.0) -> bool
      history(name=None) -> [QueryRecord]
      address -> ("127.0.0.1", port); nameserver -> "127.0.0.1:port"
    """

    def __init__(self, host="127.0.0.1", negative_ttl=1):
        self.host = host
        self.negative_ttl = negative_ttl
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self._records = {}
        self._counts = collections.Counter()
        self._history = []
        self._mode = "ok"
        self.delay = 0.0
        self.udp = None
        self.tcp = None
        self.port = None
        self._thread = None
        self._wake_r = None
        self._wake_w = None
        self.errors = []  # exceptions raised while handling a query

    # -- records ---------------------------------------------------------

    def set(self, name, addresses=(), ttl=60, cname=None):
        """Make ``name`` answer ``addresses`` (A for IPv4, AAAA for IPv6)
        with ``ttl``; or, with ``cname``, make it a CNAME to that name whose
        own TTL is ``ttl`` (then ``addresses`` must be empty)."""
        if isinstance(addresses, str):
            addresses = [addresses]
        addresses = tuple(str(ipaddress.ip_address(a)) for a in addresses)
        if cname is not None and addresses:
            raise ValueError("a CNAME owner has no other records")
        entry = _Entry(addresses, int(ttl), _name(cname) if cname is not None else None)
        with self.lock:
            self._records[_name(name)] = entry

    def remove(self, name):
        """Forget ``name``: queries for it get NXDOMAIN."""
        with self.lock:
            self._records.pop(_name(name), None)

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, value):
        if value not in MODES:
            raise ValueError("mode must be one of %s, not %r" % (MODES, value))
        with self.lock:
            self._mode = value

    # -- observation -----------------------------------------------------

    def queries(self, name=None, rdtype=None):
        """Number of queries received (for ``name``, of ``rdtype``)."""
        with self.lock:
            return self._count(name, rdtype)

    def _count(self, name, rdtype):
        name = _name(name) if name is not None else None
        rdtype = _rdtype(rdtype)
        return sum(
            c for (n, t), c in self._counts.items()
            if (name is None or n == name) and (rdtype is None or t == rdtype)
        )

    def wait_queries(self, n, name=None, rdtype=None, timeout=5.0):
        """Block until at least ``n`` queries (for ``name``/``rdtype``) have
        been received; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._count(name, rdtype) >= n, timeout=timeout
            )

    def history(self, name=None):
        """Copy of the query log (for ``name``)."""
        name = _name(name) if name is not None else None
        with self.lock:
            return [q for q in self._history if name is None or q.name == name]

    def reset_counts(self):
        with self.lock:
            self._counts.clear()
            self._history.clear()

    @property
    def address(self):
        return (self.host, self.port)

    @property
    def nameserver(self):
        """The ``IP:PORT`` string for ``--resolver`` / ``Resolver([...])``."""
        return "%s:%d" % (self.host, self.port)

    # -- life cycle ------------------------------------------------------

    def __enter__(self):
        self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(
            target=self._serve, name="DNSServer-%d" % self.port
        )
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self, timeout=5.0):
        if self._wake_w is not None:
            self._wake_w.close()
            self._wake_w = None
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "DNS server thread did not stop"
            self._thread = None
        for s in (self._wake_r, self.udp, self.tcp):
            if s is not None:
                s.close()
        self._wake_r = self.udp = self.tcp = None

    def _bind(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            self.udp, self.tcp, self.port = udp, tcp, port
            return
        raise OSError("no port free for both UDP and TCP")

    # -- serving ---------------------------------------------------------

    def _serve(self):
        sel = selectors.DefaultSelector()
        self.udp.setblocking(False)
        self.tcp.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(self.udp, selectors.EVENT_READ, "udp")
        sel.register(self.tcp, selectors.EVENT_READ, "accept")
        streams = {}          # socket -> bytearray of unparsed input
        pending = []          # heap of (due, seq, kind, target, wire)
        seq = itertools.count()
        try:
            while True:
                timeout = None
                if pending:
                    timeout = max(0.0, pending[0][0] - time.monotonic())
                events = sel.select(timeout)
                now = time.monotonic()
                while pending and pending[0][0] <= now:
                    _, _, kind, target, wire = heapq.heappop(pending)
                    self._send(kind, target, wire, streams)
                for key, _ in events:
                    what = key.data
                    if what == "wake":
                        return
                    if what == "udp":
                        try:
                            wire, peer = self.udp.recvfrom(65535)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            continue
                        out = self._handle_wire(wire, "udp")
                        if out is not None:
                            self._queue(pending, seq, "udp", peer, out, streams)
                    elif what == "accept":
                        try:
                            conn, _ = self.tcp.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        conn.setblocking(False)
                        streams[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ, "tcp")
                    else:
                        conn = key.fileobj
                        try:
                            data = conn.recv(65535)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            sel.unregister(conn)
                            streams.pop(conn, None)
                            conn.close()
                            continue
                        buf = streams[conn]
                        buf += data
                        while len(buf) >= 2:
                            (length,) = struct.unpack("!H", buf[:2])
                            if len(buf) < 2 + length:
                                break
                            wire = bytes(buf[2:2 + length])
                            del buf[:2 + length]
                            out = self._handle_wire(wire, "tcp")
                            if out is not None:
                                self._queue(pending, seq, "tcp", conn,
                                            struct.pack("!H", len(out)) + out, streams)
        finally:
            for conn in list(streams):
                conn.close()
            sel.close()

    def _queue(self, pending, seq, kind, target, wire, streams):
        delay = self.delay
        if delay:
            heapq.heappush(pending, (time.monotonic() + delay, next(seq), kind, target, wire))
        else:
            self._send(kind, target, wire, streams)

    def _send(self, kind, target, wire, streams):
        try:
            if kind == "udp":
                self.udp.sendto(wire, target)
            elif target in streams:
                target.setblocking(True)
                target.settimeout(2.0)
                try:
                    target.sendall(wire)
                finally:
                    target.setblocking(False)
        except OSError:
            pass

    def _handle_wire(self, wire, transport):
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - not a DNS message: no answer
            return None
        try:
            response, record = self._respond(query, transport)
        except Exception as exc:  # noqa: BLE001 - a bug in the test server: SERVFAIL, keep it
            self.errors.append(exc)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            record = None
        with self._changed:
            if record is not None:
                self._counts[(record.name, record.rdtype)] += 1
                self._history.append(record)
            self._changed.notify_all()
        if response is None:
            return None
        return response.to_wire()

    def _soa(self):
        soa = dns.rrset.from_text(
            dns.name.root, self.negative_ttl, "IN", "SOA",
            "ns.test. hostmaster.test. 1 3600 600 86400 %d" % self.negative_ttl,
        )
        return soa

    def _respond(self, query, transport):
        """Return (response or None to drop, QueryRecord)."""
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self.lock:
            mode = self._mode
            records = dict(self._records)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        addresses = ()
        if mode == "timeout":
            response = None
        elif mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif mode == "refused":
            response.set_rcode(dns.rcode.REFUSED)
        elif mode == "nxdomain":
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        else:
            addresses = self._fill(response, qname, qtype, records)
        rcode = response.rcode() if response is not None else None
        now = time.monotonic()
        record = QueryRecord(now, time.time(), qname, qtype, transport, mode, rcode, addresses)
        return response, record

    def _fill(self, response, qname, qtype, records):
        name = qname
        seen = set()
        while True:
            entry = records.get(name)
            if entry is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa())
                return ()
            if entry.cname is not None:
                rrset = response.find_rrset(
                    response.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME,
                    create=True,
                )
                rrset.update_ttl(entry.ttl)
                rrset.add(dns.rdata.from_text("IN", "CNAME", entry.cname.to_text()), entry.ttl)
                if qtype == dns.rdatatype.CNAME or name in seen:
                    return ()
                seen.add(name)
                name = entry.cname
                continue
            if qtype == dns.rdatatype.A:
                values = [a for a in entry.addresses if ":" not in a]
            elif qtype == dns.rdatatype.AAAA:
                values = [a for a in entry.addresses if ":" in a]
            else:
                values = []
            if not values:
                response.authority.append(self._soa())
                return ()
            rrset = dns.rrset.from_text_list(
                name, entry.ttl, "IN", dns.rdatatype.to_text(qtype), values
            )
            response.answer.append(rrset)
            return tuple(values)
