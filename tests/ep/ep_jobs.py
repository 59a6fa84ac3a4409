"""Jobs for tests/ep, run inside mooncake.testing.cluster workers (and input builders shared with the parent).

Named ``ep_jobs`` (not ``jobs``) so it cannot collide with tests/pg's job module in one pytest process.
Everything random is built on the CPU from explicit seeds, so the parent re-creates every rank's inputs
bit for bit and evaluates the global-view model (mooncake.model.ep) on them.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from mooncake.ep import Buffer
from mooncake.model.fp8 import dequantize_fp8
from mooncake.testing.cluster import worker_context

BIG_TIMEOUT_US = 20_000_000  # for calls that must not time out (2 cores, several processes)

# ------------------------------------------------------------------------------------- shared inputs


def make_inputs(case: dict, rank: int):
    """(x [N, H] bf16, topk_idx [N, K] int64, topk_weights [N, K] fp32) of ``rank`` for ``case`` (CPU)."""
    g = torch.Generator().manual_seed(case["seed"] * 1009 + rank)
    n, h, e, k = case["n"][rank], case["H"], case["E"], case["K"]
    # magnitudes spread over a few binades so the FP8 scales differ per block
    x = (torch.randn(n, h, generator=g) * torch.exp(torch.randn(n, 1, generator=g))).to(torch.bfloat16)
    topk = torch.rand(n, e, generator=g).argsort(dim=1)[:, :k].contiguous()
    if case.get("mask_p", 0.0):
        topk[torch.rand(n, k, generator=g) < case["mask_p"]] = -1
    weights = torch.randn(n, k, generator=g, dtype=torch.float32)
    return x, topk, weights


def upstream_inputs(case: dict, rank: int):
    """Upstream test_ep_grid.py's per-rank inputs (seed 2026+rank, N = int(T*(1-0.05*rank/R)), topk of
    random scores, softmax weights), at a CPU-sized shape."""
    T, H, E, K, R = case["T"], case["H"], case["E"], case["K"], case["R"]
    torch.manual_seed(2026 + rank)
    n = int(T * (1 - 0.05 * rank / R))
    x = torch.randn(n, H, dtype=torch.bfloat16)
    scores = torch.randn(n, E, dtype=torch.float32)
    topk = torch.topk(scores, K, dim=-1).indices
    weights = torch.softmax(torch.rand(n, K, dtype=torch.float32), dim=-1)
    return x, topk, weights


def expert_output(recv_x, recv_scales, recv_count, rank: int, num_local: int, use_fp8: bool,
                  scale_fn=lambda e: 1.0 + 0.1 * e) -> torch.Tensor:
    """Deterministic expert e = rank*L + l: dequantize (FP8) or widen (bf16), times fl32(scale_fn(e)), to bf16.

    Padding rows are NaN: combine must never read them.
    """
    out = torch.full(recv_x.shape, float("nan"), dtype=torch.bfloat16, device=recv_x.device)
    for l in range(num_local):
        c = int(recv_count[l])
        if c == 0:
            continue
        rows = dequantize_fp8(recv_x[l, :c], recv_scales[l, :c]) if use_fp8 else recv_x[l, :c].float()
        factor = torch.tensor(scale_fn(rank * num_local + l), dtype=torch.float32, device=recv_x.device)
        out[l, :c] = (rows * factor).to(torch.bfloat16)
    return out


def upstream_scale(e: int) -> float:
    return 0.1 * e + 1.0


# ------------------------------------------------------------------------------------- worker helpers


def _device() -> torch.device:
    ctx = worker_context()
    if ctx.device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _finish(kind: str, event, hook) -> bool:
    """Complete a call in its mode; True if the returned event/hook have the documented types."""
    ok = callable(hook)
    if kind == "hook":
        ok = ok and event is None
        hook()
    elif kind == "async":
        ok = ok and event is not None and hasattr(event, "current_stream_wait")
        event.current_stream_wait()
        with event:
            pass
    else:
        ok = ok and event is None
    return ok


def _valid_dispatch(recv, recv_count, handle, use_fp8: bool) -> dict:
    """The normative part of a dispatch result (valid rows only), FP8 codes as uint8."""
    q, scales = recv if use_fp8 else (recv, None)
    src_info, layout_range = handle[0], handle[1]
    rows, sc, src = [], [], []
    for l in range(recv_count.shape[0]):
        c = int(recv_count[l])
        rows.append((q[l, :c].view(torch.uint8) if use_fp8 else q[l, :c]).clone())
        sc.append(scales[l, :c].contiguous().clone() if use_fp8 else None)
        src.append(src_info[l, :c].clone())
    return dict(rows=rows, scales=sc, src=src, layout=layout_range.clone(), count=recv_count.clone(),
                scales_stride=tuple(scales.stride()) if use_fp8 else None,
                recv_dtype=str(q.dtype), recv_shape=tuple(q.shape))


def run_pair(buf: Buffer, case: dict, x, topk, weights, active, dev, timeout_us: int = BIG_TIMEOUT_US,
             stats=None, scale_fn=lambda e: 1.0 + 0.1 * e) -> dict:
    """One dispatch + expert + combine on ``buf`` in the case's mode; the normative outputs."""
    ctx = worker_context()
    T, E, R = case["T"], case["E"], ctx.world_size
    L, fp8, mode = E // R, case["fp8"], case.get("mode", "plain")
    kw = dict(async_finish=mode == "async", return_recv_hook=mode == "hook")
    t0 = time.monotonic()
    recv, count, handle, event, hook = buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=fp8,
                                                    cumulative_local_expert_recv_stats=stats, **kw)
    types_ok = _finish(mode, event, hook)
    t_dispatch = time.monotonic() - t0
    res = _valid_dispatch(recv, count, handle, fp8)
    res["active_dispatch"] = active.clone()
    q, scales = recv if fp8 else (recv, None)
    y = expert_output(q, scales, count, ctx.rank, L, fp8, scale_fn)
    if case.get("zc"):
        cb = buf.get_next_combine_buffer(handle)
        types_ok = types_ok and tuple(cb.shape) == tuple(y.shape) and cb.dtype == torch.bfloat16
        cb.copy_(y)
        xin = cb
    else:
        xin = y
    out = torch.zeros(x.shape, dtype=torch.bfloat16, device=dev) if case.get("out") else None
    t1 = time.monotonic()
    combined, event, hook = buf.combine(xin, topk, weights, active, timeout_us, handle, zero_copy=bool(case.get("zc")),
                                        out=out, **kw)
    types_ok = _finish(mode, event, hook) and types_ok
    res["t_combine"] = time.monotonic() - t1
    if out is not None:
        types_ok = types_ok and combined.data_ptr() == out.data_ptr()
    res.update(combined=combined.clone(), active_combine=active.clone(), types_ok=types_ok, t_dispatch=t_dispatch,
               device=str(combined.device) + "/" + str(q.device))
    return res


