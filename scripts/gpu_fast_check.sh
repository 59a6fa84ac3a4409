#!/usr/bin/env bash
# CUDA fast path on the GPU machine (one GPU, several ranks under CUDA MPS), in one batch:
#   1. build csrc/ (nvcc, sm_90 + PTX) into the cache and load it
#   2. single-process tests (FP8 quantizer vs model, loader)
#   3. EP grid for R = 1, 2, 4, 8 ranks on the one GPU: every output bitwise vs mooncake.model.ep
#   4. benchmark (benchmarks/epbench.py, DeepEP LL config) for R = 8 (and 2, 4 with --bench-all)
#   5. failure case: one rank exits before dispatch; survivors finish within timeout_us, active_ranks[dead] = 0
#   6. integration: the same grid through
#      mooncake.ep.Buffer with MOONCAKE_IMPL=fast
#   7. pg, pgx: the PG conformance suite (tests/pg) on CUDA tensors, backend "mooncake", MOONCAKE_IMPL=fast and ref,
#      2/3/4/8 ranks and the masked / reserved-slot configurations: every output bitwise vs mooncake.model, fast
#      vs ref case by case, and vs gloo where exact (pg); the PG face on CUDA (Work.wait stream ordering, graph
#      capture refused); the CUDA plane driven directly for PG_RANKS; then pg_check.py's failure cases
#      (ranks SIGKILLed inside an all_reduce: survivors agree, bitwise) with FAIL_PG_RANKS ranks and its
#      all_reduce benchmark against the HBM floor for PG_BENCH_RANKS (pgx).  PG_CONFIGS picks conformance
#      configurations (tests/pg/test_conformance.py names; default all, which takes longer than one 600 s call).
#      Needs the ucxx wheels carried in .whl/ (the ref plane and the PG face use UCX).
# STEPS (default "unit grid bench fail integration pg pgx") picks steps (each run must fit the device's 600 s
# command limit: pg alone takes most of it); RANKS, BENCH_RANKS, FAIL_RANKS the sizes.
# Logs go to $OUT (or ./gpu-out).  Notes of what each run showed: docs/gpu-runs.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
export MOONCAKE_CUDA_CACHE=${MOONCAKE_CUDA_CACHE:-$PWD/build/cuda-cache}
ranks=${RANKS:-1,2,4,8}
bench_ranks=${BENCH_RANKS:-2,4,8}
rc=0
steps=" ${STEPS:-unit grid bench fail integration pg pgx} "
has() { [[ "$steps" == *" $1 "* ]]; }
step() {  # step NAME TIMEOUT CMD...: run, log to $out/NAME.txt, remember failures
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$out/summary.txt"
  timeout "$t" "$@" > "$out/$name.txt" 2>&1
  local code=$?
  tail -n 40 "$out/$name.txt"
  echo "=== $name: rc=$code in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  [ $code -eq 0 ] || rc=1
  return $code
}

source scripts/carried_wheels.sh  # ucxx for the PG steps
install_carried_wheels "$out/wheels.txt" \
  || echo "wheel install failed: $(tail -n 3 "$out/wheels.txt")" | tee -a "$out/summary.txt"
rm -f "$out/wheels.txt"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  nvcc --version | tail -2; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

step build 300 python3 -m mooncake.fast.cuda.build || { echo "build failed"; exit 1; }
step load 60 python3 -c 'from mooncake.fast.cuda import load; lib, why = load(); print(lib, why); assert lib, why'

mps_pipe=$(mktemp -d) mps_log=$(mktemp -d)
export CUDA_MPS_PIPE_DIRECTORY=$mps_pipe CUDA_MPS_LOG_DIRECTORY=$mps_log
if nvidia-cuda-mps-control -d; then
  echo "MPS started ($mps_pipe)" | tee -a "$out/summary.txt"
  trap 'echo quit | nvidia-cuda-mps-control; cp -r "$mps_log" "$out/mps-log" 2>/dev/null' EXIT
else
  echo "MPS did not start: ranks are time-sliced (slow, still correct)" | tee -a "$out/summary.txt"
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
fi

