"""``MooncakeWork``: the handle every operation returns (a real ``dist.Work`` subclass, so errors
raised while completing reach ``wait()`` and finite wait timeouts are honoured)."""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..control.agreement import Verdict, VerdictKind
from ..control.errors import ArgumentError, MismatchError, MooncakeError, OpTimeoutError, PeerFailureError
from ..control.streams import current_stream, is_current, on_stream

_PENDING, _DONE, _FAILED = range(3)
_WAIT_SLICE_S = 0.05  # wait() re-checks for agreement decisions this often
_log = logging.getLogger("mooncake")


def order_after(stream) -> None:
    """Make the current CUDA stream wait for the work enqueued on ``stream`` so far (None: CPU, nothing to do)."""
    if stream is not None and not is_current(stream):
        current = torch.cuda.current_stream(stream.device)
        if current != stream:
            written = torch.cuda.Event()
            written.record(stream)
            current.wait_event(written)


class Collective:
    """What a collective's Work needs from its group: its number, its epoch, how to (re-)post it,
    and, for an op that was not posted at issue, the decision it waits for (``epoch``'s) or
    already has (``decision``: it was called late)."""

    def __init__(self, membership, seq: int, epoch: int, repost: Callable[[], tuple[object, int]],
                 posted: bool = True, decision=None):
        self.membership, self.seq, self.epoch, self.repost = membership, seq, epoch, repost
        self.posted, self.decision = posted, decision


class NotPosted:
    """The ``PlaneOp`` of a collective that waits for the agreement before posting anything."""

    data_complete = committed = False
    error = None

    def progress(self) -> None:
        pass

    def failed_peers(self) -> frozenset[int]:
        return frozenset()

    def pending_ranks(self) -> tuple[int, ...]:
        return ()

    def abandon(self) -> None:
        pass

    def finish(self) -> None:
        raise MooncakeError("finish() of an operation that was never posted")


def verdict_error(name: str, seq: int, verdict: Verdict) -> MooncakeError:
    """The exception every member raises for op ``seq`` failed with ``verdict``."""
    if verdict.kind is VerdictKind.REJECTED:
        return ArgumentError(f"{name} (op {seq}): {verdict.message}")
    if verdict.kind is VerdictKind.MISMATCH:
        return MismatchError(verdict.message)
    return OpTimeoutError(f"{name} (op {seq}) timed out: {verdict.message}", verdict.ranks)


