#!/usr/bin/env bash
# EP tests with CUDA tensors on the GPU machine: every rank of a cluster shares the one GPU (cuda:0);
# backends gloo (CPU comm, the Buffer stages through host) and mooncake (CUDA backend) for a subset.
# The CUDA variants are the TestEPBufferCUDA tests; they skip unless MOONCAKE_TEST_DEVICE=cuda and a GPU exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
MOONCAKE_TEST_DEVICE=cuda OMP_NUM_THREADS=1 python3 -m pytest tests/ep -q -p no:cacheprovider -k CUDA -rfEsxX "$@"
