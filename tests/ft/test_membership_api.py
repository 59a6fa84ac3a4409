"""Upstream's membership API on our agreement (docs/semantics.md, "Manual membership and
proposals"): the int options spelling and manual mode, per-op evidence, sync_after_failure,
proposals (one per epoch: racing ones are Rejected), graceful leave, in-place rejoin, and a
proposal naming a rank that died (AppliedWithDroppedRanks).  Every rank that ends a test outside
the group is killed, so the next test gets a fresh cluster."""

from __future__ import annotations

import pytest
import torch

from ft import jobs
from mooncake.testing.impls import impl_env
from ft import membership_jobs as mj
from mooncake.model import collectives as model
from mooncake.model.reduce import ReduceOp
from mooncake.pg.membership import agreement_window_s
from mooncake.testing.compare import bitwise_equal

T = 1.5                                  # group timeout of the stall cases
START_S = 20.0
RUN_S = 45.0
pytestmark = pytest.mark.timeout(120)


def _cluster(cluster_factory, impl, manual, world=3):
    cluster = cluster_factory(world, "mooncake-cpu", timeout_s=START_S, env=impl_env(impl),
                              options=("ft.membership_jobs.make_options", (), {"manual": manual}))
    cluster.run(jobs.set_group_timeout, T)
    return cluster


def _want(seed, mask):
    return model.all_reduce([jobs.input_of(seed, r)[0] for r in range(len(mask))], ReduceOp.SUM, mask)


def _ok(result, seed, mask, rank):
    outcome, value = result[0], result[1]
    assert outcome == "ok", result[:2]
    assert bitwise_equal(value, _want(seed, mask)[rank]), f"rank {rank} differs from the model over {mask}"
    assert result[5] == mask, result[5]


def test_options_spellings():
    import mooncake.pg as pg
    from mooncake.control.errors import ArgumentError
    o = pg.MooncakeBackendOptions(4)
    assert (o.max_group_size, o.active_ranks, o.failure_mode, o.manual) == (4, None, "complete", False)
    o = pg.MooncakeBackendOptions(4, True, False, False)
    assert o.is_extension and o.manual and o.failure_mode == "raise"
    o = pg.MooncakeBackendOptions(4, auto_deactivate_on_failure=True, auto_sync_on_failure=False)
    assert o.failure_mode == "raise" and not o.manual
    o = pg.MooncakeBackendOptions(torch.zeros(3, dtype=torch.int32), False, 3, failure_mode="raise")
    assert (o.max_world_size, o.failure_mode, o.auto_sync_on_failure) == (3, "raise", False)
    with pytest.raises(ArgumentError, match="requires auto_deactivate_on_failure"):
        pg.MooncakeBackendOptions(4, False, False, True)
    with pytest.raises(ArgumentError, match="contradicts"):
        pg.MooncakeBackendOptions(torch.zeros(2, dtype=torch.int32), auto_sync_on_failure=True,
                                  failure_mode="raise")
    assert pg.ViewUpdateStatus is pg.ProposalStatus
    assert [s.name for s in pg.ProposalStatus] == ["Rejected", "Applied", "AppliedWithDroppedRanks"]
    assert {s.name for s in pg.SyncAfterFailureStatus} == {"Reconciled", "NoPending", "Rejected"}


def test_failed_peer_auto(cluster_factory, impl):
    """Auto mode: a healthy op is a local success with no hint; after a kill the op is re-run over
    the survivors (same bits everywhere) but is no local success, and its hint names the dead rank."""
    cluster = _cluster(cluster_factory, impl, manual=False)
    healthy = cluster.run(mj.all_reduce, 1, timeout_s=RUN_S)
    for r in range(3):
        _ok(healthy[r], 1, [1, 1, 1], r)
        assert healthy[r][3] is True and healthy[r][4] == [0, 0, 0]
    cluster.kill(2)
    got = cluster.run(mj.all_reduce, 2, ranks=[0, 1], timeout_s=RUN_S)
    for r in (0, 1):
        _ok(got[r], 2, [1, 1, 0], r)
        assert got[r][3] is False and got[r][4] == [0, 0, 1] and got[r][6] == 1
    assert cluster.run(mj.call_sync, ranks=[0, 1])[:2] == [("NoPending", 1)] * 2


def test_failed_peer_manual(cluster_factory, impl):
    """Manual mode: PeerFailureError on every survivor, the view unchanged; the next op fails at
    once the same way; sync_after_failure settles; deactivate_ranks moves the group on."""
    cluster = _cluster(cluster_factory, impl, manual=True)
    cluster.kill(2)
    got = cluster.run(mj.manual_after_kill, 10, 2, ranks=[0, 1], timeout_s=RUN_S)
    for r in (0, 1):
        first, second, second_s, sync, state, mask_before, deactivated, after = got[r]
        assert first[0] == "PeerFailureError" and first[2] == (2,), first[:3]
        assert first[3] is False and first[4] == [0, 0, 1] and first[5] == [1, 1, 1]
        assert second[0] == "PeerFailureError" and second[2] == (2,) and second_s < 1.0, (second[:3], second_s)
        assert sync in ("Reconciled", "NoPending") and state == [False] and mask_before == [1, 1, 1]
        assert deactivated[0] in ("Applied", "AppliedWithDroppedRanks"), deactivated
        assert deactivated[0] == "Applied" or deactivated[2] == [2]
        _ok(after, 12, [1, 1, 0], r)
        assert after[3] is True
    assert got[0][0][1] == got[1][0][1] and got[0][1][1] == got[1][1][1]   # one message everywhere


