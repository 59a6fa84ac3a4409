"""Job functions for the PG conformance suite (run inside mooncake.testing.cluster workers).

Importable as ``pg.jobs`` (tests/pg/conftest.py puts ``tests/`` on sys.path; spawned workers
inherit the parent's sys.path).  Everything here is *shared data generation* and *calling the
op*; the expected values are computed in the test process with ``mooncake.model`` only, never here.

A grid case is a plain dict::

    {"id": str, "op": str, "dtype": str, "red": str | None, "root": int | None,
     "k": int,            # number of slots of slot ops (size() <= k <= capacity)
     "explicit_k": bool,  # all_to_all_single: pass explicit splits (needed when k != size())
     "variant": "plain" | "noncontig" | "inplace" | "uneven" | "special",
     "seed": int}
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}
FLOATS = ("float16", "bfloat16", "float32", "float64")
INTS = ("uint8", "int8", "int16", "int32", "int64")

VEC_SHAPE = (3, 5)   # all_reduce / broadcast / reduce
SLOT_SHAPE = (2, 3)  # one slot of the slot ops
ROWS = SLOT_SHAPE[0]


# ----------------------------------------------------------------------------- options factories

def make_options(rank, world_size, mask, capacity=None, extension_ranks=(), device="cpu"):
    """pg_options factory for Cluster(options=("pg.jobs.make_options", (mask, cap, ext), {"device": d}));
    the mask lives on the backend's device."""
    import mooncake.pg as pg
    return pg.MooncakeBackendOptions(torch.tensor(list(mask), dtype=torch.int32, device=device),
                                     is_extension=rank in tuple(extension_ranks),
                                     max_world_size=capacity)


# ----------------------------------------------------------------------------- input generation

def _gen(seed: int, rank: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 101 + salt)


def rand_values(dtype_name: str, shape, gen: torch.Generator, kind: str = "plain") -> torch.Tensor:
    """Seeded random values; ``kind``: plain, bits (full integer range), prod (tiny magnitudes),
    special (floats with NaN / inf / -0.0 mixed in)."""
    dtype = DTYPES[dtype_name]
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype_name in INTS:
        info = torch.iinfo(dtype)
        if kind == "bits":
            lo, hi = info.min, info.max  # hi exclusive: fine
        elif kind == "prod":
            lo, hi = (0, 4) if dtype is torch.uint8 else (-3, 4)
        else:
            lo, hi = (0, 120) if dtype is torch.uint8 else (-100, 101)
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)
    scale = 1.5 if kind == "prod" else 8.0
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if kind == "special":
        flat = x.reshape(-1)
        specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0],
                                dtype=torch.float64).to(dtype)
        idx = torch.randperm(flat.numel(), generator=gen)[: specials.numel()]
        flat[idx] = specials
    return x


def value_kind(case) -> str:
    red = case.get("red")
    if case["variant"] == "special":
        return "special"
    if red in ("BAND", "BOR", "BXOR"):
        return "bits"
    if red == "PRODUCT":
        return "prod"
    return "plain"


def in_splits(case, s: int) -> list[int]:
    """Rows rank ``s`` sends to each of the k slots in all_to_all_single."""
    k = case["k"]
    if case["variant"] == "uneven":
        return [(s + 2 * r) % 3 for r in range(k)]
    return [ROWS] * k