def _budget(cases, R) -> int:
    return max(Buffer.get_ep_buffer_size_hint(c["T"], c["H"], R, c["E"]) for c in cases)


# ------------------------------------------------------------------------------------- jobs


def grid_job(cases: list[dict]) -> dict:
    """All cases in a row on ONE Buffer (consecutive calls), with recv stats accumulated per E."""
    ctx = worker_context()
    dev = _device()
    R = ctx.world_size
    buf = Buffer(dist.group.WORLD, _budget(cases, R))
    stats = {}
    results = []
    for case in cases:
        x, topk, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
        active = torch.tensor(case["mask"], dtype=torch.int32, device=dev)  # a masked rank takes part too
        st = stats.setdefault(case["E"], torch.zeros(case["E"] // R, dtype=torch.int32, device=dev))
        results.append(run_pair(buf, case, x, topk, w, active, dev, stats=st,
                                timeout_us=case.get("timeout_us", BIG_TIMEOUT_US)))
    return dict(results=results, stats={e: s.clone() for e, s in stats.items()})


def upstream_grid_job(cases: list[dict]) -> list[dict]:
    """Upstream test_ep_grid design: a fresh Buffer per case, expert recv*(0.1e+1), out= given.  Upstream's
    failed rank exits; here it stays alive and masked on every rank, so it takes part (and still receives)."""
    ctx = worker_context()
    dev = _device()
    results = []
    for case in cases:
        buf = Buffer(dist.group.WORLD, Buffer.get_ep_buffer_size_hint(case["T"], case["H"], ctx.world_size, case["E"]))
        x, topk, w = (t.to(dev) for t in upstream_inputs(case, ctx.rank))
        active = torch.ones(ctx.world_size, dtype=torch.int32, device=dev)
        if case["fail_rank"] >= 0:
            active[case["fail_rank"]] = 0
        results.append(run_pair(buf, case, x, topk, w, active, dev, scale_fn=upstream_scale,
                                timeout_us=case.get("timeout_us", BIG_TIMEOUT_US)))
    return results


def warmup_job(case: dict) -> bool:
    """One dispatch + combine among all ranks, so every pair of ranks has talked before a kill."""
    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case], ctx.world_size))
    x, topk, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
    run_pair(buf, case, x, topk, w, torch.ones(ctx.world_size, dtype=torch.int32, device=dev), dev)
    return True


