"""Failures during collectives: survivors return within bounded time, agree on the failed set,
return identical bits equal to the model over the survivors, and the group stays usable.

Every case kills (or stalls) a rank at a named point of an operation with mooncake's fault
injection (mooncake/control/faults.py) over a mooncake-cpu cluster whose Store lives in the test
process, so that any rank, rank 0 included, can die.
"""

from __future__ import annotations

import signal
import zlib

import pytest
import torch

from ft import jobs
from mooncake.testing.impls import impl_env
from mooncake.model import collectives as model
from mooncake.model.reduce import ReduceOp
from mooncake.testing.cluster import ClusterError
from mooncake.testing.compare import bitwise_equal

TIMEOUT_S = 20.0            # group timeout of the kill cases (detection does not wait for it)
STALL_TIMEOUT_S = 2.0       # group timeout of the stall cases
KILL_BOUND_S = 5.0          # a killed peer is seen through its closed connection: well under this
MATRIX = [(op, world, point) for op in jobs.OPS for world in (2, 3, 4)
          for point in ("before_send", "mid_transfer", "after_data")]


def _cluster(cluster_factory, impl, world, timeout_s=TIMEOUT_S, failure_mode="complete"):
    """A cluster whose group timeout is ``timeout_s`` (start-up keeps the long default)."""
    cluster = cluster_factory(world, "mooncake-cpu", timeout_s=TIMEOUT_S, env=impl_env(impl),
                              options=("ft.jobs.make_options", (), {"failure_mode": failure_mode}))
    cluster.run(jobs.set_group_timeout, timeout_s)
    return cluster


def expected(op: str, seed: int, world: int, active: list[int]) -> list:
    """The model's outputs for ``op`` over the active mask (None at inactive ranks)."""
    if op == "all_reduce":
        return model.all_reduce([jobs.input_of(seed, r)[0] for r in range(world)], ReduceOp.SUM, active)
    if op == "all_gather":
        return [None if o is None else torch.stack(o)
                for o in model.all_gather([jobs.input_of(seed, r)[0] for r in range(world)], active)]
    if op == "reduce_scatter":
        return model.reduce_scatter([list(jobs.input_of(seed, r, world).unbind(0)) for r in range(world)],
                                    ReduceOp.SUM, active)
    if op == "all_to_all":
        return [None if o is None else torch.stack(o) for o in
                model.all_to_all([list(jobs.input_of(seed, r, world).unbind(0)) for r in range(world)], active)]
    if op == "broadcast":
        return model.broadcast([jobs.input_of(seed, r)[0] for r in range(world)], 0, active)
    return [None if not a else torch.zeros(()) for a in active]


def run_fault(cluster, fn, *args, timeout_s=None):
    """Run a job expected to lose ranks; returns the survivors' results (None for the dead)."""
    try:
        return cluster.run(fn, *args, timeout_s=timeout_s)
    except ClusterError as exc:
        assert all(e.kind in ("died", "timeout") for e in exc.errors.values()), str(exc)
        return exc.results


def survivors_agree(results, survivors, op, seed, world, bound_s):
    mask = [1 if r in survivors else 0 for r in range(world)]
    want = expected(op, seed, world, mask)
    for r in survivors:
        got, got_mask, seconds = results[r]
        assert got_mask.tolist() == mask, f"rank {r} mask {got_mask.tolist()} != {mask}"
        assert seconds < bound_s, f"rank {r} took {seconds:.2f} s"
        assert bitwise_equal(got, want[r]), f"{op}: rank {r} differs from the model over {survivors}"


def fds(cluster, ranks):
    return cluster.run(jobs.open_fds, ranks=ranks)


@pytest.mark.parametrize("op,world,point", MATRIX, ids=[f"{o}-w{w}-{p}" for o, w, p in MATRIX])
def test_kill_at_point(cluster_factory, impl, op, world, point):
    cluster = _cluster(cluster_factory, impl, world)
    seed = zlib.crc32(f"{op}/{world}/{point}".encode()) % 10_000
    victim = seed % world if op != "broadcast" else 1 + seed % (world - 1)  # root: test_root_dies
    survivors = [r for r in range(world) if r != victim]
    before = fds(cluster, survivors)
    results = run_fault(cluster, jobs.op_under_fault, op, seed, world, victim, point)
    assert results[victim] is None
    survivors_agree(results, survivors, op, seed, world, KILL_BOUND_S)
    again = cluster.run(jobs.op_after, op, seed + 1, world, ranks=survivors)
    mask = [1 if r in survivors else 0 for r in range(world)]
    want = expected(op, seed + 1, world, mask)
    for r in survivors:
        assert bitwise_equal(again[r][0], want[r]) and again[r][1].tolist() == mask
    after = fds(cluster, survivors)
    for r in survivors:
        assert after[r] <= before[r] + 2, f"rank {r} holds {after[r]} fds, {before[r]} before the failure"
    assert not cluster.alive(victim)