def test_graceful_self_deactivation(cluster_factory, impl):
    """Rank 2 deactivates itself and destroys its group; 0 and 1 carry on (their all_reduce, issued
    meanwhile, runs over {0, 1}); rank 2's own calls afterwards raise RemovedError."""
    cluster = _cluster(cluster_factory, impl, manual=False)
    got = cluster.run(mj.graceful_leave, 20, 2, timeout_s=RUN_S)
    assert got[2][0][0] == "Applied" and got[2][1] == "RemovedError", got[2]
    for r in (0, 1):
        _ok(got[r], 20, [1, 1, 0], r)
    cluster.kill(2)


@pytest.mark.parametrize("manual", [False, True], ids=["auto", "manual"])
def test_in_place_reactivation(cluster_factory, impl, manual):
    """Rank 2 stalls past the agreement, wakes up in the same process and group and is taken back
    (auto: join_group + activate_ranks; manual: activate_ranks); then all three run together."""
    cluster = _cluster(cluster_factory, impl, manual=manual)
    stall_s = T + agreement_window_s(T) + 1.5
    got = cluster.run(mj.in_place, 30, 2, stall_s, manual, timeout_s=RUN_S)
    failed = "PeerFailureError" if manual else "RemovedError"
    assert got[2][0][0] in (failed, "PeerFailureError"), got[2][0][:3]
    for r in (0, 1):
        if manual:
            assert got[r][0][0] == "PeerFailureError" and got[r][0][5] == [1, 1, 1], got[r][0][:3]
        else:
            _ok(got[r][0], 30, [1, 1, 0], r)
    assert got[0][1][0] == "Applied", got[0][1]
    for r in range(3):
        _ok(got[r][2], 31, [1, 1, 1], r)
        assert got[r][2][6] == got[0][2][6]


def test_one_proposal_per_epoch():
    """The Store decides: of two proposals for one epoch the first written wins, the second caller
    gets the winner back; an equivalent proposal counts as the winner's."""
    from torch.distributed import HashStore
    from mooncake.control.agreement import Proposal, ProposalKind, StoreAgreement
    store = StoreAgreement(HashStore(), "t")
    first = Proposal(5, 0, ProposalKind.DEACTIVATE, (2,), 11, 7)
    second = Proposal(5, 1, ProposalKind.DEACTIVATE, (0,), 22, 7)
    assert store.propose(first) == first
    assert store.propose(second) == first and store.proposal(5) == first
    assert Proposal(5, 1, ProposalKind.DEACTIVATE, (2,), 33).same_change(first)


def test_racing_proposals(cluster_factory, impl):
    """Ranks 0 and 1 propose different changes at once.  Whatever the timing, every member ends in
    one view: if both proposals met in one epoch, one is Applied and the other Rejected with a
    reason naming the winner; otherwise they ran one after the other (the second sees the first's
    view: Applied too, or RemovedError if the first removed its proposer)."""
    cluster = _cluster(cluster_factory, impl, manual=False)
    got = cluster.run(mj.race, 40, {0: [2], 1: [0]}, timeout_s=RUN_S)
    statuses = {r: got[r][0] for r in (0, 1)}
    assert all(s[0] in ("Applied", "Rejected", "RemovedError") for s in statuses.values()), statuses
    assert "Applied" in {s[0] for s in statuses.values()}, statuses
    for s in statuses.values():
        if s[0] == "Rejected":
            assert "won that epoch" in s[3], s
    members = [r for r in range(3) if not got[r][3]]
    assert members, got
    for r in members:
        assert got[r][1] == members and got[r][2] == got[members[0]][2], got
    after = cluster.run(mj.all_reduce, 41, ranks=members, timeout_s=RUN_S)
    mask = [1 if r in members else 0 for r in range(3)]
    for r in members:
        _ok(after[r], 41, mask, r)
    for r in range(3):
        if r not in members:
            cluster.kill(r)


def test_proposal_naming_a_dead_rank(cluster_factory, impl):
    """Manual mode: rank 2 dies, both survivors propose its deactivation before any op: the
    agreement finds it dead, so the proposal is AppliedWithDroppedRanks([2]) on both."""
    cluster = _cluster(cluster_factory, impl, manual=True)
    cluster.kill(2)
    got = cluster.run(mj.deactivate_dead, 2, ranks=[0, 1], timeout_s=RUN_S)
    for r in (0, 1):
        (status, epoch, dropped, _), mask = got[r]
        assert (status, dropped, mask) == ("AppliedWithDroppedRanks", [2], [1, 1, 0]), got[r]
    after = cluster.run(mj.all_reduce, 50, ranks=[0, 1], timeout_s=RUN_S)
    for r in (0, 1):
        _ok(after[r], 50, [1, 1, 0], r)
