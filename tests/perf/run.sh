#!/usr/bin/env bash
# Benchmarks of tcpproxy beside haproxy, haproxy-splice, nginx stream and socat
# on loopback (not part of the test suite).  Needs the peers:
#   apt-get install -y haproxy nginx-light libnginx-mod-stream socat iperf3 gcc
# Usage: tests/perf/run.sh [default|scaling|churn60|all] [extra proxybench args]
# Results (markdown and JSON) go to ${OUT:-perf-results}/.
set -euo pipefail
cd "$(dirname "$0")/../.."
what=${1:-default}
shift || true
out=${OUT:-perf-results}
mkdir -p "$out"
py=${PYTHON:-python3}
bench=(python3 tests/perf/proxybench.py --wait-quiet 10 --retry-noisy 1)
cmd="$py tcpproxy.py --connections {listen_port}:{target_host}:{target_port} --status {status_host}:{status_port}"

run_default() {
    # The comparison table in README.rst: every workload, every peer, one run
    # of three rounds (peers taking turns; the median round is reported).
    "${bench[@]}" --repeat 3 --cmd "$cmd" --name tcpproxy --json "$out/default.json" "$@" | tee "$out/default.md"
}

run_scaling() {
    # RSS and threads at 1,000, 5,000 and 9,900 idle connections.
    for n in 1000 5000 9900; do
        "${bench[@]}" --only idle --idle-conns "$n" --peers haproxy --cmd "$cmd" --name tcpproxy \
            --json "$out/idle-$n.json" "$@" 2>&1 | tee "$out/idle-$n.md" | grep -E "RSS|PSS|echo|threads" || true
    done
}

run_churn60() {
    # Churn sustained for 60 s beside haproxy, then 12 x 5 s against one proxy
    # with RSS, threads and descriptors after each interval (churn_trend.py):
    # conn/s must not degrade nor RSS creep, and threads and descriptors must
    # come back once the load stops.
    "${bench[@]}" --only churn --seconds 60 --peers haproxy --cmd "$cmd" --name tcpproxy \
        --json "$out/churn60.json" "$@" | tee "$out/churn60.md"
    "$py" tests/perf/churn_trend.py --python "$py" | tee "$out/churn-trend.md"
}

case "$what" in
    default) run_default "$@" ;;
    scaling) run_scaling "$@" ;;
    churn60) run_churn60 "$@" ;;
    all) run_default "$@"; run_scaling "$@"; run_churn60 "$@" ;;
    *) echo "usage: $0 [default|scaling|churn60|all] [proxybench args]" >&2; exit 2 ;;
esac