def case_inputs(case, rank: int):
    """The logical (contiguous) input values of ``rank`` for ``case``."""
    op, dt, k = case["op"], case["dtype"], case["k"]
    g = _gen(case["seed"], rank, 0)
    kind = value_kind(case)
    if op in ("all_reduce", "broadcast", "reduce"):
        return rand_values(dt, VEC_SHAPE, g, kind)
    if op in ("all_gather", "all_gather_into_tensor", "gather"):
        return rand_values(dt, SLOT_SHAPE, g, kind)
    if op == "scatter":
        return [rand_values(dt, SLOT_SHAPE, g, kind) for _ in range(k)] if rank == case["root"] else None
    if op in ("reduce_scatter", "all_to_all"):
        return [rand_values(dt, SLOT_SHAPE, g, kind) for _ in range(k)]
    if op == "reduce_scatter_tensor":
        return rand_values(dt, (ROWS * k, SLOT_SHAPE[1]), g, kind)
    if op == "all_to_all_single":
        return rand_values(dt, (sum(in_splits(case, rank)), SLOT_SHAPE[1]), g, kind)
    if op == "barrier":
        return None
    raise ValueError(f"unknown op {op}")


def garbage(dtype_name: str, shape, seed: int, rank: int) -> torch.Tensor:
    """Non-zero prefill for outputs, so that a slot left unwritten (not zero-filled) is caught."""
    dtype = DTYPES[dtype_name]
    g = _gen(seed, rank, 7)
    if dtype is torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.randint(1, 100, shape, generator=g, dtype=torch.int64).to(dtype)


# ----------------------------------------------------------------------------- tensor layouts

def noncontig_copy(values: torch.Tensor) -> torch.Tensor:
    """A transposed (non-contiguous) tensor holding ``values``."""
    if values.dim() != 2:
        return values.clone()
    buf = torch.empty(values.shape[::-1], dtype=values.dtype, device=values.device).t()
    buf.copy_(values)
    assert not buf.is_contiguous() or values.numel() <= 1 or 1 in values.shape
    return buf


class StridedOut:
    """An output that is every second column of a wider buffer; ``guard_ok`` checks that the
    columns in between were left alone."""

    def __init__(self, dtype_name, shape, seed, rank, device="cpu"):
        rows, cols = shape
        self.buf = garbage(dtype_name, (rows, 2 * cols), seed, rank + 1000).to(device)
        self.before = self.buf.clone()
        self.view = self.buf[:, ::2]

    def guard_ok(self) -> bool:
        return torch.equal(self.buf[:, 1::2], self.before[:, 1::2])


def _red(name: str):
    return getattr(dist.ReduceOp, name)


# ----------------------------------------------------------------------------- one grid case

