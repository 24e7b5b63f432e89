"""TLS: origination (--upstream-tls) to a TLS-only redis-server and a
Python TLS echo server, termination (--tls-cert/--tls-key) in front of a
plain redis-server and echo server, half-close and 50 MB both ways through
each, a half-close while the upstream streams on, refusals (wrong CA,
wrong name) with their reason, rotation of the certificate, of the
upstream CA and of the client certificate (SIGHUP, file change) under an
open connection, what /status, /connections and /metrics show, and what
``tcpproxy check`` prints.  Loopback only; certificates from the
``tls_certs`` fixture and ``peers.make_certs``."""

import hashlib
import os
import selectors
import shutil
import signal
import socket
import ssl
import threading
import time

import pytest
from helpers import (
    LOOP4,
    EchoServer,
    closed_by_peer,
    free_port,
    http,
    http_json,
    run_cli,
    wait_until,
)
from peers import make_certs, need, run
from test_status import check_schema

import tcpproxy

BIG = 50 * 1024 * 1024
CHUNK = 256 * 1024
TLS_SIDE = {"version": str, "cipher": str}
SESSION_TLS = {"client": (dict, type(None)), "upstream": (dict, type(None))}


def client_context(ca):
    context = ssl.create_default_context(cafile=str(ca))
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return context


def stream(seed, size=BIG):
    """``size`` bytes in CHUNK pieces, the same for the same seed, cheaply."""
    block = hashlib.sha512(b"%d" % seed).digest() * (CHUNK // 64)
    for offset in range(0, size, CHUNK):
        yield block[:min(CHUNK, size - offset)]


def expected_sha(seed, size=BIG):
    digest = hashlib.sha256()
    for piece in stream(seed, size):
        digest.update(piece)
    return digest.hexdigest()


class TlsEchoServer:
    """A TLS echo server (one thread per connection, blocking): echoes until
    the client's close_notify (or EOF), then ends its TLS and closes.
    ``received`` holds the SHA-256 of what each connection sent."""

    def __init__(self, certs):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certs.cert), str(certs.key))
        self.context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        self.listener = socket.create_server((LOOP4, 0))
        self.port = self.listener.getsockname()[1]
        self.received = []
        self.threads = []
        self.accepter = threading.Thread(target=self._accept, name="TlsEchoServer")
        self.accepter.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="TlsEcho-conn")
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn):
        digest = hashlib.sha256()
        try:
            conn.settimeout(30)
            with self.context.wrap_socket(conn, server_side=True) as tls:
                while True:
                    data = tls.recv(CHUNK)
                    if not data:
                        break
                    digest.update(data)
                    tls.sendall(data)
                self.received.append(digest.hexdigest())
                tls.unwrap()
        except (OSError, ValueError):
            conn.close()

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.accepter.join(10)
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads + [self.accepter])


@pytest.fixture
def tls_echo(tls_certs):
    server = TlsEchoServer(tls_certs)
    yield server
    server.close()


def exchange_plain(port, seed, size=BIG):
    """Send ``size`` bytes on a plain connection while reading the echo,
    half-close after the last byte, read to EOF: SHA-256 of the echo."""
    sock = socket.create_connection((LOOP4, port), timeout=30)
    errors = []

    def send():
        try:
            for piece in stream(seed, size):
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, name="exchange-send")
    sender.start()
    digest = hashlib.sha256()
    with sock:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            digest.update(data)
        sender.join(30)
    assert not sender.is_alive() and not errors, errors
    return digest.hexdigest()


