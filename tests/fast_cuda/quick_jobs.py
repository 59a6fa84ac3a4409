"""Job functions for the quick lane's tests (test_quick_lane.py): each rank runs blocking ``dist.all_reduce``
loops on one tensor (the same data pointer every call, as a training or decode loop does) on the CUDA plane's
CPU emulation, and reports what it got, bitwise against the model, and how its calls were posted."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from mooncake.model import collectives as model
from mooncake.model.reduce import ReduceOp
from mooncake.testing.compare import bitwise_equal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64, "float16": torch.float16}
OPS = {"SUM": dist.ReduceOp.SUM, "MAX": dist.ReduceOp.MAX, "AVG": dist.ReduceOp.AVG, "MIN": dist.ReduceOp.MIN}


def _dev():
    return dist.group.WORLD._plane.g.dev


def input_of(rank: int, step: int, dtype: str, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 17 * rank + numel)
    return (torch.randn(numel, generator=g) * 4).to(DTYPES[dtype])


def want(ranks, step: int, dtype: str, numel: int, op: str) -> torch.Tensor:
    world = dist.get_world_size()
    inputs = [input_of(r, step, dtype, numel) for r in range(world)]
    mask = [int(r in ranks) for r in range(world)]
    return model.all_reduce(inputs, ReduceOp[op], mask)[dist.get_rank()]


def counters() -> dict:
    dev = _dev()
    return {"quick": dev.quick_posts, "handed": dev.quick_handovers, **dev.outcomes}


def since(before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in counters().items()}


def loops(shapes: list, steps: int, ranks=None):
    """For each (dtype, numel, op): ``steps`` calls on one tensor refilled with step-seeded inputs.  Returns
    (the (shape, step) pairs whose result differs from the model, counters over the loops)."""
    ranks = list(range(dist.get_world_size())) if ranks is None else ranks
    bad, counts = [], []
    for dtype, numel, op in shapes:
        before = counters()
        x = torch.empty(numel, dtype=DTYPES[dtype])
        for step in range(steps):
            x.copy_(input_of(dist.get_rank(), step, dtype, numel))
            dist.all_reduce(x, op=OPS[op])
            if not bitwise_equal(x, want(ranks, step, dtype, numel, op)):
                bad.append((dtype, numel, op, step))
        counts.append(since(before))
    return bad, counts


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - the test compares it across ranks
        return (type(exc).__name__, tuple(getattr(exc, "failed_ranks", ()) or ()), str(exc))


def late_then_loop(late_rank: int, delay_s: float, numel: int, steps: int):
    """Warm the shape up, then ``late_rank`` calls ``delay_s`` late (past the device path's wait, within the
    group's timeout); then ``steps`` more.  Returns (late call's outcome, bad steps, counters of the late call)."""
    x = torch.empty(numel)
    for step in range(4):
        x.copy_(input_of(dist.get_rank(), step, "float32", numel))
        dist.all_reduce(x)
    before = counters()
    if dist.get_rank() == late_rank:
        time.sleep(delay_s)
    x.copy_(input_of(dist.get_rank(), 4, "float32", numel))
    got = outcome(lambda: dist.all_reduce(x))
    late = since(before)
    ok = got[0] == "ok" and bitwise_equal(x, want(range(dist.get_world_size()), 4, "float32", numel, "SUM"))
    bad, _ = loops([("float32", numel, "SUM")], steps)
    return got[0], ok, bad, late


def disagree(numels: dict):
    """Warm up every rank's shapes, then each rank calls all_reduce on its own ``numels[rank]`` elements
    (a mismatch), then one more agreed call.  Returns (the mismatched call's outcome, the next call's)."""
    xs = {n: torch.ones(n) for n in sorted(set(numels.values()))}
    for n, x in xs.items():
        for _ in range(4):  # a fresh group allocates both lanes, then the device path launches the shape on each
            dist.all_reduce(x)
    before = counters()
    mine = xs[numels[dist.get_rank()]]
    got = outcome(lambda: dist.all_reduce(mine))
    quick = tuple(since(before)[k] for k in ("quick", "handed"))
    y = torch.full((5,), float(dist.get_rank() + 1))
    after = outcome(lambda: (dist.all_reduce(y), y.tolist())[1])
    return got[:1] + got[2:], quick, after


def bad_argument(bad_rank: int, numel: int):
    """Warm up, then ``bad_rank`` passes an all_reduce this backend rejects (a sparse tensor) while its peers call
    the warmed shape; then one more call.  Returns (outcome, quick-lane posts of the call, next call's outcome)."""
    x = torch.ones(numel)
    for _ in range(4):  # a fresh group allocates both lanes, then the device path launches the shape on each
        dist.all_reduce(x)
    before = counters()
    if dist.get_rank() == bad_rank:  # after its peers' calls went out (else its report may freeze theirs first)
        time.sleep(0.1)
        got = outcome(lambda: dist.all_reduce(torch.ones(numel).to_sparse()))
    else:
        got = outcome(lambda: dist.all_reduce(x))
    quick = tuple(since(before)[k] for k in ("quick", "handed"))
    y = torch.full((5,), float(dist.get_rank() + 1))
    after = outcome(lambda: (dist.all_reduce(y), y.tolist())[1])
    return got[:1] + got[2:], quick, after


def mixed(numel: int, steps: int):
    """Quick-lane calls mixed with async all_reduces, a broadcast and an async call left pending across a quick
    one: every result the model's.  Returns the bad steps and the counters."""
    world = dist.get_world_size()
    ranks = range(world)
    before = counters()
    x, y = torch.empty(numel), torch.empty(numel)
    bad = []
    for step in range(steps):
        x.copy_(input_of(dist.get_rank(), step, "float32", numel))
        y.copy_(input_of(dist.get_rank(), step + 100, "float32", numel))
        if step % 3 == 1:
            w = dist.all_reduce(y, async_op=True)
            dist.all_reduce(x)
            w.wait()
            if not bitwise_equal(y, want(ranks, step + 100, "float32", numel, "SUM")):
                bad.append(("async", step))
        else:
            dist.all_reduce(x)
        if not bitwise_equal(x, want(ranks, step, "float32", numel, "SUM")):
            bad.append(("quick", step))
        if step % 4 == 2:
            z = torch.full((3,), float(dist.get_rank()))
            dist.broadcast(z, src=1)
            if z.tolist() != [1.0] * 3:
                bad.append(("broadcast", step))
        if step % 4 == 3:  # a quick op still pending (its Work not waited yet) when the broadcast comes
            x.copy_(input_of(dist.get_rank(), step + 200, "float32", numel))
            w = dist.group.WORLD.allreduce([x], _blocking_opts())
            z = torch.full((3,), float(dist.get_rank()))
            dist.broadcast(z, src=0)
            w.wait()
            if z.tolist() != [0.0] * 3 or not bitwise_equal(x, want(ranks, step + 200, "float32", numel, "SUM")):
                bad.append(("pending", step))
    return bad, since(before)


def _blocking_opts():
    from torch._C import _distributed_c10d as c10d
    opts = c10d.AllreduceOptions()
    opts.asyncOp = False
    return opts


_kept: dict = {}


def persistent_loop(numel: int, steps: int, ranks=None):
    """``steps`` calls on one tensor kept across jobs (its data pointer stays the quick lane's shape): the bad
    steps and, per step, the counters."""
    ranks = list(range(dist.get_world_size())) if ranks is None else ranks
    x = _kept.setdefault(numel, torch.empty(numel))
    bad, counts = [], []
    for step in range(steps):
        before = counters()
        x.copy_(input_of(dist.get_rank(), step, "float32", numel))
        dist.all_reduce(x)
        if not bitwise_equal(x, want(ranks, step, "float32", numel, "SUM")):
            bad.append(step)
        counts.append(since(before))
    return bad, counts


def direct_work(numel: int):
    """``pg.allreduce`` with ``asyncOp=False`` called directly, its Work used as a user would (``is_completed``,
    ``get_future``, ``wait``): returns what they said and whether the result is the model's."""
    import mooncake.pg as mpg
    pg = dist.group.WORLD
    x = torch.empty(numel)
    for step in range(4):
        x.copy_(input_of(dist.get_rank(), step, "float32", numel))
        dist.all_reduce(x)
    x.copy_(input_of(dist.get_rank(), 4, "float32", numel))
    w = pg.allreduce([x], _blocking_opts())
    kind = type(w).__name__
    fut = w.get_future()
    fut.wait()
    ok = w.wait() and w.is_completed() and w.is_success() and mpg.get_local_success(w)
    hint = mpg.get_failed_ranks_hint(w).tolist()
    return kind, ok, hint, bitwise_equal(x, want(range(dist.get_world_size()), 4, "float32", numel, "SUM"))


def delegated(numel: int, steps: int):
    """Blocking all_reduces on a group whose plane hands its collectives to the ref plane.  Returns (the
    group's implementation and reason, bad steps, quick posts)."""
    import mooncake.pg as mpg
    bad, _ = loops([("float32", numel, "SUM")], steps)
    dev = _dev()
    return mpg.get_implementation(dist.group.WORLD), bad, 0 if dev is None else dev.quick_posts
