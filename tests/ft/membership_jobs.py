"""Job functions for tests/ft/test_membership_api.py: upstream's membership API on our agreement
(manual mode, per-op evidence, sync_after_failure, proposals, graceful leave, in-place rejoin).
Each job returns plain data; the tests compare it across ranks and with mooncake.model."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ft import jobs


def make_options(rank, world_size, manual=False):
    """Upstream's int spelling: (max_group_size, is_extension, auto_deactivate, auto_sync)."""
    import mooncake.pg as pg
    return pg.MooncakeBackendOptions(world_size, False, not manual, not manual)


def _pg():
    import mooncake.pg as pg
    return pg, dist.group.WORLD


def response(r):
    return (r.status.name, r.new_epoch, sorted(r.dropped_ranks), r.reject_reason)


def all_reduce(seed: int):
    """One async all_reduce: (outcome, result or message, failed_ranks, local_success, hint, mask, epoch)."""
    pg, group = _pg()
    x = jobs.input_of(seed, dist.get_rank())[0].clone()
    work = dist.all_reduce(x, async_op=True)
    try:
        work.wait()
        outcome, value = "ok", x
    except Exception as exc:  # noqa: BLE001 - compared across ranks
        outcome, value = type(exc).__name__, str(exc)
    return (outcome, value, tuple(work.failed_ranks), pg.get_local_success(work),
            pg.get_failed_ranks_hint(work).tolist(), pg.get_active_ranks(group).tolist(),
            pg.get_current_epoch(group))


def manual_after_kill(seed: int, dead: int):
    """Manual mode, a peer died: the op fails, the next one too (at once), sync settles it, the view
    keeps the dead rank until deactivate_ranks; then the group runs without it."""
    pg, group = _pg()
    first = all_reduce(seed)
    start = time.monotonic()
    second = all_reduce(seed + 1)
    second_s = time.monotonic() - start
    sync = pg.sync_after_failure(group)
    state = pg.get_peer_state(group, [dead])
    mask_before = pg.get_active_ranks(group).tolist()
    _barrier(f"manual/{seed}", 2)   # one deactivate_ranks would move the other rank on at once
    deactivated = response(pg.deactivate_ranks(group, [dead]))
    after = all_reduce(seed + 2)
    return first, second, second_s, sync.status.name, state, mask_before, deactivated, after


def graceful_leave(seed: int, leaver: int):
    """``leaver`` deactivates itself and destroys its group; the others run an all_reduce."""
    pg, group = _pg()
    if dist.get_rank() == leaver:
        out = response(pg.deactivate_ranks(group, [leaver]))
        try:
            dist.all_reduce(torch.ones(1))
            after = "ok"
        except Exception as exc:  # noqa: BLE001
            after = type(exc).__name__
        dist.destroy_process_group()
        return out, after
    return all_reduce(seed)


def _wait_epoch(above: int, limit_s: float = 30.0) -> int:
    pg, group = _pg()
    deadline = time.monotonic() + limit_s
    while pg.get_current_epoch(group) <= above:
        if time.monotonic() > deadline:
            raise TimeoutError(f"epoch stayed at {pg.get_current_epoch(group)}")
        time.sleep(0.01)
    return pg.get_current_epoch(group)


def in_place(seed: int, victim: int, stall_s: float, manual: bool):
    """``victim`` stalls in an all_reduce past the agreement; the others carry on (auto: without it;
    manual: the op fails and it stays suspended).  It wakes up in the same process and group and is
    taken back: auto through join_group + activate_ranks, manual through activate_ranks alone."""
    from mooncake.control import faults
    from mooncake.testing.cluster import worker_context
    pg, group = _pg()
    store = worker_context().store
    me = dist.get_rank()
    if me == victim:
        faults.arm("before_send", "stall", 0, stall_s)
    try:
        first = all_reduce(seed)
    finally:
        faults.disarm()
    epoch = pg.get_current_epoch(group)
    activated = None
    if me == victim:
        store.set(f"inplace/{seed}/awake", "1")
        if not manual:
            pg.join_group(group)
        else:
            _wait_epoch(epoch)
    elif me == 0:
        store.wait([f"inplace/{seed}/awake"])
        if not manual:
            while not pg.get_peer_state(group, [victim])[0]:
                time.sleep(0.02)
        activated = response(pg.activate_ranks(group, [victim]))
    else:
        if not manual:  # get_peer_state is a collective among the active ranks
            store.wait([f"inplace/{seed}/awake"])
            while not pg.get_peer_state(group, [victim])[0]:
                time.sleep(0.02)
        _wait_epoch(epoch)
    return first, activated, all_reduce(seed + 1)


def race(seed: int, proposals: dict):
    """Ranks in ``proposals`` propose at once (rank -> ranks to deactivate); the rest wait."""
    from mooncake.testing.cluster import worker_context
    pg, group = _pg()
    store = worker_context().store
    me = dist.get_rank()
    store.add(f"race/{seed}/ready", 1)
    while store.add(f"race/{seed}/ready", 0) < dist.get_world_size():
        time.sleep(0.002)
    out = None
    if me in proposals:
        try:
            out = response(pg.deactivate_ranks(group, proposals[me]))
        except Exception as exc:  # noqa: BLE001 - removed by the other proposal before proposing
            out = (type(exc).__name__, -1, [], str(exc))
        store.add(f"race/{seed}/done", 1)
    while store.add(f"race/{seed}/done", 0) < len(proposals):
        time.sleep(0.01)
    time.sleep(0.2)   # an idle member adopts the decision from its progress thread
    membership = group.membership
    return out, list(membership.view.active), membership.view.epoch, membership.evicted is not None


def deactivate_dead(dead: int):
    """Every survivor names a rank that died (no op ran since): AppliedWithDroppedRanks."""
    pg, group = _pg()
    out = response(pg.deactivate_ranks(group, [dead]))
    return out, pg.get_active_ranks(group).tolist()


def call_sync():
    pg, group = _pg()
    return pg.sync_after_failure(group).status.name, pg.get_current_epoch(group)


def _barrier(key: str, count: int) -> None:
    from mooncake.testing.cluster import worker_context
    store = worker_context().store
    store.add(key, 1)
    while store.add(key, 0) < count:
        time.sleep(0.005)
