#!/usr/bin/env bash
# One device batch for the one-verdict protocol (fingerprints in the CUDA PG plane's lanes) and the
# correctness soak with the leaving-rank fix, run side by side on the GPU machine:
#   1. scripts/gpu_pg_check.sh (BUDGET_S, default 300): the CUDA PG plane and the PG face on CUDA
#      tensors, bitwise vs the model and ref, a rank killed mid all_reduce, then the CUDA pytest half
#   2. meanwhile benchmarks/correctness_soak.py on the CPU cores (fast plane, SOAK_S seconds,
#      SOAK_PARALLEL jobs), every rank-result bitwise vs the model
# Everything lands in $OUT: the GPU check's files, soak.json, soak.txt, machine.txt.  SKIP_GPU=1: the soak only.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
{ nproc --all; lscpu | grep -E "Model name|^CPU\(s\)"; free -g | head -2; } > "$out/machine.txt" 2>&1
source scripts/carried_wheels.sh
install_carried_wheels "$out/machine.txt"  # (gpu_pg_check.sh installs them too: the second call skips it)
( export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
  timeout $(( ${SOAK_S:-300} + 90 )) python3 benchmarks/correctness_soak.py --seed "${SOAK_SEED:-9001}" \
    --duration "${SOAK_S:-300}" --parallel "${SOAK_PARALLEL:-6}" --impls fast --world-sizes 2,3,4 \
    --tag device-verdicts --out "$out/soak.json" > "$out/soak.txt" 2>&1
  echo "soak rc=$?" >> "$out/soak.txt" ) &
soak=$!
if [ "${SKIP_GPU:-0}" != 1 ]; then
  OUT="$out" BUDGET_S="${BUDGET_S:-300}" bash scripts/gpu_pg_check.sh
fi
wait $soak
tail -n 25 "$out/soak.txt"
