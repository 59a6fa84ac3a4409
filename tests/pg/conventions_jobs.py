"""Jobs of tests/pg/test_torch_conventions.py (run inside mooncake.testing.cluster workers)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def wait_timeout(late_s: float):
    """Rank 1 calls the all_reduce ``late_s`` late; rank 0's short wait raises, its next wait returns."""
    t = torch.full((4,), float(dist.get_rank() + 1))
    if dist.get_rank() == 0:
        work = dist.all_reduce(t, async_op=True)
        try:
            work.wait(timedelta(seconds=0.05))
            raised = None
        except Exception as exc:  # noqa: BLE001 - the test checks the type
            raised = exc
        work.wait()
        return {"raised": type(raised).__name__ if raised else None,
                "is_timeout": isinstance(raised, TimeoutError),
                "is_backend_error": isinstance(raised, dist.DistBackendError),
                "message": str(raised), "result": t}
    time.sleep(late_s)
    dist.all_reduce(t)
    return {"result": t}


def get_backend():
    group = dist.group.WORLD
    backend = group._get_backend(torch.device("cpu"))
    try:
        group._get_backend(torch.device("cuda"))
        other = None
    except Exception as exc:  # noqa: BLE001
        other = type(exc).__name__
    return {"same": backend is group, "name": backend.name(), "cuda": other}


def _inputs(dtype: torch.dtype, n: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4242 + rank)
    return (torch.randn(n, generator=g) * 3).to(dtype)


def premul_sum(factor: float, dtypes: list[str]):
    r, k = dist.get_rank(), dist.get_world_size()
    op = dist._make_nccl_premul_sum(factor)
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        x = _inputs(dtype, 24 * k, r)
        y = x.clone()
        dist.all_reduce(y, op=op)
        out[f"all_reduce/{name}"] = y
        rs = torch.empty(24, dtype=dtype)
        dist.reduce_scatter_tensor(rs, x, op=op)
        out[f"reduce_scatter_tensor/{name}"] = rs
        out[f"input/{name}"] = x
    try:
        dist.all_reduce(torch.ones(4, dtype=torch.int32), op=op)
        out["int"] = None
    except Exception as exc:  # noqa: BLE001
        out["int"] = type(exc).__name__
    return out


def object_collectives():
    r, k = dist.get_rank(), dist.get_world_size()
    out = {}
    gathered = [None] * k
    dist.all_gather_object(gathered, {"rank": r, "s": "x" * r})
    out["all_gather_object"] = gathered
    objs = [r * 10, "hello"] if r == 1 else [None, None]
    dist.broadcast_object_list(objs, src=1)
    out["broadcast_object_list"] = objs
    into = [None] * k if r == 0 else None
    dist.gather_object((r, "g"), into, dst=0)
    out["gather_object"] = into
    got = [None]
    dist.scatter_object_list(got, [f"to {i}" for i in range(k)] if r == 0 else None, src=0)
    out["scatter_object_list"] = got[0]
    if r == 0:
        dist.send_object_list([{"from": 0}], dst=1)
    elif r == 1:
        box = [None]
        dist.recv_object_list(box, src=0)
        out["recv_object_list"] = box[0]
    return out


def monitored(through_group: bool, skip_rank: int | None):
    from mooncake.pg.monitored import monitored_barrier
    group = dist.group.WORLD
    call = (lambda **kw: group.monitored_barrier(**kw)) if through_group else \
        (lambda **kw: monitored_barrier(group, **kw))
    call(timeout=timedelta(seconds=30))
    if skip_rank is None:
        return "ok"
    if dist.get_rank() == skip_rank:
        time.sleep(1.0)  # late: the root gave up on it, so nobody releases it either
        try:
            call(timeout=timedelta(seconds=0.3))
            result = "passed"
        except Exception as exc:  # noqa: BLE001
            result = f"{type(exc).__name__}: {exc}"
        dist.barrier()
        return result
    try:
        call(timeout=timedelta(seconds=0.3), wait_all_ranks=True)
        result = "passed"
    except Exception as exc:  # noqa: BLE001
        result = f"{type(exc).__name__}: {exc}"
    dist.barrier()
    return result


