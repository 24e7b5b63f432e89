#!/usr/bin/env python3
"""tls_bench - TLS origination throughput and ping-pong: tcpproxy
--upstream-tls beside stunnel4 (client mode) and HAProxy (``server ... ssl
verify required ca-file CA``), in one run, on loopback (not a test).

    client (plain) -> peer on :L -> TLS -> HAProxy TLS terminator -> C echo/sink

Every peer verifies the upstream's certificate (a throw-away CA, name
localhost).  The load generator and the plain backends are proxybench's
(compiled C when a compiler is there).  Workloads: ``bulk`` (one stream
for SECONDS into a sink: MB/s) and ``pingpong`` (64 connections, 64-byte
request/reply: requests/s and p99 latency).  Peers take turns; each row
is the median of --repeat rounds.  Prints a markdown table.

    python3 tests/perf/tls_bench.py [--seconds 5] [--repeat 3] [--cpus auto]
        [--baseline OLD_TCPPROXY_PY]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import proxybench as pb
from peers import make_certs

REPO = HERE.parent.parent
HAPROXY_HEAD = """global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def wait_port(port, proc, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not proc.alive():
            raise pb.BenchError("%s exited:\n%s" % (proc.name, proc.tail()))
        if pb.port_listening(port):
            return
        time.sleep(0.02)                 # a benchmark, not a test: polling the port is fine
    raise pb.BenchError("%s did not listen on %d:\n%s" % (proc.name, port, proc.tail()))


def start(name, argv, port, logdir, cwd=None):
    proc = pb.Proc(name, argv, logdir, cwd=cwd)
    wait_port(port, proc)
    return proc


def tls_terminator(d, certs, echo_port, sink_port):
    """HAProxy serving TLS on two ports, to the echo and the sink."""
    pem = Path(d) / "server.pem"
    pem.write_text(Path(certs.cert).read_text() + Path(certs.key).read_text())
    ports = pb.free_port(), pb.free_port()
    cfg = Path(d) / "upstream.cfg"
    cfg.write_text(HAPROXY_HEAD + """listen echo
    bind 127.0.0.1:%d ssl crt %s
    server e 127.0.0.1:%d
listen sink
    bind 127.0.0.1:%d ssl crt %s
    server s 127.0.0.1:%d
""" % (ports[0], pem, echo_port, ports[1], pem, sink_port))
    proc = start("upstream-tls", ["haproxy", "-f", str(cfg), "-db"], ports[1], d)
    wait_port(ports[0], proc)
    return proc, ports


def peer_argv(name, d, certs, listen, upstream, cpus, baseline=None):
    if name in ("tcpproxy", "baseline"):
        script = baseline if name == "baseline" else str(REPO / "tcpproxy.py")
        return [sys.executable, script, "--connections",
                "%d:localhost:%d" % (listen, upstream), "--upstream-tls", "--upstream-ca",
                str(certs.ca), "--status", "off", "--cpus", cpus]
    if name == "stunnel4":
        cfg = Path(d) / ("stunnel-%d.conf" % listen)
        cfg.write_text("foreground = yes\npid =\n[p]\nclient = yes\naccept = 127.0.0.1:%d\n"
                       "connect = 127.0.0.1:%d\nverifyChain = yes\nCAfile = %s\n"
                       "checkHost = localhost\nsni = localhost\n" % (listen, upstream, certs.ca))
        return ["stunnel4", str(cfg)]
    cfg = Path(d) / ("haproxy-%d.cfg" % listen)
    cfg.write_text(HAPROXY_HEAD + """listen p
    bind 127.0.0.1:%d
    server s 127.0.0.1:%d ssl verify required ca-file %s verifyhost localhost sni str(localhost)
""" % (listen, upstream, certs.ca))
    return ["haproxy", "-f", str(cfg), "-db"]


def measure(helper, name, d, certs, upstreams, args):
    out = {}
    for workload, upstream in (("bulk", upstreams[1]), ("pingpong", upstreams[0])):
        listen = pb.free_port()
        proc = start("%s-%s" % (name, workload),
                     peer_argv(name, d, certs, listen, upstream, args.cpus, args.baseline),
                     listen, d)
        try:
            if workload == "bulk":
                r = helper.run(["bulk", pb.LOOPBACK, listen, 1, args.seconds], args.seconds + 30)
                out["bulk"] = r["MBps"]
            else:
                r = helper.run(["pingpong", pb.LOOPBACK, listen, 64, args.seconds, 1, 64],
                               args.seconds + 30)
                out["pingpong"] = r["rps"]
                out["p99"] = round(r["p99_us"] / 1000.0, 2)
        finally:
            proc.stop()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpus", default="auto", help="tcpproxy's --cpus (default auto)")
    ap.add_argument("--peers", default="tcpproxy,stunnel4,haproxy")
    ap.add_argument("--baseline", metavar="TCPPROXY_PY",
                    help="another tcpproxy.py (e.g. from git show main:tcpproxy.py) run as "
                    "the peer 'baseline', taking turns with the others")
    args = ap.parse_args(argv)
    if args.baseline and "baseline" not in args.peers.split(","):
        args.peers = "baseline," + args.peers
    for tool in ("haproxy", "stunnel4", "openssl"):
        if not shutil.which(tool):
            sys.exit("tls_bench needs %s" % tool)
    d = tempfile.mkdtemp(prefix="tls-bench-")
    try:
        certs = make_certs(d)
        helper = pb.Helper(d)
        echo, echo_port = helper.server("echo", d, "echo")
        sink, sink_port = helper.server("sink", d, "sink")
        terminator, upstreams = tls_terminator(d, certs, echo_port, sink_port)
        names = args.peers.split(",")
        rounds = {name: [] for name in names}
        for _ in range(args.repeat):
            for name in names:
                rounds[name].append(measure(helper, name, d, certs, upstreams, args))
        rows = []
        for name in names:
            results = rounds[name]
            rows.append((name, statistics.median(r["bulk"] for r in results),
                         statistics.median(r["pingpong"] for r in results),
                         statistics.median(r["p99"] for r in results)))
        ref = {r[0]: r for r in rows}.get("haproxy")
        print("TLS origination, loopback, %s CPUs, load generator %s, median of %d x %gs "
              "(tcpproxy --cpus %s)\n" % (os.cpu_count(), helper.kind, args.repeat,
                                          args.seconds, args.cpus))
        print("| peer | bulk MB/s (1 stream) | x HAProxy | ping-pong req/s (64 conns) "
              "| x HAProxy | p99 ms |")
        print("|---|---|---|---|---|---|")
        for name, bulk, pingpong, p99 in rows:
            print("| %s | %.0f | %s | %.0f | %s | %s |" % (
                name, bulk, "%.2f" % (bulk / ref[1]) if ref else "-", pingpong,
                "%.2f" % (pingpong / ref[2]) if ref else "-", p99))
        for proc in (terminator, echo, sink):
            proc.stop()
    finally:
        pb.stop_all()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
