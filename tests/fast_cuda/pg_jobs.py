"""Job functions for torch.distributed-level checks of the CUDA PG plane (run in cluster workers of
backend ``mooncake`` with CUDA tensors; see pg_check.py).  Inputs come from seeds (pg_harness.values)
so the parent computes the model's outputs itself; outputs are returned (moved to the CPU)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import pg_harness as H
from mooncake.model.reduce import ReduceOp

_RED = {"SUM": dist.ReduceOp.SUM, "PRODUCT": dist.ReduceOp.PRODUCT, "MIN": dist.ReduceOp.MIN,
        "MAX": dist.ReduceOp.MAX, "AVG": dist.ReduceOp.AVG, "BAND": dist.ReduceOp.BAND,
        "BOR": dist.ReduceOp.BOR, "BXOR": dist.ReduceOp.BXOR}


def a2a_splits(sender: int, receiver: int) -> int:
    """Rows rank ``sender`` sends rank ``receiver`` in the ragged all_to_all_single case."""
    return (sender + 2 * receiver) % 3 + 1


def dist_inputs(case: dict, rank: int, world: int):
    """This rank's CPU input(s) for a dist-level case."""
    op, numel, dtype = case["op"], case["numel"], case["dtype"]
    seed = case["seed"]
    if op in ("reduce_scatter", "all_to_all") or (op == "scatter" and rank == case["root"]):
        return [H.values(dtype, numel, seed + 1000 * s, rank) for s in range(world)]
    if op == "reduce_scatter_tensor":
        return H.values(dtype, numel * world, seed, rank)
    if op == "all_to_all_single":
        rows = sum(a2a_splits(rank, r) for r in range(world))
        return H.values(dtype, rows * 3, seed, rank).reshape(rows, 3)
    return H.values(dtype, numel, seed, rank)


def _dev() -> torch.device:
    return H.device()


def _sync() -> None:
    if _dev().type == "cuda":
        torch.cuda.synchronize()


def implementation():
    """(implementation, reason, data plane class) of the default group."""
    import mooncake.pg as pg
    group = dist.group.WORLD
    impl, reason = pg.get_implementation(group)
    return impl, reason, type(getattr(group, "_plane", None)).__name__


def run_dist_cases(cases: list[dict]):
    """Call every case's torch.distributed function on CUDA tensors; returns each case's outputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _dev()
    out = []
    for case in cases:
        op, numel = case["op"], case["numel"]
        dtype = H.DTYPES[case["dtype"]]
        x = dist_inputs(case, rank, world)
        x = [t.to(dev) for t in x] if isinstance(x, list) else x.to(dev)

        def fresh(n=numel):
            return torch.full((n,), 7, dtype=dtype, device=dev)

        red = _RED[case["red"]] if case.get("red") else None
        root = case.get("root")
        if op == "all_reduce":
            dist.all_reduce(x, op=red)
            res = x
        elif op == "broadcast":
            dist.broadcast(x, src=root)
            res = x
        elif op == "reduce":
            dist.reduce(x, dst=root, op=red)
            res = x
        elif op == "all_gather":
            res = [fresh() for _ in range(world)]
            dist.all_gather(res, x)
        elif op == "all_gather_into_tensor":
            res = fresh(numel * world)
            dist.all_gather_into_tensor(res, x)
        elif op == "gather":
            res = [fresh() for _ in range(world)] if rank == root else None
            dist.gather(x, res, dst=root)
        elif op == "scatter":
            res = fresh()
            dist.scatter(res, x if rank == root else None, src=root)
        elif op == "reduce_scatter":
            res = fresh()
            dist.reduce_scatter(res, x, op=red)
        elif op == "reduce_scatter_tensor":
            res = fresh()
            dist.reduce_scatter_tensor(res, x, op=red)
        elif op == "all_to_all":
            res = [fresh() for _ in range(world)]
            dist.all_to_all(res, x)
        elif op == "all_to_all_single":
            osplits = [a2a_splits(s, rank) for s in range(world)]
            isplits = [a2a_splits(rank, r) for r in range(world)]
            res = torch.full((sum(osplits), 3), 7, dtype=dtype, device=dev)
            dist.all_to_all_single(res, x, osplits, isplits)
        elif op == "barrier":
            dist.barrier()
            res = None
        else:
            raise ValueError(op)
        out.append(res)
    _sync()
    return out


def allreduce_under_fault(seed: int, victim: int, point: str, numel: int = 4099):
    """The victim arms a kill at ``point``; every rank calls all_reduce on CUDA tensors.
    Survivors return (result, active mask, seconds)."""
    import mooncake.pg as pg
    from mooncake.control import faults
    rank = dist.get_rank()
    x = H.values("float32", numel, seed, rank, specials=False).to(_dev())
    if rank == victim:
        faults.arm(point, "kill")
    t0 = time.monotonic()
    try:
        dist.all_reduce(x)
        _sync()
    finally:
        faults.disarm()
    return x, pg.get_active_ranks(dist.group.WORLD).clone(), time.monotonic() - t0


def allreduce_after(seed: int, numel: int = 4099):
    import mooncake.pg as pg
    x = H.values("float32", numel, seed, dist.get_rank(), specials=False).to(_dev())
    dist.all_reduce(x)
    _sync()
    return x, pg.get_active_ranks(dist.group.WORLD).clone()


def bench_dist_all_reduce(numel: int, iters: int, warmup: int = 3):
    """Per-iteration seconds of dist.all_reduce SUM of ``numel`` float32 on CUDA (GPU synchronised
    around each call), after a barrier."""
    x = torch.ones(numel, dtype=torch.float32, device=_dev())
    dist.barrier()
    times = []
    for i in range(warmup + iters):
        _sync()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        x.fill_(1)
    return times


def copy_time(nbytes: int, iters: int = 10, barrier_store_key: str | None = None):
    """Seconds of one device-to-device copy of ``nbytes`` (median over ``iters``, CUDA events)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    if barrier_store_key is not None:
        from mooncake.testing.cluster import worker_context
        store = worker_context().store
        store.add(barrier_store_key, 1)
        while int(store.add(barrier_store_key, 0)) < worker_context().world_size:
            time.sleep(0.001)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def reduce_op_name(op) -> str:
    return ReduceOp(op).name


