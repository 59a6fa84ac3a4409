"""EP dispatch/combine over NVSHMEM on one GPU, bitwise against mooncake.model.ep (docs/design/internode.md §11).

Ran on one H100 with R = 2 and 4 (every case bitwise; benchmarks/results/internode/nvshmem-h100-run1).  For
the GPU machine, one GPU, R processes under MPS::

    python benchmarks/internode/nvshmem_ep.py --ranks 4 --mps --out /tmp/ep4
    python benchmarks/internode/nvshmem_ep.py --ranks 4 --mps --force-put --out /tmp/ep4-put
    python benchmarks/internode/nvshmem_ep.py --compile-only --out /tmp/ep   # no GPU needed

Every rank builds the same inputs from ``--seed`` (three input sets, rotated per call, so that a stale
buffer half of two calls earlier holds different data), computes the expected results of every rank with
``mooncake.model.ep.dispatch`` / ``combine`` on CPU, bootstraps NVSHMEM through the Store
(nvshmem_common.py), creates one symmetric buffer (nvshmem_ep.cu), then runs the cases:

* ``bf16``, ``fp8``: ``--iters`` dispatch + combine calls, each compared bit for bit (outputs, padding,
  ``layout_range``, ``src_info``, FP8 scales, ``active_ranks``, status words), timed per op;
* ``silent-dispatch``: the last rank sends nothing in dispatch; every rank (itself included) must clear
  its bit after ``--silent-timeout-us`` and match the model with ``failed = {R-1}``, combine included;
* ``silent-combine``: the last rank returns nothing in combine; every rank must clear its bit and match
  the model's combine under that mask (the last rank's own output is then all zeros);
* ``after-silent``: three calls with every rank active again (keys, not flags: nothing was cleaned).

``--force-put`` makes the kernels ignore ``nvshmem_ptr`` and use put-with-signal for every destination.
Output: ``OUT/rank<r>.json``, ``OUT/rank<r>.log``, ``OUT/summary.json`` and a table (PASS/FAIL per case,
median µs per op over ranks' medians).  Exit status 0 only if every case passed on every rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for mooncake.model

import torch  # noqa: E402

from mooncake.model import ep as ep_model  # noqa: E402
from nvshmem_common import (  # noqa: E402
    RankRecord,
    add_common_args,
    bootstrap,
    die_with_parent,
    driver_start,
    launch,
    read_rank_outputs,
    store_barrier,
)

SOURCE = HERE / "nvshmem_ep.cu"
NUM_INPUT_SETS = 3
EPOCH = 1
SYMMETRIC_HEADROOM_BYTES = 256 << 20
MAX_RANKS = 32  # status words are 32-bit masks (nvshmem_ep.cu)
MAX_EXPERTS = 4096


@dataclass(frozen=True)
class Shape:
    """R ranks, E experts, T max tokens per rank, H hidden (multiple of 128: FP8 cases), K top-k."""

    ranks: int
    experts: int
    tokens: int
    hidden: int
    topk: int

    @property
    def local_experts(self) -> int:
        return self.experts // self.ranks


@dataclass(frozen=True)
class Case:
    """One case: FP8 or bf16 dispatch, calls, and which phase (if any) the last rank keeps silent in."""

    name: str
    use_fp8: bool
    calls: int
    silent_phase: str | None = None  # "dispatch" | "combine"


def check_shape(shape: Shape) -> None:
    """Raise ValueError naming the first argument outside what the prototype supports."""
    if not 2 <= shape.ranks <= MAX_RANKS:
        raise ValueError(
            f"--ranks must be in [2, {MAX_RANKS}] (the silent cases need a second rank), got {shape.ranks}")
    if shape.experts % shape.ranks or not 1 <= shape.experts <= MAX_EXPERTS:
        raise ValueError(
            f"experts ({shape.experts}) must be a multiple of --ranks ({shape.ranks}) in [1, {MAX_EXPERTS}]")
    if not 1 <= shape.tokens <= 0xFFFF:
        raise ValueError(f"--tokens must be in [1, 65535] (counts travel in 16 bits of a key), got {shape.tokens}")
    if shape.hidden < 128 or shape.hidden % 128:
        raise ValueError(f"--hidden must be a positive multiple of 128 (FP8 scale blocks), got {shape.hidden}")
    if not 1 <= shape.topk <= shape.experts:
        raise ValueError(f"--topk must be in [1, experts = {shape.experts}], got {shape.topk}")


def cases(iters: int) -> list[Case]:
    """The cases every run goes through, in order."""
    return [
        Case("bf16", False, iters),
        Case("fp8", True, iters),
        Case("silent-dispatch", False, 1, "dispatch"),
        Case("silent-combine", False, 1, "combine"),
        Case("after-silent", False, NUM_INPUT_SETS),
    ]


def num_tokens(shape: Shape, rank: int) -> int:
    """Tokens on ``rank``: T, then fewer on higher ranks (T - (rank % 4) * T // 8)."""
    return shape.tokens - (rank % 4) * (shape.tokens // 8)


@dataclass
class Inputs:
    """Every rank's inputs of one call: x [N_r, H] bf16, topk [N_r, K] int64 (about 10% -1), weights
    [N_r, K] float32, expert outputs [L, R*T, H] bf16."""

    xs: list[torch.Tensor]
    topks: list[torch.Tensor]
    weights: list[torch.Tensor]
    expert_outputs: list[torch.Tensor]


def make_inputs(shape: Shape, seed: int, set_id: int) -> Inputs:
    """Deterministic inputs of input set ``set_id`` (the same on every process)."""
    g = torch.Generator().manual_seed(seed * 1009 + set_id)
    R, E, T, H, K, L = shape.ranks, shape.experts, shape.tokens, shape.hidden, shape.topk, shape.local_experts
    xs, topks, weights, outs = [], [], [], []
    for rank in range(R):
        n = num_tokens(shape, rank)
        xs.append((torch.randn(n, H, generator=g) * (1 + rank)).to(torch.bfloat16))
        topk = torch.rand(n, E, generator=g).argsort(dim=1)[:, :K].contiguous()
        topk[torch.rand(n, K, generator=g) < 0.1] = -1
        topks.append(topk)
        weights.append(torch.randn(n, K, generator=g))
        outs.append(torch.randn(L, R * T, H, generator=g).to(torch.bfloat16))
    return Inputs(xs, topks, weights, outs)


@dataclass
class Expected:
    """The model's results of one call for every rank, and the masks after dispatch and after combine."""

    dispatch: list[ep_model.DispatchResult]
    mask_after_dispatch: torch.Tensor
    combined: list[torch.Tensor]
    mask_after_combine: torch.Tensor


def expected(shape: Shape, inputs: Inputs, use_fp8: bool, silent_phase: str | None) -> Expected:
    """``mooncake.model.ep`` with every rank active at entry; the last rank fails in ``silent_phase``."""
    R = shape.ranks
    silent = {R - 1}
    results, mask = ep_model.dispatch(
        inputs.xs, inputs.topks, shape.experts, shape.tokens, torch.ones(R, dtype=torch.int32),
        failed=silent if silent_phase == "dispatch" else frozenset(), use_fp8=use_fp8,
    )
    combine_mask = mask.clone()
    if silent_phase == "combine":
        combine_mask[R - 1] = 0
    combined = ep_model.combine(inputs.expert_outputs, results, inputs.topks, inputs.weights, combine_mask)
    return Expected(results, mask, combined, combine_mask)


def plan_keys(todo: list[Case]) -> list[tuple[int, bool, str | None]]:
    """(input set, use_fp8, silent_phase) of every call of ``todo``, in call order, without repeats.

    Call n (seq n, counted from 1 over all cases) uses input set n % 3, as ``run_case`` does."""
    keys, seq = [], 0
    for case in todo:
        for _ in range(case.calls):
            seq += 1
            key = (seq % NUM_INPUT_SETS, case.use_fp8, case.silent_phase)
            if key not in keys:
                keys.append(key)
    return keys


def silent_bits(shape: Shape, case: Case, phase: str) -> int:
    """The timed-out bitmask every rank must report for ``phase`` of ``case``."""
    return 1 << (shape.ranks - 1) if case.silent_phase == phase else 0


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (compared in the logical layout)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return torch.equal(as_bytes(got), as_bytes(want))


class EpLib:
    """The ctypes face of nvshmem_ep.cu for one context (all arguments are device pointers or ints)."""

    def __init__(self, lib: ctypes.CDLL, shape: Shape):
        i64, i32, u64 = ctypes.c_int64, ctypes.c_int, ctypes.c_uint64
        lib.mc_ep_symmetric_bytes.restype = i64
        lib.mc_ep_create.restype = i64
        lib.mc_ep_create.argtypes = [i32] * 5
        lib.mc_ep_dispatch.argtypes = [i64, i64, i64, i32, u64, i32, i32, i32, i64, i64, i64, i64, i64, i64, i64,
                                       ctypes.POINTER(ctypes.c_uint32)]
        lib.mc_ep_combine.argtypes = [i64, i64, i64, i64, i32, u64, i32, i32, i64, i64, i64,
                                      ctypes.POINTER(ctypes.c_uint32)]
        lib.mc_ep_destroy.argtypes = [i64, i32]
        self.lib, self.shape = lib, shape
        self.status = (ctypes.c_uint32 * 3)()
        self.ctx = 0

    def create(self) -> bool:
        s = self.shape
        self.ctx = self.lib.mc_ep_create(s.ranks, s.experts, s.tokens, s.hidden, s.topk)
        return self.ctx != 0

    def words(self) -> dict:
        return {"timed_out": self.status[0], "bad_count": self.status[1], "direct": self.status[2]}


def symmetric_size(lib: ctypes.CDLL, shape: Shape) -> int:
    """NVSHMEM_SYMMETRIC_SIZE for one context of ``shape``: its layout plus headroom for NVSHMEM itself."""
    lib.mc_ep_symmetric_bytes.restype = ctypes.c_int64
    need = lib.mc_ep_symmetric_bytes(shape.ranks, shape.experts, shape.tokens, shape.hidden, shape.topk)
    return need + SYMMETRIC_HEADROOM_BYTES


def run_case(ep: EpLib, case: Case, rank: int, plan, force_put: bool, timeout_ns: int, silent_timeout_ns: int,
             seq_start: int):
    """Run ``case`` on this rank; returns (record, last seq used).

    ``plan(set_id, case)`` gives (Inputs, Expected); the phase that ``case`` keeps silent waits
    ``silent_timeout_ns``, every other wait ``timeout_ns``."""
    s = ep.shape
    L, RT, H, S = s.local_experts, s.ranks * s.tokens, s.hidden, s.hidden // 128
    dev = torch.device("cuda")
    active = torch.ones(s.ranks, dtype=torch.int32, device=dev)
    dispatch_us, combine_us, failures, words = [], [], [], []
    seq = seq_start
    for call in range(case.calls):
        seq += 1
        key = (EPOCH << 48) | (seq << 16)
        set_id = seq % NUM_INPUT_SETS
        inputs, want = plan(set_id, case)
        x = inputs.xs[rank].to(dev)
        topk = inputs.topks[rank].to(dev)
        weights = inputs.weights[rank].to(dev)
        expert_out = inputs.expert_outputs[rank].to(dev)
        n = topk.shape[0]
        recv_x = torch.zeros(L, RT, H, dtype=torch.float8_e4m3fn if case.use_fp8 else torch.bfloat16, device=dev)
        scales_storage = torch.zeros(L, S, RT, dtype=torch.float32, device=dev)
        recv_count = torch.zeros(L, dtype=torch.int32, device=dev)
        src_info = torch.full((L, RT), -1, dtype=torch.int32, device=dev)
        layout_range = torch.zeros(L, s.ranks, dtype=torch.int64, device=dev)
        combined = torch.zeros(n, H, dtype=torch.bfloat16, device=dev)
        active.fill_(1)
        torch.cuda.synchronize()
        silent_d = int(case.silent_phase == "dispatch" and rank == s.ranks - 1)
        silent_c = int(case.silent_phase == "combine" and rank == s.ranks - 1)
        t0 = time.perf_counter()
        err_d = ep.lib.mc_ep_dispatch(
            ep.ctx, x.data_ptr(), topk.data_ptr(), n, key, int(case.use_fp8), int(force_put), silent_d,
            silent_timeout_ns if case.silent_phase == "dispatch" else timeout_ns, active.data_ptr(),
            recv_x.data_ptr(), scales_storage.data_ptr(), recv_count.data_ptr(), src_info.data_ptr(),
            layout_range.data_ptr(), ep.status)
        t1 = time.perf_counter()
        words_d = ep.words()
        mask_d = active.cpu()
        t2 = time.perf_counter()
        err_c = ep.lib.mc_ep_combine(
            ep.ctx, expert_out.data_ptr(), topk.data_ptr(), weights.data_ptr(), n, key, int(force_put), silent_c,
            silent_timeout_ns if case.silent_phase == "combine" else timeout_ns, active.data_ptr(),
            combined.data_ptr(), ep.status)
        t3 = time.perf_counter()
        words_c = ep.words()
        dispatch_us.append((t1 - t0) * 1e6)
        combine_us.append((t3 - t2) * 1e6)
        words.append({"dispatch": words_d, "combine": words_c})
        model_d = want.dispatch[rank]
        checks = {
            "dispatch_err": err_d == 0,
            "combine_err": err_c == 0,
            "recv_x": same_bits(recv_x, model_d.recv_x),
            "recv_count": same_bits(recv_count, model_d.recv_count),
            "src_info": same_bits(src_info, model_d.src_info),
            "layout_range": same_bits(layout_range, model_d.layout_range),
            "mask_after_dispatch": same_bits(mask_d, want.mask_after_dispatch),
            "dispatch_timed_out": words_d["timed_out"] == silent_bits(s, case, "dispatch"),
            "combined": same_bits(combined, want.combined[rank]),
            "mask_after_combine": same_bits(active, want.mask_after_combine),
            "combine_timed_out": words_c["timed_out"] == silent_bits(s, case, "combine"),
            "bad_counts": words_d["bad_count"] == 0 and words_c["bad_count"] == 0,
        }
        if case.use_fp8:
            checks["recv_scales"] = same_bits(scales_storage.transpose(1, 2), model_d.recv_scales)
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            failures.append({"call": call, "seq": seq, "failed": bad, "errors": [err_d, err_c],
                             "words": words[-1], "active": active.tolist()})
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    record = {"pass": not failures, "calls": case.calls, "failures": failures[:3],
              "dispatch_us_median": median(dispatch_us), "dispatch_us_min": min(dispatch_us),
              "combine_us_median": median(combine_us), "combine_us_min": min(combine_us),
              "direct_mask": words[-1]["dispatch"]["direct"], "last_words": words[-1]}
    return record, seq


def child(args) -> None:
    die_with_parent()
    torch.set_num_threads(2)
    rank = args.child
    shape = shape_of(args)
    rec = RankRecord(Path(args.out), rank)
    rec["shape"] = vars(shape)
    t = time.perf_counter()
    todo = [c for c in cases(args.iters) if c.name in args.cases.split(",")]
    sets = {i: make_inputs(shape, args.seed, i) for i in range(NUM_INPUT_SETS)}
    # every expectation up front: model time between calls would skew the ranks past the deadlines
    memo = {k: expected(shape, sets[k[0]], k[1], k[2]) for k in plan_keys(todo)}
    rec["model_s"] = time.perf_counter() - t

    def plan(set_id, case):
        return sets[set_id], memo[(set_id, case.use_fp8, case.silent_phase)]

    os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(symmetric_size(ctypes.CDLL(args.lib), shape))
    rec["symmetric_size"] = int(os.environ["NVSHMEM_SYMMETRIC_SIZE"])
    lib, store, status = bootstrap(args, rec)
    if status != 0:
        return
    ep = EpLib(lib, shape)
    rec["create_ok"] = ep.create()
    if not ep.ctx:
        return
    store_barrier(store, "create", rank, shape.ranks)  # every PE has zeroed its signals before anyone sends
    seq = 0
    results = {}
    for case in todo:
        store_barrier(store, case.name, rank, shape.ranks)
        results[case.name], seq = run_case(ep, case, rank, plan, args.force_put, args.timeout_us * 1000,
                                           args.silent_timeout_us * 1000, seq)
        rec["cases"] = results
    store_barrier(store, "destroy", rank, shape.ranks)
    lib.mc_ep_destroy(ep.ctx, 1)
    t = time.perf_counter()
    lib.mc_nvs_finalize()
    rec["finalize_s"] = time.perf_counter() - t


def shape_of(args) -> Shape:
    return Shape(args.ranks, args.experts_per_rank * args.ranks, args.tokens, args.hidden, args.topk)


def summarize(args, codes, ranks: dict) -> tuple[dict, bool]:
    """summary.json's content and whether every case passed on every rank."""
    shape = shape_of(args)
    names = [c.name for c in cases(args.iters) if c.name in args.cases.split(",")]
    table = {}
    for name in names:
        per = [(o or {}).get("cases", {}).get(name) for o in ranks.values()]
        done = [p for p in per if p is not None]
        table[name] = {
            "pass": len(done) == shape.ranks and all(p["pass"] for p in done),
            "ranks_passed": sum(1 for p in done if p["pass"]),
            "dispatch_us_median": sorted(p["dispatch_us_median"] for p in done)[len(done) // 2] if done else None,
            "combine_us_median": sorted(p["combine_us_median"] for p in done)[len(done) // 2] if done else None,
            "direct_masks": [p["direct_mask"] for p in done],
            "first_failure": next((p["failures"][0] for p in done if p["failures"]), None),
        }
    ok = bool(names) and all(t["pass"] for t in table.values()) and all(c == 0 for c in codes)
    summary = {"ranks": shape.ranks, "shape": vars(shape), "force_put": args.force_put, "exit": codes, "pass": ok,
               "cases": table, "per_rank": ranks}
    return summary, ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, "nvshmem-ep")
    p.add_argument("--experts-per-rank", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="T, max tokens per rank (rank r has T - (r%%4)*T/8)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--iters", type=int, default=20, help="calls of the bf16 and fp8 cases")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--force-put", action="store_true", help="ignore nvshmem_ptr: put-with-signal to every peer")
    p.add_argument("--timeout-us", type=int, default=2_000_000, help="deadline of every wait in normal calls")
    p.add_argument("--silent-timeout-us", type=int, default=100_000, help="deadline of the silent phase")
    p.add_argument("--cases", default=",".join(c.name for c in cases(1)),
                   help="comma-separated subset of the cases")
    args = p.parse_args()
    shape = shape_of(args)
    check_shape(shape)
    if args.child is not None:
        child(args)
        return 0
    started = driver_start(args, SOURCE)
    if started is None:
        return 0
    out, lib = started
    forward = ["--experts-per-rank", str(args.experts_per_rank), "--tokens", str(args.tokens), "--hidden",
               str(args.hidden), "--topk", str(args.topk), "--iters", str(args.iters), "--seed", str(args.seed),
               "--timeout-us", str(args.timeout_us), "--silent-timeout-us", str(args.silent_timeout_us),
               "--cases", args.cases] + (["--force-put"] if args.force_put else [])
    codes = launch(args, lib, lambda r: forward, {})
    ranks = read_rank_outputs(out, args.ranks)
    summary, ok = summarize(args, codes, ranks)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    mode = "force-put" if args.force_put else "direct"
    print(f"EP over NVSHMEM, R={shape.ranks} E={shape.experts} T={shape.tokens} H={shape.hidden} K={shape.topk} "
          f"{mode}; exit codes {codes}")
    for r, o in ranks.items():
        if o is None or o.get("init_status") != 0 or not o.get("create_ok"):
            print(f"  rank {r}: init {None if o is None else o.get('init_status')} "
                  f"create {None if o is None else o.get('create_ok')} (see {out}/rank{r}.log)")
    print(f"  {'case':<16} {'result':<6} {'ranks ok':>8} {'dispatch us':>12} {'combine us':>11}  direct masks")
    for name, t in summary["cases"].items():
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"  {name:<16} {'PASS' if t['pass'] else 'FAIL':<6} {t['ranks_passed']:>5}/{shape.ranks:<2} "
              f"{fmt(t['dispatch_us_median']):>12} {fmt(t['combine_us_median']):>11}  {t['direct_masks']}")
        if t["first_failure"]:
            print(f"      first failure: {t['first_failure']}")
    print("ep", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
