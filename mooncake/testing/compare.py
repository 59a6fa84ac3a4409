"""Bit-level comparison, the only equality the conformance suites use."""

from __future__ import annotations

import torch


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bytes (NaNs compare by payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bytes(a), _bytes(b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # a fresh tensor has standard strides even for size-1 dims, which .contiguous() may keep odd
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())
    return dense.view(-1).view(torch.uint8)
