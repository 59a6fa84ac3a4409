"""The randomized correctness soak, worker side (``benchmarks/correctness_soak.py`` drives it).

A *segment* is one job on a ``mooncake.testing.cluster.Cluster`` started with ``init=False``: every
rank creates a default group (random options: no options, an all-zero mask, an all-ones mask, or
reserved capacity slots through ``max_world_size``), optionally a partition of the ranks into
subgroups (``dist.new_group`` for every part, called by every rank, so each rank creates the same
number of backends), runs a random program of collectives and destroys everything again.

The program is drawn from ``random.Random(f"{seed}/{segment}")``, the same on every rank: op kind,
dtype, reduce op, size (on both sides of the fast CPU plane's thresholds), root, slot count, split
sizes, which group, and bursts of ``async_op=True`` ops.  Each rank's inputs come from a torch
generator seeded with (seed, segment, op index, group rank), so every rank can compute every other
rank's inputs and checks its own result bitwise against ``mooncake.model.collectives`` itself (no
result travels to the parent).  What differs per rank (a local RNG): the order in which async ops are
waited for and small random delays.  Outputs are prefilled with non-zero garbage, so a slot that
should be zero-filled but is left alone is caught, and so is a stale or partial write.

``segment(spec)`` returns counters and the first few mismatches (with enough detail to replay them).
"""

from __future__ import annotations

import random
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ..model import collectives as M
from ..model.reduce import ReduceOp, check_reducible

DTYPES = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float64": torch.float64,
}
# weights: the common dtypes most often, the rest now and then
DTYPE_WEIGHTS = {"int32": 4, "int64": 3, "float32": 5, "float64": 3, "bfloat16": 3, "float16": 3, "uint8": 2,
                 "int8": 1, "int16": 1, "bool": 1}
OPS = {  # op -> weight
    "all_reduce": 6, "reduce_scatter": 2, "reduce_scatter_tensor": 3, "all_gather": 2,
    "all_gather_into_tensor": 3, "all_to_all": 2, "all_to_all_single": 3, "broadcast": 2,
    "reduce": 2, "gather": 2, "scatter": 2, "barrier": 1,
}
REDUCING = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor")
ROOTED = ("broadcast", "reduce", "gather", "scatter")
SLOTTED = ("all_gather", "all_gather_into_tensor", "gather", "scatter", "reduce_scatter",
           "reduce_scatter_tensor", "all_to_all", "all_to_all_single")
MAX_DETAILS = 5


# ------------------------------------------------------------------------------------------ helpers

def thresholds(env: dict) -> dict[str, int]:
    """The byte thresholds of the fast CPU plane as this segment's workers see them."""
    return {
        "pipeline_min": int(env.get("MOONCAKE_FAST_CPU_PIPELINE_MIN", 1 << 20)),
        "nt_min": int(env.get("MOONCAKE_FAST_CPU_NT_MIN", 32 << 20)),
        "chunk": int(env.get("MOONCAKE_FAST_CPU_CHUNK", 256 * 1024)),
        "min_segment": 64 * 1024,
    }


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    names = list(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


def _numel(rng: random.Random, elt: int, th: dict[str, int], cap_bytes: int) -> int:
    """An element count: small, or one element either side of a threshold (or of a chunk multiple)."""
    kind = rng.random()
    if kind < 0.45:
        return rng.randint(1, 48)
    marks = [th["pipeline_min"], th["nt_min"], th["min_segment"], th["chunk"] * rng.randint(1, 6),
             rng.randint(64, 4096) * 4]
    b = rng.choice([m for m in marks if m <= cap_bytes] or [cap_bytes])
    n = max(1, b // elt + rng.choice((-1, 0, 1)))
    return max(1, min(n, cap_bytes // elt))


def _gen(seed: int, seg: int, op: int, rank: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, seg, op, rank, salt)) & 0x7FFF_FFFF_FFFF_FFFF)


def values(dtype: str, n: int, g: torch.Generator, kind: str) -> torch.Tensor:
    """Seeded inputs: ``kind`` plain / bits (full integer range) / prod (tiny magnitudes) / special
    (floats with NaN, inf, -0.0 mixed in)."""
    dt = DTYPES[dtype]
    if dt is torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if not dt.is_floating_point:
        info = torch.iinfo(dt)
        lo, hi = {"bits": (info.min, info.max), "prod": (0, 4) if dt is torch.uint8 else (-3, 4)}.get(
            kind, (0, 120) if dt is torch.uint8 else (-100, 101))
        return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64).to(dt)
    x = (torch.randn((n,), generator=g, dtype=torch.float64) * (1.5 if kind == "prod" else 8.0)).to(dt)
    if kind == "special" and n >= 5:
        idx = torch.randperm(n, generator=g)[:5]
        x[idx] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0], dtype=torch.float64).to(dt)
    return x


