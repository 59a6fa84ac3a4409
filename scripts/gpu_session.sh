#!/usr/bin/env bash
# One call on the GPU machine that checks the CUDA planes, steps in the order given, within BUDGET_S (default
# 575) s; a step is skipped when too little time is left for it (machines are scarce: one start does what
# it can).  STEPS (default "graph conf ucx nvshmem"):
#   graph    build the CUDA library, MPS, tests/fast_cuda/pg_graph.py at GRAPH_RANKS (default 2,8): the device
#            path's eager latency, every capturable collective in one graph bitwise vs the model, a rank
#            killed during a replay (scripts/gpu_pg_check.sh; its pg_check as far as PG_BUDGET_S allows)
#   conf     the PG conformance suite on CUDA tensors, fast and ref, PG_CONFIGS (default w2,w8)
#   ucx      the ref plane with CUDA memory handed to UCX, on against off (scripts/gpu_ucx_cuda.sh)
#   nvshmem  the NVSHMEM probe and EP prototype (benchmarks/internode/run_gpu.sh)
#   ep       the CUDA EP fast path: FP8 quantizer vs the model and the EP grid at EP_RANKS (default 1,2,8)
#            (scripts/gpu_fast_check.sh STEPS="unit grid")
#   profile  tests/fast_cuda/pg_profile.py: where graph, eager and large all_reduce spend their time
# Logs: $OUT/<step>/ and $OUT/<step>.txt; a summary on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
budget=${BUDGET_S:-575}
export MOONCAKE_CUDA_CACHE=${MOONCAKE_CUDA_CACHE:-/tmp/cuda-cache}
left() { echo $((budget - SECONDS)); }
for step in ${STEPS:-graph conf ucx nvshmem}; do
  case $step in
    graph)
      [ "$(left)" -gt 200 ] || { echo "=== graph skipped: $(left) s left"; continue; }
      OUT=$out/graph GRAPH_RANKS=${GRAPH_RANKS:-2,8} GRAPH_S=${GRAPH_S:-200} BUDGET_S=${PG_BUDGET_S:-300} \
        timeout $(( $(left) - 5 )) bash scripts/gpu_pg_check.sh > "$out/graph.txt" 2>&1
      echo "=== graph rc=$? at ${SECONDS}s"; cat "$out/graph/summary.txt" 2>/dev/null ;;
    conf)
      [ "$(left)" -gt 120 ] || { echo "=== conf skipped: $(left) s left"; continue; }
      OUT=$out/conf STEPS=pg PG_CONFIGS=${PG_CONFIGS:-w2,w8} timeout $(( $(left) - 5 )) bash scripts/gpu_fast_check.sh \
        > "$out/conf.txt" 2>&1
      echo "=== conf rc=$? at ${SECONDS}s"; grep -hE "passed|failed|rror" "$out"/conf/pg-conformance*.txt | tail -n 8 ;;
    ucx)
      [ "$(left)" -gt 100 ] || { echo "=== ucx skipped: $(left) s left"; continue; }
      OUT=$out/ucx timeout $(( $(left) > 200 ? 190 : $(left) - 5 )) bash scripts/gpu_ucx_cuda.sh > "$out/ucx.txt" 2>&1
      echo "=== ucx rc=$? at ${SECONDS}s"; tail -n 30 "$out/ucx/ucx_cuda.txt" 2>/dev/null ;;
    nvshmem)
      [ "$(left)" -gt 200 ] || { echo "=== nvshmem skipped: $(left) s left"; continue; }
      OUT=$out/nvshmem PYTHON=python3 timeout $(( $(left) - 5 )) bash benchmarks/internode/run_gpu.sh \
        > "$out/nvshmem.txt" 2>&1
      echo "=== nvshmem rc=$? at ${SECONDS}s"; tail -n 40 "$out/nvshmem.txt" ;;
    ep)
      [ "$(left)" -gt 120 ] || { echo "=== ep skipped: $(left) s left"; continue; }
      OUT=$out/ep STEPS="unit grid" RANKS=${EP_RANKS:-1,2,8} timeout $(( $(left) > 260 ? 250 : $(left) - 5 )) \
        bash scripts/gpu_fast_check.sh > "$out/ep.txt" 2>&1
      echo "=== ep rc=$? at ${SECONDS}s"; cat "$out/ep/summary.txt" 2>/dev/null ;;
    profile)
      [ "$(left)" -gt 120 ] || { echo "=== profile skipped: $(left) s left"; continue; }
      OUT=$out/profile PROFILE_CASES=${PROFILE_CASES:-graph,eager,large} PG_CHECK=0 PROFILE_S=$(( $(left) - 60 )) \
        timeout $(( $(left) - 5 )) bash scripts/gpu_pg_check.sh > "$out/profile.txt" 2>&1
      echo "=== profile rc=$? at ${SECONDS}s"; cat "$out/profile/summary.txt" 2>/dev/null ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
echo "gpu_session done at ${SECONDS}s"
