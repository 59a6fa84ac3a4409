"""Training steps on CUDA tensors over the ``mooncake`` backend (benchmarks/trainbench.py ``--device cuda``):
DDP (default buckets, ``no_sync`` accumulation, the bf16 compression hook) and FSDP2, on the ref and the
fast plane; the fast plane's final parameters equal ref's bit for bit, with 2 and with 4 ranks (the same
fold order).  Skipped where no CUDA device is usable; ranks share the GPU under CUDA MPS where it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINBENCH = os.path.join(REPO, "benchmarks", "trainbench.py")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.timeout(500)
@pytest.mark.parametrize("ranks, modes", [("2", "ddp,ddp_nosync,ddp_bf16,fsdp2"), ("4", "ddp,fsdp2")])
def test_training_on_cuda_fast_equals_ref(tmp_path, ranks, modes):
    cmd = [sys.executable, TRAINBENCH, "--device", "cuda", "--ranks", ranks, "--modes", modes, "--backends",
           "mooncake:ref,mooncake:fast", "--width", "256", "--layers", "3", "--batch", "8", "--steps", "3",
           "--warmup", "1", "--timeout", "200", "--check", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=460,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "trainbench.json").read_text())["results"]
    assert len(rows) == 2 * len(modes.split(","))
    for row in rows:
        assert not row.get("error"), row
        assert row["impl"] == row["backend"].split(":")[1], row
        if row["backend"] == "mooncake:fast":
            assert row["equal"], row