def survivor_job(case: dict, timeout_us: int) -> dict:
    """A survivor of a dead peer: dispatch + combine with all ranks marked alive and a short deadline."""
    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case], ctx.world_size))
    x, topk, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
    active = torch.ones(ctx.world_size, dtype=torch.int32, device=dev)
    t0 = time.monotonic()
    res = run_pair(buf, case, x, topk, w, active, dev, timeout_us=timeout_us)
    res["t_total"] = time.monotonic() - t0
    # consecutive call on the same Buffer with the mask the failure left behind: no waiting at all
    t1 = time.monotonic()
    res["second"] = run_pair(buf, case, x, topk, w, active.clone(), dev, timeout_us=timeout_us)
    res["t_second"] = time.monotonic() - t1
    return res


def dispatch_then_exit_job(case: dict, timeout_us: int, exiting_rank: int) -> dict:
    """Every rank dispatches; ``exiting_rank`` then exits (os._exit) and the others combine without it."""
    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case], ctx.world_size))
    x, topk, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
    active = torch.ones(ctx.world_size, dtype=torch.int32, device=dev)
    T, E, R = case["T"], case["E"], ctx.world_size
    recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, BIG_TIMEOUT_US, use_fp8=case["fp8"])
    res = _valid_dispatch(recv, count, handle, case["fp8"])
    res["active_dispatch"] = active.clone()
    dist.barrier()  # everyone has received before the exit (keeps the dispatch half deterministic)
    if ctx.rank == exiting_rank:
        os._exit(0)
    q, scales = recv if case["fp8"] else (recv, None)
    y = expert_output(q, scales, count, ctx.rank, E // R, case["fp8"])
    t0 = time.monotonic()
    combined, _, _ = buf.combine(y, topk, w, active, timeout_us, handle)
    res.update(combined=combined.clone(), active_combine=active.clone(), t_combine=time.monotonic() - t0)
    return res


# ------------------------------------------------------------------------------------- preconditions

PRE_CASE = dict(T=8, H=128, E=4, K=2, fp8=True, mode="plain", seed=77, n=[8, 5, 3, 0], mask_p=0.2)
CHECK_CASE = dict(PRE_CASE, seed=78, n=[6, 8, 1, 4], zc=True, out=True)


def _catch(fn) -> dict | None:
    from mooncake.pg import ArgumentError

    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        return dict(type=type(exc).__name__, is_argument_error=isinstance(exc, ArgumentError), msg=str(exc))
    return None


def precondition_job(names: list[str]) -> dict:
    """Each bad call (identical on every rank, so no rank is left waiting), then a correct
    dispatch + combine on the same Buffer; returns {name: (exception info, check-call result)}."""
    ctx = worker_context()
    dev = _device()
    R = ctx.world_size
    c = PRE_CASE
    T, H, E, K = c["T"], c["H"], c["E"], c["K"]
    group = dist.group.WORLD
    buf = Buffer(group, Buffer.get_ep_buffer_size_hint(T, H, R, E))
    other = Buffer(group, Buffer.get_ep_buffer_size_hint(T, H, R, E))
    x, topk, w = (t.to(dev) for t in make_inputs(c, ctx.rank))
    ones = lambda: torch.ones(R, dtype=torch.int32, device=dev)  # noqa: E731
    L = E // R

    def dispatch(b=buf, x=x, topk=topk, active=None, T=T, E=E, timeout=BIG_TIMEOUT_US, **kw):
        return b.dispatch(x, topk, ones() if active is None else active, T, E, timeout, **kw)

    def good_dispatch(topk=topk, **kw):
        return dispatch(topk=topk, use_fp8=False, **kw)

    def combine_with(handle, xin=None, topk=topk, weights=w, timeout=BIG_TIMEOUT_US, **kw):
        if xin is None:
            xin = torch.zeros(L, R * T, H, dtype=torch.bfloat16, device=dev)
        return buf.combine(xin, topk, weights, ones(), timeout, handle, **kw)

    def other_topk():
        t = topk.clone()
        swap = [0, 1] if t[0].tolist()[:2] != [0, 1] else [1, 0]
        t[0, :2] = torch.tensor(swap, device=dev)  # a different, still valid routing of token 0
        return t

    def handle_other_buffer():
        _, _, h, _, _ = dispatch(b=other, use_fp8=False)
        combine_with(h)

    def handle_other_topk():
        _, _, h, _, _ = good_dispatch()
        alt = other_topk()
        good_dispatch(topk=alt)
        combine_with(h, topk=alt)

    def zero_copy_without_buffer():
        _, _, h, _, _ = good_dispatch()
        combine_with(h, zero_copy=True)

    def hidden_mismatch():
        _, _, h, _, _ = good_dispatch()
        combine_with(h, xin=torch.zeros(L, R * T, H + 128, dtype=torch.bfloat16, device=dev))

    def combine_async_and_hook():
        _, _, h, _, _ = good_dispatch()
        combine_with(h, async_finish=True, return_recv_hook=True)

    def combine_bad_timeout():
        _, _, h, _, _ = good_dispatch()
        combine_with(h, timeout=-5)

    def combine_bad_weights():
        _, _, h, _, _ = good_dispatch()
        combine_with(h, weights=w.double())

    pending_hooks = []

    def combine_before_hook():
        _, _, h, _, hook = good_dispatch(return_recv_hook=True)
        pending_hooks.append(hook)
        combine_with(h)

    def nonfinite(fp8):
        def call():
            bad = x.clone()
            if bad.shape[0]:
                bad[0, 0] = float("inf")
            else:  # a rank without tokens: make the same call shape-wise valid anyway
                bad = torch.full((1, H), float("inf"), dtype=torch.bfloat16, device=dev)
                return dispatch(x=bad, topk=torch.full((1, K), -1, dtype=torch.int64, device=dev), use_fp8=fp8)
            return dispatch(x=bad, use_fp8=fp8)
        return call

    def with_topk_entry(value):
        def call():
            t = topk.clone()
            if t.shape[0] == 0:
                t = torch.full((1, K), -1, dtype=torch.int64, device=dev)
                return dispatch(x=torch.zeros(1, H, dtype=torch.bfloat16, device=dev), topk=_set(t, value))
            return dispatch(topk=_set(t, value))
        return call

    def _set(t, value):
        if value == "dup":
            t[0, :2] = 1
        else:
            t[0, 0] = value
        return t

    many = torch.zeros(T + 1, H, dtype=torch.bfloat16, device=dev)
    many_topk = torch.full((T + 1, K), -1, dtype=torch.int64, device=dev)
    checks = {
        "buffer_too_small": lambda: dispatch(T=2 * T, use_fp8=False),
        "tokens_above_max": lambda: dispatch(x=many, topk=many_topk),
        "experts_not_multiple_of_ranks": lambda: dispatch(E=E * R + 1),
        "expert_id_too_large": with_topk_entry(E),
        "expert_id_below_minus_one": with_topk_entry(-2),
        "duplicate_expert_in_row": with_topk_entry("dup"),
        "active_ranks_dtype": lambda: dispatch(active=ones().long()),
        "active_ranks_shape": lambda: dispatch(active=torch.ones(R - 1, dtype=torch.int32, device=dev)),  # shorter than R
        "active_ranks_values": lambda: dispatch(active=ones() * 2),
        "handle_from_other_buffer": handle_other_buffer,
        "handle_from_other_dispatch": handle_other_topk,
        "zero_copy_without_combine_buffer": zero_copy_without_buffer,
        "combine_hidden_mismatch": hidden_mismatch,
        "dispatch_async_and_hook": lambda: dispatch(async_finish=True, return_recv_hook=True),
        "combine_async_and_hook": combine_async_and_hook,
        "dispatch_timeout_negative": lambda: dispatch(timeout=-2),
        "dispatch_timeout_float": lambda: dispatch(timeout=1.5),
        "dispatch_timeout_bool": lambda: dispatch(timeout=True),
        "combine_timeout_negative": combine_bad_timeout,
        "combine_weights_dtype": combine_bad_weights,
        "combine_before_recv_hook": combine_before_hook,
        "nonfinite_x_bf16": nonfinite(False),
        "nonfinite_x_fp8": nonfinite(True),
    }
    cx, ctopk, cw = (t.to(dev) for t in make_inputs(CHECK_CASE, ctx.rank))
    out = {}
    for name in names:
        err = _catch(checks[name])
        for hook in pending_hooks:
            hook()  # drain the receive a check left open
        pending_hooks.clear()
        dist.barrier()  # all ranks finished the bad call before the check call
        check = run_pair(buf, CHECK_CASE, cx, ctopk, cw, ones(), dev)
        out[name] = (err, check)
    return out


# ------------------------------------------------------------------------------------- lifetime, masks, late data


def dropped_buffer_job(case: dict, delay_s: float) -> dict:
    """Rank 0 drops its Buffer right after combine; rank 1 posts its combine receive ``delay_s`` later."""
    import gc

    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case], ctx.world_size))
    x, topk, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
    active = torch.ones(ctx.world_size, dtype=torch.int32, device=dev)
    T, E, R = case["T"], case["E"], ctx.world_size
    recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, BIG_TIMEOUT_US, use_fp8=False)
    y = expert_output(recv, None, count, ctx.rank, E // R, False)
    combined, _, hook = buf.combine(y, topk, w, active, 3_000_000, handle, return_recv_hook=True)
    if ctx.rank == 0:
        hook()
        del buf, handle, hook
        gc.collect()
    else:
        time.sleep(delay_s)
        hook()
    res = dict(combined=combined.clone(), active_combine=active.clone())
    dist.barrier()
    return res


def masked_rank_job(case: dict, masked: int, timeout_us: int) -> dict:
    """Every rank (the masked one included) dispatches with ``active_ranks[masked] = 0``."""
    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case], ctx.world_size))
    x, topk, _ = (t.to(dev) for t in make_inputs(case, ctx.rank))
    active = torch.ones(ctx.world_size, dtype=torch.int32, device=dev)
    active[masked] = 0
    t0 = time.monotonic()
    recv, count, handle, _, _ = buf.dispatch(x, topk, active, case["T"], case["E"], timeout_us, use_fp8=case["fp8"])
    res = _valid_dispatch(recv, count, handle, case["fp8"])
    res.update(active_dispatch=active.clone(), t_dispatch=time.monotonic() - t0)
    return res