def garbage_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Non-zero prefill for an output."""
    if t.dtype is torch.bool:
        return torch.ones_like(t)
    return torch.randint(1, 100, t.shape, generator=g, dtype=torch.int64).to(t.dtype)


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.dtype is torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ------------------------------------------------------------------------------------------ program

def draw_op(rng: random.Random, index: int, th: dict[str, int], cap_bytes: int) -> dict:
    """One op of the program (identical on every rank): everything but the group it runs on."""
    op = _pick(rng, OPS)
    dtype = _pick(rng, DTYPE_WEIGHTS)
    dt = DTYPES[dtype]
    elt = torch.empty(0, dtype=dt).element_size()
    red = None
    if op in REDUCING:
        choices = [o for o in ReduceOp if check_reducible(o, dt) is None]
        red = rng.choice(choices).name
    kind = "plain"
    if red in ("BAND", "BOR", "BXOR"):
        kind = "bits"
    elif red == "PRODUCT":
        kind = "prod"
    elif dt.is_floating_point and rng.random() < 0.1:
        kind = "special"
    slot_cap = cap_bytes // 4 if op in SLOTTED else cap_bytes
    return {"index": index, "op": op, "dtype": dtype, "red": red, "kind": kind,
            "n": _numel(rng, elt, th, slot_cap), "root_pick": rng.random(), "k_pick": rng.random(),
            "split_seed": rng.randrange(1 << 30), "cols": rng.choice((1, 1, 2, 3))}


class Target:
    """A group the program runs ops on, as seen from one rank."""

    def __init__(self, name: str, group, members: list[int], capacity: int):
        self.name, self.group, self.members, self.capacity = name, group, members, capacity
        self.size = len(members)  # group ranks 0..size-1 are active; size..capacity-1 are reserved
        self.active = [1] * self.size + [0] * (capacity - self.size)


def _concrete(spec: dict, t: Target, seed: int, seg: int) -> dict:
    """The op's arguments for group ``t``: root, slot count, split sizes, every rank's inputs."""
    op, n, dtype = spec["op"], spec["n"], spec["dtype"]
    i = spec["index"]
    size, cap = t.size, t.capacity
    root = int(spec["root_pick"] * size)
    k = size + int(spec["k_pick"] * (cap - size + 1)) if op in SLOTTED else size
    k = min(k, cap)
    g = lambda r, salt=0: _gen(seed, seg, i, r, salt)  # noqa: E731
    c = {"root": root, "k": k}
    if op in ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "gather"):
        c["inputs"] = [values(dtype, n, g(r), spec["kind"]) for r in range(size)]
    elif op in ("reduce_scatter", "all_to_all"):
        c["inputs"] = [[values(dtype, n, g(r, s), spec["kind"]) for s in range(k)] for r in range(size)]
    elif op == "reduce_scatter_tensor":
        c["inputs"] = [values(dtype, n * k, g(r), spec["kind"]) for r in range(size)]
    elif op == "scatter":
        c["inputs"] = [values(dtype, n, g(root, s), spec["kind"]) for s in range(k)]
    elif op == "all_to_all_single":
        srng = random.Random(spec["split_seed"])
        rows = max(1, n // spec["cols"])
        # splits[s][r]: rows s sends to r; an inactive slot r < k gets rows nobody sends (the
        # receiver's own output split for an inactive sender is free: that block is zero-filled)
        splits = [[srng.randint(0, 2 * rows // k + 1) for _ in range(k)] for _ in range(size)]
        out_splits = [[splits[s][r] if s < size else srng.randint(0, 2) for s in range(k)] for r in range(size)]
        c["splits"], c["out_splits"] = splits, out_splits
        c["inputs"] = [values(dtype, sum(splits[r]) * spec["cols"], g(r), spec["kind"]).reshape(-1, spec["cols"])
                       for r in range(size)]
    return c


def expected(spec: dict, t: Target, c: dict, rank: int):
    """What ``rank`` (a group rank) must hold after the op, from the model."""
    op, cap, active = spec["op"], t.capacity, t.active
    pad = lambda xs: list(xs) + [None] * (cap - len(xs))  # noqa: E731
    red = ReduceOp[spec["red"]] if spec["red"] else None
    k = c["k"]
    if op == "all_reduce":
        return M.all_reduce(pad(c["inputs"]), red, active)[rank]
    if op == "reduce":
        return M.reduce(pad(c["inputs"]), red, c["root"], active)[rank]
    if op == "broadcast":
        return M.broadcast(pad(c["inputs"]), c["root"], active)[rank]
    if op == "all_gather":
        return M.all_gather(pad(c["inputs"]), active, k)[rank]
    if op == "all_gather_into_tensor":
        return M.all_gather_into_tensor(pad(c["inputs"]), active, k)[rank]
    if op == "gather":
        out = M.gather(pad(c["inputs"]), c["root"], active, k)[rank]
        return out if rank == c["root"] else c["inputs"][rank]  # non-roots: input untouched
    if op == "scatter":
        return M.scatter(c["inputs"], c["root"], active, k)[rank]
    if op == "reduce_scatter":
        return M.reduce_scatter(pad(c["inputs"]), red, active, k)[rank]
    if op == "reduce_scatter_tensor":
        return M.reduce_scatter_tensor(pad(c["inputs"]), red, active, k)[rank]
    if op == "all_to_all":
        return M.all_to_all(pad(c["inputs"]), active, k)[rank]
    if op == "all_to_all_single":
        return M.all_to_all_single(pad(c["inputs"]), active, pad(c["splits"]), pad(c["out_splits"]), k)[rank]
    return None  # barrier


_DIST_OPS = {"SUM": dist.ReduceOp.SUM, "PRODUCT": dist.ReduceOp.PRODUCT, "MIN": dist.ReduceOp.MIN,
             "MAX": dist.ReduceOp.MAX, "AVG": dist.ReduceOp.AVG, "BAND": dist.ReduceOp.BAND,
             "BOR": dist.ReduceOp.BOR, "BXOR": dist.ReduceOp.BXOR}


def issue(spec: dict, t: Target, c: dict, rank: int, g: torch.Generator):
    """Issue the op asynchronously on this rank; returns (work, a function giving the result)."""
    op, grp = spec["op"], t.group
    red = _DIST_OPS[spec["red"]] if spec["red"] else None
    k, root = c["k"], t.members[c["root"]]  # torch takes global ranks for roots
    ins = c.get("inputs")
    if op == "all_reduce":
        x = ins[rank].clone()
        return dist.all_reduce(x, op=red, group=grp, async_op=True), lambda: x
    if op == "reduce":
        x = ins[rank].clone()
        return dist.reduce(x, dst=root, op=red, group=grp, async_op=True), lambda: x
    if op == "broadcast":
        x = ins[rank].clone()
        return dist.broadcast(x, src=root, group=grp, async_op=True), lambda: x
    if op == "all_gather":
        outs = [garbage_like(ins[rank], g) for _ in range(k)]
        return dist.all_gather(outs, ins[rank].clone(), group=grp, async_op=True), lambda: outs
    if op == "all_gather_into_tensor":
        out = garbage_like(torch.empty(k * ins[rank].numel(), dtype=ins[rank].dtype), g)
        return dist.all_gather_into_tensor(out, ins[rank].clone(), group=grp, async_op=True), lambda: out
    if op == "gather":
        x = ins[rank].clone()
        outs = [garbage_like(x, g) for _ in range(k)] if rank == c["root"] else None
        w = dist.gather(x, outs, dst=root, group=grp, async_op=True)
        return w, (lambda: outs) if rank == c["root"] else (lambda: x)
    if op == "scatter":
        like = ins[0]
        out = garbage_like(like, g)
        lst = [s.clone() for s in ins] if rank == c["root"] else None
        return dist.scatter(out, lst, src=root, group=grp, async_op=True), lambda: out
    if op == "reduce_scatter":
        out = garbage_like(ins[rank][0], g)
        return dist.reduce_scatter(out, [s.clone() for s in ins[rank]], op=red, group=grp, async_op=True), lambda: out
    if op == "reduce_scatter_tensor":
        out = garbage_like(torch.empty(ins[rank].numel() // k, dtype=ins[rank].dtype), g)
        return dist.reduce_scatter_tensor(out, ins[rank].clone(), op=red, group=grp, async_op=True), lambda: out
    if op == "all_to_all":
        outs = [garbage_like(s, g) for s in ins[rank]]
        return dist.all_to_all(outs, [s.clone() for s in ins[rank]], group=grp, async_op=True), lambda: outs
    if op == "all_to_all_single":
        out_rows = sum(c["out_splits"][rank])
        out = garbage_like(torch.empty((out_rows, ins[rank].shape[1]), dtype=ins[rank].dtype), g)
        w = dist.all_to_all_single(out, ins[rank].clone(), output_split_sizes=c["out_splits"][rank],
                                   input_split_sizes=c["splits"][rank], group=grp, async_op=True)
        return w, lambda: out
    return dist.barrier(group=grp, async_op=True), lambda: None


def _matches(got, want) -> bool:
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same_bits(a, b) for a, b in zip(got, want))
    return same_bits(got, want)


def _summary(x) -> str:
    if isinstance(x, list):
        return "[" + ", ".join(_summary(t) for t in x[:4]) + (", ..." if len(x) > 4 else "") + "]"
    if x is None:
        return "None"
    flat = x.reshape(-1)
    return f"{x.dtype} {tuple(x.shape)} {flat[:6].tolist()}"


# ------------------------------------------------------------------------------------------ options

def make_options(kind: str, world: int, extra: int):
    import mooncake.pg as pg
    if kind == "none":
        return None, world
    if kind == "zeros":
        return pg.MooncakeBackendOptions(torch.zeros(world, dtype=torch.int32)), world
    if kind == "ones":
        return pg.MooncakeBackendOptions(torch.ones(world, dtype=torch.int32)), world
    cap = world + extra  # reserved slots: an all-zero mask of capacity length (upstream's default)
    return pg.MooncakeBackendOptions(torch.zeros(cap, dtype=torch.int32), max_world_size=cap), cap


# ------------------------------------------------------------------------------------------ the job

def segment(spec: dict) -> dict:
    """Run one segment on this worker (a Cluster job; see the module docstring)."""
    from .cluster import worker_context
    ctx = worker_context()
    rank, world = ctx.rank, ctx.world_size
    seed, seg = spec["seed"], spec["segment"]
    prog = random.Random(f"{seed}/{seg}")
    local = random.Random(f"{seed}/{seg}/{rank}")
    th = thresholds(spec.get("env", {}))
    timeout = timedelta(seconds=spec.get("timeout_s", 60))
    stats = {"ops": 0, "rank_results": 0, "wrong": 0, "details": [], "by_op": {}, "async_bursts": 0,
             "groups": 0, "error": None}
    mask_kind = prog.choice(("none", "zeros", "zeros", "ones", "capacity"))
    options, cap = make_options(mask_kind, world, prog.randint(1, 2))
    stats["mask"] = mask_kind
    t0 = time.monotonic()
    recent: list[str] = []  # the last ops issued, for error reports
    dist.init_process_group("mooncake-cpu", store=ctx.store, rank=rank, world_size=world, timeout=timeout,
                            pg_options=options)
    try:
        targets = [Target("world", None, list(range(world)), cap)]
        # a partition of the ranks into subgroups: every rank calls new_group for every part
        if world >= 2 and prog.random() < spec.get("subgroup_p", 0.5):
            ranks = list(range(world))
            prog.shuffle(ranks)
            cut = prog.randint(1, world - 1)
            parts = [sorted(ranks[:cut]), sorted(ranks[cut:])]
            mine = None
            for p in parts:
                sub_kind = prog.choice(("none", "zeros", "capacity"))
                sub_opts, sub_cap = make_options(sub_kind, len(p), 1)
                gobj = dist.new_group(p, timeout=timeout, pg_options=sub_opts)
                if rank in p:
                    mine = Target(f"sub{p}", gobj, p, sub_cap)
            targets.append(mine)
            stats["groups"] += 1
        cap_bytes = spec.get("cap_bytes", 192 * 1024)
        i = 0
        n_ops = spec["ops"]
        while i < n_ops:
            burst = 1
            if prog.random() < spec.get("async_p", 0.3):
                burst = prog.randint(2, 5)
                stats["async_bursts"] += 1
            pending = []
            for _ in range(burst):
                if i >= n_ops:
                    break
                op = draw_op(prog, i, th, cap_bytes)
                use_sub = len(targets) > 1 and prog.random() < 0.4
                t = targets[1] if use_sub else targets[0]
                grank = t.members.index(rank)
                c = _concrete(op, t, seed, seg * 7 + (1 if use_sub else 0) + 2 * t.members[0])
                g = _gen(seed, seg, i, rank, 99)
                work, result = issue(op, t, c, grank, g)
                pending.append((op, t, c, grank, work, result))
                recent.append(f"#{i} {op['op']} {op['dtype']} {op['red'] or ''} n={op['n']} k={c['k']} "
                              f"root={c['root']} on {t.name}" + (" (async burst)" if burst > 1 else ""))
                del recent[:-12]
                i += 1
                if local.random() < spec.get("delay_p", 0.03):
                    time.sleep(local.random() * 0.002)
            order = list(range(len(pending)))
            if spec.get("shuffle_waits", True):
                local.shuffle(order)  # every rank waits in its own order
            for j in order:
                pending[j][4].wait()
            for op, t, c, grank, work, result in pending:
                want = expected(op, t, c, grank)
                got = result()
                stats["ops"] += 1 if grank == 0 else 0  # one op counted once per group (by its rank 0)
                stats["rank_results"] += 1
                by = stats["by_op"].setdefault(op["op"], [0, 0])
                by[0] += 1
                if op["op"] != "barrier" and not _matches(got, want):
                    stats["wrong"] += 1
                    by[1] += 1
                    if len(stats["details"]) < MAX_DETAILS:
                        stats["details"].append({
                            "seed": seed, "segment": seg, "op_index": op["index"], "rank": rank,
                            "group": t.name, "group_rank": grank, "op": {k: v for k, v in op.items()},
                            "k": c["k"], "root": c["root"], "got": _summary(got), "want": _summary(want),
                            "mask": mask_kind, "segment_op_count": n_ops})
    except BaseException as exc:  # noqa: BLE001 - reported, the parent counts it
        stats["error"] = (f"{type(exc).__name__}: {exc}\nlast ops issued: {recent}\n"
                          f"{traceback.format_exc()[-3000:]}")
    finally:
        stats["seconds"] = time.monotonic() - t0
        try:
            dist.destroy_process_group()
        except BaseException as exc:  # noqa: BLE001
            stats["error"] = stats["error"] or f"destroy: {type(exc).__name__}: {exc}"
    return stats
