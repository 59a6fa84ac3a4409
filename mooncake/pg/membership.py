"""A group's membership over time: the current view, the collectives in flight, the NACK watch and
the failure agreement (control/agreement.py) that moves every survivor to the same next view.

Lock order: a Work's lock may be held while taking the membership lock, never the reverse; the
agreement thread takes only the membership lock and publishes decisions, which Works pick up on
their next advance.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import os
import threading
import time
from typing import Callable

import numpy as np

from .. import log
from ..control import auth, faults
from ..control.agreement import Decision, Proposal, ProposalKind, Report, StoreAgreement, VerdictKind
from ..control.errors import ArgumentError, MooncakeError, OpTimeoutError, PeerFailureError, RemovedError
from ..control.store import BoundedStore
from ..control.view import View
from ..control.wire import HEADER_BYTES, Header, Kind, OpCode

try:
    from ucxx._lib.libucxx import UCXMessageTruncatedError as _TRUNCATED
except ImportError:  # pragma: no cover - older ucxx
    _TRUNCATED = ()

FAILURE_MODES = ("complete", "raise")
#: a Store call of the agreement may take the group timeout, and at least this long (seconds)
STORE_MIN_DEADLINE_S = 5.0


class ProposalStatus(enum.IntEnum):
    """Outcome of ``deactivate_ranks`` / ``activate_ranks`` / ``recover_ranks`` (upstream's names)."""

    Rejected = 0
    Applied = 1
    AppliedWithDroppedRanks = 2


ViewUpdateStatus = ProposalStatus   # upstream's earlier name


class SyncAfterFailureStatus(enum.IntEnum):
    """Outcome of ``sync_after_failure``."""

    Reconciled = 0
    NoPending = 1
    Rejected = 2


@dataclasses.dataclass(frozen=True)
class ProposalResponse:
    """What a membership proposal returns: ``status``; ``new_epoch``, the epoch of the view this
    rank is in afterwards; ``dropped_ranks``, ranks the same agreement found failed (dead or
    silent) or could not admit; ``reject_reason`` ("" unless Rejected)."""

    status: ProposalStatus
    new_epoch: int
    dropped_ranks: list[int] = dataclasses.field(default_factory=list)
    reject_reason: str = ""


@dataclasses.dataclass(frozen=True)
class SyncAfterFailureResponse:
    status: SyncAfterFailureStatus
    reject_reason: str = ""
    new_epoch: int = 0
_MAX_FAILED_LOCAL = 256   # local verdicts kept for this epoch's report (a slow peer needs only recent ones)
_POLL_PERIOD_S = 1e-3     # poll() acts at most this often (see there)


def _add_to_runs(runs: list[list[int]], seq: int) -> None:
    """Add ``seq`` to ascending, disjoint [start, end) ``runs`` (commits come mostly in order)."""
    if runs and runs[-1][1] == seq:
        runs[-1][1] = seq + 1
        return
    i = bisect.bisect_left(runs, [seq + 1])  # first run starting after seq
    if i and runs[i - 1][1] > seq:
        return  # already in
    if i and runs[i - 1][1] == seq:
        runs[i - 1][1] = seq + 1
        if i < len(runs) and runs[i][0] == seq + 1:
            runs[i - 1][1] = runs.pop(i)[1]
    elif i < len(runs) and runs[i][0] == seq + 1:
        runs[i][0] = seq
    else:
        runs.insert(i, [seq, seq + 1])


def _private_connection(store, deadline_s: Callable[[], float]):
    """A Store client of the agreement's own: torch's TCPStore serves one request at a time per
    client, so an agreement sharing the user's client would wait behind any ``store.wait`` the
    user's thread makes (and the rank would be removed for being silent).  Every call on it ends
    within ``deadline_s()`` (``BoundedStore``), so a lost Store host fails the agreement instead
    of hanging it.  Signed with the job's keys where there is a secret."""
    sealed = auth.wrap_store(store)
    try:
        conn = BoundedStore(auth.raw_store(sealed).clone(), deadline_s)
    except (AttributeError, RuntimeError, NotImplementedError):
        return sealed  # a Store without clone() (HashStore, FileStore): no network client to share
    return sealed.over(conn) if isinstance(sealed, auth.SealedStore) else conn


def agreement_window_s(timeout_s: float) -> float:
    """How long an agreement waits for silent members' reports: live members answer a NACK from
    their progress thread within milliseconds, so a fraction of the group timeout is plenty."""
    return min(max(timeout_s / 2, 2.0), 30.0)


class Membership:
    """Views, pending collectives and agreement for one group on one rank."""

    def __init__(self, *, rank: int, capacity: int, view: View, store, prefix: str, engine,
                 peers: Callable, addresses: dict[int, bytes], group_key: int, timeout_s: Callable[[], float],
                 failure_mode: str, on_view: Callable[[View], None], keep_failed: bool = False,
                 on_join: Callable[[Decision, Proposal | None, object], None] | None = None):
        self.rank, self.capacity = rank, capacity
        self.view = view
        # manual mode (auto_deactivate_on_failure=False): failed members stay in the view, suspended,
        # and every op of the group fails with PeerFailureError until a proposal settles them
        self.keep_failed = keep_failed
        self.failure_mode = "raise" if keep_failed else failure_mode
        self.suspended: frozenset[int] = frozenset()
        self.joined_at: tuple[Decision, int] | None = None   # last decision that changed membership, next_seq then
        self._on_join = on_join
        self.lock = threading.RLock()
        self.next_seq = 0
        self.evicted: str | None = None            # why this rank can no longer take part
        self._agreement_failed = False             # ...because the agreement itself failed
        self._store = StoreAgreement(_private_connection(store, lambda: max(timeout_s(), STORE_MIN_DEADLINE_S)), prefix)
        self._auth = auth.bind_group(group_key)    # with a job secret: every message carries the group's MAC
        self._engine, self._peers, self._group_key = engine, peers, group_key
        self._addresses = addresses
        self._timeout_s = timeout_s
        self._on_view = on_view
        self._pending: set[int] = set()            # seqs of collectives not committed yet
        self._issued: dict[int, float] = {}        # pending seq -> when it was numbered (for the log)
        self._trouble_at = (0.0, 0.0)              # when this epoch's agreement started, oldest pending issue
        self._frozen = False                       # this epoch's report is out: commit nothing more
        self._decisions: dict[int, Decision] = {}  # old epoch -> its decision
        self._suspects: set[int] = set()
        self._seen_dead: set[int] = set()          # members whose NACK channel broke
        self._nacks: dict[int, object] = {}       # peer -> posted NACK receive of this epoch
        self._nacks_pending_at: int | None = None  # engine.progressed when every NACK receive was seen pending
        self._polled_at = -math.inf                # poll()'s last look (monotonic)
        self._timed_out: set[int] = set()          # ops of this epoch whose deadline passed here
        self._slow: set[int] = set()               # peers those ops still waited on
        # ops that failed here for a reason every member must share: seq -> (kind, message, reported)
        self._failed_local: dict[int, tuple[VerdictKind, str, bool]] = {}
        self._late: dict[int, Decision] = {}       # seqs not called here yet -> the decision that covered them
        self._committed: list[list[int]] = []      # [start, end) runs of the ops committed in this epoch
        self._closed = False
        self._watch_nacks()
        engine.add_watch(self._check_nacks)

    # -- operations ----------------------------------------------------------------------------
    def begin(self) -> int:
        """Number a collective and remember it until it commits; returns its seq."""
        with self.lock:
            seq = self.next_seq
            self.next_seq += 1
            self._pending.add(seq)
            if len(self._issued) > 2 * len(self._pending) + 16:  # forget committed ops now and then
                self._issued = {s: t for s, t in self._issued.items() if s in self._pending}
            self._issued[seq] = time.monotonic()  # for the log: how long detection took
            return seq

    def quick_ready(self) -> bool:
        """The next collective may be numbered and posted without the checks a call in unusual times takes
        (under ``lock``): no agreement running or decided for this view, no late decision waiting, nothing
        suspended, this rank still a member."""
        return not (self._late or self.suspended or self.evicted or self.under_agreement(self.view.epoch))

    def late_decision(self, seq: int) -> Decision | None:
        """The decision that already settled op ``seq`` while this rank had not called it (it was
        late): the op takes that decision's verdict instead of being posted."""
        with self.lock:
            return self._late.pop(seq, None)

    def poll(self) -> None:
        """Act on control messages that have arrived (a peer's NACK) before posting: a rank that
        comes late learns that its peers are in the agreement before it sends anything.  At most once
        per ``_POLL_PERIOD_S``: a NACK also wakes the engine's thread, and one in flight can always
        arrive just after a poll, so a back-to-back call gains nothing from polling again."""
        now = time.monotonic()
        if now - self._polled_at < _POLL_PERIOD_S:
            return
        self._polled_at = now
        self._engine.progress()
        self._check_nacks()

    def try_commit(self, seq: int, epoch: int) -> bool:
        """A collective may return its result unless its epoch is under agreement, or a peer's NACK
        for it has arrived and the progress thread has not acted on it yet (the peer may be
        removing this rank: only the agreement can say)."""
        with self.lock:
            if not self._frozen and epoch == self.view.epoch and self._nacked():
                self.trouble(epoch)
            if self._frozen or epoch != self.view.epoch:
                return False
            self._pending.discard(seq)
            _add_to_runs(self._committed, seq)
            return True

    def settle(self, seq: int) -> None:
        """A collective ended another way (failed, or resolved by a decision)."""
        with self.lock:
            self._pending.discard(seq)

    def fail_local(self, seq: int, kind: VerdictKind, message: str) -> None:
        """Op ``seq`` failed on this rank with a verdict every member reaches on its own (ranks that
        disagree on a call all see every fingerprint); remembered so that a report of this epoch
        never counts it as committed and carries the verdict to a member that did not see it."""
        with self.lock:
            self._pending.discard(seq)
            self._failed_local[seq] = (kind, message, True)
            shared = [s for s, v in self._failed_local.items() if v[2]]
            if len(shared) > _MAX_FAILED_LOCAL:
                del self._failed_local[min(shared)]

    def reject(self, seq: int, message: str) -> None:
        """This rank rejected op ``seq`` locally: the members learn it through the agreement and
        fail the op with the same error (``message`` names this rank and its reason)."""
        with self.lock:
            self._pending.discard(seq)
            self._failed_local[seq] = (VerdictKind.REJECTED, message, False)
            epoch, frozen = self.view.epoch, self._frozen
        if not frozen:
            self.trouble(epoch)

    def has_pending(self) -> bool:
        with self.lock:
            return bool(self._pending)

    def decision(self, epoch: int) -> Decision | None:
        with self.lock:
            return self._decisions.get(epoch)

    def under_agreement(self, epoch: int) -> bool:
        with self.lock:
            return epoch in self._decisions or (epoch == self.view.epoch and self._frozen)

    def removed_error(self, name: str) -> MooncakeError:
        """What every call raises once this rank is out of the group."""
        if self._agreement_failed:
            return MooncakeError(f"{name}: {self.evicted}")
        return RemovedError(f"{name}: {self.evicted}", (self.rank,))

    # -- failures ------------------------------------------------------------------------------
    def trouble(self, epoch: int, suspects: frozenset[int] | set[int] = frozenset(),
                timed_out: int | None = None, slow: frozenset[int] | set[int] = frozenset()) -> None:
        """A collective of ``epoch`` cannot commit (op ``timed_out`` passed its deadline waiting on
        ``slow``; ``suspects`` were seen failing): freeze the epoch and start the agreement."""
        with self.lock:
            if self._closed or epoch != self.view.epoch or epoch in self._decisions:
                return
            self._suspects |= set(suspects) & set(self.view.active)
            if self._frozen:
                return
            if timed_out is not None:
                self._timed_out.add(timed_out)
                self._slow |= set(slow) & set(self.view.active)
            self._frozen = True
            now = time.monotonic()
            self._trouble_at = (now, min((self._issued.get(s, now) for s in self._pending), default=now))
            report = self._report(epoch)
            members = self.view.active
            self._send_nacks()
        threading.Thread(target=self._agree_then_kick, args=(report, members), daemon=True,
                         name=f"mooncake-agree-{epoch}").start()

    def _agree_then_kick(self, report: Report, members: tuple[int, ...]) -> None:
        try:
            self._agree(report, members)
        finally:
            self._engine.kick()  # Works awaiting this decision are advanced by the engine's thread

    def _report(self, epoch: int) -> Report:
        """This rank's evidence for ``epoch`` (under the lock)."""
        committed = tuple((a, b) for a, b in self._committed)
        failures = tuple((s, kind, message) for s, (kind, message, _) in sorted(self._failed_local.items()))
        self._failed_local = {s: (k, m, True) for s, (k, m, _) in self._failed_local.items()}
        return Report(epoch, self.rank, committed, self.next_seq, frozenset(self._suspects - {self.rank}),
                      frozenset(self._timed_out), frozenset(self._slow - {self.rank}), failures)

    def _agree(self, report: Report, members: tuple[int, ...]) -> None:
        faults.hit("during_agreement")
        try:
            self._store.report(report)
            decision = self._store.run(report.epoch, members, agreement_window_s(self._timeout_s()),
                                       self.seen_dead, self.suspended, self.keep_failed)
            if decision.joined and self._on_join is not None:   # addresses, admission records
                self._on_join(decision, self._store.proposal(report.epoch), self._store.raw)
        except MooncakeError as exc:
            decision = None
            error = exc
        retrouble = None
        with self.lock:
            if decision is None:
                self.evicted = str(error)
                self._agreement_failed = True
                log.logger.warning("rank %d: the failure agreement of epoch %d failed: %s", self.rank,
                                   report.epoch, error)
                self._decisions[report.epoch] = Decision(report.epoch + 1, (), members)
                return
            self._decisions[report.epoch] = decision
            if self.view.epoch != report.epoch:
                return
            self._frozen = False
            self._suspects.clear()
            if self.rank not in decision.active and self.rank in decision.left:
                self.evicted = (f"rank {self.rank} left the group at epoch {report.epoch}: it was "
                                "deactivated by a membership proposal (deactivate_ranks); it may come "
                                "back with join_group")
                return
            if self.rank not in decision.active:
                self.evicted = (f"rank {self.rank} was removed from the group by the survivors at "
                                f"epoch {report.epoch} (failed ranks {list(decision.failed)}): it did "
                                "not answer the failure agreement in time (dead, stalled, or blocked "
                                "in a call that held the GIL)")
                log.logger.warning("%s", self.evicted)
                return
            for seq in range(self.next_seq, decision.high):   # ops this rank has not called yet
                self._late[seq] = decision
            self.suspended = frozenset(decision.suspended)
            if decision.left or decision.joined or decision.proposal:
                self.joined_at = (decision, max(self.next_seq, decision.high))
            trouble_at, oldest = self._trouble_at
            log.view_change(self.rank, report.epoch, decision.epoch, members, decision.active, decision.failed,
                            detect_s=max(trouble_at - oldest, 0.0), agree_s=time.monotonic() - trouble_at,
                            why="nobody failed (an operation timed out or was rejected)")
            self._adopt(View(decision.epoch, self.capacity, decision.active))
            # a rejection made while this epoch's report was already out still has to reach the others
            if any(not reported for _, _, reported in self._failed_local.values()):
                retrouble = self.view.epoch
        if retrouble is not None:
            self.trouble(retrouble)

    def _adopt(self, view: View) -> None:
        self.view = view
        self._seen_dead.clear()
        self._timed_out.clear()
        self._slow.clear()
        self._failed_local = {s: v for s, v in self._failed_local.items() if not v[2]}
        self._committed = []
        self._watch_nacks()
        self._on_view(view)

    def set_view(self, view: View, next_seq: int | None = None) -> None:
        """Adopt a view chosen by the elastic protocol (recover / join) at an op boundary."""
        with self.lock:
            if next_seq is not None:
                self.next_seq = next_seq
            self._frozen = False
            self._suspects.clear()
            old = self.view
            if view.active != old.active:
                log.view_change(self.rank, old.epoch, view.epoch, old.active, view.active)
            else:
                log.logger.info("rank %d: capacity now %d (epoch %d)", self.rank, view.capacity, view.epoch)
            self._adopt(view)

    # -- manual mode, proposals, reconciliation (docs/semantics.md, "Manual membership") --------
    def suspended_error(self, name: str, view: View) -> PeerFailureError | None:
        """Manual mode: an op of a view that still holds suspended (failed) ranks fails at once, the
        same way on every member, since every member adopted the same decision."""
        if not self.suspended:
            return None
        ranks = tuple(sorted(self.suspended & set(view.active)))
        if not ranks or view.epoch != self.view.epoch:
            return None
        return PeerFailureError(f"{name}: rank(s) {list(ranks)} failed and are still in the view "
                                "(manual membership: auto_deactivate_on_failure=False); every "
                                "collective of this group fails until deactivate_ranks (or "
                                "activate_ranks, once they are reachable) settles them", ranks)

    def _wait_decision(self, epoch: int, deadline: float) -> Decision:
        while True:
            with self.lock:
                decision = self._decisions.get(epoch)
                if decision is not None and (self.view.epoch != epoch or self.evicted):
                    return decision
                frozen = self._frozen and self.view.epoch == epoch
            if not frozen and decision is None:
                self.trouble(epoch)
            if time.monotonic() > deadline:
                raise OpTimeoutError(f"no decision for epoch {epoch} of this group within the agreement's "
                                     "bounds (is the Store reachable?)", ())
            time.sleep(0.005)

    def _bound(self) -> float:
        return time.monotonic() + self._timeout_s() + agreement_window_s(self._timeout_s()) + 10.0

    def settle_agreement(self) -> None:
        """Wait out an agreement this rank is in (its decision adopted) before a proposal reads the view."""
        with self.lock:
            epoch, busy = self.view.epoch, self._frozen
        if busy:
            self._wait_decision(epoch, self._bound())

    def propose(self, kind: ProposalKind, ranks: tuple[int, ...], incarnations: tuple[int, ...] = (),
                check: Callable[[View], None] | None = None) -> tuple[Proposal, Decision, int, bool]:
        """Write a proposal for the current epoch (the first one written wins), start the epoch's
        agreement and wait for its decision; returns (the winning proposal, the decision, the epoch,
        whether the winner is this rank's proposal or an equivalent one).

        ``check(view)`` validates the proposal against the view it is written for (under the lock)."""
        deadline = self._bound()
        while True:
            self.settle_agreement()
            with self.lock:
                if self.evicted:
                    raise self.removed_error("membership proposal")
                if self._frozen:
                    continue
                if self._pending:
                    raise ArgumentError("a membership proposal must be made at an op boundary: wait for this "
                                        "group's collectives in flight first")
                if check is not None:
                    check(self.view)
                epoch = self.view.epoch
                mine = Proposal(epoch, self.rank, kind, tuple(ranks), int.from_bytes(os.urandom(8), "little") or 1,
                                self.next_seq, tuple(incarnations))
                try:
                    won = self._store.propose(mine)
                except Exception as exc:  # noqa: BLE001 - torch raises DistStoreError / RuntimeError
                    raise MooncakeError(f"membership proposal: the Store is unreachable ({exc})") from None
            self.trouble(epoch)
            decision = self._wait_decision(epoch, deadline)
            return won, decision, epoch, won.nonce == mine.nonce or won.same_change(mine)

    def sync(self) -> tuple[bool, str]:
        """``sync_after_failure``: settle what this rank knows of failures through the agreement.
        Returns (reconciled, reason): False with "" when nothing was pending, False with a reason when
        this rank can no longer take part."""
        with self.lock:
            if self.evicted:
                return False, self.evicted
            epoch, frozen = self.view.epoch, self._frozen
        evidence = self.seen_dead() - self.suspended
        if not frozen and not evidence:
            return False, ""
        if not frozen:
            self.trouble(epoch, evidence)
        self._wait_decision(epoch, self._bound())
        with self.lock:
            return True, self.evicted or ""

    def rejoin(self) -> None:
        """An evicted rank joins again in place (same process and group): forget the eviction; the
        admission's view comes through ``set_view``."""
        with self.lock:
            if self._agreement_failed:
                raise self.removed_error("join_group")
            self.evicted = None
            self._late.clear()
            self._pending.clear()
            self._failed_local.clear()
            self.suspended = frozenset()

    # -- NACK messages -------------------------------------------------------------------------
    def _nack_header(self, src: int, dst: int, epoch: int) -> Header:
        return Header(Kind.NACK, OpCode.NACK, self._group_key, src, dst, epoch, 0, 0)

    def _watch_nacks(self) -> None:
        epoch = self.view.epoch
        others = [r for r in self.view.active if r != self.rank]
        peers = self._peers(others)
        self._nacks_pending_at = None
        self._nacks = {r: self._engine.recv(peers[r], self._nack_header(r, self.rank, epoch).tag(),
                                            np.empty(HEADER_BYTES, np.uint8)) for r in others}
        self._nack_epoch = epoch
        self._engine.keep_alive(list(self._nacks.values()))

    def _repost_nack(self, r: int, reason: str) -> None:
        """A message on rank r's NACK tag that is no NACK of this group (oversized, or unsigned with
        a job secret): drop it, log once, listen again.  It is no evidence that r failed."""
        auth.drop(f"a sender posing as rank {r} (group {self._group_key}, NACK, epoch {self._nack_epoch})", reason)
        header = self._nack_header(r, self.rank, self._nack_epoch)
        self._nacks_pending_at = None
        self._nacks[r] = self._engine.recv(self._peers([r])[r], header.tag(), np.empty(HEADER_BYTES, np.uint8))
        self._engine.keep_alive([self._nacks[r]])

    def _send_nacks(self) -> None:
        others = [r for r in self.view.active if r != self.rank]
        peers = self._peers(others)
        requests = []
        for r in others:
            header = self._nack_header(self.rank, r, self.view.epoch)
            buffer = np.empty(HEADER_BYTES, np.uint8)
            header.pack_into(memoryview(buffer))
            if self._auth is not None:
                self._auth.sign(buffer, control=True)
            requests.append(self._engine.send(peers[r], header.tag(), buffer))
        self._engine.keep_alive(requests)

    def seen_dead(self) -> frozenset[int]:
        """Members of the current view whose connection or NACK channel broke (process gone)."""
        self._engine.progress()
        self._check_nacks()
        with self.lock:
            closed = {r for r in self.view.active
                      if r != self.rank and not self._engine.peer_alive(self._addresses[r])}
            self._seen_dead |= closed
            return frozenset(self._seen_dead)

    def _check_nacks(self) -> None:
        """Engine watch: a peer's NACK pulls this rank into the agreement (even when idle); a
        broken NACK channel is evidence that the peer died."""
        with self.lock:
            if self._closed:
                return
            nacked = self._nacked()
            epoch, frozen = self.view.epoch, self._frozen
        if nacked and not frozen:
            self.trouble(epoch)

    def _nacked(self) -> bool:
        """Whether a peer's NACK of this epoch arrived; records peers whose NACK channel broke.  A
        receive completes only in a progress of the engine: none since a look that found every NACK
        receive pending means none arrived."""
        progressed = getattr(self._engine, "progressed", None)
        if progressed is not None and progressed == self._nacks_pending_at:
            self._suspects |= self._seen_dead  # (seen_dead() may have added peers meanwhile)
            return False
        nacked = False
        pending = True
        for r, req in list(self._nacks.items()):
            if req.completed:
                pending = False
                error = req.error()
                if error is None:
                    if self._auth is None:
                        nacked = True
                    elif not self._auth.verify(req.buffer, HEADER_BYTES, control=True):
                        self._repost_nack(r, "bad or missing MAC")
                    elif Header.unpack(memoryview(req.buffer)) != self._nack_header(r, self.rank, self._nack_epoch):
                        self._repost_nack(r, "replayed NACK (another epoch or pair of ranks)")
                    else:
                        nacked = True
                elif _TRUNCATED and isinstance(error, _TRUNCATED):
                    self._repost_nack(r, "oversized message")
                else:
                    self._seen_dead.add(r)
        self._suspects |= self._seen_dead
        self._nacks_pending_at = progressed if pending else None
        return nacked

    def close(self) -> None:
        """Leave: report this view's commits first, naming this rank among the suspects (it leaves),
        so that a slower peer whose agreement finds this rank gone still learns which ops stand
        instead of counting it silent and re-running an op it committed."""
        report = None
        with self.lock:
            if not self._closed and not self._frozen and self.evicted is None and len(self.view.active) > 1:
                report = dataclasses.replace(self._report(self.view.epoch), suspects=frozenset({self.rank}))
            self._closed = True
        self._engine.remove_watch(self._check_nacks)
        if report is not None:
            try:
                self._store.report(report)
            except Exception:  # noqa: BLE001 - the Store may be gone already; leaving goes on
                pass
        conn = auth.raw_store(self._store.raw)
        if isinstance(conn, BoundedStore):
            conn.close()
