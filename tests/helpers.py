"""Loopback test servers and helpers shared by the tests.

Everything binds port 0 (or a port from ``free_port()``) on loopback, every
thread is named, kept and joined, and every wait is on an event, a socket or
a condition with a timeout.  ``wait_until()`` polls a condition that no event
reports (a subprocess's thread count, a port in /proc/net/tcp) and raises
AssertionError when it is not met in time.
"""

import contextlib
import errno
import hashlib
import http.client as httplib
import inspect
import ipaddress
import json
import os
import queue
import random
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TCPPROXY = REPO / "tcpproxy.py"

LOOP4 = "127.0.0.1"


# -- small utilities ---------------------------------------------------------

def wait_until(predicate, timeout=10.0, interval=0.02, message=None):
    """Poll ``predicate`` until it returns a true value; return that value.

    Between checks it waits on an Event that nothing sets (a bounded pause
    between polls, not a sleep standing in for synchronisation).  At the
    deadline it raises AssertionError: ``message`` (a string or any object,
    or a callable returning one, called only then), or else the condition's
    source, with the predicate's last value.  ``assert wait_until(...)``
    reads the same."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            if callable(message):
                message = message()
            if message is None:
                message = "condition not met: %s" % _source(predicate)
            raise AssertionError("%s\n(not met within %.1f s; last value %r)"
                                 % (message, timeout, value))
        pause.wait(min(interval, left))


def _source(func):
    """The source text of ``func`` on one line (for a lambda: its line)."""
    try:
        text = " ".join(inspect.getsource(func).split())
    except (OSError, TypeError):
        return repr(func)
    return text if len(text) <= 200 else text[:197] + "..."


def _port_candidates():
    """Ports 10000-65535 outside the ephemeral range (where outgoing
    connections take their local ports), in a fixed shuffled order."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    ports = [port for port in range(10000, 65536) if not low <= port <= high]
    random.shuffle(ports)
    return ports


_PORTS = _port_candidates()
_port_cursor = 0
_port_lock = threading.Lock()


def free_ports(n, host=LOOP4):
    """``n`` distinct TCP ports free on ``host`` a moment ago (held open
    together while choosing).  They come from outside the ephemeral range,
    so that no outgoing connection (a probe of this suite's, a client's)
    takes one as its local port before the server under test binds it,
    and no port is handed out twice until all have been."""
    global _port_cursor
    if n > 1:
        raise_nofile(n + 1000)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    held = []
    try:
        with _port_lock:
            for _ in range(len(_PORTS)):
                port = _PORTS[_port_cursor]
                _port_cursor = (_port_cursor + 1) % len(_PORTS)
                s = socket.socket(family, socket.SOCK_STREAM)
                try:
                    s.bind((host, port))
                except OSError:
                    s.close()
                    continue
                held.append(s)
                if len(held) == n:
                    return [s.getsockname()[1] for s in held]
        raise RuntimeError("not %d free ports outside the ephemeral range on %s" % (n, host))
    finally:
        for s in held:
            s.close()


def free_port(host=LOOP4):
    """A TCP port that was free on ``host`` a moment ago (see free_ports)."""
    return free_ports(1, host)[0]


@contextlib.contextmanager
def many_sessions(port, n, host=LOOP4):
    """*n* client connections to (*host*, *port*), held open for the
    ``with`` block and closed after it (the descriptor limit raised for
    them)."""
    raise_nofile(2 * n + 1024)
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((host, port), timeout=5))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def raise_nofile(want=None):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(hard, max(soft, want))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connect(addr, timeout=5.0, source=None):
    """A client socket connected to ``addr`` (from the IP ``source``)."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source is not None:
            s.bind((source, 0))
        s.connect(addr)
    except BaseException:
        s.close()
        raise
    return s


def recv_exact(sock, n, timeout=5.0):
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(sock, timeout=5.0):
    """Everything until EOF (raises socket.timeout if EOF does not come)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk


def closed_by_peer(sock, timeout=5.0):
    """True when the peer closes (EOF or reset) within ``timeout``, data that
    arrives first is discarded; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except OSError:
            return True


def closed_promptly(addr, timeout=5.0):
    """Connect to ``addr``; True when the connection is closed (EOF or reset)
    within ``timeout``.  A connect that fails because the proxy already reset
    the connection counts as closed."""
    try:
        sock = connect(addr, timeout)
    except ConnectionError:
        return True
    with sock:
        return closed_by_peer(sock, timeout)


def reset_close(sock):
    """Close ``sock`` with a RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def roundtrip(sock, payload=b"ping", timeout=5.0):
    sock.sendall(payload)
    return recv_exact(sock, len(payload), timeout)


