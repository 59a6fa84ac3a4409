"""The elastic protocol: reserved slots, joiners, replacements (docs/semantics.md, "Joining")."""

from __future__ import annotations

import pytest
from ft import jobs
from mooncake.testing.impls import impl_env
from ft.test_failures import TIMEOUT_S, expected, run_fault, survivors_agree
from mooncake.testing.cluster import ClusterError
from mooncake.testing.compare import bitwise_equal


def _cluster(cluster_factory, impl, world, capacity):
    return cluster_factory(world, "mooncake-cpu", timeout_s=TIMEOUT_S, env=impl_env(impl),
                           options=("ft.jobs.make_options", (), {"capacity": capacity}))


def _joiner_options(rank, capacity):
    return ("ft.jobs.make_options", (), {"capacity": capacity, "extension_ranks": (rank,)})


def check_joined(results, members, seed, capacity, world_after, joiners=()):
    mask = [1 if r in members else 0 for r in range(capacity)]
    want = expected("all_reduce", seed, capacity, mask)
    for r in members:
        got, got_mask, size = results[r][-3:]
        assert bitwise_equal(got, want[r]), f"rank {r} all_reduce differs from the model over {members}"
        assert got_mask.tolist() == mask and size == world_after, (r, got_mask.tolist(), size)


def test_scale_up_into_reserved_slot(cluster_factory, impl):
    """3 founders with capacity 4; rank 3 starts as an extension (local-only), joins, takes part."""
    cluster = _cluster(cluster_factory, impl, 3, 4)
    assert cluster.run(jobs.mask)[0].tolist() == [1, 1, 1, 0]
    cluster.spawn(3, world_size=4, options=_joiner_options(3, 4))
    calls = {r: (jobs.admit, ([3], 21, 4), {}) for r in range(3)}
    calls[3] = (jobs.joiner, (21, 4), {})
    results = cluster.run_each(calls)
    assert results[3][0] == 4  # a joiner reports its declared world size until it has joined
    check_joined(results, [0, 1, 2, 3], 21, 4, 4)


def test_replace_a_killed_rank_several_times(cluster_factory, impl):
    """Rank 1 dies three times; each time the survivors agree, a replacement joins, all continue."""
    cluster = _cluster(cluster_factory, impl, 3, 3)
    for cycle in range(3):
        seed = 30 + cycle
        results = run_fault(cluster, jobs.op_under_fault, "all_reduce", seed, 3, 1, "before_send")
        survivors_agree(results, [0, 2], "all_reduce", seed, 3, 5.0)
        cluster.spawn(1, options=_joiner_options(1, 3))
        calls = {r: (jobs.admit, ([1], seed + 100, 3), {}) for r in (0, 2)}
        calls[1] = (jobs.joiner, (seed + 100, 3), {})
        check_joined(cluster.run_each(calls), [0, 1, 2], seed + 100, 3, 3)


def test_kill_during_join(cluster_factory, impl):
    """A joiner that dies after asking to join is never admitted; a second one is."""
    cluster = _cluster(cluster_factory, impl, 2, 3)
    cluster.spawn(2, world_size=3, options=_joiner_options(2, 3), env={"MOONCAKE_FAULT": "during_join:kill"})
    with pytest.raises(ClusterError) as died:
        cluster.run(jobs.joiner, 40, 3, ranks=[2])
    assert died.value.errors[2].kind == "died"
    assert cluster.run(jobs.call_api, "get_peer_state", [2], ranks=[0, 1])[:2] == [("ok", [False])] * 2
    cluster.spawn(2, world_size=3, options=_joiner_options(2, 3))
    calls = {r: (jobs.admit, ([2], 41, 3), {}) for r in (0, 1)}
    calls[2] = (jobs.joiner, (41, 3), {})
    check_joined(cluster.run_each(calls), [0, 1, 2], 41, 3, 3)


def test_extend_group_size_to(cluster_factory, impl):
    cluster = _cluster(cluster_factory, impl, 2, 2)
    results = cluster.run(jobs.extend, 3)
    for mask, capacity, size in results:
        assert mask.tolist() == [1, 1, 0] and capacity == 3 and size == 2
    cluster.spawn(2, world_size=3, options=_joiner_options(2, 3))
    calls = {r: (jobs.admit, ([2], 50, 3), {}) for r in (0, 1)}
    calls[2] = (jobs.joiner, (50, 3), {})
    check_joined(cluster.run_each(calls), [0, 1, 2], 50, 3, 3)


