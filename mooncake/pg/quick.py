"""The quick lane of the PG face: a blocking ``all_reduce`` that the data plane has run on its device path
in the same shape before is numbered, posted and waited for in a few steps, with none of the general
machinery (the plane's op object, its queue, ``MooncakeWork``), which are built only when the operation
needs them (``handover``).

A call takes the quick lane when all of this holds, else it goes the usual way, unchanged:

* torch waits on it at once (``async_op=False``) and it is not part of a coalesced call;
* the group is open, nothing of it was captured in a CUDA graph, no agreement is running or decided for its
  view, no late decision or suspended rank is waiting, and no earlier quick operation is still pending;
* the plane says yes (``quick_entry``: the device path launched this shape on this lane before, nothing it
  relies on changed, every earlier operation of the group is over).

Its verdict is the usual one: a launch that got through on every rank commits through the membership exactly
as the device path's op does (``try_commit``); anything else (a late or dead peer, a mismatch, a result the
host must fold again, the deadline, an agreement, another call of the group arriving first) hands the
operation over to the plane's host protocol and to a ``MooncakeWork``, in the state the launch left it in.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..control.errors import MooncakeError
from ..model.reduce import PREMUL_SUM, ReduceOp
from ..ref import collectives as ref
from .work import MooncakeWork, order_after


class QuickLane:
    """The quick lane of one group (``MooncakeProcessGroup._quick``), over a plane with ``quick_entry``."""

    def __init__(self, pg):
        self.pg = pg
        self.plane = pg._plane
        self.membership = pg._membership
        self.pending: QuickWork | None = None  # posted, neither committed nor handed over yet
        self._ops: dict[object, ReduceOp | None] = {}  # torch's RedOpType -> the plane's op (None: not here)

    def _reduce_op(self, opts) -> ReduceOp | None:
        kind = getattr(opts.reduceOp, "op", None)
        try:
            return self._ops[kind]
        except KeyError:
            name = getattr(kind, "name", "")
            op = ReduceOp[name] if name in ReduceOp.__members__ and name != PREMUL_SUM else None
            self._ops[kind] = op
            return op

    def all_reduce(self, tensors, opts) -> "QuickWork | None":
        """Post ``dist.all_reduce(tensors[0])`` on the quick lane, or None (nothing done: go the usual way)."""
        pg = self.pg
        if (getattr(opts, "asyncOp", True) or len(tensors) != 1 or self.pending is not None or pg._closed
                or pg._captured or pg._nested()):
            return None
        t = tensors[0]
        op = self._reduce_op(opts)
        if op is None or not isinstance(t, torch.Tensor) or t.is_sparse or \
                (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        membership = self.membership
        membership.poll()
        issued_at = time.monotonic()
        with membership.lock:
            if not membership.quick_ready():
                return None
            seq, view = membership.next_seq, membership.view
            entry = self.plane.quick_entry(t, op, seq, view.epoch)
            if entry is None:
                return None
            membership.begin()
            try:
                q = self.plane.quick_post(entry, t, seq, view.epoch)
            except BaseException as exc:
                membership.reject(seq, f"rank {pg._rank} could not post this call: {exc}")
                raise
            timeout_s = pg._timeout_of(opts)
            work = self.pending = QuickWork(self, q, view, issued_at + timeout_s, timeout_s)
        return work

    def finish(self, work: "QuickWork") -> None:
        """Wait for ``work``'s launch; commit it, or hand it over."""
        got = self.plane.quick_wait(work.q)
        membership = self.membership
        with membership.lock:
            if work.heavy is not None:  # another call of the group handed it over meanwhile
                return
            if got and time.monotonic() < work.deadline and membership.try_commit(work.q.seq, work.view.epoch):
                self.plane.quick_finish(work.q)
                work.done = True
                self.pending = None
                return
            self.handover(work, waited=True)

    def settle(self) -> None:
        """Before any other operation of the group: hand the pending quick operation over (it is then
        an ordinary one the plane's queue and the engine's thread drive)."""
        work = self.pending
        if work is not None:
            with self.membership.lock:
                if work.heavy is None and not work.done:
                    self.handover(work, waited=False)

    def handover(self, work: "QuickWork", waited: bool) -> None:
        """``work`` continues as the usual path's operation from where its launch got (under the
        membership's lock)."""
        pg, q = self.pg, work.q
        self.pending = None
        ctx = ref.OpContext(pg._engine, pg._peers, pg._group_key, pg._rank, work.view, q.seq, "all_reduce", q.fp)
        op = self.plane.quick_handover(q, ctx)
        if op is None:  # the group was shut down meanwhile
            self.membership.settle(q.seq)
            work.heavy = MooncakeWork(pg._engine, None, work.timeout_s, [q.tensor], name="all_reduce",
                                      failed=MooncakeError("this mooncake process group was shut down"))
            return
        tensor, reduce_op = q.tensor, q.op
        work.heavy = pg._work("all_reduce", work.timeout_s, op, lambda c: pg._plane.all_reduce(c, tensor, reduce_op),
                              [tensor], (), None, q.fp, q.seq, work.view, True, None,
                              work.deadline - work.timeout_s, urgent=False, waited_at_once=waited, stream=q.stream)


class QuickWork(dist.Work):
    """The ``Work`` of a quick-lane all_reduce: ``wait()`` spins on the launch (no GIL held) and commits it,
    or hands the operation over and waits on that ``MooncakeWork`` (whose contract it then has)."""

    def __init__(self, lane: QuickLane, q, view, deadline: float, timeout_s: float):
        super().__init__()
        self.lane, self.q, self.view, self.deadline, self.timeout_s = lane, q, view, deadline, timeout_s
        self.done = False
        self.heavy: MooncakeWork | None = None

    def _settled(self) -> MooncakeWork | None:
        """The ``MooncakeWork`` it became (None: it committed on the quick lane)."""
        if not self.done and self.heavy is None:
            self.lane.settle()
        return self.heavy

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        if not self.done and self.heavy is None and not (timeout and timeout.total_seconds() > 0):
            self.lane.finish(self)
        heavy = self._settled()
        if heavy is not None:
            return heavy.wait(timeout)
        order_after(self.q.stream)
        return True

    def is_completed(self) -> bool:
        heavy = self._settled()
        return True if heavy is None else heavy.is_completed()

    def is_success(self) -> bool:
        return self.done or (self.heavy is not None and self.heavy.is_success())

    def exception(self):
        return None if self.heavy is None else self.heavy.exception()

    def get_future(self) -> torch.futures.Future:
        heavy = self._settled()
        if heavy is not None:
            return heavy.get_future()
        future = torch.futures.Future()
        future.set_result([self.q.tensor])
        return future

    def result(self) -> list[torch.Tensor]:
        return [self.q.tensor]

    def synchronize(self) -> None:
        self.wait()

    @property
    def _collective(self):
        """What ``mooncake.pg.get_failed_ranks_hint`` reads: the group's membership (``.membership``)."""
        return self.lane if self.heavy is None else self.heavy._collective

    @property
    def failed_ranks(self) -> tuple[int, ...]:
        return () if self.heavy is None else self.heavy.failed_ranks

    @property
    def failed_ranks_hint(self) -> frozenset[int]:
        return frozenset() if self.heavy is None else self.heavy.failed_ranks_hint
