#!/usr/bin/env python3
"""Sustained connection churn against one tcpproxy process, in intervals.

proxybench's churn test reports one rate for the whole run; this runs its C
churn client (16 clients: connect, send 16 B, read the echo, close) for
INTERVALS x SECONDS against the same proxy and, after each interval, reads
the proxy's RSS, threads and descriptors from /proc, so that a falling rate
or a creeping RSS shows.  After the load it waits for parked workers to be
retired and checks that threads and descriptors are back to where they were
before the load.  Not part of the test suite::

    python3 tests/perf/churn_trend.py [--intervals 12] [--seconds 5] [-- proxy args]

Needs a C compiler (the load generator is proxybench's).  Exit status 1 if a
connection failed, the mean rate of the last third of the intervals is more
than 20% below that of the first third, RSS grew by more than 10% between the
first and the last interval, or threads/descriptors did not come back.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import proxybench


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, timeout=15.0):
    """Wait for LISTEN in /proc/net/tcp: no test connection, so that the
    proxy's baseline is taken before any client."""
    deadline = time.monotonic() + timeout
    while not proxybench.port_listening(port):
        if time.monotonic() > deadline:
            raise SystemExit("nothing listens on port %d after %gs" % (port, timeout))
        time.sleep(0.05)       # polling a port that is not open yet


def usage(pid):
    status = Path("/proc/%d/status" % pid).read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024.0,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir("/proc/%d/fd" % pid))}


def settle(pid, want, timeout):
    """Usage once threads and descriptors are back to *want* (or the timeout)."""
    deadline = time.monotonic() + timeout
    now = usage(pid)
    while time.monotonic() < deadline and (now["threads"], now["fds"]) != want:
        time.sleep(0.5)        # workers retire on their own clock (5 s idle)
        now = usage(pid)
    return now


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("proxy_args", nargs="*", help="extra tcpproxy arguments (after --)")
    args = parser.parse_args(argv)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("a C compiler is needed for the load generator")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "lg.c")
        source.write_text(proxybench.C_SOURCE)
        binary = str(Path(tmp, "lg"))
        subprocess.run([cc, "-O2", "-o", binary, str(source)], check=True)
        echo_port, listen_port = free_port(), free_port()
        procs = []
        try:
            procs.append(subprocess.Popen([binary, "echo", str(echo_port)],
                                          stdout=subprocess.DEVNULL))
            wait_listening(echo_port)
            proxy = subprocess.Popen(
                [args.python, str(REPO / "tcpproxy.py"), "--status", "off", "--connections",
                 "%d:127.0.0.1:%d" % (listen_port, echo_port)] + args.proxy_args)
            procs.append(proxy)
            wait_listening(listen_port)
            before = settle(proxy.pid, None, 0)
            print("| interval | conn/s | errors | RSS MiB | threads | fds |")
            print("|---:|---:|---:|---:|---:|---:|")
            print("| before | | | %.1f | %d | %d |" % (
                before["rss_mib"], before["threads"], before["fds"]))
            rows = []
            for i in range(1, args.intervals + 1):
                out = subprocess.run(
                    [binary, "churn", "127.0.0.1", str(listen_port), str(args.clients),
                     str(args.seconds), "0"], stdout=subprocess.PIPE, check=True).stdout
                result = json.loads(out)
                now = usage(proxy.pid)
                rows.append((result["cps"], result["errors"], now))
                print("| %d | %.0f | %d | %.1f | %d | %d |" % (
                    i, result["cps"], result["errors"], now["rss_mib"], now["threads"],
                    now["fds"]), flush=True)
            after = settle(proxy.pid, (before["threads"], before["fds"]), 30.0)
            print("| after (settled) | | | %.1f | %d | %d |" % (
                after["rss_mib"], after["threads"], after["fds"]))
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    rates = [r[0] for r in rows]
    first, last = rows[0][2]["rss_mib"], rows[-1][2]["rss_mib"]
    errors = sum(r[1] for r in rows)
    print()
    print("conn/s: min %.0f, max %.0f, last/first %.2f; RSS first %.1f MiB, last %.1f MiB "
          "(%+.1f%%); errors %d; threads %d -> %d, fds %d -> %d after the load" % (
              min(rates), max(rates), rates[-1] / rates[0], first, last,
              100.0 * (last - first) / first, errors, before["threads"], after["threads"],
              before["fds"], after["fds"]))
    third = max(1, len(rates) // 3)
    early, late = sum(rates[:third]) / third, sum(rates[-third:]) / third
    print("conn/s, mean of the first and of the last %d intervals: %.0f and %.0f (%.2f)"
          % (third, early, late, late / early))
    ok = (errors == 0 and late >= 0.8 * early and last <= first * 1.10
          and (after["threads"], after["fds"]) == (before["threads"], before["fds"]))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