def run_case(case, rank: int, device: str = "cpu"):
    """Run ``case`` on this rank with tensors on ``device``; returns the output tensor(s) as CPU
    tensors (None where the op has none here)."""
    op, dt, k, variant, seed = case["op"], case["dtype"], case["k"], case["variant"], case["seed"]
    vals = case_inputs(case, rank)
    if isinstance(vals, torch.Tensor):
        vals = vals.to(device)
    elif vals is not None:
        vals = [v.to(device) for v in vals]
    nc = variant == "noncontig"
    inplace = variant == "inplace"
    guards: list[StridedOut] = []

    def out_tensor(shape, salt=0):
        if nc and len(shape) == 2:
            s = StridedOut(dt, shape, seed + salt, rank, device)
            guards.append(s)
            return s.view
        return garbage(dt, shape, seed + salt, rank).to(device)

    def inp(v):
        return noncontig_copy(v) if nc else v.clone()

    def done(result):
        if not all(g.guard_ok() for g in guards):
            raise AssertionError("a strided output view's neighbouring memory was overwritten")
        if isinstance(result, list):
            return [t.to("cpu", copy=True) for t in result]
        return None if result is None else result.to("cpu", copy=True)

    if op == "all_reduce":
        x = inp(vals)
        dist.all_reduce(x, op=_red(case["red"]))
        return done(x)
    if op == "broadcast":
        x = inp(vals)
        dist.broadcast(x, src=case["root"])
        return done(x)
    if op == "reduce":
        x = inp(vals)
        dist.reduce(x, dst=case["root"], op=_red(case["red"]))
        return done(x)
    if op == "all_gather":
        x = inp(vals)
        outs = [out_tensor(SLOT_SHAPE, i) for i in range(k)]
        if inplace:
            outs[rank] = x
        dist.all_gather(outs, x)
        return done(outs)
    if op == "all_gather_into_tensor":
        out = garbage(dt, (ROWS * k, SLOT_SHAPE[1]), seed, rank).to(device)
        if inplace:
            x = out.narrow(0, rank * ROWS, ROWS)
            x.copy_(vals)
        else:
            x = inp(vals)
        dist.all_gather_into_tensor(out, x)
        return done(out)
    if op == "gather":
        x = inp(vals)
        root = case["root"]
        outs = None
        if rank == root:
            outs = [out_tensor(SLOT_SHAPE, i) for i in range(k)]
            if inplace:
                outs[rank] = x
        dist.gather(x, outs, dst=root)
        return done(outs)
    if op == "scatter":
        root = case["root"]
        out = out_tensor(SLOT_SHAPE)
        lst = None
        if rank == root:
            lst = [inp(v) for v in vals]
            if inplace:
                out = lst[rank]
        dist.scatter(out, lst, src=root)
        return done(out)
    if op == "reduce_scatter":
        lst = [inp(v) for v in vals]
        out = lst[rank] if inplace else out_tensor(SLOT_SHAPE)
        dist.reduce_scatter(out, lst, op=_red(case["red"]))
        return done(out)
    if op == "reduce_scatter_tensor":
        x = inp(vals)
        out = x.narrow(0, rank * ROWS, ROWS) if inplace else out_tensor(SLOT_SHAPE)
        dist.reduce_scatter_tensor(out, x, op=_red(case["red"]))
        return done(out)
    if op == "all_to_all":
        ins = [inp(v) for v in vals]
        outs = [out_tensor(SLOT_SHAPE, i) for i in range(k)]
        dist.all_to_all(outs, ins)
        return done(outs)
    if op == "all_to_all_single":
        x = inp(vals)
        send = in_splits(case, rank)
        recv = [in_splits(case, s)[rank] for s in range(k)]
        out = out_tensor((sum(recv), SLOT_SHAPE[1]))
        if case.get("explicit_k") or variant == "uneven":
            dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send)
        else:
            dist.all_to_all_single(out, x)
        return done(out)
    if op == "barrier":
        dist.barrier()
        return None
    raise ValueError(f"unknown op {op}")


def run_grid(cases, skip_ranks=(), device="cpu"):
    """Run every case in order on ``device`` tensors; per case the output(s) (CPU tensors) or
    ("error", type, message)."""
    rank = dist.get_rank()
    if rank in tuple(skip_ranks):
        return None
    results = []
    for case in cases:
        try:
            results.append(run_case(case, rank, device))
        except Exception as exc:  # noqa: BLE001 - reported per case
            results.append(("error", type(exc).__name__, f"{exc}\n{traceback.format_exc()}"))
    return results


def describe():
    """The view this rank sees."""
    import mooncake.pg as pg
    out = {"rank": dist.get_rank(), "world_size": dist.get_world_size(),
           "backend": dist.get_backend()}
    if dist.get_backend().startswith("mooncake"):
        out["active"] = pg.get_active_ranks(None).tolist()
        out["capacity"] = pg.get_capacity(None)
        out["impl"] = pg.get_implementation(None)[0]
    return out


# ----------------------------------------------------------------------------- async

