#!/bin/bash
# A/B of two copies of the code, interleaved ABBA, each run in its own process.
#   git archive <rev> src bench | tar -x -C /tmp/a     (one folder per revision)
#   bash bench/ab.sh "saga latency --store sqlite --broker embedded --n 400" 4 /tmp/a /tmp/b
# prints one line per run: the folder, p50/p99 (ms), throughput (wf/s), CPU use.
set -u
ARGS="$1"; ROUNDS=$2; shift 2; DIRS=("$@")
PY=${PYTHON:-python3}
for ((i = 0; i < ROUNDS; i++)); do
  if (( i % 2 == 0 )); then order=("${DIRS[@]}"); else order=($(printf '%s\n' "${DIRS[@]}" | tac)); fi
  for d in "${order[@]}"; do
    # shellcheck disable=SC2086
    out=$(cd "$d" && PYTHONPATH="$d/src:$d" $PY -m bench.cantata_scenario $ARGS 2>/dev/null | grep BENCH-RESULT)
    echo "$(basename "$d") $(echo "$out" | grep -oE '"(p50_ms|p99_ms|workflows_per_s|cpu_util)": [0-9.]+' | tr '\n' ' ')"
  done
done
