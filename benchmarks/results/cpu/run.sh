#!/usr/bin/env bash
# Reproduce the recorded CPU benchmark of the fast (shared-memory) plane against gloo and ref.
# Usage: benchmarks/results/cpu/run.sh [output dir]   (default: benchmarks/results/cpu)
# Every pgbench run interleaves its backends size by size, so machine noise hits them alike;
# -R 5 --stat min reports the best of five timed loops (the machine is shared: the minimum is the
# least disturbed sample, for every backend alike; medians are in the JSON as samples_us).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${1:-benchmarks/results/cpu}
STEPS=" ${STEPS:-1 2 3} "  # which of the three parts below to run
has() { [[ "$STEPS" == *" $1 "* ]]; }
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
B="mooncake-cpu:fast,mooncake-cpu:ref,gloo"
COMMON=(-w 5 -n 20 -R 5 --stat min --min-time 0.05 --no-progress)

# 1. all_reduce float32, 2 ranks, 8 B .. 64 MiB: the speed goals
if has 1; then
    $PY benchmarks/pgbench.py --collective all_reduce -g 2 -b 8 -e 64M -f 2 "${COMMON[@]}" --backend "$B" \
        -J "$OUT/all_reduce_2ranks.json" --plot "$OUT/all_reduce_2ranks.png" | tee "$OUT/all_reduce_2ranks.txt"
fi

# 2. every collective, 2 ranks, 8 B .. 64 MiB (x4 steps): "no collective slower than gloo"
if has 2; then
    $PY benchmarks/pgbench.py --collective all -g 2 -b 8 -e 64M -f 4 "${COMMON[@]}" --backend "mooncake-cpu:fast,gloo" \
        -J "$OUT/all_collectives_2ranks.json" --plot "$OUT/all_collectives_2ranks.png" | tee "$OUT/all_collectives_2ranks.txt"
fi

# 3. scaling: all_reduce with 2, 3 and 4 ranks on the 2 cores
if has 3; then
    for g in 2 3 4; do
        $PY benchmarks/pgbench.py --collective all_reduce -g $g -b 8 -e 64M -f 8 "${COMMON[@]}" --backend "mooncake-cpu:fast,gloo" \
            -J "$OUT/scaling_${g}ranks.json" --plot "$OUT/scaling_${g}ranks.png" | tee "$OUT/scaling_${g}ranks.txt"
    done
fi
$PY "$(dirname "$0")/summarize.py" "$OUT" > "$OUT/summary.md" 2>/dev/null || true  # needs every part's JSON