def test_root_dies(cluster_factory, impl):
    """A broadcast whose root dies ends with PeerFailureError naming it on every survivor."""
    cluster = _cluster(cluster_factory, impl, 3)
    results = run_fault(cluster, jobs.catch_op, "broadcast", 5, 3, 0, "before_send")
    for r in (1, 2):
        kind, failed, message = results[r]
        assert kind == "PeerFailureError" and failed == (0,), message
    again = cluster.run(jobs.op_after, "all_reduce", 6, 3, ranks=[1, 2])
    assert bitwise_equal(again[1][0], again[2][0]) and again[1][1].tolist() == [0, 1, 1]


def test_two_ranks_die_at_once(cluster_factory, impl):
    cluster = _cluster(cluster_factory, impl, 4)
    calls = {r: (jobs.op_under_fault, ("all_reduce", 7, 4, r if r in (1, 2) else -1, "before_send"), {})
             for r in range(4)}
    try:
        results = cluster.run_each(calls)
    except ClusterError as exc:
        results = exc.results
    survivors_agree(results, [0, 3], "all_reduce", 7, 4, KILL_BOUND_S)


def test_rank_dies_during_agreement(cluster_factory, impl):
    """Rank 3 dies at an all_reduce; rank 1 dies while agreeing on that: 0 and 2 end together."""
    cluster = _cluster(cluster_factory, impl, 4)
    calls = {0: (jobs.op_under_fault, ("all_reduce", 8, 4, -1, "before_send"), {}),
             1: (jobs.op_under_fault, ("all_reduce", 8, 4, 1, "during_agreement"), {}),
             2: (jobs.op_under_fault, ("all_reduce", 8, 4, -1, "before_send"), {}),
             3: (jobs.op_under_fault, ("all_reduce", 8, 4, 3, "before_send"), {})}
    try:
        results = cluster.run_each(calls)
    except ClusterError as exc:
        results = exc.results
    survivors_agree(results, [0, 2], "all_reduce", 8, 4, 2 * TIMEOUT_S)


@pytest.mark.parametrize("point", ["before_send", "after_data"])
def test_stalled_rank_is_removed(cluster_factory, impl, point):
    """A rank that hangs (alive, silent) is removed after the deadline plus the agreement window;
    when it wakes up it learns that it was removed."""
    cluster = _cluster(cluster_factory, impl, 3, timeout_s=STALL_TIMEOUT_S)
    stall_s = 6 * STALL_TIMEOUT_S  # removal takes ~2x the timeout (deadline + agreement): margin for load
    try:
        try:
            results = cluster.run(jobs.op_under_fault, "all_reduce", 9, 3, 2, point, "stall", 0, stall_s,
                                  timeout_s=10 * STALL_TIMEOUT_S)
            raise AssertionError("the stalled rank returned; (mask, seconds) by rank: "
                                 f"{[(r[1].tolist(), round(r[2], 2)) for r in results]}")
        except ClusterError as exc:
            assert list(exc.errors) == [2] and "was removed from the group" in exc.errors[2].detail, str(exc)
            results = exc.results
        survivors_agree(results, [0, 1], "all_reduce", 9, 3, 4 * STALL_TIMEOUT_S + 2)
    finally:
        cluster.kill(2)  # out of the group (or the test failed): the next test gets a fresh cluster


def test_framework_managed_mode_raises(cluster_factory, impl):
    cluster = _cluster(cluster_factory, impl, 3, failure_mode="raise")
    results = run_fault(cluster, jobs.catch_op, "all_reduce", 10, 3, 1, "before_send")
    for r in (0, 2):
        kind, failed, message = results[r]
        assert kind == "PeerFailureError" and failed == (1,), message
    again = cluster.run(jobs.op_after, "all_reduce", 11, 3, ranks=[0, 2])
    want = expected("all_reduce", 11, 3, [1, 0, 1])
    assert all(bitwise_equal(again[r][0], want[r]) and again[r][1].tolist() == [1, 0, 1] for r in (0, 2))


@pytest.mark.parametrize("direction", ["send", "recv"])
def test_p2p_with_dead_peer(cluster_factory, impl, direction):
    cluster = _cluster(cluster_factory, impl, 2)
    cluster.kill(1, signal.SIGKILL)
    kind, failed, seconds = cluster.run(jobs.p2p_to_dead, direction, 1, ranks=[0])[0]
    assert kind == "PeerFailureError" and failed == (1,) and seconds < KILL_BOUND_S
