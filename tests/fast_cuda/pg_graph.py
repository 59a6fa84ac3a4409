#!/usr/bin/env python3
"""The fast CUDA plane's device path on the GPU machine: eager latency, CUDA-graph capture and replay, a
peer killed during a replay (a check and a benchmark in one script; prints PASS / FAIL / BENCH lines).

    python tests/fast_cuda/pg_graph.py --ranks 2,4,8 --out gpu-out

For each R (ranks sharing the visible GPU under MPS, backend ``mooncake``, ``MOONCAKE_IMPL=fast``):

* eager ``dist.all_reduce`` median time per call (slowest rank) at 8 B .. 1 MiB, device path on and off;
* graph: ``OPS`` all_reduces captured in one ``torch.cuda.CUDAGraph`` (each on its own tensor, refilled
  from fresh inputs before every replay), replayed ``REPLAYS`` times, every output bitwise equal to
  ``mooncake.model``'s fold of every rank's inputs; the time per captured op (``--graph-words``: with the
  words in the pads and / or in host memory);
* large (not in the default steps): ``LARGE_OPS`` captured all_reduces of ``--large-sizes`` bytes, on ordinary
  tensors (in parts, through the lanes) and on ``mooncake.pg.mem_pool()`` tensors (on the tensors themselves),
  exact on integer-valued inputs, the time per op against the HBM floor (R x one rank's device copy);
* collectives: one graph holding all_reduce (SUM, AVG), reduce_scatter_tensor (SUM, AVG),
  all_gather_into_tensor, all_gather into a list, broadcast, all_to_all_single, reduce, gather and
  scatter, replayed ``REPLAYS``
  times with fresh inputs, every output bitwise equal to ``mooncake.model``'s (float32 and bfloat16; and
  an int64 group of the copy collectives);
* mismatch: rank 0 captures another call than its peers: every capture raises the same ``MismatchError``
  naming both sides, and the group then runs an eager all_reduce and a fresh capture with the model's bits;
* late (not in the default steps): the last rank's kernels publish late (0.5 s, the timeout, past it) while the
  others replay all_reduces on pool tensors: a replay gets through with the model's bits, or every rank's next
  call raises the same ``OpTimeoutError`` (nobody failed); the group then works in eager and in a new capture;
* failure: the last rank is killed while the others replay (a graph of all_reduces, and one of
  all_gathers); every survivor's replay ends within the timeout, its next call raises the same
  ``PeerFailureError`` naming the dead rank, and afterwards an eager all_reduce and a fresh capture over
  the survivors give the model's bits.

Writes ``<out>/pg_graph.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mooncake.testing.cluster import Cluster  # noqa: E402

OPS = 16
REPLAYS = 20
WARMUP = 10


def _inputs(rank: int, op: int, replay: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank * 1_000_003 + op * 7919 + replay * 104729)
    return (torch.randn(numel, generator=g) * 100).to(dtype)


def _expected(ranks, op: int, replay: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    from mooncake.model.reduce import ReduceOp, fold
    return fold(ReduceOp.SUM, [_inputs(r, op, replay, numel, dtype) for r in ranks])


def _sum_of_ranks(numel: int, ranks) -> torch.Tensor:
    """The model's SUM of every rank r's ``numel`` elements of r + 1 (the fail and late cases' inputs)."""
    from mooncake.model.reduce import ReduceOp, fold
    return fold(ReduceOp.SUM, [torch.full((numel,), float(r + 1)) for r in ranks])


def _timed_replay(graph) -> float:
    """Replay ``graph`` once every rank is ready; seconds until this rank's GPU finished it."""
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def eager_loop(numel: int, iters: int):
    x = torch.ones(numel, dtype=torch.float32, device="cuda")
    dist.barrier()
    times = []
    for i in range(iters + WARMUP):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
        x.fill_(1)
    return times


def eager_steady(numel: int, iters: int) -> float:
    """Seconds per eager all_reduce of ``iters`` issued back to back (no synchronisation between them, as a
    training step's or a decode step's calls): the steady period."""
    x = torch.ones(numel, dtype=torch.float32, device="cuda")
    for _ in range(WARMUP):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def quick_posts() -> int:
    """How many operations this rank's quick lane launched (0: the device path is off)."""
    dev = dist.group.WORLD._plane.g.dev
    return 0 if dev is None else dev.quick_posts


def _captured(body, barrier: bool = True) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``body()``, captured on a side stream once every rank is ready (``barrier``; else at
    once: the capture's own check meets the peers)."""
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    if barrier:
        dist.barrier()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            body()
    return graph


def graph_run(numel: int, replays: int, dtype_name: str = "float32", use_pool: bool = False):
    """Capture OPS all_reduces, replay; returns (mismatches, seconds per replay, seconds per replay of
    ``replays`` replays back to back: the steady state of a serving loop, no barrier between replays, whether
    the ranks' tensors were read in place).  ``use_pool``: the reduced tensors come from
    ``mooncake.pg.mem_pool()``."""
    import contextlib

    import mooncake.pg as mpg
    dtype = getattr(torch, dtype_name)
    rank, ranks = dist.get_rank(), list(range(dist.get_world_size()))
    static_in = [torch.zeros(numel, dtype=dtype, device="cuda") for _ in range(OPS)]
    pool = mpg.mem_pool() if use_pool else None
    with torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext():
        bufs = [torch.zeros(numel, dtype=dtype, device="cuda") for _ in range(OPS)]

    def body():
        for i in range(OPS):
            bufs[i].copy_(static_in[i])
            dist.all_reduce(bufs[i])

    dev = dist.group.WORLD._plane.g.dev
    direct_before = dev.direct_captures
    graph = _captured(body)
    in_place = dev.direct_captures - direct_before == OPS
    bad, times = [], []
    for rep in range(replays):
        for i in range(OPS):
            static_in[i].copy_(_inputs(rank, i, rep, numel, dtype))
        times.append(_timed_replay(graph))
        for i in range(OPS):
            want = _expected(ranks, i, rep, numel, dtype)
            got = bufs[i].cpu()
            if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                bad.append((rep, i))
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    steady = (time.perf_counter() - t0) / replays
    dist.barrier()
    return bad, times, steady, in_place


LARGE_OPS = 4


def graph_large(numel: int, replays: int, use_pool: bool = False):
    """LARGE_OPS all_reduces of ``numel`` float32 captured on one tensor (``use_pool``: allocated from
    ``mooncake.pg.mem_pool()``, so they run on the ranks' tensors), replayed ``replays`` times (refilled
    between replays, untimed): (whether every replay was exact, seconds per replay, whether the ranks'
    tensors were read in place, blocks per launch).  Rank r's element e is e % 7 + r: small integers, so every
    sum is exact and a part written to the wrong place shows (the bitwise grid is ``graph_run``)."""
    import contextlib

    import mooncake.pg as mpg
    world, rank = dist.get_world_size(), dist.get_rank()
    pool = mpg.mem_pool() if use_pool else None
    with torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext():
        x = torch.empty(numel, dtype=torch.float32, device="cuda")
    pattern = (torch.arange(numel, device="cuda") % 7).float()
    want = (pattern * world + world * (world - 1) / 2) * world ** (LARGE_OPS - 1)

    def body():
        for _ in range(LARGE_OPS):
            dist.all_reduce(x)

    dev = dist.group.WORLD._plane.g.dev
    direct_before = dev.direct_captures
    graph = _captured(body)
    in_place = dev.direct_captures - direct_before == LARGE_OPS
    blocks = dev.last_blocks
    ok, times = True, []
    for _ in range(replays):
        x.copy_(pattern + rank)
        times.append(_timed_replay(graph))
        ok &= bool(torch.equal(x, want))
    dist.barrier()
    graph = x = None  # (the device memory goes back before the next size)
    torch.cuda.empty_cache()
    return ok, times, in_place, blocks


def pool_release(numel: int, rounds: int = 2):
    """Per round, on a ``numel``-float32 ``mooncake.pg.mem_pool()`` tensor of every rank: an all_reduce captured
    (so it runs on the ranks' tensors) and replayed; the graph, the tensor and the pool dropped; at once (no
    collective between: the capture lets go of the old segments itself) the same on a new pool; that dropped
    too, and a barrier.  For each round: (device memory free before it, free after it (bytes, the whole
    device), the peers' segments mapped here after the first capture, after the second, after the barrier,
    whether torch freed this rank's segments, whether every capture ran in place, whether every replay was
    exact)."""
    import gc

    import mooncake.pg as mpg
    from mooncake.fast.cuda import pool as P
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = dist.group.WORLD._plane.g.dev
    want = world * (world + 1) / 2

    def device_free() -> int:
        torch.cuda.synchronize()
        dist.barrier()
        free = torch.cuda.mem_get_info()[0]
        dist.barrier()
        return free

    def capture_and_drop(barrier: bool):
        """(whether it ran in place, exact, segments mapped after the capture, torch freed this rank's)."""
        mem = mpg.mem_pool()
        with torch.cuda.use_mem_pool(mem):
            x = torch.empty(numel, dtype=torch.float32, device="cuda")
        addr = x.data_ptr()
        direct_before = dev.direct_captures
        graph = _captured(lambda: dist.all_reduce(x), barrier)
        in_place = dev.direct_captures - direct_before == 1
        mapped = len(dev.pool_maps)
        x.fill_(rank + 1)
        graph.replay()
        exact = bool(torch.all(x == want))
        torch.cuda.synchronize()
        graph = x = mem = None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        deadline = time.monotonic() + 10  # CUDA runs the graphs' destructors on a thread of its own
        while any(m.graphs() for m in dev.pool_maps.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return in_place, exact, mapped, P._find(dev.g.mem.lib, addr) is None

    out = []
    for _ in range(rounds):  # the first round also makes the pads and words later captures reuse
        free_before = device_free()
        first = capture_and_drop(barrier=True)
        second = capture_and_drop(barrier=False)
        dist.barrier()  # the group's next collective lets go of what no graph reads
        left = len(dev.pool_maps)
        out.append((free_before, device_free(), first[2], second[2], left, first[3] and second[3],
                    first[0] and second[0], first[1] and second[1]))
    return out


COLLECTIVES = ("all_reduce:SUM", "all_reduce:AVG", "reduce_scatter_tensor:SUM", "reduce_scatter_tensor:AVG",
               "all_gather_into_tensor", "all_gather", "broadcast", "all_to_all_single", "reduce:SUM", "gather",
               "scatter")  # the rooted ones' root: group rank 1 % world


def _expected_collective(name: str, world: int, i: int, replay: int, numel: int, dtype: torch.dtype):
    """Every rank's outputs of collective ``name`` (entry ``i`` of the graph) by ``mooncake.model``."""
    from mooncake.model import collectives as M
    from mooncake.model.reduce import ReduceOp
    kind, _, red = name.partition(":")
    mask = [1] * world
    per_rank = numel * world if kind in ("reduce_scatter_tensor", "all_to_all_single", "scatter") else numel
    xs = [_inputs(r, i, replay, per_rank, dtype) for r in range(world)]
    root = 1 % world
    if kind == "reduce":  # non-roots' tensors: their input, untouched
        return M.reduce(xs, ReduceOp[red], root, mask)
    if kind == "gather":  # non-roots' output buffers: never written (zeros)
        return [torch.cat(o) if r == root else torch.zeros(numel * world, dtype=dtype)
                for r, o in enumerate(M.gather(xs, root, mask))]
    if kind == "scatter":
        return M.scatter(list(xs[root].chunk(world)), root, mask)
    if kind == "all_reduce":
        return M.all_reduce(xs, ReduceOp[red], mask)
    if kind == "reduce_scatter_tensor":
        return M.reduce_scatter_tensor(xs, ReduceOp[red], mask)
    if kind == "all_gather_into_tensor":
        return M.all_gather_into_tensor(xs, mask)
    if kind == "all_gather":
        return [torch.cat(outs) for outs in M.all_gather(xs, mask)]
    if kind == "broadcast":
        return M.broadcast(xs, 1 % world, mask)
    return M.all_to_all_single(xs, mask)


def graph_collectives(numel: int, replays: int, dtype_name: str = "float32", names=COLLECTIVES):
    """Capture one of each collective in ``names`` in one graph (each on its own tensors, refilled from fresh
    inputs before every replay), replay; returns (mismatches as (replay, name), seconds per replay)."""
    dtype = getattr(torch, dtype_name)
    rank, world = dist.get_rank(), dist.get_world_size()
    ins, outs = [], []
    for name in names:
        kind = name.partition(":")[0]
        n_in = numel * world if kind in ("reduce_scatter_tensor", "all_to_all_single", "scatter") else numel
        n_out = numel * world if kind in ("all_gather_into_tensor", "all_gather", "all_to_all_single", "gather") \
            else numel
        ins.append(torch.zeros(n_in, dtype=dtype, device="cuda"))
        outs.append(torch.zeros(n_out, dtype=dtype, device="cuda"))
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    dist.barrier()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            for name, x, y in zip(names, ins, outs):
                kind, _, red = name.partition(":")
                op = getattr(dist.ReduceOp, red) if red else None
                if kind == "all_reduce":
                    y.copy_(x)
                    dist.all_reduce(y, op=op)
                elif kind == "reduce_scatter_tensor":
                    dist.reduce_scatter_tensor(y, x, op=op)
                elif kind == "all_gather_into_tensor":
                    dist.all_gather_into_tensor(y, x)
                elif kind == "all_gather":
                    dist.all_gather(list(y.chunk(world)), x)
                elif kind == "broadcast":
                    y.copy_(x)
                    dist.broadcast(y, 1 % world)
                elif kind == "reduce":
                    y.copy_(x)
                    dist.reduce(y, 1 % world, op=op)
                elif kind == "gather":
                    dist.gather(x, list(y.chunk(world)) if rank == 1 % world else None, dst=1 % world)
                elif kind == "scatter":
                    dist.scatter(y, list(x.chunk(world)) if rank == 1 % world else None, src=1 % world)
                else:
                    dist.all_to_all_single(y, x)
    bad, times = [], []
    for rep in range(replays):
        for i, (name, x) in enumerate(zip(names, ins)):
            x.copy_(_inputs(rank, i, rep, x.numel(), dtype))
        times.append(_timed_replay(graph))
        for i, (name, y) in enumerate(zip(names, outs)):
            want = _expected_collective(name, world, i, rep, numel, dtype)[rank]
            if not torch.equal(y.cpu().view(torch.uint8), want.reshape(-1).view(torch.uint8)):
                bad.append((rep, name))
    dist.barrier()
    return bad, times


def die_during_replay(numel: int, victim: int, timeout_s: float, kind: str = "all_reduce"):
    """Capture, replay once cleanly, then replay again on the survivors while ``victim`` is killed (before its
    own replay publishes anything: a payload published by a process that then dies is freed with it, see
    docs/semantics.md "CUDA graphs").  ``kind``: the graph holds all_reduces, all_reduces of a
    ``mooncake.pg.mem_pool()`` tensor (``all_reduce_pool``: run on the ranks' tensors where the cluster lowers
    ``MOONCAKE_FAST_CUDA_PARTS_MIN`` below the message), or all_gather_into_tensors.  Returns what the
    survivor saw (the error of its next call, seconds until its replay ended, whether the group then works in
    eager and in a new capture)."""
    import contextlib

    import mooncake.pg as mpg
    rank = dist.get_rank()
    pool = mpg.mem_pool() if kind == "all_reduce_pool" else None
    with torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext():
        x = torch.full((numel,), float(rank + 1), device="cuda")
    static_in = x.clone()
    gathered = torch.zeros(numel * dist.get_world_size(), device="cuda")
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    dist.barrier()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            for _ in range(OPS):
                if kind == "all_gather":
                    dist.all_gather_into_tensor(gathered, static_in)
                else:
                    x.copy_(static_in)
                    dist.all_reduce(x)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    replay_s = time.perf_counter() - t0
    y = torch.ones(numel, device="cuda")
    error = None
    try:
        dist.all_reduce(y)
    except Exception as exc:  # noqa: BLE001 - the outcome is the result
        error = f"{type(exc).__name__}: {exc}"
    # the group goes on over the survivors: eager, then a fresh capture
    survivors = [r for r in range(dist.get_world_size()) if r != victim]
    z = torch.full((numel,), float(rank + 1), device="cuda")
    dist.all_reduce(z)
    eager_ok = bool(torch.equal(z.cpu(), _sum_of_ranks(numel, survivors)))
    g2 = torch.cuda.CUDAGraph()
    w = torch.zeros(numel * (dist.get_world_size() if kind == "all_gather" else 1), device="cuda")
    src = torch.full((numel,), float(rank + 1), device="cuda")
    with torch.cuda.stream(side):
        with torch.cuda.graph(g2, stream=side):
            if kind == "all_gather":
                dist.all_gather_into_tensor(w, src)
            else:
                w.copy_(src)
                dist.all_reduce(w)
    g2.replay()
    torch.cuda.synchronize()
    if kind == "all_gather":
        want = torch.cat([torch.full((numel,), float(r + 1)) for r in range(dist.get_world_size())])
    else:
        want = _sum_of_ranks(numel, survivors)
    graph_ok = bool(torch.equal(w.cpu(), want))
    return {"error": error, "replay_s": round(replay_s, 3), "eager_ok": eager_ok, "graph_ok": graph_ok}


def late_during_replay(numel: int, late: int, stalls_s: list[float], ops: int = 2):
    """For each stall: capture ``ops`` all_reduces of a ``mooncake.pg.mem_pool()`` tensor (on the ranks' tensors
    where the cluster lowers ``MOONCAKE_FAST_CUDA_PARTS_MIN``), replay once cleanly, then replay while rank
    ``late``'s kernels wait that long before publishing (``MOONCAKE_FAST_CUDA_STALL_WORD``), while the others
    wait for it, read or write each other's tensors and, past the group's timeout, give up.  Returns per stall
    what this rank saw: the error of its next call (None: the replay got through), the replay's seconds, whether
    a replay that got through gave the model's bits, and whether the group then works in eager."""
    import mooncake.pg as mpg
    from mooncake.model.reduce import ReduceOp, fold
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = dist.group.WORLD._plane.g.dev
    pool = mpg.mem_pool()
    with torch.cuda.use_mem_pool(pool):
        x = torch.zeros(numel, device="cuda")
    static_in = torch.arange(numel, dtype=torch.float32, device="cuda") % 64 + rank
    want = fold(ReduceOp.SUM, [torch.arange(numel, dtype=torch.float32) % 64 + r for r in range(world)])
    side = torch.cuda.Stream()
    out = []
    for stall_s in stalls_s:
        graph = torch.cuda.CUDAGraph()
        dist.barrier()
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                for _ in range(ops):
                    x.copy_(static_in)
                    dist.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        clean = bool(torch.equal(x.cpu(), want))
        dist.barrier()
        if rank == late:
            dev.set_stall(int(stall_s * 1e9))
        x.zero_()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        replay_s = time.perf_counter() - t0
        dev.set_stall(0)
        result_ok = bool(torch.equal(x.cpu(), want))
        error = None
        y = torch.ones(4, device="cuda")
        try:
            dist.all_reduce(y)
        except Exception as exc:  # noqa: BLE001 - the outcome is the result
            error = f"{type(exc).__name__}: {exc}"
        z = torch.full((4,), float(rank + 1), device="cuda")
        dist.all_reduce(z)
        eager_ok = bool(torch.equal(z.cpu(), _sum_of_ranks(4, range(world))))
        out.append({"stall_s": stall_s, "error": error, "replay_s": round(replay_s, 3), "clean_ok": clean,
                    "result_ok": result_ok, "eager_ok": eager_ok, "direct": dev.direct_captures})
    return out  # (each stall's first replay is a fresh capture after the previous stall)


def late_eager(numel: int, late: int, stall_s: float):
    """Eager all_reduces of ``numel`` float32 while rank ``late``'s kernel waits ``stall_s`` before publishing
    (past the device path's own wait, within the group's timeout): every rank's result is the model's (the
    host protocol takes over from where the kernels left their words).  Returns (bitwise, how this rank's
    launches ended)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = dist.group.WORLD._plane.g.dev
    x = torch.full((numel,), float(rank + 1), device="cuda")
    for _ in range(3):  # both lanes allocated everywhere: the next ops take the device path
        dist.all_reduce(torch.ones_like(x))
    dist.barrier()
    before = dict(dev.outcomes)
    if rank == late:
        dev.set_stall(int(stall_s * 1e9))
    dist.all_reduce(x)
    dev.set_stall(0)
    ended = {k: v - before.get(k, 0) for k, v in dev.outcomes.items()}
    ok = bool(torch.equal(x.cpu(), _sum_of_ranks(numel, range(world))))
    x.fill_(float(rank + 1))
    dist.all_reduce(x)  # and the next one, on the device path again
    ok = ok and bool(torch.equal(x.cpu(), _sum_of_ranks(numel, range(world))))
    return ok, ended


def capture_mismatch():
    """Rank 0 captures an all_reduce of 4 elements, the others of 8: every rank's capture raises the same
    ``MismatchError`` naming both sides, before anything is enqueued; afterwards an eager all_reduce and a
    capture of the same call on every rank give the model's bits.  Returns (error text, eager ok, graph ok)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.ones(4 if rank == 0 else 8, device="cuda")
    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    dist.barrier()
    error = None
    try:
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                dist.all_reduce(x)
    except Exception as exc:  # noqa: BLE001 - the outcome is the result
        error = f"{type(exc).__name__}: {exc}"
    torch.cuda.synchronize()
    y = torch.full((8,), float(rank + 1), device="cuda")
    dist.all_reduce(y)
    want = _sum_of_ranks(8, range(world))
    eager_ok = bool(torch.equal(y.cpu(), want))
    z = torch.full((8,), float(rank + 1), device="cuda")
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(g2, stream=side):
            dist.all_reduce(z)
    z.fill_(float(rank + 1))
    g2.replay()
    torch.cuda.synchronize()
    return error, eager_ok, bool(torch.equal(z.cpu(), want))


def graph_times(c, R: int, sizes, words: str, note) -> int:
    """Captured all_reduces of each size replayed on cluster ``c``: bitwise against the model, and the time
    per op: one replay after a barrier (slowest rank's replay / ops; the ranks' skew at the start included),
    and replays back to back (``steady_us``: slowest rank); the number of failures."""
    import pg_graph as P
    failures = 0
    for size in sizes:
        for dtype in (("float32", "bfloat16") if size == 4096 else ("float32",)):
            res = c.run(P.graph_run, max(size // 4, 1), REPLAYS, dtype)
            bad = [b for r in res for b in r[0]]
            per_replay = sorted(max(ts) for ts in zip(*[r[1] for r in res]))[:-2]  # the first replays warm up
            failures += bool(bad)
            note("PASS" if not bad else "FAIL", what="graph bitwise", words=words, ranks=R, bytes=size, dtype=dtype,
                 mismatches=bad[:5])
            note("BENCH", mode="graph", words=words, ranks=R, bytes=size, dtype=dtype,
                 per_op_us=round(statistics.median(per_replay) / OPS * 1e6, 2),
                 steady_us=round(max(r[2] for r in res) / OPS * 1e6, 2))
    return failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--sizes", default="8,4096,65536,1048576")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default=".")
    ap.add_argument("--steps", default="eager,graph,collectives,mismatch,fail")
    ap.add_argument("--large-sizes", default="67108864,268435456", help="bytes of the large step's all_reduces")
    ap.add_argument("--fail-kinds", default="all_reduce,all_gather,all_reduce_pool",
                    help="what the graph of the kill case holds")
    ap.add_argument("--fail-numel", type=int, default=1024, help="float32 elements of the kill case's operations")
    ap.add_argument("--collective-sizes", default="3,1000,16384", help="elements of the captured collectives")
    ap.add_argument("--graph-words", default="pad", help="where captured ops keep their words: pad and/or host "
                    "(MOONCAKE_FAST_CUDA_GRAPH_WORDS), each timed")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import pg_graph as P  # the workers import the probes by module name
    steps = set(args.steps.split(","))
    sizes = [int(s) for s in args.sizes.split(",") if s]
    record = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    failures = 0

    def note(kind, **fields):
        record["runs"].append({"kind": kind, **fields})
        print(kind, json.dumps(fields), flush=True)

    for R in [int(r) for r in args.ranks.split(",") if r]:
        # the device path with its quick lane (the default), without it, and off (the host protocol)
        for device_mode, quick in ((("on", "on"), ("on", "off"), ("off", "off")) if "eager" in steps else ()):
            c = Cluster(R, "mooncake", device="cuda", timeout_s=120,
                        env={"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_DEVICE": device_mode,
                             "MOONCAKE_FAST_CUDA_QUICK": quick})
            try:
                for size in sizes:
                    res = c.run(P.eager_loop, max(size // 4, 1), args.iters)
                    per = sorted(max(ts) for ts in zip(*res))
                    posts = min(c.run(P.quick_posts))
                    if quick == "on" and size <= 65536 and posts == 0:
                        failures += 1
                        note("FAIL", what="the eager loop never took the quick lane", ranks=R, bytes=size)
                    note("BENCH", mode="eager", device_path=device_mode, quick_lane=quick, ranks=R, bytes=size,
                         quick_posts=posts, median_us=round(statistics.median(per) * 1e6, 1), p90_us=round(per[len(per) * 9 // 10] * 1e6, 1))
                    steady = max(c.run(P.eager_steady, max(size // 4, 1), args.iters))
                    note("BENCH", mode="eager back to back", device_path=device_mode, quick_lane=quick, ranks=R,
                         bytes=size, us_per_op=round(steady * 1e6, 1))
            finally:
                c.close()
        if "late" in steps and R >= 2:  # a late publisher, also past the others' deadline (pool tensors)
            timeout_s = 3.0
            env = {"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_STALL_WORD": "1",
                   "MOONCAKE_FAST_CUDA_PARTS_MIN": "4096"}
            stalls = [0.5, timeout_s, timeout_s + 1.5]
            c = Cluster(R, "mooncake", device="cuda", timeout_s=timeout_s, env=env)
            try:  # 65536 float32: four blocks per launch, one launch per step
                eager = c.run(P.late_eager, 256, R - 1, 0.5, timeout_s=60)  # under PARTS_MIN: one phase
                res = c.run(P.late_during_replay, 65536, R - 1, stalls, timeout_s=180)
            finally:
                c.close()
            ok = (all(e[0] for e in eager) and eager[R - 1][1].get("done") == 1
                  and all(e[1].get("published") == 1 for e in eager[:R - 1]))
            failures += not ok
            note("PASS" if ok else "FAIL", what=f"rank {R - 1} publishes an eager all_reduce 0.5 s late (past the "
                 "device path's wait): the host protocol takes over, every result the model's", ranks=R,
                 results=eager)
            for i, stall_s in enumerate(stalls):
                seen = [r[i] for r in res]
                errors = {o["error"] for o in seen}
                agree = len(errors) == 1
                error = next(iter(errors))
                through = error is None and all(o["result_ok"] for o in seen)
                gave_up = error is not None and error.startswith("OpTimeoutError") and "nobody failed" in error
                ok = (agree and (through or gave_up) and all(o["clean_ok"] and o["eager_ok"] and o["direct"] for o in seen)
                      and (stall_s <= timeout_s or gave_up) and (stall_s > timeout_s / 2 or through))
                failures += not ok
                note("PASS" if ok else "FAIL", what=f"rank {R - 1} publishes {stall_s} s late in a replay of "
                     f"all_reduces on pool tensors (timeout {timeout_s} s)", ranks=R, results=seen)
        for words in (args.graph_words.split(",") if "graph" in steps else ()):
            if words == "pad":
                continue  # timed below, with the captured collectives
            c = Cluster(R, "mooncake", device="cuda", timeout_s=180,
                        env={"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_GRAPH_WORDS": words})
            try:
                failures += graph_times(c, R, sizes, words, note)
            finally:
                c.close()
        if steps & {"graph", "collectives"}:
            c = Cluster(R, "mooncake", device="cuda", timeout_s=180, env={"MOONCAKE_IMPL": "fast"})
            try:
                if "graph" in steps and "pad" in args.graph_words.split(","):
                    failures += graph_times(c, R, sizes, "pad", note)
                if "collectives" in steps:
                    cases = [(int(n), d) for n in args.collective_sizes.split(",") if n for d in ("float32", "bfloat16")]
                    for numel, dtype in cases + [(1000, "int64")]:
                        names = COLLECTIVES if dtype != "int64" else tuple(
                            n for n in COLLECTIVES if not n.startswith(("all_reduce", "reduce")))
                        res = c.run(P.graph_collectives, numel, 4, dtype, names)
                        bad = sorted({b for r in res for b in r[0]})
                        failures += bool(bad)
                        note("PASS" if not bad else "FAIL", what="captured collectives bitwise", ranks=R,
                             numel=numel, dtype=dtype, collectives=list(names), mismatches=bad[:8])
            finally:
                c.close()
        if "large" in steps:  # captured all_reduces in parts against the HBM floor (R x one rank's copy)
            import pg_jobs as J
            c = Cluster(R, "mooncake", device="cuda", timeout_s=180, env={"MOONCAKE_IMPL": "fast"})
            try:
                for size, use_pool in [(int(x), p) for x in args.large_sizes.split(",") if x for p in (False, True)]:
                    copy_s = c.run(J.copy_time, size, ranks=[0])[0]
                    res = c.run(P.graph_large, size // 4, 6, use_pool)
                    ok = all(r[0] for r in res) and all(r[2] == use_pool for r in res)
                    per_op = statistics.median(sorted(max(ts) for ts in zip(*[r[1] for r in res]))[1:]) / LARGE_OPS
                    failures += not ok
                    memory = "pool tensors" if use_pool else "lanes"
                    note("PASS" if ok else "FAIL", what="large graph all_reduce exact", memory=memory, ranks=R,
                         bytes=size, in_place=[r[2] for r in res])
                    note("BENCH", mode="graph", what="large", memory=memory, ranks=R, bytes=size,
                         blocks=[r[3] for r in res], per_op_ms=round(per_op * 1e3, 3),
                         copy_ms=round(copy_s * 1e3, 3),
                         x_floor=round(per_op / (R * copy_s), 2))
            finally:
                c.close()
        if "mismatch" in steps:
            c = Cluster(R, "mooncake", device="cuda", timeout_s=120, env={"MOONCAKE_IMPL": "fast"})
            try:
                res = c.run(P.capture_mismatch)
            finally:
                c.close()
            errors = {r[0] for r in res}
            text = next(iter(errors)) or ""
            ok = (len(errors) == 1 and text.startswith("MismatchError: all_reduce captured in a CUDA graph")
                  and "4 elements" in text and "8 elements" in text and all(r[1] and r[2] for r in res))
            failures += not ok
            note("PASS" if ok else "FAIL", what="ranks captured different calls", ranks=R, results=res)
        for kind in (args.fail_kinds.split(",") if "fail" in steps and R >= 3 else ()):
            import mooncake.testing.cluster as cluster
            cluster.FAILURE_GRACE_S = 90.0  # the survivors' replays end at the group's timeout, after the death
            timeout_s = 5.0  # the group's: a captured op waits this long for a peer
            env = {"MOONCAKE_IMPL": "fast"}
            if kind == "all_reduce_pool":  # in parts (also 1024 float32), so on the ranks' pool tensors
                env["MOONCAKE_FAST_CUDA_PARTS_MIN"] = "4096"
            c = Cluster(R, "mooncake", device="cuda", timeout_s=timeout_s, env=env)
            try:
                victim = R - 1
                survivors = list(range(R - 1))
                errors = {}
                try:
                    results = c.run(P.die_during_replay, args.fail_numel, victim, timeout_s, kind, timeout_s=120)
                except Exception as exc:  # the victim dies: collect the survivors' answers separately
                    results = getattr(exc, "results", None) or []
                    errors = {r: str(e)[-1500:] for r, e in getattr(exc, "errors", {}).items() if r != victim}
                outs = [results[r] if r < len(results) else None for r in survivors]
                seen = {o["error"] if o else None for o in outs}
                ok = (all(o is not None for o in outs) and len(seen) == 1 and None not in seen
                      and "PeerFailureError" in next(iter(seen)) and f"[{victim}]" in next(iter(seen))
                      and all(o["eager_ok"] and o["graph_ok"] for o in outs))
                failures += not ok
                note("PASS" if ok else "FAIL", what=f"rank killed during a replay of {kind}", ranks=R,
                     numel=args.fail_numel, survivors=outs, errors=errors)
            finally:
                c.close()
    with open(os.path.join(args.out, "pg_graph.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"pg_graph: {failures} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
