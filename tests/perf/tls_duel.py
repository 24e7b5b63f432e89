#!/usr/bin/env python3
"""tls_duel - compare two tcpproxy.py files' CPU per TLS request by running
them at the same time on one CPU (not a test).

    python3 tests/perf/tls_duel.py A.py B.py [--rounds 4] [--seconds 3]

Both proxies originate TLS (``--upstream-tls``) to one HAProxy TLS
terminator in front of a C echo server, as in tls_bench.py, and each gets
its own 64-connection ping-pong load, both loads at once.  The two proxies
are pinned to the last CPU, everything else to the others, so each proxy
gets about half of that CPU and its request rate is inversely proportional
to its CPU per request: B/A is A's CPU per request over B's.  Run one
after the other, the same comparison drowns in this machine's noise (the
same loop runs at 1x-2x speed from one second to the next); run at once,
both see the same noise.  A file run against itself gives 0.99-1.04.
A spec may add environment variables: ``B.py:TCPPROXY_LIBC_IO=0``.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import proxybench as pb
import tls_bench as tb
from peers import make_certs


def argv_for(spec, d, certs, listen, upstream, cpu):
    script, *pairs = spec.split(":")
    proxy = tb.peer_argv("baseline", d, certs, listen, upstream, "all", script)
    return ["env"] + pairs + ["taskset", "-c", str(cpu)] + proxy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("tls_duel needs two CPUs")
    duel_cpu = cpus[-1]
    os.sched_setaffinity(0, cpus[:-1])           # the load, the terminator, the echo
    d = tempfile.mkdtemp(prefix="tls-duel-")
    ratios = []
    try:
        certs = make_certs(d)
        helper = pb.Helper(d)
        _, echo_port = helper.server("echo", d, "echo")
        _, upstreams = tb.tls_terminator(d, certs, echo_port, echo_port)
        for n in range(args.rounds):
            specs = (args.a, args.b) if n % 2 == 0 else (args.b, args.a)
            ports = [pb.free_port(), pb.free_port()]
            procs = [tb.start("duel-%d-%d" % (n, i),
                              argv_for(spec, d, certs, ports[i], upstreams[0], duel_cpu),
                              ports[i], d) for i, spec in enumerate(specs)]
            rates = [None, None]

            def load(i, rates=rates, ports=ports):
                rates[i] = helper.run(["pingpong", pb.LOOPBACK, ports[i], args.connections,
                                       args.seconds, 1, 64], args.seconds + 30)["rps"]

            threads = [threading.Thread(target=load, args=(i,), name="load-%d" % i)
                       for i in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for proc in procs:
                proc.stop()
            a, b = rates if specs[0] == args.a else rates[::-1]
            ratios.append(b / a)
            print("round %d: A %.0f req/s, B %.0f req/s, B/A %.3f" % (n + 1, a, b, ratios[-1]),
                  flush=True)
        print("B/A median %.3f (min %.3f, max %.3f over %d rounds)"
              % (statistics.median(ratios), min(ratios), max(ratios), len(ratios)))
    finally:
        pb.stop_all()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
