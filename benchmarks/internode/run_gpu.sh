#!/usr/bin/env bash
# The NVSHMEM prototype runs for the GPU machine (one GPU; docs/design/internode.md §11), in under 240 s:
# build both libraries, then the probe at R=2, then EP dispatch/combine at R=2 and R=4, direct and
# force-put (each EP run includes the silent-dispatch and silent-combine cases).  One private CUDA MPS
# daemon serves all steps and is stopped on any exit.  Every step runs under `timeout`: the limits add
# up to 225 s, plus 5 s each to start and stop the daemon (and 5 s per step if a driver ignored TERM).
# Results: $OUT/<step>/summary.json, $OUT/<step>.txt (the step's output), $OUT/steps.txt (step, exit
# status, seconds); a summary is printed at the end.
#
# Usage (repository root or anywhere):  OUT=/path/to/out bash benchmarks/internode/run_gpu.sh
# Environment: PYTHON (default: python) with torch and nvidia-nvshmem-cu13; nvcc and
# nvidia-cuda-mps-control on PATH.
set -u
: "${OUT:?set OUT to the output folder}"
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
DIR=benchmarks/internode
mkdir -p "$OUT"
: > "$OUT/steps.txt"

MPS_PIPE=$(mktemp -d /tmp/mc-mps-pipe.XXXXXX)
MPS_LOG=$(mktemp -d /tmp/mc-mps-log.XXXXXX)
export CUDA_MPS_PIPE_DIRECTORY=$MPS_PIPE CUDA_MPS_LOG_DIRECTORY=$MPS_LOG
stop_mps() {
  echo quit | timeout 5 nvidia-cuda-mps-control >/dev/null 2>&1
  rm -rf "$MPS_PIPE" "$MPS_LOG"
}
trap stop_mps EXIT
timeout 5 nvidia-cuda-mps-control -d || echo "MPS daemon did not start (rc $?): steps run time-sliced" | tee -a "$OUT/steps.txt"

# step NAME LIMIT_S CMD...: run CMD under timeout (TERM, then KILL 5 s later), output to $OUT/NAME.txt
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT/steps.txt"
}

COMMON=(--build-dir "$OUT/build")
# the drivers' children inherit the daemon above (no --mps) and their share CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
step build-probe 45 "$PY" $DIR/nvshmem_probe.py --compile-only --out "$OUT/probe-r2" "${COMMON[@]}" &
step build-ep 45 "$PY" $DIR/nvshmem_ep.py --compile-only --out "$OUT/ep-r2-direct" "${COMMON[@]}" &
wait
step probe-r2 30 "$PY" $DIR/nvshmem_probe.py --ranks 2 --rounds 100 --limit-s 25 --out "$OUT/probe-r2" "${COMMON[@]}"
step ep-r2-direct 35 "$PY" $DIR/nvshmem_ep.py --ranks 2 --limit-s 30 --out "$OUT/ep-r2-direct" "${COMMON[@]}"
step ep-r2-put 35 "$PY" $DIR/nvshmem_ep.py --ranks 2 --force-put --limit-s 30 --out "$OUT/ep-r2-put" "${COMMON[@]}"
step ep-r4-direct 40 "$PY" $DIR/nvshmem_ep.py --ranks 4 --limit-s 35 --out "$OUT/ep-r4-direct" "${COMMON[@]}"
step ep-r4-put 40 "$PY" $DIR/nvshmem_ep.py --ranks 4 --force-put --limit-s 35 --out "$OUT/ep-r4-put" "${COMMON[@]}"

echo
echo "== steps (rc 0 = passed, 124/137 = timed out) =="
cat "$OUT/steps.txt"
for name in probe-r2 ep-r2-direct ep-r2-put ep-r4-direct ep-r4-put; do
  echo
  echo "== $name (last lines of $OUT/$name.txt) =="
  tail -n 12 "$OUT/$name.txt" 2>/dev/null
done
