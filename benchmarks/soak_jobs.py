"""Jobs of benchmarks/soak.py (imported by the soak's cluster workers)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

NUM_ELEMENTS = 1024


def make_options(rank, world_size, extension_ranks=()):
    import mooncake.pg as pg
    return pg.MooncakeBackendOptions(torch.zeros(world_size, dtype=torch.int32),
                                     is_extension=rank in tuple(extension_ranks), max_world_size=world_size)


def input_of(seed: int, op: int, rank: int) -> torch.Tensor:
    return torch.randn(NUM_ELEMENTS, generator=torch.Generator().manual_seed(seed * 100_003 + op * 101 + rank))


def load(seed: int, num_ops: int, victim: int, point: str, kill_at: int):
    """all_reduce ``num_ops`` times; the victim kills itself at op ``kill_at`` (fault point
    ``point``). Returns per op (result, mask before, mask after, seconds)."""
    import mooncake.pg as pg
    from mooncake.control import faults
    group = dist.group.WORLD
    if dist.get_rank() == victim:
        faults.arm(point, "kill", skip=kill_at)
    out = []
    for op in range(num_ops):
        before = pg.get_active_ranks(group).clone()
        x = input_of(seed, op, dist.get_rank())
        start = time.monotonic()
        dist.all_reduce(x)
        out.append((x, before, pg.get_active_ranks(group).clone(), time.monotonic() - start))
    return out


def admit(rank: int, seed: int, limit_s: float = 60.0):
    import mooncake.pg as pg
    group = dist.group.WORLD
    deadline = time.monotonic() + limit_s
    while not pg.get_peer_state(group, [rank])[0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} did not ask to join within {limit_s} s")
        time.sleep(0.01)
    pg.recover_ranks(group, [rank])
    return check_op(seed)


def join(seed: int):
    import mooncake.pg as pg
    start = time.monotonic()
    pg.join_group(dist.group.WORLD)
    joined = time.monotonic() - start
    return check_op(seed) + (joined,)


def check_op(seed: int):
    import mooncake.pg as pg
    x = input_of(seed, 0, dist.get_rank())
    dist.all_reduce(x)
    return x, pg.get_active_ranks(dist.group.WORLD).clone()
