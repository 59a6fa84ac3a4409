"""Drive the fast CPU plane directly (no torch.distributed): cluster workers started with
``init=False`` open the plane with a GroupInfo over the test process's TCPStore and post ops with
OpContext objects.  Importable as ``fast_cpu.planeharness`` (tests/fast_cpu/conftest.py).

Inputs are generated here from seeds (``inputs``), so the test process can build every rank's
inputs for the model without receiving them.
"""

from __future__ import annotations

import os
import time

import torch

from mooncake.control.plane import GroupInfo
from mooncake.control.view import View
from mooncake.model.reduce import ReduceOp
from mooncake.ref.collectives import OpContext
from mooncake.testing import fingerprints

_state: dict = {}

DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64)}


# ---------------------------------------------------------------------------------- plane control

def open_plane(prefix: str, capacity: int, ranks: list[int], timeout_s: float = 30.0,
               addresses: dict | None = None):
    """Open the plane on this worker, knowing ``ranks``; returns this rank's pid."""
    from mooncake.fast.cpu import open_group
    from mooncake.testing.cluster import worker_context
    wc = worker_context()
    if addresses is None:
        addresses = {r: f"addr-{r}".encode() for r in ranks}
    info = GroupInfo(wc.store, prefix, wc.rank, capacity, 7, timeout_s, None, dict(addresses), "cpu")
    plane = open_group(info)
    _state[prefix] = {"plane": plane, "seq": 0, "epoch": 0, "active": tuple(sorted(ranks)),
                      "capacity": capacity}
    return os.getpid()


def close_plane(prefix: str):
    st = _state.pop(prefix, None)
    if st is not None:
        st["plane"].close()
    return True


def set_view(prefix: str, epoch: int, active, seq: int | None = None):
    st = _state[prefix]
    st["epoch"], st["active"] = epoch, tuple(active)
    if seq is not None:
        st["seq"] = seq
    return True


def add_ranks(prefix: str, addresses: dict):
    _state[prefix]["plane"].add_ranks(addresses)
    return True


def context(prefix: str, name: str = "op", seq: int | None = None, fingerprint=None):
    from mooncake.testing.cluster import worker_context
    st = _state[prefix]
    if seq is None:
        seq = st["seq"]
        st["seq"] += 1
    view = View(st["epoch"], st["capacity"], tuple(st["active"]))
    return OpContext(None, None, 7, worker_context().rank, view, seq, name, fingerprint)


def drive(op, timeout_s: float = 30.0) -> None:
    """Wait for commit (raising on a dead peer or timeout), then finish."""
    deadline = time.monotonic() + timeout_s
    while not op.committed:
        if op.error is not None:
            op.abandon()
            raise op.error
        if op.failed_peers():
            raise RuntimeError(f"peers failed: {sorted(op.failed_peers())}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{op.name} seq {op.seq} state {op.state}: pending {op.pending_ranks()}; "
                               f"{dump(op)}")
        op.wait(min(0.05, max(0.0, deadline - time.monotonic())))
    op.finish()


def dump(op) -> str:
    """The control words an op depends on, for failure messages."""
    from mooncake.fast.cpu import group as G
    g = op.g
    out = []
    for r in op.active:
        ctl = g.ctl if r == op.me else g.peer(r).ctl
        for lane, base in enumerate(g.layout.lane):
            vals = {n: int(ctl[base + getattr(G, n)]) for n in ("L_PUB", "L_RED", "L_DONE", "L_HOLD", "L_FREE")}
            out.append(f"r{r} lane{lane} {vals}")
    return "; ".join(out)


# ---------------------------------------------------------------------------------- cases

def values(dtype_name: str, numel: int, seed: int, rank: int) -> torch.Tensor:
    """Seeded values of one rank: integers over the full range, floats with specials mixed in."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919)
    if dtype is torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool()
    if dtype.is_floating_point:
        x = (torch.randn(numel, generator=g, dtype=torch.float64) * 100).to(dtype)
        if numel >= 16:
            idx = torch.randint(0, numel, (6,), generator=g)
            x[idx] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40]).to(dtype)
        return x
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (numel,), generator=g, dtype=torch.int64).to(dtype)


def case_inputs(case: dict, rank: int):
    """This rank's input(s) for a case: a tensor, or a list of k slots (slot ops)."""
    op, k, numel = case["op"], case.get("k"), case["numel"]
    if op in ("reduce_scatter", "all_to_all") or (op == "scatter" and rank == case["root"]):
        return [values(case["dtype"], numel, case["seed"] + 1000 * s, rank) for s in range(k)]
    return values(case["dtype"], numel, case["seed"], rank)