def wait_on_other_stream(numel: int, iters: int):
    """Issue all_reduce SUM on a side stream, wait() on the main stream and read the result there at
    once; returns, per iteration, how many elements the main stream saw wrong (the work is issued right
    after a long side-stream kernel, so without the ordering the read races the result's write)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _dev()
    side = torch.cuda.Stream(dev)
    want = float(world * (world + 1) // 2)
    wrong = []
    for i in range(iters):
        x = torch.full((numel,), float(rank + 1), device=dev)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time on the side stream before the operation
            work = dist.all_reduce(x, async_op=True)
        work.wait()  # main stream now ordered after the side stream's writes
        seen = x.clone()  # on the main stream
        wrong.append(int((seen != want).sum()))
        torch.cuda.synchronize()
    return wrong


def capture_refused(op: str = "reduce_scatter_list"):
    """A collective issued while a CUDA graph is being captured is refused before it communicates; the group
    then still works.  ``op``: "reduce_scatter_list" (no plane captures it), "reduce", "broadcast" or
    "all_reduce" (where the plane cannot capture them), "premul" (an all_reduce with PREMUL_SUM, which no plane captures), "uneven" (an
    all_to_all_single with uneven splits).  Returns (error type, message, the following all_reduce's value)."""
    rank = dist.get_rank()
    dev = _dev()
    x = torch.ones(16, device=dev)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(dev)
    err = None
    with torch.cuda.stream(stream):
        try:
            with torch.cuda.graph(graph, stream=stream):
                if op == "reduce_scatter_list":
                    dist.reduce_scatter(x[:8].clone(), [x[:8].clone(), x[8:].clone()])
                elif op == "reduce":
                    dist.reduce(x, 0)
                elif op == "broadcast":
                    dist.broadcast(x, 0)
                elif op == "premul":
                    dist.all_reduce(x, op=dist._make_nccl_premul_sum(0.5))
                elif op == "uneven":
                    world = dist.get_world_size()
                    splits = [16 - (world - 1)] + [1] * (world - 1)
                    dist.all_to_all_single(torch.empty_like(x), x, splits, splits)
                else:
                    dist.all_reduce(x)
        except Exception as exc:  # noqa: BLE001 - returned to the test
            err = (type(exc).__name__, str(exc))
    torch.cuda.synchronize()
    y = torch.full((4,), float(rank + 1), device=dev)
    dist.all_reduce(y)
    return err, y.cpu().tolist()


def p2p_ring(numel: int):
    """Each rank sends a CUDA tensor to the next rank and receives one from the previous (batch_isend_irecv
    issued on a side stream, results read on the main stream after wait()); then a blocking send/recv pair
    between ranks 0 and 1.  Returns what was received, on the CPU."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = _dev()
    side = torch.cuda.Stream(dev)
    send = torch.full((numel,), float(rank + 1), device=dev)
    recv = torch.zeros(numel, device=dev)
    with torch.cuda.stream(side):
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, (rank + 1) % world),
                                       dist.P2POp(dist.irecv, recv, (rank - 1) % world)])
    for req in reqs:
        req.wait()
    ring = recv.clone()
    pair = torch.full((3,), -1.0, device=dev)
    if rank == 0:
        dist.send(torch.arange(3, dtype=torch.float32, device=dev), dst=1, tag=7)
    elif rank == 1:
        dist.recv(pair, src=0, tag=7)
    return ring.cpu(), pair.cpu()