def checkpoint(path: str):
    import torch.distributed.checkpoint as dcp
    r = dist.get_rank()
    state = {"shared": torch.arange(6, dtype=torch.float32), f"own{r}": torch.full((3,), float(r)), "step": 7}
    dcp.save(state, checkpoint_id=path)
    back = {"shared": torch.zeros(6), f"own{r}": torch.zeros(3), "step": 0}
    dcp.load(back, checkpoint_id=path)
    return back


def futures(count: int):
    """Async all_reduces waited only through their futures and chained callbacks (as DDP does)."""
    r = dist.get_rank()
    threads = []
    futs = []
    for i in range(count):
        t = torch.full((1000,), float(r + i))
        fut = dist.all_reduce(t, async_op=True).get_future()
        futs.append(fut.then(lambda f: (threads.append(threading.current_thread().name), f.value()[0] * 2)[1]))
    values = [f.wait() for f in futs]
    return {"values": values, "threads": sorted(set(threads))}


def left_blocking_call(late_s: float):
    """A blocking all_reduce (``asyncOp=False``, as torch issues for ``async_op=False``) whose waiter gives up
    early (``wait(timeout)`` raises) while rank 1 is ``late_s`` late: nobody waits on it again, yet it ends
    (the engine's thread takes it over).  Rank 0 returns what it saw without advancing the Work itself
    (``is_success`` / ``exception`` only read)."""
    from torch._C import _distributed_c10d as c10d
    t = torch.full((4,), float(dist.get_rank() + 1))
    if dist.get_rank() == 1:
        time.sleep(late_s)
        dist.all_reduce(t)
        return {"result": t}
    opts = c10d.AllreduceOptions()
    opts.asyncOp = False
    work = dist.group.WORLD.allreduce([t], opts)
    try:
        work.wait(timedelta(seconds=0.05))
        raised = None
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        raised = type(exc).__name__
    deadline = time.monotonic() + late_s + 10.0
    while not work.is_success() and work.exception() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"raised": raised, "success": work.is_success(), "result": t}


def unwaited_p2p(timeout_s: float):
    """P2P operations whose handles are kept but never waited on, whose peer never takes part: an irecv
    from rank 1 on rank 0 and a 4 MiB isend to rank 0 on rank 1, in a group with a ``timeout_s`` timeout.
    Each must fail at its deadline with nobody driving it (``exception`` only reads the Work)."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    dist.barrier(group=group)
    if rank == 0:
        work = dist.irecv(torch.empty(4), 1, group=group, tag=7)
    else:
        work = dist.isend(torch.ones(1 << 20), 0, group=group, tag=9)
    t0 = time.monotonic()
    while work.exception() is None and time.monotonic() - t0 < timeout_s + 10.0:
        time.sleep(0.01)
    exc = work.exception()
    out = {"error": type(exc).__name__ if exc is not None else None, "after_s": time.monotonic() - t0}
    dist.barrier(group=group)
    return out


def engine_kicks(num_calls: int) -> int:
    """How often ``num_calls`` blocking all_reduces kick the engine's background thread (``Engine._kick_locked``
    counted): a caller that waits and returns should leave the thread asleep."""
    from mooncake.ref import ucx
    engine = ucx.engine()
    kicks = [0]
    kick = engine._kick_locked

    def counted():
        kicks[0] += 1
        kick()
    t = torch.ones(4)
    for _ in range(20):
        dist.all_reduce(t)
    dist.barrier()
    engine._kick_locked = counted
    try:
        for _ in range(num_calls):
            dist.all_reduce(t)
    finally:
        engine._kick_locked = kick
    dist.barrier()
    return kicks[0]