def post_case(prefix: str, case: dict):
    """Post one case on this rank; returns (op, outputs to report)."""
    from mooncake.testing.cluster import worker_context
    rank = worker_context().rank
    st = _state[prefix]
    plane = st["plane"]
    ctx = context(prefix, case["op"], fingerprint=fingerprints.of_case(case))
    op, numel, k = case["op"], case["numel"], case.get("k")
    dtype = DTYPES[case["dtype"]]
    red = ReduceOp[case["red"]] if case.get("red") else None
    root = case.get("root")
    x = case_inputs(case, rank)
    if op == "all_reduce":
        return plane.all_reduce(ctx, x, red), x
    if op == "reduce":
        return plane.reduce(ctx, x, red, root), x
    if op == "broadcast":
        return plane.broadcast(ctx, x, root), x
    if op == "all_gather":
        outs = [torch.full((numel,), 7, dtype=dtype) for _ in range(k)]
        return plane.all_gather(ctx, outs, x), outs
    if op == "gather":
        outs = [torch.full((numel,), 7, dtype=dtype) for _ in range(k)] if rank == root else None
        return plane.gather(ctx, outs, x, root), outs
    if op == "scatter":
        out = torch.full((numel,), 7, dtype=dtype)
        return plane.scatter(ctx, out, x if rank == root else None, root), out
    if op == "reduce_scatter":
        out = torch.full((numel,), 7, dtype=dtype)
        return plane.reduce_scatter(ctx, out, x, red), out
    if op == "all_to_all":
        outs = [torch.full((numel,), 7, dtype=dtype) for _ in range(k)]
        return plane.all_to_all(ctx, outs, x), outs
    if op == "barrier":
        return plane.barrier(ctx), None
    raise ValueError(op)


def run_cases(prefix: str, cases: list[dict], mode: str = "sync"):
    """Run ``cases`` in order: one at a time ("sync"), or all posted first then finished in
    reverse order ("async").  Returns each case's outputs."""
    if mode == "sync":
        results = []
        for case in cases:
            op, outs = post_case(prefix, case)
            drive(op)
            results.append(outs)
        return results
    posted = [post_case(prefix, case) for case in cases]
    for op, _ in reversed(posted):
        drive(op)
    return [outs for _, outs in posted]


def idle_cpu(prefix: str, seconds: float):
    """Post a barrier nobody else joins and wait ``seconds``: returns (CPU s used, committed)."""
    st = _state[prefix]
    op = st["plane"].barrier(context(prefix, "barrier"))
    t0 = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end and not op.committed:
        op.wait(end - time.monotonic())
    used = time.process_time() - t0
    op.abandon()
    return used, op.committed


def wait_for_failure(prefix: str, timeout_s: float):
    """Post a barrier and wait until a peer is reported dead: (failed ranks, seconds it took)."""
    st = _state[prefix]
    op = st["plane"].barrier(context(prefix, "barrier"))
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if op.failed_peers():
            failed = sorted(op.failed_peers())
            op.abandon()
            return failed, time.monotonic() - t0
        op.wait(0.05)
    op.abandon()
    return [], time.monotonic() - t0


def mapped_segments():
    """Names of the memfd segments this process maps (from /proc/self/maps)."""
    names = set()
    with open("/proc/self/maps") as f:
        for line in f:
            if "memfd:mooncake-fastcpu" in line:
                names.add(line.split("memfd:")[1].split()[0])
    return sorted(names)


def sleep(seconds: float):
    time.sleep(seconds)
    return os.getpid()


def call(prefix: str, method: str, *args):
    """Post ``plane.<method>(ctx, *args)`` and drive it to completion (benchmarks, debugging)."""
    op = getattr(_state[prefix]["plane"], method)(context(prefix, method), *args)
    drive(op)
    return op


def corrupt_next_slot_table(prefix: str) -> bool:
    """This rank's next published op points its slot 0 far outside its lane segment (a broken or
    hostile peer): readers must refuse it without touching the memory."""
    from mooncake.fast.cpu import group as G
    original = G.ShmOp._describe

    def describe(op, nslots, nbytes):
        original(op, nslots, nbytes)
        op.g.ctl[op.base + G.L_SLOTS] = 1 << 40
        G.ShmOp._describe = original
    G.ShmOp._describe = describe
    return True


def drive_outcome(prefix: str, case: dict, timeout_s: float):
    """Post and drive ``case``; returns what happened as text (no exception escapes)."""
    op, _ = post_case(prefix, case)
    try:
        drive(op, timeout_s)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        op.abandon()
        return f"{type(exc).__name__}: {exc}"


def broken_reasons(prefix: str) -> dict:
    return dict(_state[prefix]["plane"].shm.broken)
