"""``fold_into``: the model's reduction fold written into a given tensor, without temporaries.

``mooncake.model.reduce.fold(op, inputs)`` allocates a new tensor per step; the data plane folds
chunks into shared memory or into the user's tensor, so it uses the same operations in place:

* the accumulator starts as a copy of ``inputs[0]`` converted to the accumulation dtype (float32
  for float16 / bfloat16, else the inputs' dtype), then each further input is combined into it in
  order with the same torch function the model uses (``add``, ``mul``, ``minimum``, ...; the
  accumulator is always the first operand, and a 16-bit input is promoted exactly to float32 by
  torch's type promotion, which is what ``x.to(float32)`` gives);
* AVG divides by ``torch.tensor(n, dtype=acc_dtype)`` (floats, a true IEEE division) or with
  ``rounding_mode="trunc"`` (integers), as the model does;
* the result is rounded once into ``out`` (round to nearest even, as ``.to(dtype)``).

Every step is elementwise, so folding a slice gives the slice of the fold, with one catch: torch's
vectorized loops handle the last ``n % (2 * vector width)`` elements of a call with scalar code,
and for NaN results the two paths may encode the NaN differently (float32 -> float16 conversion
keeps a NaN's sign and payload in the vector path and writes the canonical 0x7E00 in the scalar
one).  So the plane cuts tensors into chunks whose starts are multiples of ``ALIGN`` elements:
every chunk but the last is then vector-only, and the last one's scalar tail is the model's.  For float32 / float64 SUM and AVG the compiled kernel
(``native.sum_into``) replaces the torch calls (same bits: IEEE additions in the same order).
tests/fast_cpu/test_fold.py checks all of it bitwise against the model.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...model.reduce import ReduceOp, accumulator_dtype
from . import native

#: chunk and part boundaries are multiples of this many elements (see above)
ALIGN = 256

_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _combine_(op: ReduceOp, acc: torch.Tensor, x: torch.Tensor) -> None:
    """``acc = op(acc, x)`` in place (the model's ``_combine``)."""
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        if acc.dtype is torch.bool:
            torch.logical_or(acc, x, out=acc)
        else:
            torch.add(acc, x, out=acc)
    elif op is ReduceOp.PRODUCT:
        if acc.dtype is torch.bool:
            torch.logical_and(acc, x, out=acc)
        else:
            torch.mul(acc, x, out=acc)
    elif op is ReduceOp.MIN:
        torch.minimum(acc, x, out=acc)
    elif op is ReduceOp.MAX:
        torch.maximum(acc, x, out=acc)
    elif op is ReduceOp.BAND:
        torch.bitwise_and(acc, x, out=acc)
    elif op is ReduceOp.BOR:
        torch.bitwise_or(acc, x, out=acc)
    else:
        torch.bitwise_xor(acc, x, out=acc)


def _combine_out(op: ReduceOp, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = op(a, b)`` for same-dtype ``a``, ``b``, ``out`` (the first step, fused with the copy)."""
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        (torch.logical_or if a.dtype is torch.bool else torch.add)(a, b, out=out)
    elif op is ReduceOp.PRODUCT:
        (torch.logical_and if a.dtype is torch.bool else torch.mul)(a, b, out=out)
    elif op is ReduceOp.MIN:
        torch.minimum(a, b, out=out)
    elif op is ReduceOp.MAX:
        torch.maximum(a, b, out=out)
    elif op is ReduceOp.BAND:
        torch.bitwise_and(a, b, out=out)
    elif op is ReduceOp.BOR:
        torch.bitwise_or(a, b, out=out)
    else:
        torch.bitwise_xor(a, b, out=out)


def fold_into(op: ReduceOp, inputs: Sequence[torch.Tensor], out: torch.Tensor,
              scratch: torch.Tensor | None = None, nt: bool = False) -> None:
    """``out.copy_(fold(op, inputs))``, bit for bit, with no temporary of the full size.

    ``inputs`` (ascending rank order) and ``out`` are contiguous, of one dtype and numel; ``out``
    must not overlap any input.  ``scratch`` (float32, at least ``out.numel()`` elements) is the
    accumulator for float16 / bfloat16 (allocated when None).  ``nt`` lets the compiled float
    kernels write ``out`` with non-temporal stores (large outputs nobody reads soon).
    """
    op = ReduceOp(op)
    dtype = out.dtype
    n = len(inputs)
    acc_dtype = accumulator_dtype(dtype)
    if acc_dtype is dtype:
        if n == 1:
            native.copy(out, inputs[0], nt)
        elif op in (ReduceOp.SUM, ReduceOp.AVG) and native.sum_into(out, list(inputs), nt):
            pass
        else:
            _combine_out(op, inputs[0], inputs[1], out)
            for x in inputs[2:]:
                _combine_(op, out, x)
        if op is ReduceOp.AVG:
            if dtype in _INTEGER:
                out.div_(n, rounding_mode="trunc")
            else:
                torch.div(out, torch.tensor(n, dtype=acc_dtype), out=out)
        return
    numel = out.numel()
    if scratch is None or scratch.numel() < numel:
        acc = torch.empty(out.shape, dtype=acc_dtype)
    else:
        acc = scratch[:numel].view(out.shape)
    acc.copy_(inputs[0])
    for x in inputs[1:]:
        _combine_(op, acc, x)
    if op is ReduceOp.AVG:
        torch.div(acc, torch.tensor(n, dtype=acc_dtype), out=acc)
    out.copy_(acc)
