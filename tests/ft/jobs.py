"""Job functions for the fault-tolerance tests (run inside mooncake.testing.cluster workers).

Inputs are generated here from (seed, rank); expected values are computed in the test process
with ``mooncake.model`` only.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

SHAPE = (4, 6)
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier")


def make_options(rank, world_size, capacity=None, failure_mode="complete", extension_ranks=()):
    import mooncake.pg as pg
    capacity = capacity or world_size
    return pg.MooncakeBackendOptions(torch.zeros(capacity, dtype=torch.int32),
                                     is_extension=rank in tuple(extension_ranks),
                                     max_world_size=capacity, failure_mode=failure_mode)


def input_of(seed: int, rank: int, k: int = 1) -> torch.Tensor:
    """Rank ``rank``'s float32 input: ``k`` stacked slots of SHAPE."""
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    return torch.randn((k, *SHAPE), generator=gen)


def run_op(op: str, seed: int, capacity: int) -> torch.Tensor:
    """Call ``op`` once with this rank's inputs; returns what this rank got."""
    rank = dist.get_rank()
    if op == "all_reduce":
        x = input_of(seed, rank)[0].clone()
        dist.all_reduce(x)
        return x
    if op == "all_gather":
        outs = [torch.empty(SHAPE) for _ in range(capacity)]
        dist.all_gather(outs, input_of(seed, rank)[0])
        return torch.stack(outs)
    if op == "reduce_scatter":
        out = torch.empty(SHAPE)
        dist.reduce_scatter(out, list(input_of(seed, rank, capacity).unbind(0)))
        return out
    if op == "all_to_all":
        outs = [torch.empty(SHAPE) for _ in range(capacity)]
        dist.all_to_all(outs, list(input_of(seed, rank, capacity).unbind(0)))
        return torch.stack(outs)
    if op == "broadcast":
        x = input_of(seed, rank)[0].clone()
        dist.broadcast(x, src=0)
        return x
    if op == "barrier":
        dist.barrier()
        return torch.zeros(())
    raise ValueError(op)


def op_under_fault(op: str, seed: int, capacity: int, victim: int, point: str, action: str = "kill",
                   skip: int = 0, stall_s: float = 3600.0):
    """The victim arms a fault, every rank calls ``op``; survivors return (result, mask, seconds)."""
    import mooncake.pg as pg
    from mooncake.control import faults
    if dist.get_rank() == victim:
        faults.arm(point, action, skip, stall_s)
    start = time.monotonic()
    try:
        result = run_op(op, seed, capacity)
    finally:
        faults.disarm()
    return result, pg.get_active_ranks(dist.group.WORLD).clone(), time.monotonic() - start


def op_after(op: str, seed: int, capacity: int):
    """The group is usable afterwards: call ``op`` again; returns (result, mask)."""
    import mooncake.pg as pg
    return run_op(op, seed, capacity), pg.get_active_ranks(dist.group.WORLD).clone()


def catch_op(op: str, seed: int, capacity: int, victim: int, point: str):
    """Like op_under_fault, but returns the exception (type name, failed_ranks) a survivor saw."""
    try:
        return ("ok", op_under_fault(op, seed, capacity, victim, point))
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return (type(exc).__name__, tuple(getattr(exc, "failed_ranks", ())), str(exc))


def open_fds() -> int:
    import os
    return len(os.listdir("/proc/self/fd"))


def mask():
    import mooncake.pg as pg
    return pg.get_active_ranks(dist.group.WORLD).clone()


def catch_timeout(seed: int):
    """Call all_reduce while some rank never does; returns (exception type, message)."""
    x = input_of(seed, dist.get_rank())[0].clone()
    try:
        dist.all_reduce(x)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return "ok", ""


def p2p_to_dead(direction: str, peer: int):
    """send to / recv from a dead peer; returns (exception type, failed_ranks, seconds)."""
    start = time.monotonic()
    x = torch.zeros(8)
    try:
        if direction == "send":
            dist.send(x, peer)
        else:
            dist.recv(x, peer)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, tuple(getattr(exc, "failed_ranks", ())), time.monotonic() - start
    return "ok", (), time.monotonic() - start


def set_group_timeout(seconds: float) -> None:
    from datetime import timedelta

    import mooncake.pg as pg
    pg.set_timeout(dist.group.WORLD, timedelta(seconds=seconds))


