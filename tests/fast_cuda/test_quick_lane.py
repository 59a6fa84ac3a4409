"""The quick lane (mooncake/pg/quick.py over the CUDA plane's device path) on the plane's CPU emulation,
through the PG face as users call it: repeated blocking ``dist.all_reduce`` calls take it, give the model's
bits, and every one-sided event (a late rank, a rank that disagrees, one rank's bad argument, a rank that
dies, other calls in between) ends with the verdict the usual path gives, the same on every rank."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quick_jobs as Q  # noqa: E402

EMU = {"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_EMULATE": "cpu", "MOONCAKE_FAST_CUDA_EMULATE_LAG": "1",
       "MOONCAKE_FAST_CUDA_DEVICE": "on", "MOONCAKE_FAST_CUDA_DEVICE_WAIT_MS": "50"}
RUN_S = 120


def _cluster(cluster_factory, world, **env):
    return cluster_factory(world, "mooncake-cpu", env={**EMU, **env}, timeout_s=60,
                           options=("pg_integration.options", (), {}))


SHAPES = [("float32", 1, "SUM"), ("float32", 1000, "SUM"), ("bfloat16", 37, "MAX"), ("float64", 300, "AVG"),
          ("float16", 64, "MIN")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_repeated_calls_take_the_quick_lane_with_the_models_bits(cluster_factory, world):
    steps = 6
    for bad, counts in _cluster(cluster_factory, world).run(Q.loops, SHAPES, steps, timeout_s=RUN_S):
        assert not bad, bad
        # a shape's first call on each lane parity takes the device path and teaches the quick lane the shape
        # (a group's first calls on a parity also allocate the lane, on the host protocol)
        assert counts[0]["quick"] >= steps - 4 and counts[0]["quick"] + 2 == counts[0]["done"], counts
        for c in counts[1:]:
            # a peer that a loaded machine keeps from publishing within the quick wait's budget hands the op over
            # (its bits are checked above): most, not all, of the quick posts commit on the quick lane
            handed = c.pop("handed")
            assert c == {"quick": steps - 2, "done": steps, "published": 0, "not posted": 0}, counts
            assert handed <= (steps - 2) // 2, counts


@pytest.mark.timeout(300)
def test_quick_lane_off_gives_the_same_bits(cluster_factory):
    for bad, counts in _cluster(cluster_factory, 2, MOONCAKE_FAST_CUDA_QUICK="off").run(
            Q.loops, SHAPES[:2], 4, timeout_s=RUN_S):
        assert not bad, bad
        assert [c["quick"] for c in counts] == [0, 0] and counts[0]["done"] >= 2 and counts[1]["done"] == 4, counts


@pytest.mark.timeout(300)
def test_a_late_rank_hands_the_call_over_and_the_loop_goes_on(cluster_factory):
    """Rank 1 calls 0.3 s late: past the launch's wait (50 ms), within the group's timeout.  Rank 0's launch
    gives up after publishing, its quick op is handed to the host protocol, and every rank gets the model's
    bits; the loop then takes the quick lane again."""
    res = _cluster(cluster_factory, 2).run(Q.late_then_loop, 1, 0.3, 100, 6, timeout_s=RUN_S)
    for kind, ok, bad, late in res:
        assert kind == "ok" and ok and not bad, res
    assert res[0][3]["quick"] == res[0][3]["handed"] == res[0][3]["published"] == 1, res  # handed over, published
    assert res[1][3]["done"] == 1, res


@pytest.mark.timeout(300)
def test_ranks_that_disagree_get_one_mismatch_error(cluster_factory):
    """Both ranks call a shape the quick lane knows, but not the same one: every rank raises the same
    MismatchError and the next call is right."""
    res = _cluster(cluster_factory, 2).run(Q.disagree, {0: 10, 1: 12}, timeout_s=RUN_S)
    (got0, quick0, after0), (got1, quick1, after1) = res
    assert quick0 == quick1 == (1, 1), res  # both went out on the quick lane, both were handed over
    assert got0 == got1 and got0[0] == "MismatchError", res
    assert after0 == after1 == ("ok", [3.0] * 5), res


@pytest.mark.timeout(300)
def test_one_ranks_bad_argument_fails_the_call_on_every_rank(cluster_factory):
    """Rank 1 rejects its call (a sparse tensor) while rank 0's goes out on the quick lane: both raise
    ArgumentError, rank 0's naming rank 1 and its reason, and the next call is right."""
    res = _cluster(cluster_factory, 2).run(Q.bad_argument, 1, 8, timeout_s=RUN_S)
    (got0, quick0, after0), (got1, quick1, after1) = res
    assert (quick0, quick1) == ((1, 1), (0, 0)), res
    assert got0[0] == got1[0] == "ArgumentError", res
    assert "rank 1 rejected this call" in got0[1] and got1[1] in got0[1], res
    assert after0 == after1 == ("ok", [3.0] * 5), res


@pytest.mark.timeout(300)
def test_a_dead_rank_gives_the_survivors_one_verdict(cluster_factory):
    """Rank 2 of 3 is killed between two loops on one tensor: the survivors' next call goes out on the quick
    lane, is handed over when the launch gives up, and is re-posted over the survivors (the default), with
    the model's bits over ranks 0 and 1; the loop then goes on."""
    c = _cluster(cluster_factory, 3)
    for bad, _ in c.run(Q.persistent_loop, 100, 6, timeout_s=RUN_S):
        assert not bad, bad
    c.kill(2)
    res = c.run(Q.persistent_loop, 100, 6, [0, 1], ranks=[0, 1], timeout_s=RUN_S)
    for bad, counts in res[:2]:
        assert not bad, bad
        assert counts[0]["quick"] == counts[0]["handed"] == 1, counts  # out on the quick lane, then handed over
        assert sum(c["quick"] for c in counts[1:]) >= 1, counts  # the new view's shapes take it again


@pytest.mark.timeout(300)
def test_other_calls_between_quick_ones(cluster_factory):
    """Async all_reduces left pending across a quick-lane call, and broadcasts between them: every result is the
    model's (a quick op still pending when another call comes is handed over first)."""
    for bad, counts in _cluster(cluster_factory, 2).run(Q.mixed, 50, 12, timeout_s=RUN_S):
        assert not bad, bad
        assert counts["quick"] > 0 and counts["handed"] >= 3, counts  # the pending ones were handed over


@pytest.mark.timeout(300)
def test_a_quick_work_used_directly(cluster_factory):
    """``pg.allreduce`` with asyncOp=False called directly: its Work answers future, wait, is_completed."""
    for kind, ok, hint, right in _cluster(cluster_factory, 2).run(Q.direct_work, 20, timeout_s=RUN_S):
        assert kind == "QuickWork" and ok and right and hint == [0, 0], (kind, ok, hint, right)


@pytest.mark.timeout(300)
def test_a_group_on_two_hosts_says_why_its_collectives_take_the_ref_plane(cluster_factory):
    """Ranks on two (emulated) hosts: the plane hands every collective to the ref plane, which gives the
    model's bits; no call takes the quick lane, and ``get_implementation`` names the reason."""
    c = _cluster(cluster_factory, 2, MOONCAKE_FAST_CPU_HOST_ID="per-process")
    for (impl, reason), bad, quick in c.run(Q.delegated, 100, 4, timeout_s=RUN_S):
        assert impl == "fast" and "run on another host" in reason and "ref plane" in reason, reason
        assert not bad and quick == 0, (bad, quick)