def handshake_step(tls):
    """One step of a TLS handshake over memory BIOs: True once it is done
    (False: it waits for the peer's bytes)."""
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def exchange_tls(port, context, seed, size=BIG, hostname="localhost"):
    """exchange_plain() over TLS, on one thread (an SSL object must not be
    used by two) through memory BIOs: the half-close is close_notify, sent
    when every complete record received has been read, so that unwrap()'s
    second SSL_shutdown() finds nothing to drop.  Returns (SHA-256 of the
    echo, the TLS version)."""
    sock = socket.create_connection((LOOP4, port), timeout=30)
    sock.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    pieces = stream(seed, size)
    digest = hashlib.sha256()
    handshaken = closed = done = False
    pending = b""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    buf = bytearray(CHUNK)
    with sock, sel:
        while not done:
            handshaken = handshaken or handshake_step(tls)
            if handshaken and not closed and not pending and outgoing.pending < CHUNK:
                piece = next(pieces, None)
                if piece is None:
                    try:
                        tls.unwrap()
                    except ssl.SSLWantReadError:
                        pass
                    closed = True
                else:
                    tls.write(piece)
            if outgoing.pending and not pending:
                pending = outgoing.read()
            if pending:
                try:
                    sent = sock.send(pending)
                    pending = pending[sent:]
                except BlockingIOError:
                    pass
            events = sel.select(timeout=30 if pending or closed else 0)
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
            sel.modify(sock, mask)
            if not events and (pending or closed):
                raise AssertionError("no progress in 30 s")
            if events and events[0][1] & selectors.EVENT_READ:
                try:
                    data = sock.recv(CHUNK)
                except BlockingIOError:
                    data = None
                if data == b"":
                    done = True
                elif data:
                    incoming.write(data)
            while handshaken:
                try:
                    n = tls.read(CHUNK, buf)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    done = True
                    break
                if not n:
                    done = True
                    break
                digest.update(memoryview(buf)[:n])
        return digest.hexdigest(), tls.version()


def redis_cli(port, *args, input=None, tls_ca=None):
    argv = [need("redis-cli", "redis-tools"), "-h", LOOP4, "-p", port]
    if tls_ca is not None:
        argv += ["--tls", "--cacert", tls_ca]
    return run(argv + list(args), input=input)


def metric(proxy, name, **labels):
    text = http(proxy.status_address, path="/metrics")[2].decode()
    want = ",".join('%s="%s"' % item for item in sorted(labels.items()))
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and all(
                '%s="%s"' % item in head for item in labels.items()):
            return float(value)
    raise AssertionError("no %s{%s} in:\n%s" % (name, want, text))


# -- origination ---------------------------------------------------------------

