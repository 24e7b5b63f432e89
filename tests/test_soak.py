"""A mixed-load soak (issue 4): bulk transfers, ping-pong, connection churn
and idle connections at once for at least 60 s (TCPPROXY_SOAK_SECONDS),
after which the proxy's threads, descriptors and RSS are back at their
baselines.  Opt-in: ``pytest -m perf tests/test_soak.py``."""

import hashlib
import os
import threading
import time

import pytest
from helpers import (
    LOOP4,
    EchoServer,
    connect,
    echo_once,
    free_port,
    pattern,
    proc_fds,
    proc_rss_kib,
    proc_threads,
    roundtrip,
    sha256,
    spec,
    wait_until,
)

pytestmark = [pytest.mark.perf, pytest.mark.timeout(600)]

SOAK_SECONDS = max(60.0, float(os.environ.get("TCPPROXY_SOAK_SECONDS", "60")))
MB = 1 << 20
WORKER_IDLE = 5.0                  # the proxy retires a worker thread after 5 s idle
IDLE_CONNECTIONS = 200


class Load:
    """The mixed load, on four mappings; every loop checks ``stop`` so that
    each worker ends within one iteration (each bounded by socket timeouts)."""

    def __init__(self, ports):
        self.ports = ports
        self.stop = threading.Event()
        self.errors = []
        self.counts = {"bulk": 0, "ping": 0, "churn": 0}
        self.lock = threading.Lock()
        self.threads = []
        self.idle = []

    def _count(self, kind, n=1):
        with self.lock:
            self.counts[kind] += n

    def _guard(self, kind, body):
        def run():
            try:
                body()
            except Exception as exc:  # noqa: BLE001 - every failure is reported at the end
                self.errors.append((kind, repr(exc)))
        return run

    def bulk(self, seed):
        payload = pattern(4 * MB, seed)
        want = sha256(payload)
        while not self.stop.is_set():
            with connect((LOOP4, self.ports["bulk"]), timeout=30) as c:
                got = {}

                def receive(c=c, got=got):
                    digest, n = hashlib.sha256(), 0
                    while n < len(payload):
                        data = c.recv(MB)
                        if not data:
                            break
                        digest.update(data)
                        n += len(data)
                    got["sha"] = digest.hexdigest()

                reader = threading.Thread(target=receive, name="soak-bulk-reader")
                reader.start()
                try:
                    c.sendall(payload)
                finally:
                    reader.join(60)
                assert not reader.is_alive(), "bulk echo stalled"
                assert got.get("sha") == want, "bulk bytes changed"
            self._count("bulk")

    def ping(self):
        with connect((LOOP4, self.ports["ping"]), timeout=10) as c:
            n = 0
            while not self.stop.is_set():
                msg = b"p%09d" % n
                assert roundtrip(c, msg, timeout=10) == msg
                n += 1
                if n % 100 == 0:
                    self._count("ping", 100)

    def churn(self):
        n = 0
        while not self.stop.is_set():
            msg = b"c%09d" % n
            assert echo_once((LOOP4, self.ports["churn"]), msg, timeout=10) == msg
            n += 1
            self._count("churn")

    def start(self, bulk=2, ping=6, churn=3, idle=IDLE_CONNECTIONS):
        for i in range(idle):
            c = connect((LOOP4, self.ports["idle"]), timeout=10)
            assert roundtrip(c, b"i%05d" % i) == b"i%05d" % i
            self.idle.append(c)
        jobs = ([("bulk", lambda i=i: self.bulk(100 + i)) for i in range(bulk)]
                + [("ping", self.ping)] * ping + [("churn", self.churn)] * churn)
        for kind, body in jobs:
            t = threading.Thread(target=self._guard(kind, body), name="soak-%s" % kind)
            self.threads.append(t)
            t.start()

    def finish(self, timeout=60.0):
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        # the idle connections were never touched: they still work
        for i, c in enumerate(self.idle):
            try:
                assert roundtrip(c, b"I%05d" % i, timeout=10) == b"I%05d" % i
            except (OSError, AssertionError) as exc:
                self.errors.append(("idle", repr(exc)))
                break
        for c in self.idle:
            c.close()
        self.idle = []
        return alive


