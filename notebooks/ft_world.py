"""Helpers for notebooks/fault_tolerant_pg.ipynb: the options and jobs of its small local world.

The notebook starts ranks with ``mooncake.testing.cluster.Cluster`` (real processes, one ``mooncake-cpu``
group, a TCPStore hosted by the notebook's own process) and sends them jobs.  Jobs must be importable
top-level functions, so they live here.  Every job stamps what it did with ``time.monotonic()`` (one clock for
all processes of a Linux host), so the notebook can draw a timeline of all ranks together.

Inputs are generated here from ``(seed, rank)``; the notebook recomputes every expected result itself with the
model (``mooncake.model``) and compares bit for bit.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

N = 16  # elements per all_reduce input


def options(rank: int, world_size: int, capacity: int, extension_ranks=(), failure_mode: str = "complete"):
    """``MooncakeBackendOptions`` of one rank: founders mark ``[0, world_size)`` active and the rest of the
    ``capacity`` slots reserved; a rank in ``extension_ranks`` starts with ``is_extension=True``."""
    import mooncake.pg as pg

    mask = torch.tensor([1 if r < world_size else 0 for r in range(capacity)], dtype=torch.int32)
    return pg.MooncakeBackendOptions(mask, is_extension=rank in tuple(extension_ranks),
                                     max_world_size=capacity, failure_mode=failure_mode)


def input_of(seed: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s float32 input of the ``seed``-th all_reduce."""
    return torch.randn(N, generator=torch.Generator().manual_seed(1000 * seed + rank))


def describe() -> dict:
    """What this rank sees of its group right now."""
    import mooncake.pg as pg

    group = dist.group.WORLD
    return dict(rank=dist.get_rank(), world_size=dist.get_world_size(), capacity=pg.get_capacity(group),
                mask=pg.get_active_ranks(group).clone(), epoch=group.view.epoch, view=list(group.view.active),
                implementation=pg.get_implementation(group)[0], t=time.monotonic())


def set_timeout(seconds: float) -> None:
    from datetime import timedelta

    import mooncake.pg as pg

    pg.set_timeout(dist.group.WORLD, timedelta(seconds=seconds))


def all_reduce(seed: int, victim: int = -1, point: str = "mid_transfer") -> dict:
    """One ``dist.all_reduce`` (SUM) of this rank's input.  Rank ``victim`` arms a fault first: it is killed
    (SIGKILL, like a crash) at ``point`` of this very collective."""
    from mooncake.control import faults

    if dist.get_rank() == victim:
        faults.arm(point, "kill")
    before = describe()
    x = input_of(seed, dist.get_rank())
    t0 = time.monotonic()
    dist.all_reduce(x)
    t1 = time.monotonic()
    return dict(result=x, t0=t0, t1=t1, before=before, after=describe())


def joiner(seed: int) -> dict:
    """On a rank started with ``is_extension=True``: a collective before joining (local-only), then
    ``join_group`` (blocks until the healthy ranks admit this rank)."""
    import mooncake.pg as pg

    start = describe()
    x = input_of(seed, dist.get_rank())
    mine = x.clone()
    dist.all_reduce(x)  # local-only: this rank's view is just itself
    local_only = bool(torch.equal(x, mine))
    t0 = time.monotonic()
    pg.join_group(dist.group.WORLD)
    t1 = time.monotonic()
    return dict(start=start, local_only=local_only, join_t0=t0, join_t1=t1, after=describe())


def admit(ranks: list[int], poll_s: float = 0.1, limit_s: float = 60.0) -> dict:
    """On every healthy rank: poll ``get_peer_state(group, ranks)`` (a collective among the active ranks, so
    every rank sees the same answer) until all of ``ranks`` asked to join, then ``recover_ranks``."""
    import mooncake.pg as pg

    group = dist.group.WORLD
    polls = []
    deadline = time.monotonic() + limit_s
    while True:
        states = pg.get_peer_state(group, list(ranks))
        polls.append((time.monotonic(), states))
        if all(states):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {ranks} did not ask to join within {limit_s} s")
        time.sleep(poll_s)
    before = describe()
    pg.recover_ranks(group, list(ranks))
    return dict(polls=polls, before=before, after=describe())


def call(name: str, *args):
    """Call ``mooncake.pg.<name>(WORLD, *args)``; returns ("ok", result) or (exception type, message)."""
    import mooncake.pg as pg

    try:
        return "ok", getattr(pg, name)(dist.group.WORLD, *args)
    except Exception as exc:  # noqa: BLE001 - the notebook shows it
        return type(exc).__name__, str(exc)


def store_names() -> tuple[str, str]:
    """``(group name, mooncake prefix)``: torch keeps each group's records under ``{group name}/cpu/`` of the
    Store it was given (PrefixStores), and mooncake keeps its own under ``mooncake/{n}/`` inside that."""
    group = dist.group.WORLD
    return group.group_name, group._prefix
