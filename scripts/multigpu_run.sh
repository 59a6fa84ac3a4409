#!/usr/bin/env bash
# The multi-GPU run, one batch, everything under $OUT (default ./gpu-out).
#
# On a host with N >= 2 GPUs, one rank per GPU (rank r pinned to GPU r), NVLink multicast off:
#   machine  nvidia-smi -L, topo -m, per-GPU query, NVLink status, torch/NCCL versions, peer access and
#            GPU0<->GPUj copy bandwidth (benchmarks/multigpu_faults.py machine)
#   build    csrc/ for the CUDA fast path (python -m mooncake.fast.cuda.build) and a load check
#   pgbench  benchmarks/pgbench.py, mooncake (fast) against nccl side by side, all_reduce / all_gather /
#            reduce_scatter / all_to_all, 8 B - 1 GiB (-f 2), float sum, in-place and out-of-place, #wrong
#            checked; JSON, plots and a mooncake-vs-nccl table (multigpu_faults.py pg-compare); then
#            (PG_GRAPH=1, the default) the same side by side in graph mode (pgbench -G 5, mooncake's
#            buffers from mooncake.pg.mem_pool()), all_reduce / all_gather_base / reduce_scatter /
#            all_to_all, 8 B - PG_GRAPH_MAXBYTES (256M), into pgbench-graph/ and pgbench.md.
#            Where pgbench has no `--device cuda` the step records "skipped: pgbench has no --device cuda
#            yet"; where MOONCAKE_IMPL=fast cannot serve CUDA tensors it records the reason, runs nccl
#            alone over the full range and mooncake:ref next to nccl up to PG_REF_MAXBYTES (default 1M).
#   epbench  benchmarks/epbench.py in DeepEP's low-latency configuration (T=128, H=7168, top-8, 256
#            experts, FP8 dispatch, BF16 combine) at EP 2/4/8 (those <= N), one rank per GPU
#            (multigpu_faults.py ep-bench), and the table next to DeepEP's published EP8 77 / 114 us and
#            NCCL EP's 224 / 185 GB/s (multigpu_faults.py ep-compare)
#   faults   benchmarks/multigpu_faults.py faults: backend mooncake with CUDA tensors, EP fast path;
#            a rank SIGKILLed mid-dispatch (before and after its send) and mid-all_reduce; survivors
#            finish within the bound with the model's result and one mask; replacements join
#            (is_extension + join_group / get_peer_state / recover_ranks); EP over the recovered group
#
# One GPU: a dry run: DRY_RANKS (default 4) ranks share the GPU under CUDA MPS; NCCL is
# skipped (it refuses two ranks on one device), pgbench runs mooncake next to gloo up to 1M, epbench
# at EP 2 and 4 on the one GPU, faults with DRY_RANKS ranks.  No GPU: a CPU smoke run (pgbench
# mooncake-cpu vs gloo, faults on mooncake-cpu and gloo); epbench and build are skipped.
#
# What comes back from $OUT (the device tool returns at most 8 files, 2 folders deep): summary.txt,
# machine.txt, pgbench.md, pgbench.png, epbench.md, faults.txt and details.tgz (every log, JSON, plot).
#
# Knobs (environment): STEPS (default "machine build pgbench epbench faults"), RANKS (default: N),
# NGPUS (use fewer GPUs than the host has), DRY_RANKS, PG_MAXBYTES (1G; 1M dry), PG_REF_MAXBYTES (1M),
# PG_ITERS (20), PG_WARMUP (5), EP_RANKS (2,4,8), EP_ITERS (50), TIME_BUDGET_S (560: the device tool
# stops a command at 600 s; later steps are skipped, and say so, once the budget is spent), PYTHON.
# Wheels for ucxx & co. in .whl/ are installed into /tmp/site (carry .whl), as every GPU script (scripts/carried_wheels.sh).
set -uo pipefail
set -m  # every step in its own process group, so a step past its limit is stopped with all its children
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
logs=$out/logs; mkdir -p "$logs"
summary=$out/summary.txt; : > "$summary"

# NVLink multicast stays off (on the shared GPU hosts it can take the host's GPUs out of service);
# every program started below inherits these, pgbench's and the cluster's spawned ranks included
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
export MOONCAKE_CUDA_CACHE=${MOONCAKE_CUDA_CACHE:-$PWD/build/cuda-cache}
PY=${PYTHON:-python3}
budget=${TIME_BUDGET_S:-560}
t_start=$SECONDS
steps=" ${STEPS:-machine build pgbench epbench faults} "
rc=0