def async_ops():
    rank, n = dist.get_rank(), dist.get_world_size()
    res = {}
    t = torch.full((4,), float(rank + 1))
    w = dist.all_reduce(t, async_op=True)
    res["wait"] = w.wait()
    res["completed_after_wait"] = w.is_completed()
    res["t_wait"] = t.clone()

    t = torch.full((4,), float(rank + 1))
    w = dist.all_reduce(t, async_op=True)
    res["wait_timeout"] = w.wait(timeout=timedelta(seconds=20))
    res["t_wait_timeout"] = t.clone()

    t = torch.arange(6, dtype=torch.int64) * (rank + 1)
    fut = dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True).get_future()
    value = fut.wait()
    res["future_value"] = [v.clone() for v in value]
    res["future_value_is_output"] = value[0].data_ptr() == t.data_ptr()

    # several in flight, waited in reverse order
    ts = [torch.full((3,), float(10 * i + rank)) for i in range(5)]
    works = [dist.all_reduce(x, async_op=True) for x in ts]
    gathered = [torch.zeros(2, dtype=torch.int32) for _ in range(n)]
    works.append(dist.all_gather(gathered, torch.tensor([rank, -rank], dtype=torch.int32), async_op=True))
    b = torch.full((2,), rank, dtype=torch.int16)
    works.append(dist.broadcast(b, src=n - 1, async_op=True))
    res["reverse_waits"] = [w.wait() for w in reversed(works)]
    res["reverse_completed"] = [w.is_completed() for w in works]
    res["reverse_ts"] = [x.clone() for x in ts]
    res["reverse_gathered"] = [x.clone() for x in gathered]
    res["reverse_b"] = b.clone()
    # a barrier async too
    res["barrier_wait"] = dist.barrier(async_op=True).wait()
    return res


# ----------------------------------------------------------------------------- P2P

def p2p_basic():
    """World size 2: send/recv, isend/irecv, tags, FIFO, any-source, size mismatch."""
    rank = dist.get_rank()
    peer = 1 - rank
    res = {}
    # blocking send / recv
    if rank == 0:
        dist.send(torch.arange(5, dtype=torch.float32), dst=1)
    else:
        t = torch.zeros(5)
        dist.recv(t, src=0)
        res["recv"] = t
    # isend / irecv both directions at once
    out = torch.zeros(3, dtype=torch.int64)
    ws = [dist.isend(torch.full((3,), rank + 40, dtype=torch.int64), dst=peer),
          dist.irecv(out, src=peer)]
    for w in ws:
        w.wait()
    res["irecv"] = out
    # tags: two messages, received in the opposite order of sending
    if rank == 0:
        w1 = dist.isend(torch.tensor([1.0]), dst=1, tag=11)
        w2 = dist.isend(torch.tensor([2.0]), dst=1, tag=22)
        w1.wait(), w2.wait()
    else:
        b = torch.zeros(1)
        dist.recv(b, src=0, tag=22)
        a = torch.zeros(1)
        dist.recv(a, src=0, tag=11)
        res["tag22"], res["tag11"] = b, a
    # per-(peer, tag) FIFO
    if rank == 0:
        ws = [dist.isend(torch.tensor([i], dtype=torch.int32), dst=1, tag=5) for i in range(4)]
        for w in ws:
            w.wait()
    else:
        bufs = [torch.zeros(1, dtype=torch.int32) for _ in range(4)]
        ws = [dist.irecv(b, src=0, tag=5) for b in bufs]
        for w in reversed(ws):
            w.wait()
        res["fifo"] = [int(b.item()) for b in bufs]
    # any source
    if rank == 1:
        dist.send(torch.tensor([7.5]), dst=0, tag=3)
    else:
        t = torch.zeros(1)
        res["anysrc_rank"] = dist.recv(t, tag=3)
        res["anysrc_value"] = t
    # size mismatch: 4 elements sent, 5 expected (and then 5 sent, 4 expected)
    for label, (n_send, n_recv) in (("short", (4, 5)), ("long", (5, 4))):
        if rank == 0:
            try:
                dist.send(torch.ones(n_send), dst=1, tag=9)
                res[f"mismatch_{label}_sender"] = "ok"
            except Exception as exc:  # noqa: BLE001
                res[f"mismatch_{label}_sender"] = _exc(exc)
        else:
            try:
                dist.recv(torch.zeros(n_recv), src=0, tag=9)
                res[f"mismatch_{label}"] = None
            except Exception as exc:  # noqa: BLE001
                res[f"mismatch_{label}"] = _exc(exc)
    # the group still works: P2P and a collective
    out = torch.zeros(2)
    ws = [dist.isend(torch.full((2,), float(rank)), dst=peer, tag=9), dist.irecv(out, src=peer, tag=9)]
    for w in ws:
        w.wait()
    res["after_p2p"] = out
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    res["after_allreduce"] = t
    return res