def admit(ranks, seed: int, capacity: int, poll_s: float = 0.05, limit_s: float = 30.0):
    """Healthy side: poll get_peer_state until ``ranks`` can join, admit them, then all_reduce."""
    import mooncake.pg as pg
    group = dist.group.WORLD
    deadline = time.monotonic() + limit_s
    while not all(pg.get_peer_state(group, list(ranks))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {ranks} did not ask to join within {limit_s} s")
        time.sleep(poll_s)
    pg.recover_ranks(group, list(ranks))
    return after_join(seed, capacity)


def joiner(seed: int, capacity: int):
    """Joining side: a local-only all_reduce first, then join_group, then the group all_reduce."""
    import mooncake.pg as pg
    group = dist.group.WORLD
    local = input_of(seed, dist.get_rank())[0].clone()
    mine = local.clone()
    dist.all_reduce(local)
    assert torch.equal(local, mine), "a joining rank's collectives must be local-only"
    declared = dist.get_world_size()
    pg.join_group(group)
    return (declared,) + after_join(seed, capacity)


def after_join(seed: int, capacity: int):
    """(all_reduce result, mask, world size) right after a join."""
    import mooncake.pg as pg
    x = input_of(seed, dist.get_rank())[0].clone()
    dist.all_reduce(x)
    return x, pg.get_active_ranks(dist.group.WORLD).clone(), dist.get_world_size()


def extend(size: int):
    import mooncake.pg as pg
    pg.extend_group_size_to(dist.group.WORLD, size)
    return pg.get_active_ranks(dist.group.WORLD).clone(), pg.get_capacity(dist.group.WORLD), dist.get_world_size()


def call_api(name: str, *args):
    """Call a mooncake.pg function on WORLD; returns ("ok", result) or (exception type, message)."""
    import mooncake.pg as pg
    try:
        return "ok", getattr(pg, name)(dist.group.WORLD, *args)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)


def subgroups(founders: int, capacity: int, joining: bool):
    """Create WORLD's subgroups in one order on every process: ``pair`` = ranks {0, 1} (then
    {0, 1, 2} once rank 2 joins).  Founders list the current members, joiners the eventual ones
    (PyTorch's new_group rule); returns nothing, the groups live in ``_GROUPS``."""
    import mooncake.pg as pg
    members = list(range(capacity)) if joining else list(range(founders))
    opts = pg.MooncakeBackendOptions(torch.zeros(capacity, dtype=torch.int32), is_extension=joining,
                                     max_world_size=capacity)
    _GROUPS["sub"] = dist.new_group(members, pg_options=opts)


_GROUPS: dict = {}


def sub_admit(rank: int, seed: int):
    """Healthy side of a subgroup recovery: WORLD first, then the subgroup (creation order)."""
    import mooncake.pg as pg
    world = dist.group.WORLD
    while not pg.get_peer_state(world, [rank])[0]:
        time.sleep(0.02)
    pg.recover_ranks(world, [rank])
    sub = _GROUPS["sub"]
    while not pg.get_peer_state(sub, [rank])[0]:
        time.sleep(0.02)
    pg.recover_ranks(sub, [rank])
    return sub_ops(seed)


def sub_join(seed: int):
    import mooncake.pg as pg
    pg.join_group(dist.group.WORLD)
    pg.join_group(_GROUPS["sub"])
    return sub_ops(seed)


def sub_ops(seed: int):
    """all_reduce on WORLD and on the subgroup; (world result, sub result, sub mask)."""
    import mooncake.pg as pg
    x = input_of(seed, dist.get_rank())[0].clone()
    y = x.clone()
    dist.all_reduce(x)
    dist.all_reduce(y, group=_GROUPS["sub"])
    return x, y, pg.get_active_ranks(_GROUPS["sub"]).clone()


def idle_cpu(seconds: float):
    """CPU seconds this process burns while idle for ``seconds`` after a collective; and the
    names of its Python threads."""
    import threading
    x = torch.ones(4)
    dist.all_reduce(x)
    start = time.process_time()
    time.sleep(seconds)
    return time.process_time() - start, sorted(t.name for t in threading.enumerate())


def _tiny_model(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _digest(model) -> list:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def survivor_admits(delay_s: float, step: int):
    """A survivor at a step boundary ``delay_s`` after its peer: ``elastic.admit_replacements`` (wait), then
    one all_reduce; returns (admitted ranks, parameters, the all_reduce's result)."""
    from datetime import timedelta

    from mooncake.pg import elastic
    group = dist.group.WORLD
    model, optimizer = _tiny_model(0)
    time.sleep(delay_s)
    admitted = elastic.admit_replacements(group, model, optimizer, step, wait=True, timeout=timedelta(seconds=30))
    x = torch.ones(2)
    dist.all_reduce(x)
    return admitted, _digest(model), x.tolist()


def replacement_catches_up():
    """A replacement: ``elastic.join_and_catch_up`` (its model starts off wrong), then one all_reduce;
    returns (step, parameters, the all_reduce's result)."""
    from mooncake.pg import elastic
    model, optimizer = _tiny_model(1234)
    step = elastic.join_and_catch_up(dist.group.WORLD, model, optimizer)
    x = torch.ones(2)
    dist.all_reduce(x)
    return step, _digest(model), x.tolist()
