#!/usr/bin/env bash
# Run on the GPU machine (repo root, wheels for ucxx & co. carried in .whl/): checks the ref
# implementation with CUDA tensors — the PG demo on backend `mooncake` and the EP suite —
# and writes the logs to $OUT (or ./gpu-out). Notes of what each run showed: docs/gpu-runs.md.
# Usage: scripts/gpu_ref_check.sh [pg] [ep]   (default: both; each part has its own time limit)
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
parts=${*:-pg ep}
source "$(dirname "$0")/carried_wheels.sh"
export PYTHONPATH=$PWD
install_carried_wheels /dev/stderr || exit 1
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'; } 2>&1 | tee "$out/machine.txt"
rc=0
if [[ " $parts " == *" pg "* ]]; then
  timeout 300 python3 -m mooncake.demo --device cuda --ranks 4 2>&1 | tee "$out/pg_demo_cuda.txt" || rc=1
fi
if [[ " $parts " == *" ep "* ]]; then
  timeout "${EP_TIMEOUT_S:-380}" bash tests/ep/run_cuda.sh --durations=10 2>&1 | tee "$out/ep_cuda.txt" || rc=1
fi
echo "gpu_ref_check ($parts) rc=$rc" | tee -a "$out/machine.txt"
exit $rc