class MooncakeWork(dist.Work):
    """One operation in flight.

    ``wait(timeout)`` drives it to completion and re-raises its error; a finite ``timeout`` that
    expires first raises ``OpTimeoutError`` (as gloo raises) and leaves the operation running (its
    own deadline, the group timeout, still applies; a later ``wait()`` may still succeed).

    Whichever thread sees the operation commit completes the Work and its future: a caller in
    ``wait()``, or the engine's background thread, which is woken at once for an ``urgent``
    operation (``async_op=True``, DDP's buckets) or when someone asks for the future.  A blocking
    collective (``waited_at_once``: ``async_op=False``, which torch waits on at once) is handed to that
    thread only if it is still pending when its ``wait()`` returns or raises, or when someone asks
    for its future or whether it completed.

    ``failed_ranks`` lists the group ranks a failed operation lost, or that the survivors agreed had
    failed while it ran.

    CUDA outputs are written on the stream that was current when the operation was issued (or
    ``stream``); a successful ``wait()`` also makes the stream current at the time of the call wait for those
    writes (as NCCL's ``Work.wait`` does), so the outputs may be used on any stream after it.

    A collective (``collective`` given) commits only through its group's membership: if it cannot
    commit it waits for the survivors' decision, then finishes, is re-posted under the new view
    (default) or raises ``PeerFailureError`` (framework-managed mode).
    """

    def __init__(self, engine, op, timeout_s: float, outputs: list[torch.Tensor],
                 after: Callable[[], None] | None = None,
                 source_rank: int | Callable[[], int] = -1, name: str = "operation",
                 collective: "Collective | None" = None, issued_at: float | None = None,
                 failed: BaseException | None = None, urgent: bool = False, waited_at_once: bool = False,
                 stream=None):
        super().__init__()
        self._engine = engine
        self._name = name
        self._op = op
        self._after = after
        self._outputs = outputs
        self._timeout_s = timeout_s
        # the deadline counts from the issue, before anything was posted: building ``op`` may
        # already have moved data (and a stall there must still count against this operation)
        self._deadline = (time.monotonic() if issued_at is None else issued_at) + timeout_s
        self._lock = threading.Lock()
        self._state = _PENDING
        self._error: BaseException | None = None
        # made on first ask (a torch Future costs about as much as a small operation on the device path)
        self._future: torch.futures.Future | None = None
        self._future_lock = threading.Lock()
        self._future_settled = False
        self._source_rank_value = source_rank
        self._collective = collective
        self._registered = False
        self._awaiting_decision = collective is not None and not collective.posted
        self._stream = stream  # where the outputs are written: given, or the current one of their device
        for t in outputs if stream is None else ():
            if isinstance(t, torch.Tensor) and t.is_cuda:
                self._stream = current_stream(t.get_device())
                break
        self.failed_ranks: tuple[int, ...] = ()
        self.failed_ranks_hint: frozenset[int] = frozenset()   # evidence: peers seen failing in this op
        if failed is not None:
            self._fail(failed)
        elif op is None:
            self._complete()
        elif collective is not None and collective.decision is not None:
            with self._lock:
                self._resolve(collective.decision)   # called late: the verdict is already known
            if self._state == _PENDING and not waited_at_once:
                self._register(urgent)
        elif not waited_at_once:
            self._register(urgent)
        # else (torch's blocking call, which waits at once) registered only if wait() leaves it pending

    def _register(self, urgent: bool) -> None:
        """Hand the operation to the engine's thread, which sleeps on this plane's doorbell
        (``engine_sleeps``) or UCX's events, or else in the plane's own wait."""
        self._registered = True
        op = self._op
        blocker = None if getattr(op, "engine_sleeps", False) or not hasattr(op, "wait") else self._block
        self._engine.add_poller(self._advance, deadline=self._wake_at, urgent=urgent, blocker=blocker)

    def _keep_driven(self) -> None:
        """Register with the engine's thread now if the operation is pending and was not (a blocking call
        whose caller stops waiting, or asks for the future)."""
        if not self._registered and self._state == _PENDING:
            self._register(False)
            if self._state != _PENDING:  # it ended meanwhile
                self._engine.remove_poller(self._advance)
            else:  # the thread may sleep with no deadline (an op awaiting a decision): look at it now
                self._engine.kick()

    def _wake_at(self) -> float:
        """When the engine's thread must advance this operation even if no event comes: its
        deadline, or never while it awaits the agreement (the decision kicks the engine)."""
        return math.inf if self._awaiting_decision else self._deadline

    def _block(self, timeout_s: float) -> None:
        """The engine's thread sleeps here for a plane no fd of its own announces (CUDA IPC, P2P)."""
        op_wait = getattr(self._op, "wait", None)
        if op_wait is not None and not self._awaiting_decision and self._state == _PENDING:
            op_wait(timeout_s)
        else:
            time.sleep(timeout_s)

    # -- completion ------------------------------------------------------------------------------
    def _advance(self) -> bool:
        """Move the operation on; returns True once it is done or failed."""
        with self._lock:
            if self._state == _PENDING:
                if self._collective is None:
                    self._advance_p2p()
                else:
                    self._advance_collective()
            return self._state != _PENDING

    def _advance_p2p(self) -> None:
        op = self._op
        op.progress()
        if op.committed:
            self._finish_op()
        elif op.failed_peers():
            failed = tuple(sorted(op.failed_peers()))
            self.failed_ranks_hint |= set(failed)
            op.abandon()
            self._fail(PeerFailureError(f"{self._name}: lost connection to rank(s) {list(failed)}", failed))
        elif time.monotonic() >= self._deadline:
            op.abandon()
            self._fail(self._timeout_error())

    def _advance_collective(self) -> None:
        c = self._collective
        if self._awaiting_decision:
            decision = c.membership.decision(c.epoch)
            if decision is not None:
                self._resolve(decision)
            return
        op = self._op
        op.progress()
        if op.error is not None:  # the ranks disagree on the call: every one of them sees it
            op.abandon()
            c.membership.fail_local(c.seq, VerdictKind.MISMATCH, str(op.error))
            self._fail(op.error)
            return
        # committed only after the deadline: the others may have given this rank up meanwhile (it was
        # stalled), and whether they did is in the agreement, not yet in this rank's view
        late = time.monotonic() >= self._deadline
        if op.committed and not late and c.membership.try_commit(c.seq, c.epoch):
            self._finish_op()
        elif op.committed or op.failed_peers() or late or c.membership.under_agreement(c.epoch):
            self._awaiting_decision = True
            timed_out = late and not op.committed
            self.failed_ranks_hint |= op.failed_peers() | (set(op.pending_ranks()) if timed_out else set())
            c.membership.trouble(c.epoch, op.failed_peers(), c.seq if timed_out else None,
                                 op.pending_ranks() if timed_out else ())

    def _resolve(self, decision) -> None:
        """Apply the members' decision about this collective's epoch (docs/semantics.md, "One
        verdict per operation")."""
        c = self._collective
        membership = c.membership
        self._awaiting_decision = False
        self.failed_ranks = decision.failed
        self.failed_ranks_hint |= set(decision.failed)
        verdict = decision.verdict(c.seq)
        if membership.evicted:
            self._op.abandon()
            self._settle_fail(membership.removed_error(self._name))
        elif decision.committed(c.seq):
            if self._op.data_complete:
                membership.settle(c.seq)
                self._finish_op()
            else:  # a commit elsewhere proves every rank had its data: the protocol was broken
                self._settle_fail(MooncakeError(f"{self._name}: committed by a peer but this rank lacks "
                                                "data (a bug: please report it)"))
        elif verdict is not None:
            self._op.abandon()
            self._settle_fail(verdict_error(self._name, c.seq, verdict))
        elif decision.failed and c.seq < decision.high and membership.failure_mode == "raise":
            self._op.abandon()
            self._settle_fail(PeerFailureError(
                f"{self._name}: rank(s) {list(decision.failed)} failed; the survivors "
                f"{list(decision.active)} agreed on it and the group continues without them",
                decision.failed))
        else:  # run it (again) under the new view
            self._op.abandon()
            self._deadline = time.monotonic() + self._timeout_s
            try:
                self._op, c.epoch = c.repost()
            except BaseException as exc:  # noqa: BLE001 - e.g. the root is among the failed
                self._settle_fail(exc)

    def _settle_fail(self, exc: BaseException) -> None:
        self._collective.membership.settle(self._collective.seq)
        self._fail(exc)

    def _finish_op(self) -> None:
        try:
            self._op.finish()
        except BaseException as exc:  # noqa: BLE001 - delivered to wait()
            self._fail(exc)
        else:
            self._complete()

    def _timeout_error(self) -> OpTimeoutError:
        pending = self._op.pending_ranks()
        return OpTimeoutError(f"{self._name} did not complete within {self._timeout_s:.3g} s; "
                              f"still waiting on rank(s) {list(pending)}", pending)

    def _complete(self) -> None:
        try:
            if self._after is not None:
                with on_stream(self._stream):
                    self._after()
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
            return
        self._state = _DONE
        if self._registered:
            self._engine.remove_poller(self._advance)
        self._settle_future()

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, OpTimeoutError):
            _log.warning("%s", exc)
        self._error = exc  # before the state: another thread that sees _FAILED raises _error
        if isinstance(exc, PeerFailureError):
            self.failed_ranks = exc.failed_ranks
            self.failed_ranks_hint |= set(exc.failed_ranks)
        elif isinstance(exc, OpTimeoutError):
            self.failed_ranks = exc.pending_ranks
        self._state = _FAILED
        if self._registered:
            self._engine.remove_poller(self._advance)
        self._settle_future()

    def _settle_future(self) -> None:
        """Complete the future, once the operation ended and someone asked for it (exactly once)."""
        with self._future_lock:
            if self._future is None or self._future_settled or self._state == _PENDING:
                return
            self._future_settled = True
        if self._state == _DONE:
            self._future.set_result(self._outputs)
        else:
            self._future.set_exception(self._error)

    # -- dist.Work API -------------------------------------------------------------------------
    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        """Block until the operation ends (every path to that end is bounded: the deadline, then
        the agreement window).  With a positive ``timeout`` that expires first, raise
        ``OpTimeoutError`` as gloo does; the operation keeps running to its own deadline."""
        limit = None
        if timeout and timeout.total_seconds() > 0:
            limit = time.monotonic() + timeout.total_seconds()
        try:
            self._wait_until_done(limit, timeout)
        finally:
            self._keep_driven()
        if self._state == _FAILED:
            raise self._error
        order_after(self._stream)
        return True

    def _wait_until_done(self, limit: float | None, timeout: timedelta) -> None:
        while not self._advance():
            now = time.monotonic()
            if limit is not None and now >= limit:
                _log.info("%s: wait(timeout=%.3g s) expired; the operation keeps running until its "
                          "deadline", self._name, timeout.total_seconds())
                raise OpTimeoutError(f"{self._name}: wait(timeout={timeout.total_seconds():.3g} s) expired; "
                                     "the operation keeps running until its own deadline (the group "
                                     f"timeout, {self._timeout_s:.3g} s) and a later wait() may still "
                                     "return it", ())
            slice_end = min(limit or now + _WAIT_SLICE_S, now + _WAIT_SLICE_S)
            op_wait = getattr(self._op, "wait", None)  # shared-memory / CUDA IPC planes: UCX never wakes us
            if op_wait is not None and not self._awaiting_decision:
                with self._engine.waiting():  # the engine's thread stays parked: no GIL fight
                    op_wait(max(0.0, slice_end - now))
                    self._advance()  # complete here, so leaving does not wake the engine's thread for it
            else:
                self._engine.wait_until(self._advance, slice_end)
            if self._collective is not None and self._state == _PENDING:
                # the engine's thread may stay parked while this caller waits: answer a peer's NACK
                # from here, or this rank would count as silent in the peer's agreement
                self._collective.membership.poll()

    def is_completed(self) -> bool:
        if self._advance():
            return True
        self._keep_driven()
        return False

    def is_success(self) -> bool:
        return self._state == _DONE

    def exception(self):
        return self._error

    def get_future(self) -> torch.futures.Future:
        """Completed, with callbacks run, by whichever thread sees the operation commit: asking for
        it wakes the engine's thread, since whoever waits on a future does not drive the operation."""
        with self._future_lock:
            if self._future is None:
                self._future = torch.futures.Future()
        self._settle_future()
        if self._state == _PENDING:
            self._keep_driven()
            self._engine.kick()
        return self._future

    def result(self) -> list[torch.Tensor]:
        return self._outputs

    def source_rank(self) -> int:
        """The sender of a receive (resolved once a message matched, for receives from any source)."""
        value = self._source_rank_value
        return value() if callable(value) else value

    _source_rank = source_rank

    def synchronize(self) -> None:
        self.wait()