def test_redis_through_upstream_tls(redis_tls, tls_certs, start_proxy):
    """Plain redis-cli -> tcpproxy --upstream-tls -> TLS-only redis-server:
    PING, then a 4 MB value set and read back intact; the IP literal target
    is verified against the certificate's IP address."""
    port, by_ip = free_port(), free_port()
    proxy = start_proxy("%d:localhost:%d" % (port, redis_tls.port),
                        "%d:127.0.0.1:%d" % (by_ip, redis_tls.port),
                        extra=["--upstream-tls", "--upstream-ca", tls_certs.ca])
    assert redis_cli(port, "PING").stdout.strip() == "PONG"
    assert redis_cli(by_ip, "PING").stdout.strip() == "PONG"
    value = (hashlib.sha256(b"v").hexdigest() * (4 * 1024 * 1024 // 64))
    assert redis_cli(port, "-x", "SET", "big", input=value).stdout.strip() == "OK"
    got = redis_cli(by_ip, "GET", "big").stdout.rstrip("\n")
    assert len(got) == len(value) and got == value
    # what /status says of the mapping
    mapping = next(m for m in http_json(proxy.status_address, "/status?format=json")
                   ["mappings"] if m["spec"].startswith("%d:" % port))
    assert mapping["tls"]["upstream_tls"] is True
    assert mapping["tls"]["upstream_ca"] == str(tls_certs.ca)


@pytest.mark.parametrize("how", ["wrong CA", "wrong name"])
def test_upstream_tls_refused(how, redis_tls, tls_certs, tmp_path, start_proxy):
    """A certificate from another CA, or one for another name, is refused:
    the client is closed, the reason logged naming the mismatch, counted as
    a failed upstream and a TLS handshake failure (verify)."""
    port = free_port()
    if how == "wrong CA":
        (tmp_path / "other-ca").mkdir()
        other = make_certs(tmp_path / "other-ca")
        extra = ["--upstream-tls", "--upstream-ca", other.ca]
        reason = "certificate in certificate chain"   # redis sends its CA too
    else:
        extra = ["--upstream-tls", "--upstream-ca", tls_certs.ca,
                 "--upstream-sni", "wrong.example"]
        reason = "Hostname mismatch, certificate is not valid for 'wrong.example'"
    proxy = start_proxy("%d:localhost:%d" % (port, redis_tls.port), extra=extra)
    result = redis_cli(port, "PING")
    assert "PONG" not in result.stdout
    wait_until(lambda: "TLS handshake with the upstream failed (verify)" in proxy.stderr(),
               message=proxy.stderr)
    line = next(l for l in proxy.stderr().splitlines() if "TLS handshake" in l)
    assert reason in line and "certificate verify failed" in line, line
    assert metric(proxy, "tcpproxy_tls_handshake_failures_total", mapping=port,
                  side="upstream", reason="verify") >= 1
    assert metric(proxy, "tcpproxy_upstream_connect_failures_total", mapping=port,
                  reason="tls") >= 1


def test_origination_half_close_and_50mb(tls_echo, tls_certs, start_proxy):
    """50 MB through --upstream-tls to a TLS echo server: what the server got
    and what came back are both intact; the client's half-close reaches the
    server (as close_notify) and the echo still comes back in full."""
    port = free_port()
    proxy = start_proxy("%d:localhost:%d" % (port, tls_echo.port),
                        extra=["--upstream-tls", "--upstream-ca", tls_certs.ca])
    want = expected_sha(1)
    assert exchange_plain(port, 1) == want
    wait_until(lambda: tls_echo.received)
    assert tls_echo.received == [want]
    assert "TLS error" not in proxy.stderr()


class StreamingTlsServer:
    """A TLS server for one client that streams 16 KiB records to it
    without a pause until the client's close_notify comes, then sends
    b"END" and its own close_notify and closes (one thread, memory BIOs,
    so that it reads while it writes).  ``result``: what it received
    before the close_notify and how many bytes it had streamed."""

    def __init__(self, certs):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certs.cert), str(certs.key))
        self.listener = socket.create_server((LOOP4, 0))
        self.port = self.listener.getsockname()[1]
        self.result = None
        self.thread = threading.Thread(target=self._serve, name="StreamingTlsServer")
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(30)
        conn, _ = self.listener.accept()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        record = b"x" * 16384
        received, sent, out, handshaken = bytearray(), 0, b"", False
        with conn, selectors.DefaultSelector() as sel:
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ)
            while True:
                handshaken = handshaken or handshake_step(tls)
                if handshaken and not out and outgoing.pending < CHUNK:
                    sent += tls.write(record)
                out = out or outgoing.read()
                if out:
                    try:
                        out = out[conn.send(out):]
                    except BlockingIOError:
                        pass
                sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if out or handshaken else 0))
                if not sel.select(30):
                    return
                try:
                    data = conn.recv(CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    return                     # a FIN without close_notify: no result
                incoming.write(data)
                try:
                    while handshaken:
                        data = tls.read(CHUNK)
                        if not data:
                            raise ssl.SSLZeroReturnError()
                        received += data
                except ssl.SSLWantReadError:
                    continue
                except ssl.SSLZeroReturnError:     # close_notify
                    self.result = {"received": bytes(received), "sent": sent}
                    tls.write(b"END")
                    try:
                        tls.unwrap()
                    except ssl.SSLWantReadError:
                        pass
                    conn.setblocking(True)
                    conn.sendall(out + outgoing.read())
                    return

    def close(self):
        self.listener.close()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_half_close_reaches_a_peer_that_streams_on(tls_certs, start_proxy):
    """The client's half-close becomes close_notify at once, even while the
    upstream streams without a pause (close_notify is written in memory,
    between two records, so nothing the upstream sends is lost): the
    upstream sees the request and then the close_notify, and everything
    it streamed, then b"END", reaches the client before the EOF."""
    server = StreamingTlsServer(tls_certs)
    try:
        port = free_port()
        start_proxy("%d:localhost:%d" % (port, server.port),
                    extra=["--upstream-tls", "--upstream-ca", tls_certs.ca])
        total, tail = 0, b""
        with socket.create_connection((LOOP4, port), timeout=30) as sock:
            sock.sendall(b"request")
            while total < 4 * 1024 * 1024:         # the stream flows
                total += len(sock.recv(CHUNK))
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 30
            while True:
                assert time.monotonic() < deadline, "no EOF: the upstream saw no close_notify"
                data = sock.recv(CHUNK)
                if not data:
                    break
                total += len(data)
                tail = (tail + data)[-3:]
        server.thread.join(30)
        assert server.result is not None, "the upstream saw no close_notify"
        assert server.result["received"] == b"request"
        assert tail == b"END"
        assert total == server.result["sent"] + 3
    finally:
        server.close()


# -- termination ---------------------------------------------------------------

def test_redis_cli_tls_to_terminating_mapping(redis, tls_certs, start_proxy):
    """redis-cli --tls --cacert CA -> tcpproxy --tls-cert/--tls-key -> a plain
    redis-server."""
    port = free_port()
    start_proxy("%d:127.0.0.1:%d" % (port, redis.port),
                extra=["--tls-cert", tls_certs.cert, "--tls-key", tls_certs.key])
    result = redis_cli(port, "PING", tls_ca=tls_certs.ca)
    assert result.stdout.strip() == "PONG", result
    assert redis_cli(port, "SET", "k", "v", tls_ca=tls_certs.ca).stdout.strip() == "OK"
    assert redis.cli("GET", "k").stdout.strip() == "v"


def test_termination_half_close_and_50mb(tls_certs, start_proxy):
    """50 MB both ways over TLS to the proxy, plain TCP to an echo server:
    the client's close_notify becomes a FIN upstream, the echo's rest and
    its FIN come back as data and close_notify."""
    with EchoServer() as echo:
        port = free_port()
        proxy = start_proxy("%d:%s" % (port, echo.hostport),
                            extra=["--tls-cert", tls_certs.cert, "--tls-key", tls_certs.key])
        digest, version = exchange_tls(port, client_context(tls_certs.ca), 2)
        assert digest == expected_sha(2)
        assert version == "TLSv1.3"
        assert "TLS error" not in proxy.stderr()


def test_termination_and_origination_together(tls_echo, tls_certs, start_proxy):
    """TLS on both sides, one session: 8 MB both ways, and /connections
    shows both sides' version and cipher while it is open."""
    port = free_port()
    proxy = start_proxy("%d:localhost:%d" % (port, tls_echo.port), extra=[
        "--tls-cert", tls_certs.cert, "--tls-key", tls_certs.key,
        "--upstream-tls", "--upstream-ca", tls_certs.ca])
    size = 8 * 1024 * 1024
    assert exchange_tls(port, client_context(tls_certs.ca), 3, size)[0] == expected_sha(3, size)
    context = client_context(tls_certs.ca)
    with context.wrap_socket(socket.create_connection((LOOP4, port), timeout=10),
                             server_hostname="localhost") as tls:
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"
        sessions = http_json(proxy.status_address, "/connections")["sessions"]
        assert len(sessions) == 1
        check_schema(sessions[0]["tls"], SESSION_TLS)
        for side in ("client", "upstream"):
            check_schema(sessions[0]["tls"][side], TLS_SIDE)
            assert sessions[0]["tls"][side]["version"] == "TLSv1.3"


@pytest.mark.parametrize("sides", ["origination", "both"])
def test_idle_timeout_closes_a_silent_tls_session_only(sides, tls_echo, tls_certs, start_proxy):
    """--idle-timeout 1 on TLS sessions (whose pumps wait in recv() with
    SO_RCVTIMEO, not in poll()): a silent session is closed 1-3.5 s after
    its last byte, one that exchanges every 0.2 s stays open."""
    port = free_port()
    extra = ["--upstream-tls", "--upstream-ca", tls_certs.ca, "--idle-timeout", "1"]
    if sides == "both":
        extra += ["--tls-cert", tls_certs.cert, "--tls-key", tls_certs.key]
    start_proxy("%d:localhost:%d" % (port, tls_echo.port), extra=extra)

    def connect():
        sock = socket.create_connection((LOOP4, port), timeout=10)
        if sides == "both":
            sock = client_context(tls_certs.ca).wrap_socket(sock, server_hostname="localhost")
        return sock

    def roundtrip(sock, data):
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            piece = sock.recv(len(data) - len(got))
            assert piece, "closed"
            got += piece
        return got

    silent, busy = connect(), connect()
    try:
        assert roundtrip(silent, b"quiet") == b"quiet"
        last = time.monotonic()
        closed = False
        while time.monotonic() - last < 3.5:
            assert roundtrip(busy, b"ping") == b"ping"
            if not closed and closed_by_peer(silent, 0.2):
                closed = True
                waited = time.monotonic() - last
                assert waited > 0.8, waited
        assert closed, "the silent TLS session outlived --idle-timeout 1 by 2.5 s"
        assert roundtrip(busy, b"still here") == b"still here"
    finally:
        silent.close()
        busy.close()


def test_client_handshake_failure_is_counted(tls_certs, start_proxy):
    """A client that speaks plain TCP to a terminating mapping is closed and
    counted (side client, reason protocol); the upstream is never asked."""
    with EchoServer() as echo:
        port = free_port()
        proxy = start_proxy("%d:%s" % (port, echo.hostport),
                            extra=["--tls-cert", tls_certs.cert, "--tls-key", tls_certs.key])
        with socket.create_connection((LOOP4, port), timeout=5) as sock:
            sock.sendall(b"PING\r\n" * 100)
            try:
                assert sock.recv(100) != b"PING\r\n"
            except ConnectionResetError:
                pass
        wait_until(lambda: metric(proxy, "tcpproxy_tls_handshake_failures_total",
                                  mapping=port, side="client", reason="protocol") == 1)
        assert echo.accepted == 0


# -- certificate rotation ------------------------------------------------------

def test_certificate_rotation_by_sighup(tls_certs, tmp_path, start_proxy):
    """Replace the certificate files with one from another CA and SIGHUP: an
    open connection keeps working on the old one, a new connection gets the
    new one.  A bad file then keeps the one in force, with a warning."""
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    shutil.copy(tls_certs.cert, cert)
    shutil.copy(tls_certs.key, key)
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    new = make_certs(new_dir)
    with EchoServer() as echo:
        port = free_port()
        proxy = start_proxy("%d:%s" % (port, echo.hostport),
                            extra=["--tls-cert", cert, "--tls-key", key, "--debug", "1"])
        old_context, new_context = client_context(tls_certs.ca), client_context(new.ca)
        with old_context.wrap_socket(socket.create_connection((LOOP4, port), timeout=10),
                                     server_hostname="localhost") as before:
            before.sendall(b"one")
            assert before.recv(3) == b"one"
            shutil.copy(new.cert, cert)
            shutil.copy(new.key, key)
            proxy.send_signal(signal.SIGHUP)
            wait_until(lambda: "re-read certificate" in proxy.stderr(), message=proxy.stderr)
            before.sendall(b"two")
            assert before.recv(3) == b"two"
            with new_context.wrap_socket(socket.create_connection((LOOP4, port), timeout=10),
                                         server_hostname="localhost") as after:
                after.sendall(b"three")
                assert after.recv(5) == b"three"
            with pytest.raises(ssl.SSLCertVerificationError):
                old_context.wrap_socket(socket.create_connection((LOOP4, port), timeout=10),
                                        server_hostname="localhost").close()
        # a broken certificate: the new one stays, /status warns
        cert.write_text("not a certificate\n")
        proxy.send_signal(signal.SIGHUP)

        def rejected():
            status = http_json(proxy.status_address, "/status?format=json")
            warned = any("cannot load TLS certificate" in w for w in status["warnings"])
            return status if warned else None

        status = wait_until(rejected)
        assert any(str(cert) in w for w in status["warnings"])
        with new_context.wrap_socket(socket.create_connection((LOOP4, port), timeout=10),
                                     server_hostname="localhost") as again:
            again.sendall(b"four")
            assert again.recv(4) == b"four"


def ping(sock):
    """Redis PING on an open connection: the reply (b"" when it closed)."""
    sock.sendall(b"PING\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        data = sock.recv(64)
        if not data:
            break
        reply += data
    return reply


def ping_new(port):
    """PING on a new connection to the proxy's *port*: the reply, or None
    when the proxy closed it (its TLS handshake upstream failed)."""
    try:
        with socket.create_connection((LOOP4, port), timeout=10) as sock:
            return ping(sock) or None
    except OSError:
        return None


def upstream_files_warned(proxy):
    """Wait until /status warns that upstream TLS files cannot be loaded;
    return the /status JSON."""
    def warned():
        status = http_json(proxy.status_address, "/status?format=json")
        if any("cannot load the upstream TLS files" in w for w in status["warnings"]):
            return status
        return None
    return wait_until(warned, message=proxy.stderr)


def test_upstream_ca_rotation(redis_tls, tls_certs, tmp_path, start_proxy):
    """The TLS redis-server moves to a certificate from another CA: new
    connections are refused until the proxy's --upstream-ca file follows;
    once it is replaced, new connections verify against the new CA (on the
    file's change alone, and on SIGHUP) while a connection opened before
    keeps working.  A broken CA file keeps the CA in force, with a warning
    in /status and a single log line."""
    live = tmp_path / "live"
    live.mkdir()
    ca = live / "ca.crt"
    shutil.copy(tls_certs.ca, ca)
    (tmp_path / "new").mkdir()
    new = make_certs(tmp_path / "new")
    port = free_port()
    proxy = start_proxy("%d:localhost:%d" % (port, redis_tls.port),
                        extra=["--upstream-tls", "--upstream-ca", ca, "--debug", "1"])
    pong = b"+PONG\r\n"
    with socket.create_connection((LOOP4, port), timeout=10) as before:
        assert ping(before) == pong
        result = redis_cli(redis_tls.port, "CONFIG", "SET", "tls-cert-file", new.cert,
                           "tls-key-file", new.key, tls_ca=tls_certs.ca)
        assert result.stdout.strip() == "OK", result
        assert ping_new(port) is None                  # the old CA cannot verify it
        assert metric(proxy, "tcpproxy_tls_handshake_failures_total", mapping=port,
                      side="upstream", reason="verify") == 1
        # the file changes: new connections verify against the new CA
        shutil.copy(new.ca, ca)
        wait_until(lambda: ping_new(port) == pong, message=proxy.stderr)
        assert "TLS: re-read upstream CA %s" % ca in proxy.stderr()
        assert ping(before) == pong                    # the open one: untouched
        # back to the first CA, by SIGHUP (no connection asks meanwhile)
        result = redis_cli(redis_tls.port, "CONFIG", "SET", "tls-cert-file", tls_certs.cert,
                           "tls-key-file", tls_certs.key, tls_ca=new.ca)
        assert result.stdout.strip() == "OK", result
        shutil.copy(tls_certs.ca, ca)
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.stderr().count("TLS: re-read upstream CA") == 2,
                   message=proxy.stderr)
        assert ping_new(port) == pong
        assert ping(before) == pong
        # a broken CA file: the CA in force stays, /status warns, logged once
        ca.write_text("not a certificate\n")
        proxy.send_signal(signal.SIGHUP)
        status = upstream_files_warned(proxy)
        assert any(str(ca) in w and "stays" in w for w in status["warnings"])
        assert ping_new(port) == pong
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.stderr().count("static backend has nothing to reload") == 3,
                   message=proxy.stderr)
        assert proxy.stderr().count("cannot load the upstream TLS files") == 1
        assert ping_new(port) == pong
        assert ping(before) == pong
        # fixed: the warning goes
        shutil.copy(tls_certs.ca, ca)
        proxy.send_signal(signal.SIGHUP)
        wait_until(lambda: not http_json(proxy.status_address, "/status?format=json")
                   ["warnings"], message=proxy.stderr)
        assert ping_new(port) == pong


