#!/usr/bin/env bash
# Run on the GPU machine (repo root, wheels for ucxx & co. carried in .whl/): CUDA tensors on the ref plane,
# device memory handed to UCX (MOONCAKE_UCX_CUDA=on) vs staged through host memory (off), over UCX's
# inter-host path (UCX_TLS=tcp,cuda_copy).  Writes $OUT (or ./gpu-out): machine.txt, doctor.txt, ucx_info.txt,
# ucx_cuda.json, ucx_cuda.txt (the table), ucx_cuda.log, proto.txt (UCX_PROTO_INFO's protocol
# choices).  Under 200 s: later cases are skipped (and marked so) past the benchmark's deadline.
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
source "$(dirname "$0")/carried_wheels.sh"
export PYTHONPATH=$PWD
install_carried_wheels /dev/stderr || exit 1
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'; } 2>&1 | tee "$out/machine.txt"
ucx_lib=$(python3 -c 'import libucx, os; print(os.path.dirname(libucx.__file__))' 2>/dev/null)
if [[ -n "$ucx_lib" ]]; then
  LD_LIBRARY_PATH="$ucx_lib/lib:${LD_LIBRARY_PATH:-}" timeout 20 "$ucx_lib/bin/ucx_info" -v -d > "$out/ucx_info.txt" 2>&1
fi
timeout 30 python3 -m mooncake.doctor > "$out/doctor.txt" 2>&1; grep -E "ucx" "$out/doctor.txt"
UCX_PROTO_INFO=y timeout -k 10 150 python3 benchmarks/ucx_cuda.py --out "$out" --deadline-s 110 > "$out/ucx_cuda.log" 2>&1
rc=$?
grep -F "|" "$out/ucx_cuda.log" | head -300 > "$out/proto.txt"
grep -E "^(machine:|mode |op |all_reduce|all_gather|send_recv|all results|ucx_cuda:|Traceback)" "$out/ucx_cuda.log" \
  | tee "$out/ucx_cuda.txt"
echo "gpu_ucx_cuda rc=$rc" | tee -a "$out/machine.txt"
exit $rc
