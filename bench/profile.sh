#!/usr/bin/env bash
# Profile one Cantata scenario with py-spy (installed in bench/.venv-peers by
# bench/peers/setup.sh) and write under bench/results/:
#   profile-<name>.svg        flame graph (CPU: samples of running threads only)
#   profile-<name>.raw        collapsed stacks, CPU, per thread
#   profile-<name>-idle.raw   collapsed stacks including idle/waiting threads (wall time)
#   profile-<name>-top.txt    top functions (own and total) of both, via bench/pyspy_top.py
#
# usage: bash bench/profile.sh [saga|chain] [throughput|latency] [scenario options...]
#   e.g. bash bench/profile.sh saga throughput --store sqlite --broker embedded --n 2000
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
kind="${1:-saga}"; workload="${2:-throughput}"; shift $(( $# >= 2 ? 2 : $# ))
pyspy="bench/.venv-peers/bin/py-spy"
[ -x "$pyspy" ] || { echo "no $pyspy: run bash bench/peers/setup.sh" >&2; exit 1; }
py=".venv/bin/python"
opts=("$@")
name="$kind-$workload$(printf -- '%s' "${opts[@]:-}" | tr -c 'a-z0-9' '-' | sed 's/-\+/-/g; s/-$//')"
out="bench/results/profile-$name"
mkdir -p bench/results
run() { "$pyspy" record --rate 250 --nonblocking "$@" -- "$py" -m bench.cantata_scenario \
          "$kind" "$workload" "${opts[@]}" | grep '^BENCH-RESULT' | cut -c1-300; }
run --format flamegraph -o "$out.svg"
run --threads --format raw -o "$out.raw"
run --threads --idle --format raw -o "$out-idle.raw"
{
  echo "# CPU (running threads only)"; "$py" -m bench.pyspy_top "$out.raw" --top 15
  echo; echo "# wall (idle and waiting threads included)"; "$py" -m bench.pyspy_top "$out-idle.raw" --top 15
} > "$out-top.txt"
cat "$out-top.txt"
echo "written: $out.svg $out.raw $out-idle.raw $out-top.txt" >&2