has unit && step unit 180 python3 -m pytest -q -p no:cacheprovider tests/fast_cuda -k "quantize or loader" -rfEs
has grid && step grid 360 python3 tests/fast_cuda/fcuda_grid.py --ranks "$ranks" --out "$out/grid" --timeout 90
if has grid && [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && grep -qs "cudaIpcOpenMemHandle" "$out"/grid/*.log; then
  echo "CUDA IPC failed under MPS: rerunning R=2 without MPS" | tee -a "$out/summary.txt"
  ( unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    step grid-nomps 200 python3 tests/fast_cuda/fcuda_grid.py --ranks 2 --out "$out/grid-nomps" --timeout 150 )
fi
has bench && for r in ${bench_ranks//,/ }; do
  step "bench-R$r" 180 python3 benchmarks/epbench.py --ranks "$r" --out "$out/bench" --timeout 150
done
has fail && step fail 200 python3 tests/fast_cuda/fcuda_grid.py --ranks "${FAIL_RANKS:-4,8}" --fail --out "$out/fail" --timeout 120
has integration && MOONCAKE_IMPL=fast step integration 300 python3 tests/fast_cuda/fcuda_grid.py --via-buffer \
  --ranks "${INTEG_RANKS:-2,8}" --out "$out/integ" --timeout 120
has pg && MOONCAKE_TEST_DEVICE=cuda MOONCAKE_TEST_CONFIGS=${PG_CONFIGS:-} step "pg-conformance${PG_CONFIGS:+-${PG_CONFIGS//,/-}}" \
  480 python3 -m pytest -q -p no:cacheprovider --maxfail=20 --timeout 450 --durations=12 tests/pg/test_conformance.py \
  -k "initial_view or matches_model or impls_agree or matches_gloo" -rfEs
if has pgx; then
  step pg-face 240 python3 -m pytest -q -p no:cacheprovider tests/fast_cuda/test_cuda_pg_face.py -rfEs
  MOONCAKE_FAST_CUDA_RANKS=${PG_RANKS:-2,8} step pg-plane 300 python3 -m pytest -q -p no:cacheprovider \
    tests/fast_cuda/test_fast_cuda_pg.py -k test_cuda_ -rfEs
  step pg-check 240 python3 tests/fast_cuda/pg_check.py --steps fail,bench --ranks "${PG_BENCH_RANKS:-2,4,8}" \
    --fail-ranks "${FAIL_PG_RANKS:-4}" --deadline 180 --out "$out"
fi
grep -h "PASS\|FAIL" "$out"/grid.txt "$out"/fail.txt "$out"/integration.txt 2>/dev/null | tail -n 20 >> "$out/summary.txt"
# what comes back is at most 8 files: summary, setup, grid, bench, fail logs and one archive
if [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]; then
  echo quit | nvidia-cuda-mps-control; trap - EXIT; sleep 1; cp -r "$mps_log" "$out/mps-log" 2>/dev/null
fi
find "$out" -name '*.pt' -delete; find "$out" -name 'store-*' -delete
cat "$out"/machine.txt "$out"/build.txt "$out"/load.txt "$out"/unit.txt > "$out/setup.txt" 2>/dev/null
cat "$out"/bench-R*.txt > "$out/bench.txt" 2>/dev/null
[ -f "$out/grid-nomps.txt" ] && cat "$out/grid-nomps.txt" >> "$out/grid.txt"
rm -f "$out"/machine.txt "$out"/build.txt "$out"/load.txt "$out"/unit.txt "$out"/bench-R*.txt "$out/grid-nomps.txt"
details=$(cd "$out" && ls -d grid grid-nomps fail bench integ 2>/dev/null)
[ -n "$details" ] && tar czf "$out/details.tgz" -C "$out" $details mps-log 2>/dev/null && rm -rf "$out"/grid "$out"/grid-nomps "$out"/fail "$out"/bench "$out"/integ "$out"/mps-log
rm -rf "$out/mps-log"
echo "gpu_fast_check rc=$rc" | tee -a "$out/summary.txt"
exit $rc
