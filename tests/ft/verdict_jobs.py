"""Job functions for the one-verdict tests: one-sided events (a late rank, one rank's bad argument,
ranks that disagree on a call, a P2P tag mismatch, a GIL-holding block, two threads on one group,
malformed records).  Each job returns what this rank saw as plain data: ("ok", result) or
(exception class name, failed_ranks, message); the tests compare those across ranks."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ft import jobs


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - the test compares it across ranks
        ranks = getattr(exc, "failed_ranks", None) or getattr(exc, "pending_ranks", ())
        return (type(exc).__name__, tuple(ranks), str(exc),
                [c.__name__ for c in type(exc).__mro__])


def _rank() -> int:
    return dist.get_rank()


def family(op: str, seed: int):
    """One call of ``op`` on this rank's seeded inputs (``jobs.run_op``), capacity = world size."""
    return jobs.run_op(op, seed, dist.get_world_size())


def late(op: str, seed: int, late_rank: int, delay_s: float):
    """``late_rank`` sleeps ``delay_s`` (alive: its progress thread answers) before calling ``op``."""
    if _rank() == late_rank:
        time.sleep(delay_s)
    return outcome(lambda: family(op, seed))


def after(seed: int, count: int = 2):
    """``count`` all_reduces after the event: (results, mask) — equal on every rank, equal to the model."""
    import mooncake.pg as pg
    out = []
    for i in range(count):
        x = jobs.input_of(seed + i, _rank())[0].clone()
        dist.all_reduce(x)
        out.append(x)
    return out, pg.get_active_ranks(dist.group.WORLD).tolist()


# ----------------------------------------------------------------------------- local rejection

def _rejected_call(op: str, seed: int):
    """A call of ``op`` that this rank rejects locally (each family its own bad argument)."""
    n = dist.get_world_size()
    if op == "all_reduce":
        return dist.all_reduce(torch.ones(4), op=dist.ReduceOp.BAND)           # BAND on float32
    if op == "broadcast":
        return dist.broadcast(torch.ones(4), src=n + 5)                          # root out of range
    if op == "all_gather":
        return dist.all_gather([torch.empty(4) for _ in range(n - 1)], torch.ones(4))  # too few slots
    if op == "reduce_scatter":
        return dist.reduce_scatter(torch.empty(4), [torch.ones(5) for _ in range(n)])  # slot sizes differ
    if op == "all_to_all":
        return dist.all_to_all_single(torch.empty(2 * n), torch.ones(2 * n),
                                      input_split_sizes=[1] * n)               # splits do not add up
    raise ValueError(op)


def reject(op: str, seed: int, rejecting: int):
    """``rejecting`` makes a call it rejects locally; the others call ``op`` correctly."""
    if _rank() == rejecting:
        return outcome(lambda: _rejected_call(op, seed))
    return outcome(lambda: family(op, seed))


def reject_coalesced(seed: int, rejecting: int):
    """A coalesced all_reduce of 3 tensors whose third is bad on ``rejecting``: the first two run on
    every rank, the third fails on every rank."""
    def call():
        xs = [jobs.input_of(seed + i, _rank())[0].clone() for i in range(3)]
        if _rank() == rejecting:
            xs[2] = torch.ones(4, dtype=torch.uint32)  # a dtype mooncake does not carry
        with dist._coalescing_manager(async_ops=True) as cm:
            for x in xs:
                dist.all_reduce(x, async_op=True)
        cm.wait()
        return xs
    return outcome(call)


# ----------------------------------------------------------------------------- mismatches