def late_data_job(case_a: dict, case_b: dict, slow_rank: int, sleep_s: float, timeout_us: int) -> dict:
    """Call 1: ``slow_rank`` dispatches ``sleep_s`` late, the others time it out.  Call 2 (everyone again
    with all ranks active, new routing): its results must not contain call 1's late data."""
    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case_a, case_b], ctx.world_size))
    out = {}
    for key, case in (("first", case_a), ("second", case_b)):
        x, topk, _ = (t.to(dev) for t in make_inputs(case, ctx.rank))
        active = torch.ones(ctx.world_size, dtype=torch.int32, device=dev)
        if key == "first" and ctx.rank == slow_rank:
            time.sleep(sleep_s)
        try:
            recv, count, handle, _, _ = buf.dispatch(x, topk, active, case["T"], case["E"],
                                                    timeout_us if key == "first" else BIG_TIMEOUT_US,
                                                    use_fp8=case["fp8"])
            res = _valid_dispatch(recv, count, handle, case["fp8"])
            res["active_dispatch"] = active.clone()
        except Exception as exc:  # noqa: BLE001
            res = dict(error=f"{type(exc).__name__}: {exc}")
        out[key] = res
        if key == "first":
            time.sleep(sleep_s + 0.5)  # the late data has certainly arrived before call 2
    return out