def p2p_ring():
    """batch_isend_irecv ring, and receives from any source (rank 0 receives from everyone)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    res = {}
    send = torch.arange(4, dtype=torch.int64) + 100 * rank
    recv = torch.zeros(4, dtype=torch.int64)
    ops = [dist.P2POp(dist.isend, send, (rank + 1) % n), dist.P2POp(dist.irecv, recv, (rank - 1) % n)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    res["ring"] = recv
    if rank == 0:
        got = []
        for _ in range(n - 1):
            t = torch.zeros(2, dtype=torch.int32)
            src = dist.recv(t, tag=4)
            got.append((src, t.tolist()))
        res["anysrc"] = got
    else:
        dist.send(torch.tensor([rank, 10 * rank], dtype=torch.int32), dst=0, tag=4)
    dist.barrier()
    return res


# ----------------------------------------------------------------------------- subgroups

def subgroups():
    """World 4: even = [0, 2], odd = [1, 3]; collectives in each, then world ones."""
    rank, n = dist.get_rank(), dist.get_world_size()
    even = dist.new_group([r for r in range(n) if r % 2 == 0])
    odd = dist.new_group([r for r in range(n) if r % 2 == 1])
    mine = even if rank % 2 == 0 else odd
    members = [r for r in range(n) if r % 2 == rank % 2]
    res = {"group_rank": dist.get_rank(mine), "group_size": dist.get_world_size(mine),
           "backend": type(mine).__name__}
    x = rand_values("float32", (4,), _gen(77, rank, 0))
    dist.all_reduce(x, group=mine)
    res["all_reduce"] = x
    y = rand_values("int32", (3,), _gen(78, rank, 0), "bits")
    dist.all_reduce(y, op=dist.ReduceOp.BXOR, group=mine)
    res["all_reduce_bxor"] = y
    g = [torch.zeros(2, dtype=torch.int64) for _ in members]
    dist.all_gather(g, torch.tensor([rank, rank * rank], dtype=torch.int64), group=mine)
    res["all_gather"] = g
    b = rand_values("bfloat16", (5,), _gen(79, rank, 0))
    dist.broadcast(b, src=members[-1], group=mine)  # src is a global rank
    res["broadcast"] = b
    r = rand_values("int16", (3,), _gen(80, rank, 0))
    dist.reduce(r, dst=members[0], op=dist.ReduceOp.MIN, group=mine)
    res["reduce"] = r
    out = torch.zeros(len(members) * 2, dtype=torch.float64)
    inp = torch.arange(len(members) * 2, dtype=torch.float64) + rank
    dist.all_to_all_single(out, inp, group=mine)
    res["all_to_all_single"] = out
    # P2P inside the subgroup (global ranks)
    peer = members[1] if rank == members[0] else members[0]
    pbuf = torch.zeros(1)
    ws = [dist.isend(torch.tensor([float(rank)]), dst=peer, group=mine), dist.irecv(pbuf, src=peer, group=mine)]
    for w in ws:
        w.wait()
    res["p2p"] = pbuf
    # world collectives afterwards
    w = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(w)
    res["world_all_reduce"] = w
    wg = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
    dist.all_gather(wg, torch.tensor([rank]))
    res["world_all_gather"] = wg
    return res


# ----------------------------------------------------------------------------- bad inputs

def _exc(exc: BaseException):
    import mooncake.pg as pg
    return {"type": type(exc).__name__, "msg": str(exc),
            "argument_error": isinstance(exc, pg.ArgumentError),
            "wire_error": isinstance(exc, pg.WireError),
            "value_error": isinstance(exc, ValueError), "runtime_error": isinstance(exc, RuntimeError)}


def _follow_up():
    """The next collective on the same group: an all_reduce whose result the parent checks."""
    t = torch.tensor([dist.get_rank() + 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def _bad_call(name: str, rank: int):
    import mooncake.pg as pg
    group = dist.group.WORLD
    f32 = torch.ones(4)
    if name == "complex64":
        opts = dist.AllreduceOptions()
        return group.allreduce([torch.ones(4, dtype=torch.complex64)], opts).wait()
    if name == "uint32":
        return dist.all_reduce(torch.ones(4, dtype=torch.uint32))
    if name == "sparse":
        return dist.all_reduce(torch.ones(4).to_sparse())
    if name == "band_float":
        return dist.all_reduce(f32, op=dist.ReduceOp.BAND)
    if name == "avg_bool":
        return dist.all_reduce(torch.ones(4, dtype=torch.bool), op=dist.ReduceOp.AVG)
    if name == "root_out_of_range":
        return dist.broadcast(f32, src=9)
    if name == "reduce_root_out_of_range":
        return dist.reduce(f32, dst=9)
    if name == "inactive_root_reserved":
        return dist.broadcast(f32, src=group.capacity - 1)
    if name == "inactive_root_middle":
        return dist.broadcast(f32, src=1)
    if name == "inactive_root_reserved_gather":
        return dist.gather(f32, None, dst=group.capacity - 1)
    if name == "all_gather_slots":
        return dist.all_gather([torch.zeros(4)], f32)
    if name == "all_gather_too_many_slots":
        return dist.all_gather([torch.zeros(4) for _ in range(group.capacity + 1)], f32)
    if name == "all_gather_numel":
        return dist.all_gather([torch.zeros(5), torch.zeros(4)], f32)
    if name == "all_gather_dtype":
        opts = torch._C._distributed_c10d.AllgatherOptions()  # not re-exported by torch.distributed
        return group.allgather([[torch.zeros(4, dtype=torch.float64), torch.zeros(4)]], [f32], opts).wait()
    if name == "agit_numel":
        return dist.all_gather_into_tensor(torch.zeros(7), f32)
    if name == "agit_dtype":
        return dist.all_gather_into_tensor(torch.zeros(8, dtype=torch.float64), f32)
    if name == "rst_numel":
        return dist.reduce_scatter_tensor(torch.zeros(3), torch.zeros(8))
    if name == "a2as_splits_sum":
        return dist.all_to_all_single(torch.zeros(4), torch.zeros(4), [2, 2], [1, 2])
    if name == "a2as_splits_len":
        return dist.all_to_all_single(torch.zeros(4), torch.zeros(4), [4], [4])
    if name == "a2as_negative":
        return dist.all_to_all_single(torch.zeros(4), torch.zeros(4), [2, 2], [5, -1])
    if name == "p2p_self":
        return group.send([f32], rank, 0).wait()
    if name == "p2p_out_of_range":
        return dist.send(f32, dst=7) if rank == 0 else dist.recv(f32, src=7)
    if name == "p2p_tag":
        return dist.send(f32, dst=1, tag=1 << 14) if rank == 0 else dist.recv(f32, src=0, tag=1 << 14)
    if name == "size_mismatch":
        return dist.all_reduce(torch.ones(4 if rank == 0 else 5))
    if name == "op_mismatch":
        # both ranks send to and receive from each other, 60 bytes each way
        if rank == 0:
            return dist.all_reduce(torch.ones(15))
        return dist.all_gather_into_tensor(torch.zeros(15 * dist.get_world_size()), torch.ones(15))
    if name == "op_mismatch_broadcast":
        # rank 0 is the broadcast root (sends only); rank 1 calls all_reduce (sends and receives)
        if rank == 0:
            return dist.broadcast(torch.ones(6), src=0)
        return dist.all_reduce(torch.ones(6))
    if name == "dtype_mismatch":
        return dist.all_reduce(torch.ones(4, dtype=torch.float32 if rank == 0 else torch.int32))
    if name == "redop_mismatch":
        return dist.all_reduce(torch.ones(4), op=dist.ReduceOp.SUM if rank == 0 else dist.ReduceOp.MAX)
    raise ValueError(name)


def bad_input(name: str, ranks=None, skip_ranks=()):
    """Run the bad call on ``ranks`` (default all; others skip it), then the follow-up collective.
    ``skip_ranks`` (extension ranks, local-only) do nothing."""
    rank = dist.get_rank()
    if rank in tuple(skip_ranks):
        return None
    outcome = "skipped"
    if ranks is None or rank in ranks:
        try:
            _bad_call(name, rank)
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001
            outcome = _exc(exc)
    return {"outcome": outcome, "follow_up": _follow_up()}


def allgather_default_opts():
    """The backend's own methods called without ``opts`` (as upstream code calling the group
    object directly does): they must default their options themselves."""
    group = dist.group.WORLD
    rank, n = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([rank, 2 * rank], dtype=torch.int32)
    outs = [torch.zeros(2, dtype=torch.int32) for _ in range(n)]
    group.allgather([outs], [t]).wait()
    out = torch.zeros(2 * n, dtype=torch.int32)
    group._allgather_base(out, t).wait()
    return outs, out


# ----------------------------------------------------------------------------- options errors

def init_options_errors(backend_good="mooncake-cpu"):
    """In a cluster started with init=False: each bad pg_options, then a correct init."""
    import mooncake.pg as pg
    from mooncake.testing.cluster import worker_context
    ctx = worker_context()
    rank, n = ctx.rank, ctx.world_size
    store = ctx.store
    timeout = timedelta(seconds=30)
    res = {}

    def attempt(label, backend, build):
        try:
            opts = build()
            dist.init_process_group(backend, store=dist.PrefixStore(label, store), rank=rank,
                                    world_size=n, timeout=timeout, pg_options=opts)
            res[label] = "ok"
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001
            res[label] = _exc(exc)
        res[label + "_initialized_after"] = dist.is_initialized()

    attempt("int64", backend_good,
            lambda: pg.MooncakeBackendOptions(torch.ones(n, dtype=torch.int64)))

    def on_meta():
        opts = pg.MooncakeBackendOptions(torch.ones(n, dtype=torch.int32))
        opts.active_ranks = torch.ones(n, dtype=torch.int32, device="meta")  # not a CPU tensor
        return opts
    attempt("not_cpu", backend_good, on_meta)
    attempt("not_gpu", "mooncake", lambda: pg.MooncakeBackendOptions(torch.ones(n, dtype=torch.int32)))
    attempt("sized", backend_good,
            lambda: pg.MooncakeBackendOptions(torch.ones(n + 1, dtype=torch.int32), max_world_size=n + 2))
    attempt("capacity_small", backend_good,
            lambda: pg.MooncakeBackendOptions(torch.ones(n - 1, dtype=torch.int32), max_world_size=n - 1))
    # finally a correct init on the same store, and it works
    mask = torch.ones(n + 2, dtype=torch.int32)
    dist.init_process_group(backend_good, store=dist.PrefixStore("good", store), rank=rank,
                            world_size=n, timeout=timeout,
                            pg_options=pg.MooncakeBackendOptions(mask, max_world_size=n + 2))
    t = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(t)
    res["good_all_reduce"] = int(t.item())
    res["good_world_size"] = dist.get_world_size()
    res["good_mask"] = mask.tolist()
    dist.destroy_process_group()
    return res


def env_pythonpath():
    return os.environ.get("PYTHONPATH"), os.environ.get("MOONCAKE_IMPL"), time.time()