class CapturedWork(dist.Work):
    """An operation enqueued into a CUDA graph being captured: nothing to wait for now.  It runs at each
    replay; a replay that gives up is raised by the group's next call (``check_graphs``)."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self._outputs = outputs

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self):
        return None

    def get_future(self) -> torch.futures.Future:
        future = torch.futures.Future()
        future.set_result(self._outputs)
        return future

    def result(self) -> list[torch.Tensor]:
        return self._outputs

    def synchronize(self) -> None:
        pass


class ComposedWork(dist.Work):
    """Several operations issued by one call (coalesced forms); completes when all have."""

    def __init__(self, works: list[MooncakeWork], outputs: list[torch.Tensor]):
        super().__init__()
        self._works = works
        self._outputs = outputs
        self._future: torch.futures.Future | None = None

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        limit = time.monotonic() + timeout.total_seconds() if timeout and timeout.total_seconds() > 0 else None
        for w in self._works:  # one timeout for the whole call, as a single Work's
            left = None if limit is None else timedelta(seconds=max(limit - time.monotonic(), 1e-6))
            w.wait(left) if left is not None else w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def is_success(self) -> bool:
        return all(w.is_success() for w in self._works)

    def exception(self):
        return next((w.exception() for w in self._works if w.exception() is not None), None)

    @property
    def failed_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for w in self._works for r in w.failed_ranks}))

    @property
    def failed_ranks_hint(self) -> frozenset[int]:
        return frozenset(r for w in self._works for r in w.failed_ranks_hint)

    def get_future(self) -> torch.futures.Future:
        if self._future is None:
            futures = torch.futures.collect_all([w.get_future() for w in self._works])
            self._future = futures.then(lambda f: [t for sub in f.value() for t in sub.value()])
        return self._future

    def result(self) -> list[torch.Tensor]:
        return self._outputs
