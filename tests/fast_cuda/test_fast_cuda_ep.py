"""CUDA fast-path EP kernels vs the global-view model, bit for bit (skips without a usable GPU).

Ranks: ``MOONCAKE_FAST_CUDA_RANKS`` (default ``1,2``; scripts/gpu_fast_check.sh runs 1,2,4,8 under MPS).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mooncake.fast.cuda import unavailable_reason  # noqa: E402

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CUDA fast path unavailable: {REASON}")
RANKS = [int(r) for r in os.environ.get("MOONCAKE_FAST_CUDA_RANKS", "1,2").split(",") if r]


def test_quantize_fp8_matches_model():
    from mooncake.fast.cuda.ep import quantize_fp8
    from mooncake.model.fp8 import quantize_fp8 as model_quantize

    g = torch.Generator().manual_seed(5)
    x = torch.randn(257, 1024, generator=g) * torch.exp(3 * torch.randn(257, 1, generator=g))
    x[0] = 0.0
    x[1, :128] = 1e-6  # amax below the 1e-4 floor
    x[2, 5] = -448.0 * 3
    x[3] = torch.linspace(-1, 1, 1024)
    x = x.to(torch.bfloat16)
    # every bf16 magnitude class in one row block
    x[4] = torch.arange(1024, dtype=torch.int16).mul(61).view(torch.bfloat16).nan_to_num(0.0, 0.0, 0.0)
    q, s = quantize_fp8(x.cuda())
    mq, ms = model_quantize(x)
    assert torch.equal(q.cpu().view(torch.uint8), mq.view(torch.uint8))
    assert torch.equal(s.cpu().view(torch.int32), ms.view(torch.int32))


@pytest.mark.parametrize("ranks", RANKS)
def test_ep_grid_bitwise(ranks, tmp_path):
    from fcuda_grid import run

    assert run(ranks, str(tmp_path), fail=False, timeout_s=240)


@pytest.mark.skipif(max(RANKS) < 2, reason="needs 2+ ranks")
@pytest.mark.parametrize("timeout_us", [2_000_000, -1])
def test_ep_dead_rank_ends_the_wait(timeout_us, tmp_path):
    """A rank exits before dispatch: the survivors finish (deadline, or the liveness watchdog with -1)."""
    from fcuda_grid import run

    assert run(max(max(RANKS), 2), str(tmp_path), fail=True, timeout_s=120, fail_timeout_us=timeout_us)