def mismatch(kind: str):
    """Ranks disagree on one call (each kind a different disagreement)."""
    r, n = _rank(), dist.get_world_size()

    def call():
        if kind == "size":
            return dist.all_reduce(torch.ones(4 + r))
        if kind == "size_pipelined":  # both sides of 1 MiB: the fast plane's pipelined path
            return dist.all_reduce(torch.ones(262144 if r == 0 else 300000))
        if kind == "dtype_same_bytes":
            return dist.all_reduce(torch.ones(8, dtype=torch.int32 if r == 0 else torch.float32))
        if kind == "reduce_op":
            return dist.all_reduce(torch.ones(4), op=dist.ReduceOp.SUM if r == 0 else dist.ReduceOp.MAX)
        if kind == "barrier_vs_all_reduce":
            return dist.barrier() if r == 0 else dist.all_reduce(torch.ones(4))
        if kind in ("root_broadcast", "root_reduce", "root_gather", "root_scatter"):
            root = r % n  # every rank names itself
            x = torch.full((4,), float(r))
            if kind == "root_broadcast":
                return dist.broadcast(x, src=root)
            if kind == "root_reduce":
                return dist.reduce(x, dst=root)
            if kind == "root_gather":
                return dist.gather(x, [torch.empty(4) for _ in range(n)], dst=root)
            return dist.scatter(x, [torch.full((4,), float(i)) for i in range(n)], src=root)
        if kind == "a2a_splits":  # rank 0 sends 2 rows to rank 1, which expects 1
            splits_in = [1] * n
            splits_out = [1] * n
            if r == 0:
                splits_in = [1, 2, 0] + [1] * (n - 3)
            return dist.all_to_all_single(torch.empty(n), torch.ones(n), splits_out, splits_in)
        raise ValueError(kind)
    return outcome(call)


# ----------------------------------------------------------------------------- P2P, GIL, threads

def p2p_tag_mismatch(timeout_s: float):
    """Rank 0 sends with tag 1, rank 1 receives with tag 2 (neither matches); then a collective."""
    r = _rank()

    def call():
        x = torch.full((4,), 7.0)
        if r == 0:
            work = dist.isend(x, 1, tag=1)
        else:
            work = dist.irecv(x, 0, tag=2)
        work.wait(timedelta(seconds=timeout_s))
        return x
    first = outcome(call) if r in (0, 1) else ("ok", None)
    return first


def store_block(seed: int, blocked: int, block_s: float):
    """``blocked`` sits in a Store call (a store.wait on a key nobody writes, on the job's Store
    client) while the others run an all_reduce; then it calls the same all_reduce."""
    from mooncake.testing.cluster import worker_context
    if _rank() == blocked:
        try:
            worker_context().store.wait(["mooncake-test/never"], timedelta(seconds=block_s))
        except Exception:  # noqa: BLE001 - the wait times out: that is the point
            pass
    return outcome(lambda: family("all_reduce", seed))


def gil_block(seed: int, blocked: int, block_s: float):
    """``blocked`` sits in a C call that holds the GIL (libc sleep through ctypes.PyDLL) while the
    others run an all_reduce; then it calls the same all_reduce."""
    import ctypes
    if _rank() == blocked:
        ctypes.PyDLL(None).usleep(int(block_s * 1e6))  # PyDLL: the GIL stays held
    return outcome(lambda: family("all_reduce", seed))


def subgroup_during_collective(seed: int):
    """Rank 0 creates a subgroup while rank 1 runs an all_reduce; then rank 1 creates it, rank 0
    runs the all_reduce."""
    if _rank() == 0:
        group = dist.new_group([0, 1])
        first = outcome(lambda: family("all_reduce", seed))
    else:
        first = outcome(lambda: family("all_reduce", seed))
        group = dist.new_group([0, 1])
    x = torch.full((2,), float(_rank() + 1))
    dist.all_reduce(x, group=group)
    return first, x.tolist()


def two_threads(seed: int, rounds: int):
    """Two threads issue different collectives on one group at once, ``rounds`` times."""
    out = []
    for i in range(rounds):
        got = {}
        barrier = threading.Barrier(2)

        def a():
            barrier.wait()
            got["a"] = outcome(lambda: dist.all_reduce(torch.ones(6)))

        def b():
            barrier.wait()
            got["b"] = outcome(lambda: dist.all_gather([torch.empty(5) for _ in range(dist.get_world_size())],
                                                        torch.ones(5)))
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.append((got["a"][0], got["b"][0], got["a"][2] if len(got["a"]) > 2 else "",
                    got["b"][2] if len(got["b"]) > 2 else ""))
    return out


