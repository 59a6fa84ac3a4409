"""Helpers for notebooks/ep_dispatch_combine.ipynb: a toy MoE and the jobs its small local world runs.

The notebook starts a few ranks with ``mooncake.testing.cluster.Cluster`` (real processes, one
``torch.distributed`` group) and sends them jobs.  Jobs must be importable top-level functions, so they
live here rather than in the notebook.  Everything a rank computes is also computed by the notebook
itself with the global-view model (``mooncake.model.ep``), and the two are compared bit for bit.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from mooncake.ep import Buffer
from mooncake.model.fp8 import dequantize_fp8
from mooncake.testing.cluster import worker_context

_buffers: dict[int, Buffer] = {}  # one Buffer per worker process, kept alive across jobs


# ------------------------------------------------------------------------------ the toy MoE


def toy_inputs(num_tokens: list[int], hidden: int, num_experts: int, top_k: int, seed: int = 0,
               mask_p: float = 0.15):
    """Every rank's tokens, router choices and combine weights, built on the CPU from one seed.

    Returns per-rank lists ``xs`` (``[N_r, H]`` bf16), ``topk_idxs`` (``[N_r, K]`` int64, some entries -1)
    and ``topk_weights`` (``[N_r, K]`` float32, a softmax over the router scores of the chosen experts).
    """
    g = torch.Generator().manual_seed(seed)
    xs, topks, weights = [], [], []
    for n in num_tokens:
        # token magnitudes spread over a few binades so that FP8 scales differ per token and block
        x = torch.randn(n, hidden, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
        scores = torch.randn(n, num_experts, generator=g)
        top = scores.topk(top_k, dim=1)
        topk = top.indices.clone()
        w = torch.softmax(top.values, dim=1).float()
        topk[torch.rand(n, top_k, generator=g) < mask_p] = -1  # masked entries: not sent, not combined
        xs.append(x.to(torch.bfloat16))
        topks.append(topk)
        weights.append(w)
    return xs, topks, weights


def expert_factor(expert: int) -> float:
    """The toy expert ``e`` scales its input by ``1 + 0.1 e`` (a stand-in for an FFN)."""
    return 1.0 + 0.1 * expert


def run_experts(recv_x, recv_scales, recv_count, rank: int, num_local_experts: int) -> torch.Tensor:
    """What this rank's experts return for the rows they received: ``[L, R*T, H]`` bf16.

    FP8 rows are dequantized first (``q * scale_inv``).  Padding rows are NaN on purpose: combine must
    never read them.
    """
    out = torch.full(recv_x.shape, float("nan"), dtype=torch.bfloat16)
    for local in range(num_local_experts):
        count = int(recv_count[local])
        if count == 0:
            continue
        rows = recv_x[local, :count]
        rows = dequantize_fp8(rows, recv_scales[local, :count]) if recv_scales is not None else rows.float()
        factor = torch.tensor(expert_factor(rank * num_local_experts + local), dtype=torch.float32)
        out[local, :count] = (rows * factor).to(torch.bfloat16)
    return out


# ------------------------------------------------------------------------------ jobs (run on every rank)


def _buffer(T: int, H: int, E: int) -> Buffer:
    ctx = worker_context()
    need = Buffer.get_ep_buffer_size_hint(T, H, ctx.world_size, E)
    buf = _buffers.get(0)
    if buf is None or buf.num_ep_buffer_bytes < need:
        buf = _buffers[0] = Buffer(dist.group.WORLD, need)
    return buf


def _normative(recv, recv_count, handle, use_fp8: bool) -> dict:
    """The normative part of a dispatch result, as plain CPU tensors (valid rows only)."""
    q, scales = recv if use_fp8 else (recv, None)
    src_info, layout_range = handle[0], handle[1]
    rows, sc, src = [], [], []
    for local in range(recv_count.shape[0]):
        c = int(recv_count[local])
        # float8 tensors do not survive pickling (the cluster's reply channel): ship the codes as uint8
        rows.append((q[local, :c].view(torch.uint8) if use_fp8 else q[local, :c]).clone())
        sc.append(scales[local, :c].contiguous().clone() if use_fp8 else None)
        src.append(src_info[local, :c].clone())
    return dict(rows=rows, scales=sc, src=src, recv_count=recv_count.clone(), layout_range=layout_range.clone(),
                recv_x_shape=tuple(q.shape), recv_x_dtype=str(q.dtype),
                scales_stride=tuple(scales.stride()) if use_fp8 else None)


def dispatch_combine(x, topk_idx, topk_weights, T: int, E: int, active=None, use_fp8: bool = True,
                     timeout_us: int = 10_000_000, zero_copy: bool = False, stall_s: float = 0.0,
                     skip_combine: bool = False) -> dict:
    """One ``Buffer.dispatch`` + toy experts + ``Buffer.combine`` on this rank.

    ``active`` is this rank's ``active_ranks`` (int32 ``[R]``, default all ones); ``stall_s`` delays this rank before it
    dispatches (a slow rank); ``skip_combine`` stops after dispatch.  Returns the normative outputs.
    """
    ctx = worker_context()
    R, H = ctx.world_size, x.shape[1]
    L = E // R
    buf = _buffer(T, H, E)
    active = torch.ones(R, dtype=torch.int32) if active is None else active.clone()
    if stall_s:
        time.sleep(stall_s)
    t0 = time.monotonic()
    recv, recv_count, handle, _, _ = buf.dispatch(x, topk_idx, active, T, E, timeout_us, use_fp8=use_fp8)
    out = _normative(recv, recv_count, handle, use_fp8)
    out.update(active_after_dispatch=active.clone(), dispatch_s=time.monotonic() - t0)
    if skip_combine:
        return out
    q, scales = recv if use_fp8 else (recv, None)
    y = run_experts(q, scales, recv_count, ctx.rank, L)
    if zero_copy:
        buf.get_next_combine_buffer(handle).copy_(y)  # experts write straight into the combine buffer
    t1 = time.monotonic()
    combined, _, _ = buf.combine(y, topk_idx, topk_weights, active, timeout_us, handle, zero_copy=zero_copy)
    out.update(combined=combined.clone(), active_after_combine=active.clone(), combine_s=time.monotonic() - t1)
    return out


def dispatch_then_exit(x, topk_idx, topk_weights, T: int, E: int, exiting_rank: int, timeout_us: int,
                       use_fp8: bool = True) -> dict:
    """Everyone dispatches; then ``exiting_rank`` dies (``os._exit``) and the others combine without it."""
    import os

    ctx = worker_context()
    R, H = ctx.world_size, x.shape[1]
    buf = _buffer(T, H, E)
    active = torch.ones(R, dtype=torch.int32)
    recv, recv_count, handle, _, _ = buf.dispatch(x, topk_idx, active, T, E, 10_000_000, use_fp8=use_fp8)
    dist.barrier()  # every rank has its rows before one of them dies
    if ctx.rank == exiting_rank:
        os._exit(0)
    q, scales = recv if use_fp8 else (recv, None)
    y = run_experts(q, scales, recv_count, ctx.rank, E // R)
    t0 = time.monotonic()
    combined, _, _ = buf.combine(y, topk_idx, topk_weights, active, timeout_us, handle)
    return dict(combined=combined.clone(), active_after_combine=active.clone(), combine_s=time.monotonic() - t0)
