"""Real peers on loopback: PostgreSQL, Redis (plain and TLS), HAProxy and
Prometheus, started as subprocesses for the tests that drive real clients
through the proxy.  Loaded as a pytest plugin by conftest.py.

Each server gets free loopback ports and a temporary directory, is waited for
until its ports listen (and its log says it is ready), and is stopped at
teardown together with every process it started.  Nothing sleeps: waits are
``wait_until()`` on /proc, the server's log or its HTTP API, with timeouts.

Fixtures (each skips, saying why, when its program is not installed;
``.ci/run`` installs them all):

``postgres``
    a ``Postgres``: ``.port``; ``.psql(*args, host=, port=)``,
    ``.pgbench(*args, host=, port=)`` run the clients against 127.0.0.1 and
    the server's own port unless told otherwise (e.g. the proxy's port).
``redis``, ``redis_tls``
    a ``Redis`` (plain port, or ``--tls-port`` only); ``.cli(*args, host=,
    port=, input=)`` runs ``redis-cli``.
``tls_certs``
    ``make_certs(dir)``: a throw-away CA and a server certificate for
    localhost, 127.0.0.1 and ::1 (``.ca``, ``.cert``, ``.key`` paths).
``haproxy``
    factory ``haproxy(config_text, ports)`` -> ``HAProxy``; ``.log()`` is its
    stdout and stderr (``log stdout format raw local0`` lands there).
``prometheus``
    factory ``prometheus(target)`` -> ``Prometheus`` scraping ``host:port``
    every second; ``.query(expr)``, ``.wait_query(expr)``.
``promtool_check_metrics(text)``
    ``promtool check metrics`` on ``text``: CompletedProcess.
``MetricsEndpoint(text)``
    a one-thread HTTP server answering every GET with ``text``.
"""

import glob
import http.server
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from helpers import LOOP4, free_port, listening, stop_process, wait_until

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
CLIENT_TIMEOUT = 60.0


def need(program, package):
    """The path of ``program``, or skip the test saying what to install."""
    path = shutil.which(program)
    if not path:
        pytest.skip("%s is not installed (apt-get install %s; .ci/run installs it)"
                    % (program, package))
    return path


def run(argv, timeout=CLIENT_TIMEOUT, input=None, **kw):
    """Run a client to completion (``input`` is its stdin, else /dev/null):
    CompletedProcess with text output."""
    if input is None:
        kw["stdin"] = subprocess.DEVNULL
    return subprocess.run([str(a) for a in argv], input=input, capture_output=True, check=False,
                          text=True, timeout=timeout, **kw)


def account(user):
    """Popen keywords that run a child as ``user`` (None: as ourselves)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


# -- processes ---------------------------------------------------------------

def _parent_and_start(pid):
    """(parent pid, start time) of ``pid`` from /proc, or None if gone."""
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19])


def descendants(pid):
    """{(pid, start time)} of every live descendant of ``pid``."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _parent_and_start(int(name))
            if info:
                parents[int(name)] = info
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, start) in parents.items():
            if ppid == parent:
                found.add((child, start))
                todo.append(child)
    return found


def _alive(entry):
    info = _parent_and_start(entry[0])
    return info is not None and info[1] == entry[1]


class Peer:
    """A server subprocess with its output in ``dir/output.log``.

    ``ready()`` may be overridden: by default the process owns a listening
    socket on every port in ``ports``, and its output contains
    ``ready_text`` when set.  ``close()`` sends ``stop_signal``, waits, and
    checks that no process it started is left.
    """

    name = "peer"
    stop_signal = signal.SIGTERM
    ready_text = None

    def __init__(self, argv, dir, ports, user=None, env=None, timeout=START_TIMEOUT):
        self.dir = Path(dir)
        self.ports = set(ports)
        self._out = open(self.dir / "output.log", "wb")  # noqa: SIM115 - the server's log
        self.proc = subprocess.Popen([str(a) for a in argv], cwd=str(self.dir), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, **account(user))
        self.pid = self.proc.pid
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    def log(self):
        """Everything the server wrote to stdout and stderr so far."""
        return (self.dir / "output.log").read_text(errors="replace")

    def ready(self):
        if not self.ports <= {p for _, p in listening(self.pid)}:
            return False
        return self.ready_text is None or self.ready_text in self.log()

    def _wait_ready(self, timeout):
        def check():
            if self.proc.poll() is not None:
                raise AssertionError("%s exited with %s before it was ready:\n%s"
                                     % (self.name, self.proc.returncode, self.log()))
            return self.ready()

        if not wait_until(check, timeout, interval=0.05):
            raise AssertionError("%s not ready within %ss (ports %s):\n%s"
                                 % (self.name, timeout, sorted(self.ports), self.log()))

    def close(self, timeout=STOP_TIMEOUT):
        if self._out.closed:
            return
        family = descendants(self.pid)
        try:
            stop_process(self.proc, self.stop_signal, timeout, lambda: "%s did not stop "
                         "within %ss:\n%s" % (self.name, timeout, self.log()))
            if not wait_until(lambda: not any(_alive(e) for e in family), 5):
                left = [entry[0] for entry in family if _alive(entry)]
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
                raise AssertionError("%s left processes %s" % (self.name, left))
        finally:
            self._out.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- PostgreSQL --------------------------------------------------------------

