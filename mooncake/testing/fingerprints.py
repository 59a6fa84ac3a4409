"""The fingerprint the control plane gives a plane-harness test case (a dict with ``op``, ``dtype``,
``numel`` and optional ``k``, ``red``, ``root``), for tests that drive a data plane directly."""

from __future__ import annotations

import torch

from ..control.fingerprint import NO_DTYPE, NO_ROOT, Fingerprint
from ..control.wire import OpCode
from ..model.reduce import DTYPE_CODES, ReduceOp

_SLOT_OPS = ("all_gather", "reduce_scatter", "all_to_all")


def of_case(case: dict) -> Fingerprint:
    op, numel, k = case["op"], case["numel"], case.get("k") or 0
    if op == "barrier":
        return Fingerprint(OpCode.BARRIER)
    dtype = DTYPE_CODES[getattr(torch, case["dtype"])] if case.get("dtype") else NO_DTYPE
    red = int(ReduceOp[case["red"]]) if case.get("red") else 0
    root = NO_ROOT if case.get("root") is None else case["root"]
    if op == "all_to_all":
        return Fingerprint(OpCode.ALL_TO_ALL, dtype, slots=k, sends=(numel,) * k, recvs=(numel,) * k)
    return Fingerprint(OpCode[op.upper()], dtype, red, root, numel, k if op in _SLOT_OPS else 0)