def make_client_cert(certs, dir):
    """A client certificate (extendedKeyUsage clientAuth) and its key,
    signed by ``certs``' CA, in ``dir``: (cert, key)."""
    dir.mkdir()
    key, csr, cert, ext = (dir / "client.key", dir / "client.csr", dir / "client.crt",
                           dir / "client.ext")
    ext.write_text("extendedKeyUsage=clientAuth\n")
    openssl = need("openssl", "openssl")
    for argv in (["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=tcpproxy client"],
                 ["x509", "-req", "-in", csr, "-CA", certs.ca, "-CAkey", certs.ca_key,
                  "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext]):
        result = run([openssl] + argv)
        assert result.returncode == 0, result.stderr
    return cert, key


def test_upstream_client_certificate_rotation(redis_tls, tls_certs, tmp_path, start_proxy):
    """Mutual TLS: redis-server requires a client certificate from its CA.
    The proxy's --upstream-cert/--upstream-key files hold one from another
    CA (refused); once they are replaced by a good one, new connections
    get through (on the files' change, no signal), and the one in force
    stays when the new files are broken."""
    result = redis_cli(redis_tls.port, "CONFIG", "SET", "tls-auth-clients", "yes",
                       tls_ca=tls_certs.ca)
    assert result.stdout.strip() == "OK", result
    (tmp_path / "other").mkdir()
    other = make_certs(tmp_path / "other")
    bad_cert, bad_key = make_client_cert(other, tmp_path / "bad-client")
    good_cert, good_key = make_client_cert(tls_certs, tmp_path / "good-client")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "client.crt", live / "client.key"
    shutil.copy(bad_cert, cert)
    shutil.copy(bad_key, key)
    port = free_port()
    proxy = start_proxy("%d:localhost:%d" % (port, redis_tls.port), extra=[
        "--upstream-tls", "--upstream-ca", tls_certs.ca, "--upstream-cert", cert,
        "--upstream-key", key, "--debug", "1"])
    pong = b"+PONG\r\n"
    assert ping_new(port) is None                      # redis refuses the certificate
    shutil.copy(good_cert, cert)
    shutil.copy(good_key, key)
    wait_until(lambda: ping_new(port) == pong, message=proxy.stderr)
    assert "TLS: re-read upstream CA %s, certificate %s" % (tls_certs.ca, cert) \
        in proxy.stderr()
    with socket.create_connection((LOOP4, port), timeout=10) as before:
        assert ping(before) == pong
        key.write_text("not a key\n")
        proxy.send_signal(signal.SIGHUP)
        status = upstream_files_warned(proxy)
        assert any("%s: no PEM private key in it" % key in w for w in status["warnings"])
        assert ping_new(port) == pong
        assert ping(before) == pong


# -- configuration -------------------------------------------------------------

def test_mapping_tls_fields_are_validated():
    m = tcpproxy.Mapping(8000, "db.example.com", 5432, upstream_tls="true", upstream_ca=" ca.pem ")
    assert m.upstream_tls is True and m.upstream_ca == "ca.pem"
    for bad in ({"upstream_tls": "maybe"}, {"upstream_sni": "not a name"},
                {"tls_key": "k.pem"}, {"upstream_key": "k.pem"}, {"tls_cert": ""}):
        with pytest.raises(tcpproxy.ConfigError):
            tcpproxy.Mapping(8000, "db.example.com", 5432, **bad)


def test_file_backend_reads_tls_keys(tls_certs):
    pytest.importorskip("yaml")
    from tcpproxy_backends.file import parse_config
    mappings, _ = parse_config(
        "mappings:\n"
        "  - listen: 8002\n    target: db.example.com:6379\n    upstream_tls: true\n"
        "    upstream_ca: %s\n    upstream_sni: primary.example.com\n"
        "  - listen: 8003\n    target: 127.0.0.1:6379\n    tls_cert: %s\n    tls_key: %s\n"
        % (tls_certs.ca, tls_certs.cert, tls_certs.key))
    assert mappings[0].upstream_tls and mappings[0].upstream_sni == "primary.example.com"
    assert mappings[1].tls_cert == str(tls_certs.cert)


def test_dynamodb_item_with_tls():
    pytest.importorskip("boto3")
    from tcpproxy_backends.dynamodb import _item_mapping
    mapping = _item_mapping({"proxy_configuration": {"S": "8002:cache.example.com:6379"},
                             "upstream_tls": {"BOOL": True},
                             "upstream_sni": {"S": "primary.example.com"}})
    assert mapping.upstream_tls is True and mapping.upstream_sni == "primary.example.com"


def test_bad_tls_files_stop_the_cli(tmp_path, proxy_cli):
    missing = tmp_path / "missing.pem"
    p = proxy_cli(["--connections", "%d:127.0.0.1:9" % free_port(), "--status", "off",
                   "--tls-cert", missing], wait=False)
    assert p.wait(20) == 2
    assert "cannot load TLS certificate" in p.stderr()
    assert os.path.basename(str(missing)) in p.stderr()


# -- tcpproxy check ------------------------------------------------------------

def test_check_prints_tls_settings(tls_certs, tmp_path):
    """``tcpproxy check`` shows each mapping's TLS settings, the mapping's
    own over the command line's, and nothing for a plain one."""
    pytest.importorskip("yaml")
    path = tmp_path / "mappings.yaml"
    path.write_text(
        "mappings:\n"
        "  - {listen: 8001, target: 'db.example.com:5432'}\n"
        "  - listen: 8002\n    target: cache.example.com:6379\n    upstream_tls: true\n"
        "    upstream_ca: %s\n    upstream_sni: primary.example.com\n"
        "    upstream_cert: %s\n    upstream_key: %s\n"
        "  - listen: 8003\n    target: 127.0.0.1:6379\n    tls_cert: %s\n    tls_key: %s\n"
        % (tls_certs.ca, tls_certs.cert, tls_certs.key, tls_certs.cert, tls_certs.key))
    result = run_cli(["check", "--backend", "file", "--config", path])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "8001:db.example.com:5432"
    assert lines[1] == ("8002:cache.example.com:6379 upstream_tls=on upstream_ca=%s "
                        "upstream_sni=primary.example.com upstream_cert=%s upstream_key=%s"
                        % (tls_certs.ca, tls_certs.cert, tls_certs.key))
    assert lines[2] == "8003:127.0.0.1:6379 upstream_tls=off tls_cert=%s tls_key=%s" % (
        tls_certs.cert, tls_certs.key)
    # the command line's: the SNI is the target's name, the CAs the system's
    result = run_cli(["check", "--connections", "8004:cache.example.com:6379", "--upstream-tls",
                      "--tls-cert", tls_certs.cert, "--tls-key", tls_certs.key])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "8004:cache.example.com:6379 upstream_tls=on upstream_ca=system "
        "upstream_sni=cache.example.com tls_cert=%s tls_key=%s" % (tls_certs.cert, tls_certs.key))


@pytest.mark.parametrize("flags, reason", [
    (["--upstream-tls", "--upstream-ca", "{missing}"], "{missing}: No such file or directory"),
    (["--upstream-tls", "--upstream-ca", "{dir}"], "{dir}: Is a directory"),
    (["--upstream-tls", "--upstream-ca", "{key}"], "{key}: no PEM certificate in it"),
    (["--upstream-tls", "--upstream-cert", "{cert}"], "{cert}: no PEM private key in it"),
    (["--tls-cert", "{garbage}"], "{garbage}: no PEM certificate in it"),
    (["--tls-cert", "{cert}", "--tls-key", "{ca_key}"], "the key does not match the certificate"),
])
def test_check_reports_bad_tls_files(flags, reason, tls_certs, tmp_path):
    """A TLS file that cannot be read or is not what it should be: ``check``
    exits 2 with one line naming the mapping, the file and why."""
    names = {"missing": tmp_path / "missing.pem", "dir": tmp_path, "key": tls_certs.key,
             "cert": tls_certs.cert, "garbage": tmp_path / "garbage.pem",
             "ca_key": tls_certs.ca_key}
    names["garbage"].write_text("not a certificate\n")
    result = run_cli(["check", "--connections", "8002:localhost:6379"]
                     + [flag.format(**names) for flag in flags])
    assert result.returncode == 2, result
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("tcpproxy: error: 8002:localhost:6379: "), errors
    assert errors[0].endswith(reason.format(**names)), errors
    assert "static backend: 1 mapping(s), 1 problem(s)" in result.stdout
