#!/usr/bin/env bash
# PG collectives on CUDA tensors through the CUDA fast plane (mooncake/fast/cuda/pg.py), on the GPU machine,
# in one batch (R ranks = processes sharing the one GPU under CUDA MPS):
#   1. install the carried ucxx wheels (.whl/, for the ref comparison and the PG face), build csrc/ (IPC helpers)
#   2. start MPS (temp pipe/log dirs)
#   3. tests/fast_cuda/pg_check.py --ranks $RANKS: the plane alone bitwise vs mooncake.model (every collective,
#      dtype, reduce op; inactive rank; async + large), torch.distributed on backend "mooncake" with
#      MOONCAKE_IMPL=fast and =ref (every output vs the model and fast vs ref), a rank killed mid all_reduce
#      (survivors agree, bitwise), all_reduce bandwidth at 64-256 MiB vs the device-copy HBM floor
#   4. if time is left: the CUDA half of tests/fast_cuda/test_fast_cuda_pg.py under pytest
#   5. stop MPS
# EARLY_TESTS: pytest node ids run first (under MPS), within EARLY_S (240) seconds.  FLOOR_RANKS (e.g. 1,2,8): benchmarks/host_floor.py (what
# an eager call of a Python torch backend costs this machine's host at least) into floor.txt / floor.json.  GRAPH_RANKS (e.g. 2,8): first tests/fast_cuda/pg_graph.py (the device path: eager latency, CUDA graphs of
# all_reduce, every captured collective bitwise against the model, a rank killed during a replay of all_reduces
# and of all_gathers for 3+ ranks) within GRAPH_S seconds; GRAPH_ARGS more arguments of it (default: 100
# eager iterations per size).  LATENCY_RANKS (e.g. 2):
# first tests/fast_cuda/pg_latency.py with rank 0's profile, into latency.txt.  PROFILE_CASES (e.g.
# graph,eager,large; trace2,trace8 the kernels' own step times; ehost2,ehost8 each host layer timed): tests/fast_cuda/pg_profile.py
# into profile/ (within PROFILE_S; PROFILE_ARGS more arguments, e.g. --env NAME=VALUE).  SWEEP_RANKS (e.g.
# 2,4,8): benchmarks/pgbench.py all_reduce 16 B - SWEEP_MAX (256M), x4 steps, eager and graph mode (-G 5, on
# mooncake.pg.mem_pool() tensors) per R, into sweep/ and the table sweep.md.  PG_CHECK=0 skips pg_check
# and the pytest half.
# Logs go to $OUT (or ./gpu-out): summary.txt, pg_check.txt, pg_check.json, setup.txt, pytest.txt.
# Budget: BUDGET_S (default 330) seconds for the whole script; pg_check skips steps that would start too late.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
budget=${BUDGET_S:-330}
rc=0
ranks=${RANKS:-2,4}
source scripts/carried_wheels.sh
export PYTHONPATH=$PWD
: > "$out/setup.txt"
install_carried_wheels "$out/setup.txt" \
  || { echo "wheel install failed" | tee -a "$out/summary.txt"; cat "$out/setup.txt"; exit 1; }
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export MOONCAKE_CUDA_CACHE=${MOONCAKE_CUDA_CACHE:-$PWD/build/cuda-cache}
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  echo "cpus: $(nproc --all), $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"; nvcc --version | tail -2
  timeout 120 python3 -m mooncake.fast.cuda.build
  python3 -c 'from mooncake.fast.cuda import pg_unavailable_reason as r; print("CUDA PG plane:", r() or "available")'
} >> "$out/setup.txt" 2>&1
cat "$out/setup.txt" | tail -n 12

mps_pipe=$(mktemp -d) mps_log=$(mktemp -d)
export CUDA_MPS_PIPE_DIRECTORY=$mps_pipe CUDA_MPS_LOG_DIRECTORY=$mps_log
if nvidia-cuda-mps-control -d; then
  echo "MPS started" | tee -a "$out/summary.txt"
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
else
  echo "MPS did not start: ranks are time-sliced" | tee -a "$out/summary.txt"
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
fi

if [ -n "${EARLY_TESTS:-}" ]; then  # pytest node ids to run first, under MPS (e.g. a check that decides the rest)
  timeout "${EARLY_S:-240}" python3 -m pytest -q -p no:cacheprovider $EARLY_TESTS -rfEs > "$out/early.txt" 2>&1
  code=$?; [ $code -eq 0 ] || rc=1
  echo "=== early tests rc=$code at ${SECONDS}s: $(tail -n 1 "$out/early.txt")" | tee -a "$out/summary.txt"
fi

if [ -n "${FLOOR_RANKS:-}" ]; then  # the host-time floor of a Python torch backend on this machine
  timeout 180 python3 benchmarks/host_floor.py --ranks "$FLOOR_RANKS" --json "$out/floor.json" > "$out/floor.txt" 2>&1
  echo "=== host_floor rc=$? at ${SECONDS}s" | tee -a "$out/summary.txt"
  cat "$out/floor.txt" >> "$out/summary.txt"
fi