def resync_job(case: dict, extra_rank: int) -> dict:
    """``extra_rank`` makes one EP call the others never make (a lone dispatch that times them out);
    after ``update_ep_member`` on every rank a dispatch + combine pair must match the model again."""
    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case], ctx.world_size))
    x, topk, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
    ones = lambda: torch.ones(ctx.world_size, dtype=torch.int32, device=dev)  # noqa: E731
    lone = None
    if ctx.rank == extra_rank:
        active = ones()
        buf.dispatch(x, topk, active, case["T"], case["E"], 200_000, use_fp8=case["fp8"])
        lone = active.clone()
    buf.update_ep_member()
    res = run_pair(buf, case, x, topk, w, ones(), dev)
    res["lone"] = lone
    return res


def fixed_size_mask_job(case: dict, mask_len: int) -> dict:
    """The same dispatch + combine with an ``[R]`` mask and with a ``[mask_len]`` one (upstream's
    elastic tests allocate the mask at a fixed size): identical outputs; the long mask's tail untouched."""
    ctx = worker_context()
    dev = _device()
    buf = Buffer(dist.group.WORLD, _budget([case], ctx.world_size))
    x, topk, w = (t.to(dev) for t in make_inputs(case, ctx.rank))
    short = run_pair(buf, case, x, topk, w, torch.ones(ctx.world_size, dtype=torch.int32, device=dev), dev)
    long_mask = torch.full((mask_len,), 7, dtype=torch.int32, device=dev)
    long_mask[:ctx.world_size] = 1
    long = run_pair(buf, case, x, topk, w, long_mask, dev)
    return {"same": all(torch.equal(short[k], long[k]) for k in ("combined",)) and
            torch.equal(short["active_combine"], long["active_combine"][:ctx.world_size]),
            "tail": long_mask[ctx.world_size:].tolist()}
