"""When a collective may commit on its own, and when it must ask the agreement first.

A rank that was stalled may find its operation complete when it wakes although the others have
removed it meanwhile; it must not return that result as if nothing happened.  Two guards, tested
here without any transport: the deadline counts from the issue (a stall while the operation was
being posted counts against it), and a peer's NACK that has arrived but not been acted on yet
blocks the commit.
"""

import contextlib
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from mooncake.control.agreement import Decision
from mooncake.control.errors import MooncakeError, OpTimeoutError
from mooncake.control.view import View
from mooncake.pg.membership import Membership
from mooncake.pg.work import Collective, MooncakeWork


class CommittedOp:
    """An operation whose data and DONE round are all in."""

    committed = data_complete = True
    error = None

    def progress(self):
        pass

    def failed_peers(self):
        return frozenset()

    def abandon(self):
        self.abandoned = True

    def finish(self):
        pass


class Engine:
    def __init__(self):
        self.pollers, self.watches, self.sent = [], [], []

    def add_poller(self, fn, **kwargs):
        self.pollers.append(fn)

    def kick(self):
        pass

    def waiting(self):
        return contextlib.nullcontext()

    def remove_poller(self, fn):
        if fn in self.pollers:
            self.pollers.remove(fn)

    def add_watch(self, fn):
        self.watches.append(fn)

    def remove_watch(self, fn):
        self.watches.remove(fn)

    def recv(self, peer, tag, buffer):
        return Request()

    def send(self, peer, tag, buffer):
        self.sent.append(peer)
        return Request(completed=True)

    def keep_alive(self, requests):
        pass

    def progress(self):
        pass

    def wait_until(self, done, deadline):
        while not done() and time.monotonic() < deadline:
            time.sleep(0.001)

    def peer_alive(self, address):
        return True


class Request:
    def __init__(self, completed=False):
        self.completed = completed

    def error(self):
        return None


class Watch:
    """The membership surface a Work uses, recording what it was asked."""

    failure_mode = "complete"

    def __init__(self):
        self.evicted = None
        self.commits, self.troubles = [], []
        self.decisions: dict[int, Decision] = {}

    def try_commit(self, seq, epoch):
        self.commits.append(seq)
        return True

    def trouble(self, epoch, suspects=frozenset(), timed_out=None, slow=frozenset()):
        self.troubles.append(epoch)

    def under_agreement(self, epoch):
        return bool(self.troubles)

    def decision(self, epoch):
        return self.decisions.get(epoch)

    def settle(self, seq):
        pass

    def poll(self):
        pass

    def removed_error(self, name):
        from mooncake.control.errors import RemovedError
        return RemovedError(f"{name}: {self.evicted}", (2,))


def work_of(watch, issued_at=None, timeout_s=2.0):
    return MooncakeWork(Engine(), CommittedOp(), timeout_s, [torch.zeros(1)], name="all_reduce",
                        collective=Collective(watch, 0, 0, repost=None), issued_at=issued_at)


def test_commit_within_the_deadline_needs_no_agreement():
    watch = Watch()
    work = work_of(watch, issued_at=time.monotonic())
    assert work.wait() and watch.commits == [0] and watch.troubles == []


def test_stall_while_posting_counts_against_the_deadline():
    """Issued 3 s ago with a 2 s timeout (the rank stalled while posting): complete, yet it asks."""
    watch = Watch()
    work = work_of(watch, issued_at=time.monotonic() - 3.0)
    with pytest.raises(OpTimeoutError, match="keeps running"):  # as gloo: a wait timeout raises
        work.wait(timeout=timedelta(seconds=0.2))
    assert watch.commits == [] and watch.troubles == [0]
    watch.evicted = "rank 2 was removed from the group by the survivors at epoch 0"
    watch.decisions[0] = Decision(1, (0, 1), (2,), ((0, 1),), 1)
    with pytest.raises(MooncakeError, match="was removed from the group"):
        work.wait()


def membership(store, engine, rank=2, timeout_s=2.0):
    return Membership(rank=rank, capacity=3, view=View(0, 3, (0, 1, 2)), store=store, prefix="t",
                      engine=engine, peers=lambda ranks: {r: r for r in ranks},
                      addresses={0: b"0", 1: b"1", 2: b"2"}, group_key=7, timeout_s=lambda: timeout_s,
                      failure_mode="complete", on_view=lambda view: None)


def test_arrived_nack_blocks_the_commit():
    """The NACK is in but the progress thread has not seen it: the commit waits for the agreement,
    which (the others having decided without this rank) says it was removed."""
    store = dist.HashStore()
    engine = Engine()
    m = membership(store, engine)
    survivors = Decision(1, (0, 1), (2,))
    store.set("t/agree/0/decision", survivors.encode())
    seq = m.begin()
    m._nacks[0].completed = True  # rank 0's NACK arrived; no watch has run
    assert not m.try_commit(seq, 0)
    assert sorted(engine.sent) == [0, 1]  # this rank's own NACKs went out with its report
    deadline = time.monotonic() + 10
    while m.decision(0) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m.decision(0) == survivors and "was removed from the group" in (m.evicted or "")
    m.close()


def test_commit_without_nack_is_immediate():
    m = membership(dist.HashStore(), Engine())
    seq = m.begin()
    assert m.try_commit(seq, 0) and not m.has_pending()
    assert not m.under_agreement(0)
    m.close()


def test_a_leaving_rank_reports_what_it_committed():
    """Rank 1 commits op 0 and leaves (destroy_process_group); rank 0 has not seen rank 1's DONE yet,
    finds rank 1 gone and asks the agreement: the decision must say op 0 stands (rank 0 finishes it
    with everyone's data) and rank 1 left, instead of counting rank 1 silent and re-running op 0 over
    rank 0 alone — which returned rank 0's own contribution as the result."""
    store = dist.HashStore()
    leaver = Membership(rank=1, capacity=2, view=View(0, 2, (0, 1)), store=store, prefix="t", engine=Engine(),
                        peers=lambda ranks: {r: r for r in ranks}, addresses={0: b"0", 1: b"1"}, group_key=7,
                        timeout_s=lambda: 2.0, failure_mode="complete", on_view=lambda view: None)
    seq = leaver.begin()
    assert leaver.try_commit(seq, 0)
    leaver.close()
    stayer = Membership(rank=0, capacity=2, view=View(0, 2, (0, 1)), store=store, prefix="t", engine=Engine(),
                        peers=lambda ranks: {r: r for r in ranks}, addresses={0: b"0", 1: b"1"}, group_key=7,
                        timeout_s=lambda: 2.0, failure_mode="complete", on_view=lambda view: None)
    assert stayer.begin() == seq
    stayer.trouble(0, {1})
    deadline = time.monotonic() + 10
    while stayer.decision(0) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    decision = stayer.decision(0)
    assert decision is not None and decision.committed(seq), decision
    assert decision.failed == (1,) and decision.active == (0,)
    stayer.close()