if [ -n "${LATENCY_RANKS:-}" ]; then  # where a small all_reduce's time goes: rank 0's profile of the dist loop
  timeout 150 python3 tests/fast_cuda/pg_latency.py --ranks "$LATENCY_RANKS" --sizes 8,4096 --iters 200 --profile \
    --label "${LATENCY_LABEL:-run}" --out "$out" > /dev/null 2>&1
  echo "=== pg_latency rc=$? at ${SECONDS}s" | tee -a "$out/summary.txt"
  grep -E "^ *run|R=" "$out/latency.txt" | grep -v "^ " | tee -a "$out/summary.txt"
fi

if [ -n "${GRAPH_RANKS:-}" ]; then  # the device path: eager latency on/off, graph capture + replay, a rank killed mid-replay
  echo "=== pg_graph (ranks $GRAPH_RANKS)" | tee -a "$out/summary.txt"
  timeout "${GRAPH_S:-240}" python3 tests/fast_cuda/pg_graph.py --ranks "$GRAPH_RANKS" --out "$out" \
    ${GRAPH_ARGS:---iters 100} > "$out/pg_graph.txt" 2>&1
  code=$?; [ $code -eq 0 ] || rc=1
  echo "=== pg_graph rc=$code at ${SECONDS}s" | tee -a "$out/summary.txt"
  grep -E "^(PASS|FAIL|BENCH|pg_graph)" "$out/pg_graph.txt" | tee -a "$out/summary.txt"
fi

if [ -n "${SWEEP_RANKS:-}" ]; then  # pgbench all_reduce 16 B - SWEEP_MAX, eager and graph mode (-G, pool tensors), per R
  mkdir -p "$out/sweep"; labels=()
  for R in ${SWEEP_RANKS//,/ }; do
    for mode in eager graph; do
      extra=(); [ "$mode" = graph ] && extra=(-G 5 --mem-pool)
      timeout "${SWEEP_S:-150}" python3 benchmarks/pgbench.py --collective "${SWEEP_COLLECTIVES:-all_reduce}" \
        --backend mooncake:fast --device cuda -g "$R" -b 16 -e "${SWEEP_MAX:-256M}" -f 4 -n "${SWEEP_ITERS:-20}" \
        -w 3 --no-progress "${extra[@]}" -J "$out/sweep/$mode-$R.json" > "$out/sweep/$mode-$R.txt" 2>&1
      code=$?; [ $code -eq 0 ] || rc=1
      echo "=== pgbench $mode R=$R rc=$code at ${SECONDS}s" | tee -a "$out/summary.txt"
      labels+=("R=$R $mode=$out/sweep/$mode-$R.json")
    done
  done
  python3 benchmarks/multigpu_faults.py pg-compare "${labels[@]}" --md "$out/sweep.md" > /dev/null 2>&1
  cat "$out/sweep.md" >> "$out/summary.txt"
fi

if [ -n "${PROFILE_CASES:-}" ]; then  # where the goal misses spend their time (tests/fast_cuda/pg_profile.py)
  echo "=== pg_profile ($PROFILE_CASES)" | tee -a "$out/summary.txt"
  timeout "${PROFILE_S:-240}" python3 tests/fast_cuda/pg_profile.py --cases "$PROFILE_CASES" --out "$out/profile" ${PROFILE_ARGS:-} \
    > "$out/pg_profile.txt" 2>&1
  code=$?; [ $code -eq 0 ] || rc=1
  echo "=== pg_profile rc=$code at ${SECONDS}s" | tee -a "$out/summary.txt"
  grep -E "^(graph|eager|large|e?trace[0-9]+|ehost[0-9]+) " "$out/pg_profile.txt" | tee -a "$out/summary.txt"
  cat "$out"/profile/*trace*.txt "$out"/profile/ehost*.txt 2>/dev/null >> "$out/summary.txt"
fi

if [ "${PG_CHECK:-1}" = 0 ]; then budget=0; fi  # PG_CHECK=0: only the steps above
left=$((budget - SECONDS - 45))
[ "$left" -gt 0 ] && {
echo "=== pg_check (ranks $ranks, deadline ${left}s)" | tee -a "$out/summary.txt"
timeout $((left + 40)) python3 tests/fast_cuda/pg_check.py --ranks "$ranks" --fail-ranks "${FAIL_RANKS:-4}" \
  --deadline "$left" --out "$out" 2>&1 | tee "$out/pg_check.txt" | grep -E "^(PASS|FAIL|SKIP|BENCH|pg_check|machine|CUDA)"
code=${PIPESTATUS[0]}; [ $code -eq 0 ] || rc=1
echo "=== pg_check rc=$code at ${SECONDS}s" | tee -a "$out/summary.txt"
grep -E "^(PASS|FAIL|SKIP|BENCH|pg_check)" "$out/pg_check.txt" >> "$out/summary.txt"
}

if [ $((budget - SECONDS)) -gt 60 ]; then
  timeout $((budget - SECONDS - 10)) python3 -m pytest -q -p no:cacheprovider tests/fast_cuda/test_fast_cuda_pg.py tests/fast_cuda/test_cuda_pg_face.py tests/fast_cuda/test_shared_memory.py \
    -k "test_cuda_" -rfEs > "$out/pytest.txt" 2>&1
  echo "=== pytest (CUDA tests) rc=$? at ${SECONDS}s: $(tail -n 1 "$out/pytest.txt")" | tee -a "$out/summary.txt"
fi

if [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]; then
  echo quit | nvidia-cuda-mps-control; trap - EXIT
fi
echo "gpu_pg_check rc=$rc in ${SECONDS}s" | tee -a "$out/summary.txt"
exit $rc
