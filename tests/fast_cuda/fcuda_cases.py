"""Inputs, grid and bitwise comparison for the CUDA fast-path EP tests (no GPU needed to import).

Every rank's inputs are built on the CPU from explicit seeds, so the parent rebuilds all of them and
evaluates the global-view model (``mooncake.model.ep``) while the workers run the kernels.
"""

from __future__ import annotations

import math

import torch

from mooncake.model import ep as model
from mooncake.model.fp8 import dequantize_fp8

BIG_TIMEOUT_US = 5_000_000  # calls that must not time out (ms on a GPU; a hang shows as a timeout)


def make_inputs(case: dict, rank: int):
    """(x [N, H] bf16, topk_idx [N, K] int64, topk_weights [N, K] fp32) of ``rank`` (CPU)."""
    R, T, H, E, K = case["R"], case["T"], case["H"], case["E"], case["K"]
    if case.get("upstream"):  # upstream test_ep_grid.py's inputs
        g = torch.Generator().manual_seed(2026 + rank)
        n = int(T * (1 - 0.05 * rank / R))
        x = torch.randn(n, H, generator=g).to(torch.bfloat16)
        topk = torch.topk(torch.randn(n, E, generator=g), K, dim=-1).indices
        weights = torch.softmax(torch.rand(n, K, generator=g), dim=-1)
        return x, topk.contiguous(), weights
    g = torch.Generator().manual_seed(case["seed"] * 1009 + rank)
    n = case["n"][rank] if "n" in case else T
    # magnitudes over several binades so FP8 scales differ per block; a few exact zeros and -0.0
    x = torch.randn(n, H, generator=g) * torch.exp(2 * torch.randn(n, 1, generator=g))
    x[:, :3] = torch.tensor([0.0, -0.0, 1e-30])
    x = x.to(torch.bfloat16)
    routing = case.get("routing", "uniform")
    if routing == "incast":  # every token picks its experts among rank 0's
        L = E // R
        topk = torch.rand(n, L, generator=g).argsort(dim=1)[:, :K]
    else:
        topk = torch.rand(n, E, generator=g).argsort(dim=1)[:, :K]
    topk = topk.contiguous()
    if case.get("mask_p", 0.0):
        topk[torch.rand(n, K, generator=g) < case["mask_p"]] = -1
    weights = torch.randn(n, K, generator=g, dtype=torch.float32)
    return x, topk, weights


def expert_output(recv_x, recv_scales, recv_count, rank: int, num_local: int, use_fp8: bool) -> torch.Tensor:
    """Expert e = rank*L + l: dequantize (FP8) or widen (bf16), times fl32(1 + 0.1 e), to bf16. Padding is NaN."""
    out = torch.full(recv_x.shape, float("nan"), dtype=torch.bfloat16, device=recv_x.device)
    for l in range(num_local):
        c = int(recv_count[l])
        if c == 0:
            continue
        rows = dequantize_fp8(recv_x[l, :c], recv_scales[l, :c]) if use_fp8 else recv_x[l, :c].float()
        factor = torch.tensor(1.0 + 0.1 * (rank * num_local + l), dtype=torch.float32, device=recv_x.device)
        out[l, :c] = (rows * factor).to(torch.bfloat16)
    return out


def valid_dispatch(recv_x, recv_scales, recv_count, src_info, layout_range, use_fp8: bool) -> dict:
    """The normative part of a dispatch result, on the CPU (FP8 codes as uint8)."""
    count = recv_count.cpu()
    rows, scales, src = [], [], []
    for l in range(count.shape[0]):
        c = int(count[l])
        rows.append((recv_x[l, :c].view(torch.uint8) if use_fp8 else recv_x[l, :c].view(torch.int16)).cpu().clone())
        scales.append(recv_scales[l, :c].contiguous().view(torch.int32).cpu().clone() if use_fp8 else None)
        src.append(src_info[l, :c].cpu().clone())
    return dict(rows=rows, scales=scales, src=src, layout=layout_range.cpu().clone(), count=count.clone(),
                scales_stride=tuple(recv_scales.stride()) if use_fp8 else None)


def grid(R: int) -> list[dict]:
    """The EP grid for R ranks: FP8/BF16, masked entries, zero-copy, hook/async, masks, shapes."""
    small = dict(R=R, T=16, H=256, E=8 * R, K=4)
    medium = dict(R=R, T=48, H=2048, E=64, K=8)
    uneven = [48 - 7 * (r % 3) for r in range(R)]
    uneven[-1] = 0  # a rank with no tokens
    cases = [
        dict(small, name="fp8-plain", seed=1, fp8=True),
        dict(small, name="bf16-plain", seed=2, fp8=False),
        dict(medium, name="fp8-masked-uneven", seed=3, fp8=True, mask_p=0.2, n=uneven),
        dict(medium, name="bf16-masked-zerocopy", seed=4, fp8=False, mask_p=0.2, zc=True),
        dict(medium, name="fp8-hook-zerocopy", seed=5, fp8=True, mode="hook", zc=True, mask_p=0.1),
        dict(small, name="bf16-async-out", seed=6, fp8=False, mode="async", out=True),
        dict(medium, name="fp8-premasked", seed=7, fp8=True, premasked=R - 1, mask_p=0.05),
        dict(medium, name="fp8-twice-parity", seed=8, fp8=True, twice=True, mask_p=0.1),
        # one rank rejects its dispatch (bad timeout_us): it still counts there; the others time it out
        dict(medium, name="fp8-one-rank-rejects", seed=15, fp8=True, reject=R - 1, timeout_us=300_000),
        dict(medium, name="fp8-upstream-inputs", seed=9, fp8=True, upstream=True),
        dict(small, name="bf16-cpu-mask", seed=10, fp8=False, cpu_mask=True, mask_p=0.3),
        dict(medium, name="fp8-incast", seed=11, fp8=True, routing="incast"),
        dict(R=R, T=16, H=7168, E=32, K=8, name="fp8-h7168", seed=12, fp8=True, mask_p=0.05),
        dict(R=R, T=16, H=7168, E=32, K=8, name="bf16-h7168-zerocopy", seed=13, fp8=False, zc=True),
        dict(medium, name="fp8-cuda-graph", seed=14, fp8=True, mask_p=0.1, graph=True),  # last: captures
    ]
    if R == 1:
        cases = [c for c in cases if "premasked" not in c and "reject" not in c]
    return cases


