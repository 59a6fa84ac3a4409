"""One verdict per op on every rank, for the everyday one-sided events (docs/semantics.md, "One
verdict per operation"): a rank that arrives late, one rank's local rejection, ranks that disagree
on a call, a P2P tag mismatch, a rank blocked in a call that holds the GIL, a subgroup created while
a peer is inside a collective, two threads on one group, a malformed agreement record.

Every case checks that every rank ended the op with the same verdict (the same result, or the same
exception class and cause), that no message calls itself a bug, and that the next two all_reduces
are correct (the model's bits) and identical on every rank — op k+1 pairs with op k+1.
"""

from __future__ import annotations

import pytest
import torch

from ft import jobs
from mooncake.testing.impls import impl_env
from ft import verdict_jobs as vj
from mooncake.pg.membership import agreement_window_s
from mooncake.model import collectives as model
from mooncake.model.reduce import ReduceOp
from mooncake.testing.cluster import ClusterError
from mooncake.testing.compare import bitwise_equal

T = 1.5                                 # group timeout of these cases
WINDOW = agreement_window_s(T)          # how long an agreement waits for a silent member
START_S = 20.0                          # start-up timeout of the cluster (the tests' clusters share it)
RUN_S = 60.0
DELAYS = {"below": 0.3 * T, "between": T + 0.5 * WINDOW, "long": T + WINDOW + 1.5}


def _cluster(cluster_factory, impl, world, failure_mode="complete"):
    cluster = cluster_factory(world, "mooncake-cpu", timeout_s=START_S, env=impl_env(impl),
                              options=("ft.jobs.make_options", (), {"failure_mode": failure_mode}))
    cluster.run(jobs.set_group_timeout, T)
    return cluster


def _no_bug(results):
    for r, res in enumerate(results):
        if res is not None and res[0] != "ok":
            assert "a bug" not in res[2], f"rank {r}: {res[2]}"


def one_error(results, cls: str, ranks=None):
    """Every rank raised ``cls`` with the same message; returns it."""
    ranks = range(len(results)) if ranks is None else ranks
    _no_bug(results)
    kinds = {r: results[r][0] for r in ranks}
    assert set(kinds.values()) == {cls}, {r: results[r][:3] for r in ranks}
    messages = {results[r][2] for r in ranks}
    assert len(messages) == 1, messages
    return messages.pop()


def next_ops_agree(cluster, world, seed, ranks=None, mask=None):
    """The next two all_reduces: the model's bits on every rank, and the same mask."""
    ranks = list(range(world)) if ranks is None else ranks
    mask = mask or [1] * world
    got = cluster.run(vj.after, seed, ranks=ranks, timeout_s=RUN_S)
    for i in range(2):
        want = model.all_reduce([jobs.input_of(seed + i, r)[0] for r in range(world)], ReduceOp.SUM, mask)
        for r in ranks:
            assert bitwise_equal(got[r][0][i], want[r]), f"op {i} after the event: rank {r} differs"
    assert all(got[r][1] == mask for r in ranks), [got[r][1] for r in ranks]


# ------------------------------------------------------------------------------------- late rank

LATE = [(op, "between") for op in jobs.OPS] + [(op, d) for op in ("all_reduce", "broadcast") for d in ("below", "long")]


@pytest.mark.parametrize("op,delay", LATE, ids=[f"{o}-{d}" for o, d in LATE])
def test_late_rank(cluster_factory, impl, op, delay):
    """Rank 2 is alive but calls the op ``delay`` late.  Below the timeout: a normal op.  Past it:
    every rank, the late one included, raises the same OpTimeoutError naming rank 2."""
    world, seed = 3, 100 + jobs.OPS.index(op)
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(vj.late, op, seed, 2, DELAYS[delay], timeout_s=RUN_S)
    if delay == "below":
        assert all(res[0] == "ok" for res in results), [res[:3] for res in results]
    else:
        message = one_error(results, "OpTimeoutError")
        assert "rank(s) [2] had not called it" in message, message
        assert all(res[1] == (2,) for res in results), [res[1] for res in results]
    next_ops_agree(cluster, world, seed + 10)


# ------------------------------------------------------------------------------ local rejection