PIPE_POOL_MAX = 64                 # tcpproxy._PipePool keeps at most 64 idle pipes


def pipe_fds(pid):
    """Descriptors of ``pid`` that are pipe ends (the splice pipe pool)."""
    n = 0
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, name)).startswith("pipe:")
        except OSError:
            pass
    return n


def sample(pid):
    pipes = pipe_fds(pid)
    return {"threads": proc_threads(pid), "fds": proc_fds(pid) - pipes, "pipe_fds": pipes,
            "rss_kib": proc_rss_kib(pid)}


def settled(pid, timeout=WORKER_IDLE + 15.0):
    """Threads and descriptors once they stop changing for a second."""
    last = [None]
    pause = threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = (proc_threads(pid), proc_fds(pid))
        if now == last[0]:
            break
        last[0] = now
        pause.wait(1.0)
    return sample(pid)


def test_mixed_load_soak(start_proxy):
    echoes = [EchoServer() for _ in range(4)]
    try:
        names = ("bulk", "ping", "churn", "idle")
        ports = {name: free_port() for name in names}
        p = start_proxy(*[spec(ports[n], LOOP4, e.port) for n, e in zip(names, echoes)])
        idle_base = settled(p.pid)

        # warm-up: the same mix for a few seconds fills the pools (buffers,
        # pipes, parked threads, allocator arenas); RSS is measured after it
        warm = Load(ports)
        warm.start(idle=20)
        warm.stop.wait(5.0)
        assert warm.finish() == [] and warm.errors == [], warm.errors
        wait_until(lambda: proc_threads(p.pid) <= idle_base["threads"], WORKER_IDLE + 10,
                   message="workers did not retire after the warm-up")
        base = settled(p.pid)

        load = Load(ports)
        t0 = time.monotonic()
        load.start()
        samples = []
        while time.monotonic() - t0 < SOAK_SECONDS and not load.errors:
            load.stop.wait(5.0)
            samples.append((round(time.monotonic() - t0), sample(p.pid), dict(load.counts)))
            assert p.alive(), p.output()
        alive = load.finish()
        elapsed = time.monotonic() - t0
        assert alive == [], "load threads did not stop: %s" % alive
        assert load.errors == [], load.errors[:5]
        assert elapsed >= SOAK_SECONDS
        counts = load.counts
        assert counts["bulk"] >= 10 and counts["ping"] >= 1000 and counts["churn"] >= 500, counts

        # back at baseline: threads after the idle retirement, every
        # descriptor, and RSS within a small margin of the warm baseline
        for e in echoes:
            assert e.wait_idle(15)
        # (idle pipes kept by the splice pool are a bounded cache, not a leak)
        wait_until(lambda: proc_threads(p.pid) <= idle_base["threads"]
                   and proc_fds(p.pid) - pipe_fds(p.pid) <= base["fds"], WORKER_IDLE + 15,
                   message=lambda: "threads/descriptors not back at baseline: baseline %s, "
                   "after %s, during %s" % (base, sample(p.pid), samples))
        after = sample(p.pid)
        report = "baseline %s, after %s, during %s" % (base, after, samples)
        assert after["pipe_fds"] <= 2 * PIPE_POOL_MAX, "pipe pool unbounded: " + report
        assert after["rss_kib"] <= base["rss_kib"] + max(8 * 1024, base["rss_kib"] // 5), (
            "RSS not back near its baseline: " + report)
        assert echo_once((LOOP4, ports["churn"]), b"still") == b"still"
        assert "Traceback" not in p.stderr() and "ERROR" not in p.stderr(), p.stderr()[-3000:]
        print("\nsoak %.0f s: %s\n%s" % (elapsed, counts, report))
    finally:
        for e in echoes:
            e.close()
