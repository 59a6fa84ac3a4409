"""The reduction contract as code: which (op, dtype) pairs exist and how a fold is computed.

``fold(op, inputs)`` is the single definition used by the global-view model, the ref data plane and
the tests: a left fold over the inputs of the active ranks in ascending rank order, seeded with the
lowest active rank's tensor.  Integers, bool, float32 and float64 accumulate in their own dtype;
float16 and bfloat16 accumulate in float32 and are rounded once at the end.  AVG divides the SUM
accumulator by the number of inputs (a true IEEE division for floats, truncation toward zero for
integers) before that single rounding.

``PREMUL_SUM(factor)`` (torch's ``dist._make_nccl_premul_sum``, which FSDP2 uses for reduce-scatter)
is NCCL's definition: every input is first multiplied by ``factor`` -- in the accumulator dtype,
rounded once back to the input dtype (``premul``, which is what ``x * factor`` computes in torch,
and what NCCL's pre-multiply does per element) -- then the scaled inputs are SUM-folded as above
(``premul_sum``).  Floating dtypes only.  It is not a wire op: the PG face scales each rank's input
and the data planes run SUM, so ref and fast give the same bits.
"""

from __future__ import annotations

import enum
from typing import Sequence

import torch


class ReduceOp(enum.IntEnum):
    """Reduction operators, numbered for the wire (stable across versions)."""

    SUM = 0
    PRODUCT = 1
    MIN = 2
    MAX = 3
    AVG = 4
    BAND = 5
    BOR = 6
    BXOR = 7


#: dtypes every collective accepts, numbered for the wire (stable across versions).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bool: 0,
    torch.uint8: 1,
    torch.int8: 2,
    torch.int16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.float16: 6,
    torch.bfloat16: 7,
    torch.float32: 8,
    torch.float64: 9,
}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}

_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BITWISE = (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fold over ``dtype`` inputs accumulates in (float32 for 16-bit floats)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_reducible(op: ReduceOp, dtype: torch.dtype) -> str | None:
    """Why ``op`` cannot reduce ``dtype`` tensors, or None when it can."""
    if dtype not in DTYPE_CODES:
        return f"dtype {dtype} is not supported (supported: {', '.join(map(str, DTYPE_CODES))})"
    if op in _BITWISE and dtype in _FLOAT:
        return f"{op.name} needs an integer or bool dtype, got {dtype}"
    if op is ReduceOp.AVG and dtype is torch.bool:
        return "AVG is not defined for bool tensors"
    return None


def _combine(op: ReduceOp, acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        return torch.logical_or(acc, x) if acc.dtype is torch.bool else torch.add(acc, x)
    if op is ReduceOp.PRODUCT:
        return torch.logical_and(acc, x) if acc.dtype is torch.bool else torch.mul(acc, x)
    if op is ReduceOp.MIN:
        return torch.minimum(acc, x)
    if op is ReduceOp.MAX:
        return torch.maximum(acc, x)
    if op is ReduceOp.BAND:
        return torch.bitwise_and(acc, x)
    if op is ReduceOp.BOR:
        return torch.bitwise_or(acc, x)
    return torch.bitwise_xor(acc, x)


def fold(op: ReduceOp, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reduce ``inputs`` (ordered by ascending rank, same shape and dtype) into a new tensor.

    Returns a contiguous tensor of the inputs' dtype and shape on the inputs' device.
    """
    if not inputs:
        raise ValueError("fold needs at least one input")
    op = ReduceOp(op)
    dtype = inputs[0].dtype
    reason = check_reducible(op, dtype)
    if reason:
        raise ValueError(reason)
    acc_dtype = accumulator_dtype(dtype)
    acc = inputs[0].to(acc_dtype, copy=True).contiguous()
    for x in inputs[1:]:
        acc = _combine(op, acc, x.to(acc_dtype))
    if op is ReduceOp.AVG:
        n = len(inputs)
        if dtype in _INTEGER:
            acc = torch.div(acc, n, rounding_mode="trunc")
        else:
            acc = torch.div(acc, torch.tensor(n, dtype=acc_dtype, device=acc.device))
    return acc.to(dtype)


PREMUL_SUM = "PREMUL_SUM"  # torch's name; not a ReduceOp member (it carries a factor and never goes on the wire)


def check_premul(dtype: torch.dtype) -> str | None:
    """Why PREMUL_SUM cannot reduce ``dtype`` tensors, or None when it can."""
    if dtype not in _FLOAT:
        return f"PREMUL_SUM needs a floating dtype ({', '.join(map(str, _FLOAT))}), got {dtype}"
    return None


def premul_factor(factor) -> float:
    """The scalar of a PREMUL_SUM: a Python number, or a one-element tensor (torch accepts both)."""
    if isinstance(factor, torch.Tensor):
        if factor.numel() != 1:
            raise ValueError(f"PREMUL_SUM factor must be a scalar, got a tensor of {factor.numel()} elements")
        return float(factor.item())
    return float(factor)


def premul(x: torch.Tensor, factor) -> torch.Tensor:
    """``x`` multiplied by ``factor`` in the accumulator dtype and rounded once to ``x``'s dtype
    (a new contiguous tensor): bitwise what ``x * factor`` gives in torch."""
    acc_dtype = accumulator_dtype(x.dtype)
    scale = torch.tensor(premul_factor(factor), dtype=acc_dtype, device=x.device)
    return torch.mul(x.to(acc_dtype), scale).to(x.dtype).contiguous()


def premul_sum(inputs: Sequence[torch.Tensor], factor) -> torch.Tensor:
    """PREMUL_SUM over ``inputs`` (ordered by ascending rank): SUM fold of the ``premul``-ed inputs."""
    if not inputs:
        raise ValueError("premul_sum needs at least one input")
    reason = check_premul(inputs[0].dtype)
    if reason:
        raise ValueError(reason)
    return fold(ReduceOp.SUM, [premul(x, factor) for x in inputs])