REJECT_OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all")


@pytest.mark.parametrize("op", REJECT_OPS)
def test_one_rank_rejects_a_call(cluster_factory, impl, op):
    """Rank 1 rejects its call before any data moves; the others fail the same op with the same
    class, naming rank 1 and its reason; sequence numbers stay paired."""
    world, seed = 3, 200 + REJECT_OPS.index(op)
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(vj.reject, op, seed, 1, timeout_s=RUN_S)
    _no_bug(results)
    assert all(res[0] == "ArgumentError" for res in results), [res[:3] for res in results]
    reason = results[1][2]
    for r in (0, 2):
        assert "rank 1 rejected this call" in results[r][2] and reason in results[r][2], results[r][2]
    next_ops_agree(cluster, world, seed + 10)


def test_a_coalesced_call_rejected_part_way(cluster_factory, impl):
    """The third tensor of a coalesced all_reduce is bad on rank 1: the first two complete on every
    rank, the third fails on every rank, and the next ops pair."""
    world, seed = 2, 230
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(vj.reject_coalesced, seed, 1, timeout_s=RUN_S)
    _no_bug(results)
    assert all(res[0] == "ArgumentError" for res in results), [res[:3] for res in results]
    next_ops_agree(cluster, world, seed + 10)


# ------------------------------------------------------------------------------------ mismatches