def postgres_bin():
    """The newest /usr/lib/postgresql/*/bin that has ``postgres``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    return Path(found[-1]).parent


class Postgres(Peer):
    """``initdb`` into a fresh directory and ``postgres`` on 127.0.0.1:port,
    trust authentication, Unix socket in the same directory.  Runs as the
    ``postgres`` account when the tests run as root (postgres refuses root)."""

    name = "postgres"
    stop_signal = signal.SIGINT             # fast shutdown: do not wait for clients
    ready_text = "ready to accept connections"

    def __init__(self):
        self.bin = postgres_bin()
        self.port = free_port()
        user = "postgres" if os.geteuid() == 0 else None
        # not under pytest's tmp_path: its parents are mode 0700 for root
        self.home = Path(tempfile.mkdtemp(prefix="tcpproxy-pg-"))
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.home, entry.pw_uid, entry.pw_gid)
        data = self.home / "data"
        env = dict(os.environ, LC_ALL="C.UTF-8", TZ="UTC")
        init = run([self.bin / "initdb", "-D", data, "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], env=env, cwd=str(self.home), **account(user))
        if init.returncode:
            shutil.rmtree(self.home, ignore_errors=True)
            raise AssertionError("initdb failed:\n%s%s" % (init.stdout, init.stderr))
        argv = [self.bin / "postgres", "-D", data, "-p", self.port,
                "-c", "listen_addresses=%s" % LOOP4,
                "-c", "unix_socket_directories=%s" % self.home,
                "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "logging_collector=off"]
        try:
            super().__init__(argv, self.home, [self.port], user=user, env=env)
        except BaseException:
            shutil.rmtree(self.home, ignore_errors=True)
            raise

    def close(self, timeout=STOP_TIMEOUT):
        try:
            super().close(timeout)
        finally:
            shutil.rmtree(self.home, ignore_errors=True)

    def _client(self, program, args, host, port, timeout):
        env = dict(os.environ, PGCONNECT_TIMEOUT="5", PGUSER="postgres",
                   PGDATABASE="postgres")
        return run([self.bin / program, "-h", host, "-p", port or self.port] + list(args),
                   timeout=timeout, env=env)

    def psql(self, *args, host=LOOP4, port=None, timeout=CLIENT_TIMEOUT):
        """``psql -X -A -t ARGS`` (no psqlrc, unaligned, tuples only)."""
        return self._client("psql", ["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"] + list(args),
                            host, port, timeout)

    def pgbench(self, *args, host=LOOP4, port=None, timeout=CLIENT_TIMEOUT):
        return self._client("pgbench", args, host, port, timeout)


# -- Redis -------------------------------------------------------------------

class Certs:
    """A throw-away CA (``ca``) and a server certificate (``cert``, ``key``)
    for localhost, 127.0.0.1 and ::1, made with ``openssl`` in ``dir``."""

    def __init__(self, dir):
        openssl = need("openssl", "openssl")
        dir = Path(dir)
        self.ca, self.ca_key = dir / "ca.crt", dir / "ca.key"
        self.cert, self.key = dir / "server.crt", dir / "server.key"
        csr, ext = dir / "server.csr", dir / "server.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
                       "extendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for argv in (
            ["req", "-x509"] + ec + ["-keyout", self.ca_key, "-out", self.ca, "-days", "2",
                                     "-subj", "/CN=tcpproxy test CA"],
            ["req"] + ec + ["-keyout", self.key, "-out", csr, "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
             "-CAcreateserial", "-out", self.cert, "-days", "2", "-extfile", ext],
        ):
            result = run([openssl] + argv)
            assert result.returncode == 0, result.stderr


def make_certs(dir):
    return Certs(dir)


class Redis(Peer):
    """``redis-server`` on 127.0.0.1, no persistence; with ``certs`` it
    listens on a ``--tls-port`` only (client certificates not required)."""

    name = "redis"
    ready_text = "Ready to accept connections"

    def __init__(self, dir, certs=None):
        server = need("redis-server", "redis-server")
        self.certs = certs
        self.port = free_port()
        argv = [server, "--bind", LOOP4, "--save", "", "--appendonly", "no",
                "--dir", dir, "--protected-mode", "no"]
        if certs is None:
            argv += ["--port", self.port]
        else:
            argv += ["--port", "0", "--tls-port", self.port, "--tls-cert-file", certs.cert,
                     "--tls-key-file", certs.key, "--tls-ca-cert-file", certs.ca,
                     "--tls-auth-clients", "no"]
        super().__init__(argv, dir, [self.port])

    def cli(self, *args, host=LOOP4, port=None, input=None, timeout=CLIENT_TIMEOUT):
        """``redis-cli -h HOST -p PORT ARGS`` (``--tls`` against the CA for
        a TLS server); ``input`` is its stdin (``-x``)."""
        argv = [need("redis-cli", "redis-tools"), "-h", host, "-p", port or self.port]
        if self.certs is not None:
            argv += ["--tls", "--cacert", self.certs.ca]
        return run(argv + list(args), timeout=timeout, input=input)


# -- HAProxy -----------------------------------------------------------------

class HAProxy(Peer):
    """``haproxy -f CFG -db`` (foreground, one process) with ``config`` as
    its configuration; ``ports`` are the ``bind`` ports to wait for."""

    name = "haproxy"

    def __init__(self, dir, config, ports):
        binary = need("haproxy", "haproxy")
        cfg = Path(dir) / "haproxy.cfg"
        cfg.write_text(config)
        check = run([binary, "-c", "-f", cfg])
        assert check.returncode == 0, check.stdout + check.stderr
        super().__init__([binary, "-f", cfg, "-db"], dir, ports)


# -- Prometheus --------------------------------------------------------------

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url, timeout=5.0):
    """(status, body bytes) of GET ``url``, never through an HTTP proxy."""
    try:
        with _no_proxy.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


class Prometheus(Peer):
    """``prometheus`` on 127.0.0.1:port with a fresh TSDB, scraping
    ``target`` ("host:port", path /metrics) every second."""

    name = "prometheus"
    ready_text = "Server is ready to receive web requests."

    def __init__(self, dir, target, job="target"):
        binary = need("prometheus", "prometheus")
        self.port = free_port()
        self.url = "http://%s:%d" % (LOOP4, self.port)
        cfg = Path(dir) / "prometheus.yml"
        cfg.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": job,
                                "static_configs": [{"targets": [target]}]}],
        }))                                  # JSON is YAML
        super().__init__([binary, "--config.file=%s" % cfg,
                          "--storage.tsdb.path=%s" % (Path(dir) / "data"),
                          "--web.listen-address=%s:%d" % (LOOP4, self.port)],
                         dir, [self.port])

    def query(self, expr):
        """The ``result`` list of an instant query (HTTP API)."""
        status, body = http_get("%s/api/v1/query?%s"
                                % (self.url, urllib.parse.urlencode({"query": expr})))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (status, answer)
        return answer["data"]["result"]

    def wait_query(self, expr, timeout=15.0):
        """The first non-empty result of ``expr`` within ``timeout``."""
        result = wait_until(lambda: self.query(expr), timeout, interval=0.2)
        assert result, "no result for %r within %ss:\n%s" % (expr, timeout, self.log())
        return result


def promtool_check_metrics(text):
    """``promtool check metrics`` with ``text`` on stdin."""
    return run([need("promtool", "prometheus"), "check", "metrics"], input=text)


class MetricsEndpoint:
    """An HTTP server on 127.0.0.1 (one thread) answering every GET with
    ``text`` as the Prometheus text format; ``requests`` counts them."""

    def __init__(self, text):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = owner.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                owner.requests += 1

            def log_message(self, *args):
                pass

        self.text = text
        self.requests = 0
        self.server = http.server.HTTPServer((LOOP4, 0), Handler)
        self.port = self.server.server_address[1]
        self.target = "%s:%d" % (LOOP4, self.port)
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, name="MetricsEndpoint")
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- fixtures ----------------------------------------------------------------

@pytest.fixture
def postgres():
    with Postgres() as server:
        yield server


def _dir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return d


@pytest.fixture
def tls_certs(tmp_path):
    return make_certs(_dir(tmp_path, "certs"))


@pytest.fixture
def redis(tmp_path):
    with Redis(_dir(tmp_path, "redis")) as server:
        yield server


@pytest.fixture
def redis_tls(tmp_path, tls_certs):
    with Redis(_dir(tmp_path, "redis"), tls_certs) as server:
        yield server


def _factory(tmp_path, cls):
    """A factory fixture's body: yields ``make(*args)``, which starts
    ``cls(dir, *args)`` in a new directory under ``tmp_path``; closes every
    one at teardown."""
    started = []

    def make(*args, **kw):
        started.append(cls(_dir(tmp_path, "%s-%d" % (cls.name, len(started))), *args, **kw))
        return started[-1]

    yield make
    for server in started:
        server.close()


@pytest.fixture
def haproxy(tmp_path):
    yield from _factory(tmp_path, HAProxy)


@pytest.fixture
def prometheus(tmp_path):
    yield from _factory(tmp_path, Prometheus)