def echo_once(addr, payload=b"hello", timeout=5.0):
    with connect(addr, timeout) as s:
        return roundtrip(s, payload, timeout)


def banner_via(addr, size=1, timeout=5.0):
    """Connect and return the first ``size`` bytes the upstream sends (its
    banner), or b"" when the proxy closes the connection."""
    with connect(addr, timeout) as s:
        try:
            return recv_exact(s, size, timeout)
        except ConnectionError:
            return b""


def hostport(host, port):
    """``HOST:PORT`` (an IPv6 literal in brackets)."""
    if ":" in host:
        host = "[%s]" % host
    return "%s:%d" % (host, port)


def spec(listen_port, host, port):
    """The ``LPORT:HOST:RPORT`` string (IPv6 literal in brackets)."""
    return "%d:%s" % (listen_port, hostport(host, port))


# -- probes for tagged upstreams (EchoServer(tag=...)) -------------------------

def talk(port, timeout=5.0, host=LOOP4):
    """Connect to ``host``:``port`` (127.0.0.1); return (socket, the greeting
    line: the tag of the EchoServer the connection reached, as str)."""
    sock = connect((host, port), timeout)
    try:
        tag = b""
        while not tag.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionError("closed before the greeting (got %r)" % tag)
            tag += chunk
    except BaseException:
        sock.close()
        raise
    return sock, tag.decode().strip()


def greeting(port, timeout=5.0, host=LOOP4):
    """The tag of the server that a new connection to ``host``:``port``
    (127.0.0.1) reaches, or None when it is refused or closed without a
    greeting."""
    try:
        sock, tag = talk(port, timeout, host)
    except OSError:
        return None
    sock.close()
    return tag


def refused(port, host=LOOP4):
    """True when nothing listens on ``host``:``port`` (127.0.0.1): the
    connection is refused."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def echoes(sock, payload=b"ping", timeout=5.0):
    """True when ``sock`` still carries bytes both ways (False on EOF or an
    error)."""
    try:
        return roundtrip(sock, payload, timeout) == payload
    except OSError:
        return False


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# -- pumps ---------------------------------------------------------------------

# The proxy moves bytes with one of three pumps, chosen by its environment:
#   splice   os.splice for bulk, libc recv/send for small reads (Linux, 3.10+)
#   copy     libc recv/send only (Python 3.9 on Linux)
#   sockets  socket.recv_into/sendall only (no ctypes, not Linux)
# A test that moves bytes runs with each pump the proxy can use here: it is
# marked ``@each_pump`` and starts the proxy with the ``start_proxy``
# fixture.  Every other test runs once, with the pump the proxy picks.
PUMPS = {"splice": {"TCPPROXY_SPLICE": "1", "TCPPROXY_LIBC_IO": "1"},
         "copy": {"TCPPROXY_SPLICE": "0", "TCPPROXY_LIBC_IO": "1"},
         "sockets": {"TCPPROXY_SPLICE": "0", "TCPPROXY_LIBC_IO": "0"}}
try:
    import tcpproxy
    if not tcpproxy.HAVE_SPLICE:
        del PUMPS["splice"]
    if tcpproxy._LibcIO.load() is None:
        del PUMPS["copy"]
except ImportError:  # pragma: no cover
    del PUMPS["splice"], PUMPS["copy"]

each_pump = pytest.mark.parametrize("pump", sorted(PUMPS))


# -- /proc --------------------------------------------------------------------

def _proc_net_listen():
    """{(ip, port, inode)} of TCP sockets in LISTEN state on this host."""
    out = set()
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            else:
                raw = raw[::-1]
            out.add((str(ipaddress.ip_address(raw)), int(hexport, 16), int(f[9])))
    return out


def _socket_inodes(pid):
    inodes = set()
    fd_dir = Path("/proc/%d/fd" % pid)
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listening(pid=None):
    """{(ip, port)} of listening TCP sockets (of process ``pid``)."""
    entries = _proc_net_listen()
    if pid is None:
        return {(ip, port) for ip, port, _ in entries}
    inodes = _socket_inodes(pid)
    return {(ip, port) for ip, port, inode in entries if inode in inodes}


def port_listening(port, pid=None):
    return any(p == port for _, p in listening(pid))


def proc_threads(pid):
    try:
        return len(os.listdir("/proc/%d/task" % pid))
    except OSError:
        return 0


def proc_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return 0


def proc_rss_kib(pid):
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def listen_overflows():
    """TcpExt ListenOverflows + ListenDrops (system-wide counters)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    total = 0
    for names, values in zip(lines[::2], lines[1::2]):
        if not names.startswith("TcpExt:"):
            continue
        table = dict(zip(names.split()[1:], values.split()[1:]))
        total += int(table.get("ListenOverflows", 0)) + int(table.get("ListenDrops", 0))
    return total


