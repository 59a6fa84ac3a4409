"""Worker jobs of tests/fast_cuda/test_graph_host.py: the PG face's CUDA-graph capture path on CPU tensors,
with the stream-capture test patched to say "capturing" (no GPU is needed to reach the argument checks and
the planes' refusals)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def capture_refusals():
    """Every case of a collective issued "while capturing" on this rank: {case: (error type, message)}; then
    the value of an eager all_reduce (every rank still pairs its next op: a refused capture took no
    sequence number)."""
    from mooncake.pg import backend as B
    rank = dist.get_rank()
    x = torch.ones(8)
    cases = {
        "all_reduce": lambda: dist.all_reduce(x),
        "all_reduce BAND": lambda: dist.all_reduce(torch.ones(8, dtype=torch.int32), op=dist.ReduceOp.BAND),
        "premul": lambda: dist.all_reduce(x, op=dist._make_nccl_premul_sum(0.5)),
        "reduce_scatter premul": lambda: dist.reduce_scatter_tensor(torch.empty(4), x,
                                                                    op=dist._make_nccl_premul_sum(0.5)),
        "uneven": lambda: dist.all_to_all_single(torch.empty(8), x, [7, 1], [7, 1]),
        "unequal sides": lambda: dist.all_to_all_single(torch.empty(8, 2), torch.ones(8, 1)),
        "non-contiguous": lambda: dist.all_gather_into_tensor(torch.empty(16, 2)[:, 0], x),
        "dtype": lambda: dist.all_gather_into_tensor(torch.empty(16, dtype=torch.float64), x),
        "reduce": lambda: dist.reduce(x, 0),
        "reduce_scatter list": lambda: dist.reduce_scatter(torch.empty(4), [x[:4].clone(), x[4:].clone()]),
        "broadcast": lambda: dist.broadcast(x, 0),
    }
    saved = B._stream_captured
    B._stream_captured = lambda t: isinstance(t, torch.Tensor)
    out = {}
    try:
        for name, call in cases.items():
            try:
                call()
                out[name] = None
            except Exception as exc:  # noqa: BLE001 - returned to the test
                out[name] = (type(exc).__name__, str(exc))
    finally:
        B._stream_captured = saved
    y = torch.full((4,), float(rank + 1))
    dist.all_reduce(y)
    return out, y.tolist()