# ----------------------------------------------------------------------------- malformed records

def garbage_decision(seed: int, epoch_offset: int, garbage: bytes):
    """Write ``garbage`` where the next agreement's decision goes, then make every rank need it
    (rank 1 rejects a call)."""
    import mooncake.pg as pg
    backend = pg._backend(dist.group.WORLD)
    epoch = backend.view.epoch + epoch_offset
    ready = f"{backend._prefix}/test/garbage-written/{epoch}"
    if _rank() == 0:
        backend._store.set(f"{backend._prefix}/agree/{epoch}/decision", garbage)
        backend._store.set(ready, b"1")
    backend._store.wait([ready])  # not a collective: under load that could itself need the agreement
    first = reject("all_reduce", seed, 1)
    second = outcome(lambda: family("all_reduce", seed + 1))
    return first, second


def outcome_of_all_reduce(seed: int):
    return outcome(lambda: family("all_reduce", seed))


def waits_out_of_order(seed: int, count: int):
    """``count`` async all_reduces, waited in an order that differs by rank (reversed on odd ranks)."""
    xs = [jobs.input_of(seed + i, _rank())[0].clone() for i in range(count)]
    works = [dist.all_reduce(x, async_op=True) for x in xs]
    order = range(count) if _rank() % 2 == 0 else reversed(range(count))
    for i in order:
        works[i].wait()
    return xs


def staggered(seed: int, delays: dict, timeout_s: float):
    """Each rank calls all_reduce after its own delay, under a group timeout of ``timeout_s``."""
    jobs.set_group_timeout(timeout_s)
    try:
        time.sleep(delays.get(_rank(), 0.0))
        return outcome(lambda: family("all_reduce", seed))
    finally:
        jobs.set_group_timeout(1.5)


# ----------------------------------------------------------------------------- CUDA graph replays

_graph_resets: list[int] = []


def fake_graph_trouble(dead: list[int], stale: bool = False):
    """Stand in for the fast CUDA plane's trouble word on this rank's (CPU) plane: a captured op of the
    current view gave up (or, ``stale``, one captured under an earlier view), the peers in ``dead`` seen
    dead.  The PG face's handling (``check_graphs``) is what runs for real."""
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    epoch = backend.membership.view.epoch
    _graph_resets.clear()
    pending = [(epoch - 1 if stale else epoch, stale, frozenset(dead))]
    backend._plane.graph_trouble = lambda: pending.pop() if pending else None
    backend._plane.graph_reset = _graph_resets.append
    backend._captured = True
    return epoch


def graph_resets():
    return list(_graph_resets)


_graph_views: list[int] = []


def graph_trouble_seen_late(seed: int, gave_up: bool):
    """One rank's replay gave up (``gave_up``: its trouble word says so now); the other's got through and
    learns of it only once the agreement moved the view on (its trouble word written late by the peer's
    kernel).  Each then calls all_reduce; returns (the epoch before, the outcome, the epochs the plane was
    told of as the views changed)."""
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    epoch = backend.membership.view.epoch
    pending = [(epoch, False, frozenset())] if gave_up else []
    _graph_views.clear()
    backend._plane.graph_trouble = lambda: pending.pop() if pending else None
    backend._plane.graph_reset = lambda e: None
    backend._plane.graph_view = _graph_views.append
    backend._captured = True
    if not gave_up:
        deadline = time.monotonic() + 60
        while backend.membership.view.epoch == epoch and time.monotonic() < deadline:
            time.sleep(0.01)
        pending.append((epoch, False, frozenset()))
    return epoch, outcome_of_all_reduce(seed), list(_graph_views)