def failure_case(R: int, dead: int = 1, timeout_us: int = 2_000_000) -> dict:
    """Rank ``dead`` exits before dispatch.  With a deadline the survivors time it out; with
    ``timeout_us = -1`` the host's liveness watchdog ends their waits."""
    name = f"fp8-rank{dead}-dies" + ("-no-deadline" if timeout_us == -1 else "")
    return dict(R=R, T=48, H=2048, E=64, K=8, name=name, seed=21, fp8=True, mask_p=0.1, dead=dead,
                timeout_us=timeout_us)


# ---------------------------------------------------------------------------------------------- model side


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t


def model_outputs(case: dict):
    """Global-view model results for ``case``: (per-rank valid dispatch dicts, per-rank combined, active_out)."""
    R, T, E = case["R"], case["T"], case["E"]
    L, fp8 = E // R, case["fp8"]
    inputs = [make_inputs(case, r) for r in range(R)]
    xs, topks, weights = zip(*inputs)
    active = torch.ones(R, dtype=torch.int32)
    if case.get("premasked") is not None:
        active[case["premasked"]] = 0
    gone = case.get("dead", case.get("reject"))
    failed = frozenset([gone]) if gone is not None else frozenset()
    results, active_out = model.dispatch(list(xs), list(topks), E, T, active, failed=failed, use_fp8=fp8)
    valid = [valid_dispatch(res.recv_x, res.recv_scales, res.recv_count, res.src_info, res.layout_range, fp8)
             for res in results]
    ys = [expert_output(res.recv_x, res.recv_scales, res.recv_count, r, L, fp8) for r, res in enumerate(results)]
    combined = model.combine(ys, results, list(topks), list(weights), active_out)
    return valid, combined, active_out


def compare(case: dict, rank: int, got: dict, want_valid: dict, want_combined: torch.Tensor,
            want_active: torch.Tensor) -> list[str]:
    """Differences between a worker's saved outputs and the model's, as readable strings (empty = bitwise equal)."""
    errs = []
    if not torch.equal(got["count"], want_valid["count"]):
        errs.append(f"recv_count {got['count'].tolist()} != {want_valid['count'].tolist()}")
    if not torch.equal(got["layout"], want_valid["layout"]):
        errs.append(f"layout_range differs: {got['layout'].tolist()} vs {want_valid['layout'].tolist()}")
    if case["fp8"] and got["scales_stride"] != want_valid["scales_stride"]:
        errs.append(f"scales strides {got['scales_stride']} != {want_valid['scales_stride']}")
    for l, (a, b) in enumerate(zip(got["src"], want_valid["src"])):
        if not torch.equal(a, b):
            errs.append(f"src_info of local expert {l} differs")
            break
    for l, (a, b) in enumerate(zip(got["rows"], want_valid["rows"])):
        if a.shape != b.shape or not torch.equal(a, b):
            n = int((a != b).sum()) if a.shape == b.shape else -1
            errs.append(f"recv_x rows of local expert {l} differ ({n} elements)")
            break
    if case["fp8"]:
        for l, (a, b) in enumerate(zip(got["scales"], want_valid["scales"])):
            if a.shape != b.shape or not torch.equal(a, b):
                errs.append(f"scales of local expert {l} differ")
                break
    if not torch.equal(got["active_dispatch"], want_active):
        errs.append(f"active_ranks after dispatch {got['active_dispatch'].tolist()} != {want_active.tolist()}")
    if got.get("combined") is None:  # a dispatch-only case
        return errs
    a, b = _bits(got["combined"]), _bits(want_combined)
    if a.shape != b.shape or not torch.equal(a, b):
        n = int((a != b).sum()) if a.shape == b.shape else -1
        errs.append(f"combined_x differs in {n} of {b.numel()} elements")
    if not torch.equal(got["active_combine"], want_active):
        errs.append(f"active_ranks after combine {got['active_combine'].tolist()} != {want_active.tolist()}")
    if not got.get("types_ok", True):
        errs.append("event / hook types wrong")
    return errs


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    k = min(len(s) - 1, max(0, int(math.ceil(q / 100 * len(s))) - 1))
    return s[k]