MISMATCHES = {
    "size": ["4 elements", "5 elements"],
    "size_pipelined": ["262144 elements", "300000 elements"],
    "dtype_same_bytes": ["all_reduce(int32", "all_reduce(float32"],
    "reduce_op": ["SUM", "MAX"],
    "barrier_vs_all_reduce": ["called barrier", "called all_reduce"],
    "root_broadcast": ["root 0", "root 1", "root 2"],
    "root_reduce": ["root 0", "root 1", "root 2"],
    "root_gather": ["root 0", "root 1", "root 2"],
    "root_scatter": ["root 0", "root 1", "root 2"],
    "a2a_splits": ["rank 0 sends 2 elements to rank 1, which expects 1",
                   "rank 0 sends 0 elements to rank 2, which expects 1"],
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_ranks_disagree_on_a_call(cluster_factory, impl, kind):
    """Every rank raises the same MismatchError naming each side: never a timeout, never data."""
    world = 3
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(vj.mismatch, kind, timeout_s=RUN_S)
    message = one_error(results, "MismatchError")
    assert all("WireError" in res[3] for res in results)
    for fragment in MISMATCHES[kind]:
        assert fragment in message, message
    next_ops_agree(cluster, world, 300 + list(MISMATCHES).index(kind))


# ------------------------------------------------------------------------- P2P, GIL, threads, Store

def test_p2p_tag_mismatch_then_collectives(cluster_factory, impl):
    """A send and a receive whose tags differ never match; the collectives after them still pair."""
    cluster = _cluster(cluster_factory, impl, 2)
    cluster.run(vj.p2p_tag_mismatch, 0.5, timeout_s=RUN_S)
    next_ops_agree(cluster, 2, 400)


def test_rank_blocked_in_a_store_call_is_only_late(cluster_factory, impl):
    """Rank 2 sits in a store.wait on the job's Store client past the timeout and the agreement
    window: the agreement talks to the Store on a connection of its own, so rank 2 answers it and is
    merely late — every rank raises the same OpTimeoutError naming it, nobody is removed."""
    world, seed = 3, 405
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(vj.store_block, seed, 2, T + WINDOW + 2.5, timeout_s=RUN_S)
    message = one_error(results, "OpTimeoutError")
    assert "rank(s) [2] had not called it" in message, message
    next_ops_agree(cluster, world, seed + 10)


def test_rank_blocked_holding_the_gil_is_removed(cluster_factory, impl):
    """Rank 2 sits in a C call that holds the GIL past the timeout and the agreement window while
    the others run an all_reduce (framework-managed mode): it cannot answer, so the others remove
    it and raise PeerFailureError naming it; it learns so before sending anything and raises
    RemovedError, a PeerFailureError naming itself, on this and every later call."""
    world, seed = 3, 410
    cluster = _cluster(cluster_factory, impl, world, failure_mode="raise")
    try:
        results = cluster.run(vj.gil_block, seed, 2, T + WINDOW + 2.5, timeout_s=RUN_S)
        _no_bug(results)
        assert results[2][0] == "RemovedError" and results[2][1] == (2,), results[2][:3]
        assert "PeerFailureError" in results[2][3]
        for r in (0, 1):
            assert results[r][0] == "PeerFailureError" and results[r][1] == (2,), results[r][:3]
        next_ops_agree(cluster, world, seed + 10, ranks=[0, 1], mask=[1, 1, 0])
        again = cluster.run(vj.outcome_of_all_reduce, seed, ranks=[2], timeout_s=RUN_S)[2]
        assert again[0] == "RemovedError", again[:3]
    finally:
        cluster.kill(2)


def test_subgroup_created_while_a_peer_is_in_a_collective(cluster_factory, impl):
    world, seed = 2, 420
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(vj.subgroup_during_collective, seed, timeout_s=RUN_S)
    firsts = [res[0] for res in results]
    _no_bug(firsts)
    assert {f[0] for f in firsts} in ({"ok"}, {"OpTimeoutError"}), [f[:3] for f in firsts]
    if firsts[0][0] != "ok":
        one_error(firsts, "OpTimeoutError")
    assert all(res[1] == [3.0, 3.0] for res in results), results
    next_ops_agree(cluster, world, seed + 10)


def test_two_threads_on_one_group(cluster_factory, impl):
    """Two threads race to issue different collectives: each op's verdict is the same on every rank
    (both succeed, or both fail with the same MismatchError); never mixed data."""
    world, rounds = 2, 4
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(vj.two_threads, 430, rounds, timeout_s=RUN_S)
    for i in range(rounds):
        sides = [sorted([(results[r][i][0], results[r][i][2]), (results[r][i][1], results[r][i][3])])
                 for r in range(world)]
        assert sides[0] == sides[1], sides
        assert {k for k, _ in sides[0]} <= {"ok", "MismatchError"}, sides
    next_ops_agree(cluster, world, 440)


def test_malformed_agreement_decision(cluster_factory, impl):
    """Garbage where the next decision goes: every rank gets a clear MooncakeError naming the key,
    never a KeyError or a crash, on this and every later call."""
    cluster = _cluster(cluster_factory, impl, 2)
    try:
        results = cluster.run(vj.garbage_decision, 450, 0, b"\x00" * 8, timeout_s=RUN_S)
        for r, (first, second) in enumerate(results):
            for res in (first, second) if r == 0 else (second,):
                assert res[0] == "MooncakeError" and "/decision" in res[2] and "too short" in res[2], res[:3]
    finally:
        cluster.restart()


def test_a_missing_caller_catches_up(cluster_factory, impl):
    """Rank 2 never called the op the others timed out on; when it calls it later it takes the same
    verdict without sending anything, and the next ops pair."""
    world = 3
    cluster = _cluster(cluster_factory, impl, world)
    results = cluster.run(jobs.catch_timeout, 12, ranks=[0, 1], timeout_s=RUN_S)
    later = cluster.run(jobs.catch_timeout, 12, ranks=[2], timeout_s=RUN_S)
    kinds = {results[0][0], results[1][0], later[2][0]}
    messages = {results[0][1], results[1][1], later[2][1]}
    assert kinds == {"OpTimeoutError"} and len(messages) == 1, (results, later)
    next_ops_agree(cluster, world, 460)


def test_async_ops_waited_in_different_orders(cluster_factory, impl):
    """Ranks wait on their in-flight ops in different orders: whoever waits drives every pending
    op of the rank, so no rank waits for a peer that waits for it."""
    world, seed, count = 2, 470, 4
    cluster = _cluster(cluster_factory, impl, world)
    got = cluster.run(vj.waits_out_of_order, seed, count, timeout_s=RUN_S)
    for i in range(count):
        want = model.all_reduce([jobs.input_of(seed + i, r)[0] for r in range(world)], ReduceOp.SUM, [1] * world)
        assert all(bitwise_equal(got[r][i], want[r]) for r in range(world)), i
    next_ops_agree(cluster, world, seed + 10)


def test_a_rank_waiting_in_an_op_answers_the_agreement(cluster_factory, impl):
    """Rank 0 calls at once, rank 1 just before rank 0's deadline, rank 2 far too late.  Rank 0's
    agreement reaches rank 1 while rank 1 waits inside the op (its deadline is still far): rank 1
    answers from there, so it is not counted silent, and all three raise the same OpTimeoutError
    naming rank 2."""
    timeout_s = 6.0
    cluster = _cluster(cluster_factory, impl, 3)
    delays = {0: 0.0, 1: timeout_s - 1.0, 2: timeout_s + agreement_window_s(timeout_s) + 3.0}
    results = cluster.run(vj.staggered, 480, delays, timeout_s, timeout_s=RUN_S)
    message = one_error(results, "OpTimeoutError")
    assert "rank(s) [2] had not called it" in message, message
    next_ops_agree(cluster, 3, 490)


# ----------------------------------------------------------------------------- CUDA graph replays
# The fast CUDA plane's captured ops report a replay that gave up through a trouble word; the PG face turns
# it into one verdict (check_graphs).  Here a stand-in plane reports it, so the host logic runs on the CPU
# (the GPU run, tests/fast_cuda/pg_graph.py, kills a rank during real replays).

@pytest.mark.timeout(180)
@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_a_replay_that_gave_up_on_a_dead_peer_raises_one_verdict(cluster_factory, impl):
    c = _cluster(cluster_factory, impl, 3)
    epoch = c.run(vj.fake_graph_trouble, [2], ranks=[0, 1])[0]
    c.kill(2)
    res = c.run(vj.outcome_of_all_reduce, 7, ranks=[0, 1], timeout_s=RUN_S)
    msg = one_error(res, "PeerFailureError", ranks=[0, 1])
    assert "rank(s) [2] failed" in msg and "capture the graph again" in msg, msg
    assert res[0][1] == (2,)
    assert c.run(vj.graph_resets, ranks=[0, 1])[:2] == [[epoch + 1]] * 2  # captured ops start over in the new view
    next_ops_agree(c, 3, 11, ranks=[0, 1], mask=[1, 1, 0])


@pytest.mark.timeout(180)
def test_a_replay_that_timed_out_with_nobody_failed(cluster_factory):
    c = _cluster(cluster_factory, "fast", 2)
    c.run(vj.fake_graph_trouble, [])
    msg = one_error(c.run(vj.outcome_of_all_reduce, 7, timeout_s=RUN_S), "OpTimeoutError")
    assert "agreed nobody failed" in msg, msg
    next_ops_agree(c, 2, 11)


@pytest.mark.timeout(180)
def test_a_graph_replayed_after_the_view_changed(cluster_factory):
    c = _cluster(cluster_factory, "fast", 2)
    c.run(vj.fake_graph_trouble, [], True)
    msg = one_error(c.run(vj.outcome_of_all_reduce, 7, timeout_s=RUN_S), "MooncakeError")
    assert "replayed after the view changed" in msg, msg
    next_ops_agree(c, 2, 11)


@pytest.mark.timeout(180)
def test_a_rank_whose_replay_got_through_raises_the_same_error(cluster_factory):
    """Rank 0's replay gave up, rank 1's got through (its peer was late only for rank 0): rank 0's next call
    runs the agreement; rank 1, idle, adopts its decision (the plane is told the new view, so graphs of the
    old one stop running) and learns of the replay from its trouble word, written late by rank 0's kernel.
    Both raise the same OpTimeoutError at their next call."""
    c = _cluster(cluster_factory, "fast", 2)
    res = c.run_each({0: (vj.graph_trouble_seen_late, (7, True), {}), 1: (vj.graph_trouble_seen_late, (7, False), {})},
                     timeout_s=RUN_S)
    epoch = res[0][0]
    msg = one_error([r[1] for r in res], "OpTimeoutError")
    assert "agreed nobody failed" in msg and "capture the graph again" in msg, msg
    assert all(r[2] == [epoch + 1] for r in res), [r[2] for r in res]
    next_ops_agree(c, 2, 11)