@pytest.mark.parametrize("name,args,error,text", [
    ("extend_group_size_to", (1,), "ArgumentError", "newSize < oldSize"),
    ("extend_group_size_to", (300,), "ArgumentError", "Size out of range"),
    ("get_peer_state", ([5],), "ArgumentError", "out of range"),
    ("recover_ranks", ([0],), "ArgumentError", "already active"),
    ("recover_ranks", ([2],), "ArgumentError", "has not called join_group"),
    ("join_group", (), "ArgumentError", "joinGroup is only valid for extension backends"),
])
def test_bad_calls_raise_before_communicating(cluster_factory, impl, name, args, error, text):
    cluster = _cluster(cluster_factory, impl, 2, 3)
    results = cluster.run(jobs.call_api, name, *args)
    for kind, message in results:
        assert kind == error and text in message, message
    assert all(m.tolist() == [1, 1, 0] for m in cluster.run(jobs.mask))
    again = cluster.run(jobs.op_after, "all_reduce", 60, 3)
    assert bitwise_equal(again[0][0], again[1][0])


def test_peer_state_is_false_until_join(cluster_factory, impl):
    cluster = _cluster(cluster_factory, impl, 2, 3)
    assert cluster.run(jobs.call_api, "get_peer_state", [0, 1, 2]) == [("ok", [True, True, False])] * 2


def test_founder_restarted_without_extension_is_refused(cluster_factory, impl):
    """A rank that comes back as a founder after the membership changed gets a clear error."""
    cluster = _cluster(cluster_factory, impl, 3, 3)
    run_fault(cluster, jobs.op_under_fault, "all_reduce", 70, 3, 2, "before_send")
    cluster.spawn(2)
    with pytest.raises(Exception, match="already running"):
        cluster.run(jobs.mask, ranks=[2])


def test_subgroup_recovery(cluster_factory, impl):
    """Founders 0, 1 (capacity 3) and joiner 2 create a subgroup in the same order; after WORLD
    and the subgroup admit rank 2, both span {0, 1, 2}."""
    cluster = _cluster(cluster_factory, impl, 2, 3)
    cluster.run(jobs.subgroups, 2, 3, False)
    cluster.spawn(2, world_size=3, options=_joiner_options(2, 3))
    cluster.run(jobs.subgroups, 2, 3, True, ranks=[2])
    calls = {r: (jobs.sub_admit, (2, 80), {}) for r in (0, 1)}
    calls[2] = (jobs.sub_join, (80,), {})
    results = cluster.run_each(calls)
    want = expected("all_reduce", 80, 3, [1, 1, 1])
    for r in range(3):
        world, sub, sub_mask = results[r]
        assert bitwise_equal(world, want[r]) and bitwise_equal(sub, want[r]) and sub_mask.tolist() == [1, 1, 1]


@pytest.mark.parametrize("late", [0, 1])
def test_a_survivor_late_to_the_boundary_still_catches_the_replacement_up(cluster_factory, impl, late):
    """One survivor reaches the step boundary first and admits the replacement (its recover_ranks is applied
    on every member by the agreement, also on the other survivor, still busy before the boundary); the late
    survivor's admit_replacements must still take part in the catch-up, or the survivors run different
    collectives afterwards (seen under load in a launcher run)."""
    cluster = _cluster(cluster_factory, impl, 3, 3)
    results = run_fault(cluster, jobs.op_under_fault, "all_reduce", 40, 3, 2, "before_send")
    survivors_agree(results, [0, 1], "all_reduce", 40, 3, 5.0)
    cluster.spawn(2, options=_joiner_options(2, 3))
    calls = {r: (jobs.survivor_admits, (3.0 if r == late else 0.0, 7), {}) for r in (0, 1)}
    calls[2] = (jobs.replacement_catches_up, (), {})
    out = cluster.run_each(calls)
    assert out[0][0] == out[1][0] == [2], out
    assert out[2][0] == 7
    assert out[0][1] == out[1][1] == out[2][1]          # the replacement holds the survivors' parameters
    assert out[0][2] == out[1][2] == out[2][2] == [3.0, 3.0]