def tcp_timers(local_port=None, remote_port=None, pid=None):
    """[(local_port, remote_port, timer)] for established TCP sockets (of
    process ``pid``); timer 2 is the keepalive timer (proc_net_tcp.txt)."""
    inodes = _socket_inodes(pid) if pid is not None else None
    out = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "01":
                continue
            lp = int(f[1].split(":")[1], 16)
            rp = int(f[2].split(":")[1], 16)
            if local_port is not None and lp != local_port:
                continue
            if remote_port is not None and rp != remote_port:
                continue
            if inodes is not None and int(f[9]) not in inodes:
                continue
            out.append((lp, rp, int(f[5].split(":")[0], 16)))
    return out


# -- HTTP ---------------------------------------------------------------------

def http(addr, method="GET", path="/status", timeout=5.0):
    """(status, headers dict lower-cased, body bytes)."""
    conn = httplib.HTTPConnection(addr[0], addr[1], timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def http_json(addr, path, timeout=5.0):
    status, _headers, body = http(addr, "GET", path, timeout)
    assert status == 200, (status, body)
    return json.loads(body)


def mapping_stats(status_address, port):
    """The /status?format=json entry of the mapping listening on ``port``."""
    data = http_json(status_address, "/status?format=json")
    for entry in data["mappings"]:
        if entry["listen"].rsplit(":", 1)[1] == str(port):
            return entry
    raise AssertionError("no mapping on port %d in %s" % (port, json.dumps(data)))


def walk(obj):
    """Yield every (key, value) pair and every leaf of a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


def json_values(obj):
    """Every scalar in a JSON document."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from json_values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_values(v)
    else:
        yield obj


# -- servers ------------------------------------------------------------------

class _LoopServer:
    """A single-threaded selectors loop with a wake-up socketpair and a way to
    run a function on the loop thread (``call``)."""

    def __init__(self, name):
        self._name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls = queue.Queue()
        self._stop = False
        self._thread = None
        self.errors = []

    def _start(self):
        self._thread = threading.Thread(target=self._run, name=self._name)
        self._thread.start()

    def call(self, fn, timeout=5.0):
        """Run ``fn()`` on the loop thread and return its result."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box["error"] = exc
            done.set()

        self._calls.put(run)
        self._wake()
        assert done.wait(timeout), "server loop did not answer"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _run(self):
        try:
            while not self._stop:
                for key, mask in self._sel.select(1.0):
                    if key.data is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                        while True:
                            try:
                                self._calls.get_nowait()()
                            except queue.Empty:
                                break
                        continue
                    try:
                        key.data(key.fileobj, mask)
                    except Exception as exc:  # noqa: BLE001 - recorded, the test may check
                        self.errors.append(exc)
        finally:
            self._cleanup()

    def _cleanup(self):
        pass

    def close(self, timeout=5.0):
        if self._thread is None:
            return
        self._stop = True
        self._wake()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "%s did not stop" % self._name
        self._thread = None
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Conn:
    __slots__ = ("sock", "out", "eof", "shut")

    def __init__(self, sock):
        self.sock = sock
        self.out = bytearray()
        self.eof = False
        self.shut = False


class EchoServer(_LoopServer):
    """Echo upstream on one thread (selectors), for thousands of connections;
    binds at construction, a context manager (``close()`` on exit).

    ``banner``: bytes sent first on every connection (tells which upstream a
    proxied connection reached).  ``tag``: a name sent as the first line
    (``tag`` and a newline), what ``talk()`` and ``greeting()`` read.  EOF
    from the client: pending data is flushed, then the write half is shut
    (half-close propagates back).

    ``mode``: "echo"; "close" (accept, close at once); "reset" (accept, close
    with RST).  ``refuse()`` closes the listener (connections are refused),
    ``resume()`` listens again on the same address.

    ``address`` is (host, port), ``hostport`` the ``HOST:PORT`` text.
    ``accepted`` counts connections; ``wait_accepted(n)``; ``active`` counts
    open ones; ``wait_idle()``.
    """

    HIGH_WATER = 256 * 1024

    def __init__(self, host=LOOP4, port=0, banner=None, mode="echo", backlog=4096, tag=None):
        super().__init__("EchoServer-%s" % (tag or host))
        if tag is not None:
            assert banner is None, "a tag is the banner: give one of them"
            banner = (tag.encode() if isinstance(tag, str) else tag) + b"\n"
        self.host = host
        self.banner = banner
        self.mode = mode
        self.backlog = backlog
        self._cond = threading.Condition()
        self.accepted = 0
        self._conns = {}
        self.listener = None
        self._bind(port)
        self.port = self.listener.getsockname()[1]
        self._start()

    @property
    def address(self):
        return (self.host, self.port)

    @property
    def hostport(self):
        return hostport(self.host, self.port)

    @property
    def active(self):
        with self._cond:
            return len(self._conns)

    def _bind(self, port):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind((self.host, port))
            ls.listen(self.backlog)
        except BaseException:
            ls.close()
            raise
        ls.setblocking(False)
        self.listener = ls
        self._sel.register(ls, selectors.EVENT_READ, self._on_accept)

    def refuse(self):
        def do():
            if self.listener is not None:
                self._sel.unregister(self.listener)
                self.listener.close()
                self.listener = None
        self.call(do)

    def resume(self):
        self.call(lambda: self.listener or self._bind(self.port))

    def wait_accepted(self, n, timeout=5.0):
        with self._cond:
            return self._cond.wait_for(lambda: self.accepted >= n, timeout)

    def wait_idle(self, timeout=5.0):
        with self._cond:
            return self._cond.wait_for(lambda: not self._conns, timeout)

    def close_all(self, reset=False):
        """Close every accepted connection (with RST when ``reset``)."""
        def do():
            for c in list(self._conns.values()):
                self._drop(c, reset)
        self.call(do)

    def _on_accept(self, ls, mask):
        for _ in range(64):
            try:
                sock, _ = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.errors.append(exc)
                return
            with self._cond:
                self.accepted += 1
                self._cond.notify_all()
            if self.mode == "reset":
                reset_close(sock)
                continue
            if self.mode == "close":
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(sock)
            with self._cond:
                self._conns[sock.fileno()] = c
            if self.banner:
                c.out += self.banner
            self._sel.register(sock, self._events(c), lambda s, m, c=c: self._on_io(c, m))
            self._flush(c)

    def _events(self, c):
        ev = 0
        if not c.eof and len(c.out) < self.HIGH_WATER:
            ev |= selectors.EVENT_READ
        if c.out:
            ev |= selectors.EVENT_WRITE
        return ev

    def _on_io(self, c, mask):
        if c.sock.fileno() == -1:
            return
        try:
            if mask & selectors.EVENT_READ:
                data = c.sock.recv(65536)
                if data:
                    c.out += data
                else:
                    c.eof = True
            if c.out:
                self._flush(c)
                if c.sock.fileno() == -1:
                    return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(c)
            return
        self._update(c)

    def _flush(self, c):
        try:
            while c.out:
                n = c.sock.send(c.out)
                del c.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(c)

    def _update(self, c):
        if c.sock.fileno() == -1:
            return
        if c.eof and not c.out:
            if not c.shut:
                c.shut = True
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            self._drop(c)
            return
        ev = self._events(c)
        self._sel.modify(c.sock, ev, self._sel.get_key(c.sock).data)

    def _drop(self, c, reset=False):
        fd = c.sock.fileno()
        if fd == -1:
            return
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        if reset:
            reset_close(c.sock)
        else:
            c.sock.close()
        with self._cond:
            self._conns.pop(fd, None)
            self._cond.notify_all()

    def _cleanup(self):
        for c in list(self._conns.values()):
            self._drop(c)
        if self.listener is not None:
            try:
                self._sel.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
            self.listener = None


def echo_pair(first, second):
    """Two EchoServers on one port at two addresses: *first* and *second*
    are (host, banner).  Returns (a, b); tells which address a connection
    reached."""
    for _ in range(20):
        a = EchoServer(host=first[0], banner=first[1])
        try:
            b = EchoServer(host=second[0], port=a.port, banner=second[1])
        except OSError:
            a.close()
            continue
        return a, b
    raise AssertionError("no port free on both %s and %s" % (first[0], second[0]))


class BulkServer:
    """Upstream that, per connection, sends ``payload`` and at the same time
    reads everything until EOF, recording the byte count and SHA-256.

    ``read_gate``: when given, reading waits until this Event is set (a slow
    reader).  One thread per connection, all joined by ``close()``.
    Results: ``results`` (a Queue of dicts: received, sha256, sent).
    """

    def __init__(self, payload=b"", read_gate=None, host=LOOP4):
        self.payload = payload
        self.read_gate = read_gate
        self.results = queue.Queue()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(64)
        self.address = self.listener.getsockname()
        self.port = self.address[1]
        self._closing = threading.Event()
        self._threads = []
        self._socks = []
        self._lock = threading.Lock()
        self._accept_thread = threading.Thread(target=self._accept, name="BulkServer-accept")
        self._accept_thread.start()

    def _accept(self):
        self.listener.settimeout(0.2)
        while not self._closing.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self._lock:
                self._socks.append(sock)
                t = threading.Thread(target=self._serve, args=(sock,), name="BulkServer-conn")
                self._threads.append(t)
            t.start()

    def _serve(self, sock):
        result = {"received": 0, "sha256": None, "sent": 0, "error": None}
        digest = hashlib.sha256()

        def sender():
            try:
                view = memoryview(self.payload)
                for i in range(0, len(view), 1 << 20):
                    sock.sendall(view[i:i + (1 << 20)])
                    result["sent"] += len(view[i:i + (1 << 20)])
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                result["error"] = exc

        st = threading.Thread(target=sender, name="BulkServer-send")
        st.start()
        try:
            if self.read_gate is not None:
                while not self.read_gate.wait(0.2):
                    if self._closing.is_set():
                        return
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    break
                digest.update(data)
                result["received"] += len(data)
        except OSError as exc:
            result["error"] = exc
        finally:
            st.join(30)
            result["sha256"] = digest.hexdigest()
            self.results.put(result)
            sock.close()

    def close(self, timeout=10.0):
        self._closing.set()
        self._accept_thread.join(timeout)
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)
            assert not t.is_alive(), "bulk server thread did not stop"
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Blackhole:
    """A listener whose accept queue is full: connecting to it times out
    (SYNs are dropped), as a host that does not answer."""

    def __init__(self, host=LOOP4, port=0):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.address = self.listener.getsockname()
        self.port = self.address[1]
        self.fillers = []
        # fill the queue until a connect attempt times out
        for _ in range(8):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.3)
            try:
                s.connect(self.address)
            except socket.timeout:
                s.close()
                self.works = True
                return
            self.fillers.append(s)
        self.works = False

    def close(self):
        for s in self.fillers:
            s.close()
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MotoEndpoint:
    """moto's DynamoDB server on a loopback port that can go down (``stop()``)
    and come back on the same port (``start()``): moto keeps its data in this
    process, so tables survive.  The ``aws_env`` fixture points boto3 at it."""

    def __init__(self):
        self.port = 0
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address=LOOP4, port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self):
        if self.server is not None:
            self.server.stop()
            # ThreadedMotoServer.stop() only ends serve_forever(); close the
            # socket too, so that the endpoint refuses like a dead one.
            self.server._server.server_close()
            self.server = None

    @property
    def url(self):
        return "http://%s" % hostport(LOOP4, self.port)


# -- clients -------------------------------------------------------------------

class Hammer:
    """A thread that opens a new connection to 127.0.0.1:``port`` over and
    over until the ``with`` block ends (at most ``limit`` connections),
    recording every greeting (``tags``) and every failure."""

    def __init__(self, port, limit=5000):
        self.port = port
        self.limit = limit
        self.tags = []
        self.failures = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="hammer-%d" % port)

    def _run(self):
        while not self._stop.is_set() and len(self.tags) + len(self.failures) < self.limit:
            try:
                sock, tag = talk(self.port, timeout=5)
                sock.close()
                self.tags.append(tag)
            except OSError as exc:
                self.failures.append(repr(exc))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def seen(self, tag):
        return tag in self.tags


# -- the proxy as a subprocess ----------------------------------------------

def stop_process(proc, sig, timeout, describe):
    """Send *sig* to *proc* if it runs and wait *timeout* seconds for it;
    if it is still running then, kill it and raise AssertionError(describe()).
    Returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(describe()) from None
    return proc.returncode



class ProxyProcess:
    """``python tcpproxy.py ARGS`` with stdout/stderr in temporary files."""

    def __init__(self, args, env=None, nofile=None, cwd=REPO, argv0=None):
        self.args = [str(a) for a in args]
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - open while the process runs
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        full_env = dict(os.environ)
        full_env.pop("STATUS_ADDRESS", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        preexec = None
        if nofile is not None:
            def preexec():
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
        cmd = argv0 if argv0 is not None else [sys.executable, str(TCPPROXY)]
        self.proc = subprocess.Popen(
            list(cmd) + self.args, cwd=str(cwd), env=full_env,
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
            preexec_fn=preexec,  # noqa: PLW1509 - only setrlimit(), before exec
        )
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def _read(self, f):
        f.flush()
        f.seek(0)
        return f.read().decode("utf-8", "replace")

    def stderr(self):
        return self._read(self._err)

    def stdout(self):
        return self._read(self._out)

    def output(self):
        return self.stdout() + self.stderr()

    def wait_listening(self, ports, timeout=10.0, status=None):
        """Wait until every port is in LISTEN state and owned by the proxy
        (no connection is made: a probe would be proxied upstream), and the
        status address accepts a TCP connection."""
        ports = set(ports)

        def ready():
            if not self.alive():
                raise AssertionError(
                    "proxy exited with %s before listening:\n%s"
                    % (self.proc.returncode, self.output()))
            return ports <= {p for _, p in listening(self.pid)}

        wait_until(ready, timeout, message=lambda: "proxy not listening on %s:\n%s"
                   % (sorted(ports), self.output()))
        if status is not None:
            def status_up():
                try:
                    socket.create_connection(status, timeout=1).close()
                    return True
                except OSError:
                    return False
            wait_until(status_up, timeout, message=lambda: "status %s not accepting:\n%s"
                       % (status, self.output()))
        return self

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=10.0):
        return self.proc.wait(timeout)

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Signal and wait; returns the exit status (kills after ``timeout``)."""
        return stop_process(self.proc, sig, timeout, lambda: "proxy did not exit within "
                            "%ss of %s:\n%s" % (timeout, sig, self.output()))

    def close(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


def run_proxy_cli(args, ports=(), status=None, timeout=10.0, **kw):
    """Start ``python tcpproxy.py ARGS`` (cwd: the repository) and wait until
    ``ports`` listen and ``status`` accepts; the caller closes it."""
    p = ProxyProcess(args, **kw)
    try:
        p.wait_listening(ports, timeout=timeout, status=status)
    except BaseException:
        p.close()
        raise
    return p


def run_cli(args, timeout=20.0, env=None, input_=None):
    """Run ``python tcpproxy.py ARGS`` to completion: CompletedProcess."""
    full_env = dict(os.environ)
    full_env.pop("STATUS_ADDRESS", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, str(TCPPROXY)] + [str(a) for a in args],
        cwd=str(REPO), env=full_env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def accept(listener, timeout=5.0):
    """Accept one connection on a test's bare upstream ``listener``."""
    listener.settimeout(timeout)
    conn, _ = listener.accept()
    conn.settimeout(timeout)
    return conn


def lookups_at_once(r, name, n):
    """*n* threads call r.lookup(name) at the same moment: ([answers],
    [ResolveErrors])."""
    results, errors, go = [], [], threading.Event()

    def look():
        go.wait(5)
        try:
            results.append(r.lookup(name))
        except Exception as exc:  # noqa: BLE001 - the test checks each
            errors.append(exc)

    threads = [threading.Thread(target=look, name="lookup-%d" % i) for i in range(n)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return results, errors
