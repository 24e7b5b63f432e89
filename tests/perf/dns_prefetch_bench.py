#!/usr/bin/env python3
"""dns_prefetch_bench - connect latency through the proxy while the target's
DNS answer keeps expiring, beside the same run with an IP-literal target
(a benchmark on loopback, not a test).

A loopback nameserver (tests/dnsserver.py) answers after --delay seconds
(default 0.2) with TTL --ttl (default 2); an echo upstream listens on
127.0.0.1; the proxy runs as a subprocess (--proxy-cmd, default this
checkout's tcpproxy.py) with ``--resolver 127.0.0.1:PORT``.  --clients
threads (default 16) connect, send one 16-byte message, read it back and
close, over and over, for --seconds (default 20).  One warm-up connection
first (the first lookup waits for DNS whatever the proxy does).

Two runs in one invocation: (a) the target is the name, (b) the target is
127.0.0.1.  Prints count, p50, p99 and max of the connect + echo time, how
many took over 100 ms, and p99(name) / p99(literal) (and the same for
p99.9: with thousands of connections a second, the few that wait for DNS
can stay under the 1% that p99 ignores; --pause 0.05 makes each client
pause between connections, as clients with work to do between them).  Without prefetch a
connection waits for the lookup (A then AAAA: twice the delay) each time
the answer expires; with it, the p99 ratio should stay within 1.5.

    python3 tests/perf/dns_prefetch_bench.py                  # this checkout
    python3 tests/perf/dns_prefetch_bench.py --proxy-cmd OTHER-CHECKOUT/tcpproxy.py   # e.g. a git worktree of main
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dnsserver import DNSServer
from helpers import EchoServer, free_port

REPO = HERE.parent.parent
NAME = "bench.example.test"
MESSAGE = b"0123456789abcdef"


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def wait_listening(port, proc, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit("the proxy exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)           # a benchmark, not a test: polling the port is fine
    raise SystemExit("the proxy did not listen on %d" % port)


def once(port):
    """One connection: connect, echo MESSAGE, close; its seconds."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(MESSAGE)
        got = b""
        while len(got) < len(MESSAGE):
            chunk = sock.recv(len(MESSAGE) - len(got))
            if not chunk:
                raise ConnectionError("closed after %d bytes" % len(got))
            got += chunk
    return time.perf_counter() - t0


def warm_up(port, tries=10):
    """One connection that works: the first lookup is behind us."""
    for attempt in range(tries):
        try:
            return once(port)
        except OSError as exc:
            error = exc
            sys.stderr.write("warm-up connection %d failed: %s\n" % (attempt + 1, exc))
    raise SystemExit("warm-up failed (%s); --show-log prints the proxy's log" % error)


def load(port, clients, seconds, pause=0.0):
    """(latencies, errors) of *clients* threads connecting for *seconds*,
    each pausing *pause* seconds between connections."""
    stop = threading.Event()
    results, errors = [], []
    lock = threading.Lock()

    def client():
        mine, failed = [], 0
        while not stop.is_set():
            try:
                mine.append(once(port))
            except OSError:
                failed += 1
            if pause:
                stop.wait(pause)
        with lock:
            results.extend(mine)
            errors.append(failed)

    threads = [threading.Thread(target=client, name="bench-client-%d" % i)
               for i in range(clients)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    return results, sum(errors)


def run(args, dns_server, echo, target):
    port = free_port()
    argv = [args.python, args.proxy_cmd, "--connections", "%d:%s:%d" % (port, target, echo.port),
            "--listen-address", "127.0.0.1", "--status", "off",
            "--resolver", dns_server.nameserver] + args.proxy_arg
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - the proxy's log, read at the end
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        wait_listening(port, proc)
        warm_up(port)
        queries = dns_server.queries(NAME)
        latencies, errors = load(port, args.clients, args.seconds, args.pause)
        queries = dns_server.queries(NAME) - queries
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        stderr = log.read()
        log.close()
    if args.show_log:
        sys.stderr.write(stderr)
    if not latencies:
        raise SystemExit("no connection worked:\n%s" % stderr[-2000:])
    return {"target": target, "count": len(latencies), "errors": errors, "queries": queries,
            "p50": statistics.median(latencies), "p99": percentile(latencies, 0.99),
            "p999": percentile(latencies, 0.999), "max": max(latencies), "slow": sum(1 for t in latencies if t > 0.1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy-cmd", default=str(REPO / "tcpproxy.py"),
                        help="the tcpproxy.py to run (default this checkout's)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--proxy-arg", action="append", default=[],
                        help="one more argument for the proxy (repeatable)")
    parser.add_argument("--delay", type=float, default=0.2, help="nameserver delay (s)")
    parser.add_argument("--ttl", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds each client waits between connections (default 0: "
                             "back to back)")
    parser.add_argument("--show-log", action="store_true", help="print the proxy's log")
    args = parser.parse_args(argv)
    with DNSServer() as dns_server, EchoServer() as echo:
        dns_server.set(NAME, ["127.0.0.1"], ttl=args.ttl)
        dns_server.delay = args.delay
        rows = [run(args, dns_server, echo, NAME), run(args, dns_server, echo, "127.0.0.1")]
    print("proxy: %s; nameserver delay %gs, TTL %ds; %d clients for %gs each run, pause %gs; "
          "load %s" % (os.path.relpath(args.proxy_cmd), args.delay, args.ttl, args.clients,
                       args.seconds, args.pause, " ".join("%.2f" % x for x in os.getloadavg())))
    print()
    print("| target | connections | errors | DNS queries | p50 ms | p99 ms | p99.9 ms | max ms "
          "| > 100 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| %s | %d | %d | %d | %.2f | %.2f | %.1f | %.1f | %d |" % (
            row["target"], row["count"], row["errors"], row["queries"], row["p50"] * 1e3,
            row["p99"] * 1e3, row["p999"] * 1e3, row["max"] * 1e3, row["slow"]))
    print()
    print("p99 ratio name / literal: %.2f (p99.9: %.2f)" % (
        rows[0]["p99"] / rows[1]["p99"], rows[0]["p999"] / rows[1]["p999"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
