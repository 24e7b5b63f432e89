"""Loopback helpers for the backend tests: tagged echo servers, waiting on a
condition with a deadline (never a bare sleep), and client probes."""

import socket
import socketserver
import threading
import time

HOST = "127.0.0.1"


def free_port():
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n):
    """n distinct free ports (held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate, timeout=10.0, step=0.02, message=None):
    """Return predicate()'s first true value, checking until *timeout*.

    Between checks it waits on an Event that is never set (a bounded wait,
    not a sleep used as synchronisation); raises AssertionError at the
    deadline with *message* (a string, or a callable returning one, called
    only then).
    """
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if callable(message):
                message = message()
            raise AssertionError(message or "condition not met in %.1f s: %r"
                                 % (timeout, predicate))
        pause.wait(step)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server = self.server
        with server.lock:
            server.clients.add(self.request)
        try:
            self.request.sendall(server.tag + b"\n")
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                self.request.sendall(data)
        except OSError:
            pass
        finally:
            with server.lock:
                server.clients.discard(self.request)


class _EchoTCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True


class EchoServer:
    """A TCP server on 127.0.0.1 that greets each client with its *tag* and a
    newline, then echoes.  Binds in __enter__, before the thread starts."""

    def __init__(self, tag, port=0):
        self.tag = tag.encode() if isinstance(tag, str) else tag
        self._port = port
        self.server = None
        self.thread = None

    def __enter__(self):
        self.server = _EchoTCPServer((HOST, self._port), _EchoHandler)
        self.server.tag = self.tag
        self.server.lock = threading.Lock()
        self.server.clients = set()
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05},
                                       name="echo-%s" % self.tag.decode())
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def port(self):
        return self.server.server_address[1]

    @property
    def address(self):
        return "%s:%d" % (HOST, self.port)

    def client_count(self):
        with self.server.lock:
            return len(self.server.clients)

    def close(self):
        if self.server is None:
            return
        self.server.shutdown()
        with self.server.lock:
            clients = list(self.server.clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server.server_close()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.server = None


def talk(port, timeout=5.0):
    """Connect to 127.0.0.1:port; return (socket, greeting tag as str)."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
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


def greeting(port, timeout=5.0):
    """The tag of the server that a new connection to *port* reaches, or None
    when the connection is refused or closed without a greeting."""
    try:
        sock, tag = talk(port, timeout)
    except OSError:
        return None
    sock.close()
    return tag


def refused(port):
    """True when nothing listens on 127.0.0.1:port."""
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def echoes(sock, payload=b"ping"):
    """True when *sock* still carries bytes both ways."""
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(len(payload) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == payload
    except OSError:
        return False


def closed_by_peer(sock, timeout=5.0):
    """True when the peer closes *sock* (EOF or reset) within *timeout*."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


class Hammer:
    """A thread that opens a new connection to *port* over and over until
    stopped (at most *limit* connections), recording every greeting and
    every failure."""

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


class MotoEndpoint:
    """moto's DynamoDB server on a fixed loopback port that can go down and
    come back (moto keeps its data in this process, so tables survive)."""

    def __init__(self):
        self.port = 0
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
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
        return "http://%s:%d" % (HOST, self.port)