note() { echo "$*" | tee -a "$summary"; }
has() { [[ "$steps" == *" $1 "* ]]; }
run_step() {  # run_step NAME LIMIT_S CMD...: log to logs/NAME.txt, stop its process group past the limit
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - t_start)))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    note "=== $name: skipped: the time budget (${budget} s) is spent"; rc=1; return 99
  fi
  echo "=== $name (limit ${limit} s): $*" | tee -a "$summary"
  local t0=$SECONDS
  "$@" > "$logs/$name.txt" 2>&1 &
  local pid=$!
  ( sleep "$limit"; kill -TERM -- "-$pid" 2>/dev/null; sleep 10; kill -KILL -- "-$pid" 2>/dev/null ) &
  local watcher=$!
  wait "$pid"
  local code=$?
  kill -- "-$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
  tail -n 25 "$logs/$name.txt"
  note "=== $name: rc=$code in $((SECONDS - t0)) s$( ((code == 143 || code == 137)) && echo " (stopped at its limit)")"
  ((code == 0)) || rc=1
  return $code
}

# -------------------------------------------------------------------------------- environment
source scripts/carried_wheels.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
install_carried_wheels "$logs/wheels.txt" || note "wheels from .whl/ did not install (see logs/wheels.txt)"
ngpu=0
command -v nvidia-smi >/dev/null && ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ -n "${NGPUS:-}" ] && ((NGPUS < ngpu)); then
  ngpu=$NGPUS
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((ngpu - 1)))
fi
if ((ngpu >= 2)); then
  mode=multi; ranks=${RANKS:-$ngpu}; ((ranks > ngpu)) && ranks=$ngpu
  dev=cuda; pg_max=${PG_MAXBYTES:-1G}
elif ((ngpu == 1)); then
  mode=dryrun; ranks=${DRY_RANKS:-4}; dev=cuda; pg_max=${PG_MAXBYTES:-1M}
else
  mode=cpu; ranks=${DRY_RANKS:-3}; dev=cpu; pg_max=${PG_MAXBYTES:-1M}
fi
ep_ranks="" ep_list=${EP_RANKS:-2,4,8}
for x in ${ep_list//,/ }; do ((x <= ranks)) && ep_ranks="$ep_ranks $x"; done
has_ucxx=$("$PY" -c 'import ucxx' >/dev/null 2>&1 && echo 1 || echo 0)
note "# multigpu_run: mode=$mode gpus=$ngpu ranks=$ranks device=$dev ep_ranks=[${ep_ranks# }] ucxx=$has_ucxx" \
  "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
case $mode in
  multi) note "# one rank per GPU (rank r on GPU r)";;
  dryrun) note "# DRY RUN: one GPU, $ranks ranks share it under CUDA MPS; nothing here is a multi-GPU number";;
  cpu) note "# CPU SMOKE RUN: no GPU; only the CPU halves of the steps run";;
esac

# -------------------------------------------------------------------------------- machine
if has machine; then
  machine_info() {
    echo "## nvidia-smi -L"; nvidia-smi -L 2>&1
    echo; echo "## nvidia-smi topo -m"; nvidia-smi topo -m 2>&1
    echo; echo "## nvidia-smi --query-gpu"
    nvidia-smi --query-gpu=index,name,pci.bus_id,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv 2>&1
    echo; echo "## nvidia-smi nvlink -s (GPU 0)"; nvidia-smi nvlink -s -i 0 2>&1 | head -n 24
    echo; echo "## host"; uname -r; nproc; free -g 2>&1 | head -n 2
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    echo; echo "## peer access, copy bandwidth, NCCL (benchmarks/multigpu_faults.py machine)"
    "$PY" benchmarks/multigpu_faults.py machine --out "$out/machine"
  }
  run_step machine 120 machine_info
  cp "$logs/machine.txt" "$out/machine.txt"
fi

# -------------------------------------------------------------------------------- build
fast_ok=0
if has build && [ "$dev" = cuda ]; then
  if run_step build 300 "$PY" -m mooncake.fast.cuda.build \
      && run_step load 60 "$PY" -c 'from mooncake.fast.cuda import load; lib, why = load(); print(lib, why); assert lib, why'; then
    fast_ok=1
  fi
elif [ "$dev" = cuda ]; then
  "$PY" -c 'from mooncake.fast.cuda import load; lib, why = load(); assert lib, why' >/dev/null 2>&1 && fast_ok=1
fi

# MPS for the one-GPU dry run (the ranks' kernels must run at once: without MPS, one GPU time-slices
# processes, ~4.5 ms per kernel-to-kernel round trip against ~1.2 µs with MPS)
if [ "$mode" = dryrun ]; then
  mps_pipe=$(mktemp -d) mps_log=$(mktemp -d)
  export CUDA_MPS_PIPE_DIRECTORY=$mps_pipe CUDA_MPS_LOG_DIRECTORY=$mps_log
  if nvidia-cuda-mps-control -d; then
    note "# MPS started ($mps_pipe)"
    trap 'echo quit | nvidia-cuda-mps-control; cp -r "$mps_log" "$logs/mps-log" 2>/dev/null' EXIT
  else
    note "# MPS did not start: the ranks are time-sliced (slow, still correct)"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi

# -------------------------------------------------------------------------------- pgbench
if has pgbench; then
  pgb=benchmarks/pgbench.py
  mkdir -p "$out/pgbench"
  help=$("$PY" $pgb --help 2>&1)
  colls=""
  for c in all_reduce all_gather reduce_scatter all_to_all; do
    if grep -qw -- "$c" <<<"$help"; then colls="$colls,$c"
    elif [ $c = all_to_all ] && grep -qw alltoall <<<"$help"; then colls="$colls,alltoall"
    else note "pgbench: collective $c: skipped: pgbench does not offer it"; fi
  done
  colls=${colls#,}
  iters=(-n "${PG_ITERS:-20}" -w "${PG_WARMUP:-5}" -c 1 --no-progress)
  if [ "$dev" = cuda ] && ! grep -qE -- '--device[^a-z_-].*cuda' <<<"$help"; then
    note "pgbench: skipped: pgbench has no --device cuda yet"
  elif [ "$dev" = cuda ]; then
    why_fast=$("$PY" -c 'import mooncake.impl as i; print(i.fast_unavailable_reason("cuda") or "")' 2>&1 | tail -n 1)
    mooncake=""
    if [ "$has_ucxx" != 1 ]; then
      note "pgbench: mooncake: skipped: ucxx is not importable (carry .whl/ with the ucxx wheels)"
    elif [ -z "$why_fast" ]; then
      mooncake="mooncake:fast"
    else
      note "pgbench: mooncake:fast: skipped: $why_fast"
      mooncake="mooncake:ref"
    fi
    if [ "$mode" = multi ]; then
      if [ "$mooncake" = "mooncake:fast" ]; then
        run_step pgbench 360 "$PY" $pgb --collective "$colls" --backend mooncake:fast,nccl --device cuda -g "$ranks" \
          -b 8 -e "$pg_max" -f 2 "${iters[@]}" -J "$out/pgbench/pg-fast-nccl.json" --plot "$out/pgbench/pg-fast-nccl.png"
        if [ "${PG_GRAPH:-1}" = 1 ]; then  # graph mode, the mode of the several-GPU goals; mooncake on its pool
          mkdir -p "$out/pgbench-graph"
          run_step pgbench-graph 240 "$PY" $pgb --collective all_reduce,all_gather_base,reduce_scatter,alltoall \
            --backend mooncake:fast,nccl --device cuda -g "$ranks" -b 8 -e "${PG_GRAPH_MAXBYTES:-256M}" -f 4 \
            "${iters[@]}" -G 5 --mem-pool -J "$out/pgbench-graph/pg-graph-fast-nccl.json" \
            --plot "$out/pgbench-graph/pg-graph-fast-nccl.png"
        fi
      else
        run_step pgbench-nccl 300 "$PY" $pgb --collective "$colls" --backend nccl --device cuda -g "$ranks" \
          -b 8 -e "$pg_max" -f 2 "${iters[@]}" -J "$out/pgbench/pg-nccl.json" --plot "$out/pgbench/pg-nccl.png"
        if [ -n "$mooncake" ] && [ "${PG_REF_MAXBYTES:-1M}" != 0 ]; then
          note "pgbench: mooncake:ref (host-staged ref data plane, not a performance claim) next to nccl, 8 B - ${PG_REF_MAXBYTES:-1M}"
          run_step pgbench-ref 180 "$PY" $pgb --collective "$colls" --backend "$mooncake,nccl" --device cuda -g "$ranks" \
            -b 8 -e "${PG_REF_MAXBYTES:-1M}" -f 2 "${iters[@]}" -J "$out/pgbench/pg-ref-nccl.json" \
            --plot "$out/pgbench/pg-ref-nccl.png"
        fi
      fi
    else
      note "pgbench: nccl: skipped: one GPU (NCCL refuses two ranks on one device); gloo stands in for the side-by-side path"
      if [ -n "$mooncake" ]; then
        run_step pgbench-dry 240 "$PY" $pgb --collective "$colls" --backend "$mooncake,gloo" --device cuda -g "$ranks" \
          -b 8 -e "$pg_max" -f 4 "${iters[@]}" -J "$out/pgbench/pg-dry.json" --plot "$out/pgbench/pg-dry.png"
      fi
    fi
  else
    note "pgbench: nccl and mooncake (CUDA): skipped: no GPU; mooncake-cpu vs gloo instead"
    run_step pgbench-cpu 240 "$PY" $pgb --collective "$colls" --backend mooncake-cpu,gloo --device cpu -g "$ranks" \
      -b 8 -e "$pg_max" -f 8 "${iters[@]}" -J "$out/pgbench/pg-cpu.json" --plot "$out/pgbench/pg-cpu.png"
  fi
  jsons=$(ls "$out"/pgbench/*.json 2>/dev/null)
  if [ -n "$jsons" ]; then
    "$PY" benchmarks/multigpu_faults.py pg-compare $jsons --md "$out/pgbench.md" > /dev/null 2>&1 \
      || note "pgbench: pg-compare failed"
    main_png=$(ls "$out"/pgbench/pg-fast-nccl.png "$out"/pgbench/pg-nccl.png "$out"/pgbench/*.png 2>/dev/null | head -n 1)
    [ -n "$main_png" ] && cp "$main_png" "$out/pgbench.png"
  fi
  if [ -s "$out/pgbench-graph/pg-graph-fast-nccl.json" ]; then
    "$PY" benchmarks/multigpu_faults.py pg-compare "$out/pgbench-graph/pg-graph-fast-nccl.json" \
      --md "$out/pgbench-graph.md" > /dev/null 2>&1 || note "pgbench: pg-compare (graph mode) failed"
  fi
  { grep -h "^pgbench" "$summary"; echo; cat "$out/pgbench.md" 2>/dev/null
    [ -s "$out/pgbench-graph.md" ] && { echo; echo "# CUDA graphs (pgbench -G 5; mooncake on mooncake.pg.mem_pool())"
      cat "$out/pgbench-graph.md"; }; } > "$out/pgbench.md.tmp"
  mv "$out/pgbench.md.tmp" "$out/pgbench.md"
fi

# -------------------------------------------------------------------------------- epbench
if has epbench; then
  if [ "$dev" != cuda ]; then
    note "epbench: skipped: no GPU"
  elif [ "$fast_ok" != 1 ]; then
    note "epbench: skipped: the CUDA fast path did not build or load (logs/build.txt, logs/load.txt)"
  elif [ -z "$ep_ranks" ]; then
    note "epbench: skipped: no EP size in EP_RANKS fits $ranks ranks"
  else
    for r in $ep_ranks; do
      run_step "epbench-R$r" 200 "$PY" benchmarks/multigpu_faults.py ep-bench --ranks "$r" --out "$out/epbench" \
        --iters "${EP_ITERS:-50}" --timeout 180
    done
    "$PY" benchmarks/multigpu_faults.py ep-compare "$out/epbench" --md "$out/epbench.md" > /dev/null 2>&1 \
      || note "epbench: no results to compare"
    [ "$mode" = dryrun ] && [ -f "$out/epbench.md" ] && sed -i '1a\
\
DRY RUN: every rank on the one GPU under MPS; these are not multi-GPU numbers.' "$out/epbench.md"
  fi
fi

# -------------------------------------------------------------------------------- faults
if has faults; then
  if [ "$dev" = cuda ]; then
    if [ "$has_ucxx" != 1 ]; then
      note "faults: skipped: ucxx is not importable (the mooncake backend needs it; carry .whl/)"
    else
      run_step faults 330 "$PY" benchmarks/multigpu_faults.py faults --device cuda --backend mooncake --ranks "$ranks" \
        --out "$out/faults"
    fi
  else
    run_step faults-mooncake-cpu 200 "$PY" benchmarks/multigpu_faults.py faults --device cpu --backend mooncake-cpu \
      --ranks "$ranks" --out "$out/faults-mooncake-cpu"
    run_step faults-gloo 120 "$PY" benchmarks/multigpu_faults.py faults --device cpu --backend gloo --ranks "$ranks" \
      --out "$out/faults-gloo"
  fi
  cat "$logs"/faults*.txt > "$out/faults.txt" 2>/dev/null
fi

# -------------------------------------------------------------------------------- pack
if [ "$mode" = dryrun ] && [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]; then
  echo quit | nvidia-cuda-mps-control; trap - EXIT; sleep 1; cp -r "$mps_log" "$logs/mps-log" 2>/dev/null
fi
note "# multigpu_run rc=$rc in $((SECONDS - t_start)) s (mode=$mode)"
find "$out" -name 'store*' -delete 2>/dev/null
( cd "$out" && tar czf details.tgz --exclude=details.tgz $(ls -d logs machine pgbench pgbench-graph epbench faults* 2>/dev/null | grep -v '^faults.txt$') \
    2>/dev/null && rm -rf logs machine pgbench pgbench-graph pgbench-graph.md epbench faults faults-mooncake-cpu faults-gloo )
# what the command's output tail should show even if no file comes back
echo; cat "$out/epbench.md" 2>/dev/null
echo; grep -h '^\[\(PASS\|FAIL\|SKIP\)\]\|^# faults:' "$out/faults.txt" 2>/dev/null
echo; cat "$summary"
ls "$out"
exit $rc
