"""A group's membership over time: the current view, the collectives in flight, the NACK watch and
the failure agreement (control/agreement.py) that moves every survivor to the same next view.

Lock order: a Work's lock may be held while taking the membership lock, never the reverse; the
agreement thread takes only the membership lock and publishes decisions, which Works pick up on
their next advance.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

import numpy as np

from ..control import faults
from ..control.agreement import Decision, Report, StoreAgreement
from ..control.errors import MooncakeError
from ..control.view import View
from ..control.wire import HEADER_BYTES, Header, Kind, OpCode

FAILURE_MODES = ("complete", "raise")


def agreement_window_s(timeout_s: float) -> float:
    """How long an agreement waits for silent members' reports: live members answer a NACK from
    their progress thread within milliseconds, so a fraction of the group timeout is plenty."""
    return min(max(timeout_s / 2, 2.0), 30.0)


class Membership:
    """Views, pending collectives and agreement for one group on one rank."""

    def __init__(self, *, rank: int, capacity: int, view: View, store, prefix: str, engine,
                 peers: Callable, addresses: dict[int, bytes], group_key: int, timeout_s: Callable[[], float],
                 failure_mode: str, on_view: Callable[[View], None]):
        self.rank, self.capacity = rank, capacity
        self.view = view
        self.failure_mode = failure_mode
        self.lock = threading.RLock()
        self.next_seq = 0
        self.evicted: str | None = None
        self._store = StoreAgreement(store, prefix)
        self._engine, self._peers, self._group_key = engine, peers, group_key
        self._addresses = addresses
        self._timeout_s = timeout_s
        self._on_view = on_view
        self._pending: set[int] = set()            # seqs of collectives not committed yet
        self._frozen = False                       # this epoch's report is out: commit nothing more
        self._decisions: dict[int, Decision] = {}  # old epoch -> its decision
        self._suspects: set[int] = set()
        self._seen_dead: set[int] = set()          # members whose NACK channel broke
        self._nacks: dict[int, object] = {}       # peer -> posted NACK receive of this epoch
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
            return seq

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
            return True

    def settle(self, seq: int) -> None:
        """A collective ended another way (failed, or resolved by a decision)."""
        with self.lock:
            self._pending.discard(seq)

    def has_pending(self) -> bool:
        with self.lock:
            return bool(self._pending)

    def decision(self, epoch: int) -> Decision | None:
        with self.lock:
            return self._decisions.get(epoch)

    def under_agreement(self, epoch: int) -> bool:
        with self.lock:
            return epoch in self._decisions or (epoch == self.view.epoch and self._frozen)

    # -- failures ------------------------------------------------------------------------------
    def trouble(self, epoch: int, suspects: frozenset[int] | set[int] = frozenset()) -> None:
        """A collective of ``epoch`` cannot commit: freeze the epoch and start the agreement."""
        with self.lock:
            if self._closed or epoch != self.view.epoch or epoch in self._decisions:
                return
            self._suspects |= set(suspects) & set(self.view.active)
            if self._frozen:
                return
            self._frozen = True
            pending = sorted(self._pending)
            low = pending[0] if pending else self.next_seq
            extra = frozenset(s for s in range(low, self.next_seq) if s not in self._pending)
            report = Report(epoch, self.rank, low, extra, frozenset(self._suspects - {self.rank}))
            members = self.view.active
            self._send_nacks()
        threading.Thread(target=self._agree, args=(report, members), daemon=True,
                         name=f"mooncake-agree-{epoch}").start()

    def _agree(self, report: Report, members: tuple[int, ...]) -> None:
        faults.hit("during_agreement")
        try:
            self._store.report(report)
            decision = self._store.run(report.epoch, members, agreement_window_s(self._timeout_s()),
                                       self.seen_dead)
        except MooncakeError as exc:
            decision = None
            error = exc
        with self.lock:
            if decision is None:
                self.evicted = str(error)
                self._decisions[report.epoch] = Decision(report.epoch + 1, (), members, 0, frozenset())
                return
            self._decisions[report.epoch] = decision
            if self.view.epoch != report.epoch:
                return
            self._frozen = False
            self._suspects.clear()
            if self.rank not in decision.active:
                self.evicted = (f"rank {self.rank} was removed from the group by the survivors at "
                                f"epoch {report.epoch} (failed ranks {list(decision.failed)}): it did "
                                "not answer the failure agreement in time")
                return
            self._adopt(View(decision.epoch, self.capacity, decision.active))

    def _adopt(self, view: View) -> None:
        self.view = view
        self._seen_dead.clear()
        self._watch_nacks()
        self._on_view(view)

    def set_view(self, view: View, next_seq: int | None = None) -> None:
        """Adopt a view chosen by the elastic protocol (recover / join) at an op boundary."""
        with self.lock:
            if next_seq is not None:
                self.next_seq = next_seq
            self._frozen = False
            self._suspects.clear()
            self._adopt(view)

    # -- NACK messages -------------------------------------------------------------------------
    def _nack_header(self, src: int, dst: int, epoch: int) -> Header:
        return Header(Kind.NACK, OpCode.NACK, self._group_key, src, dst, epoch, 0, 0)

    def _watch_nacks(self) -> None:
        epoch = self.view.epoch
        others = [r for r in self.view.active if r != self.rank]
        peers = self._peers(others)
        self._nacks = {r: self._engine.recv(peers[r], self._nack_header(r, self.rank, epoch).tag(),
                                            np.empty(HEADER_BYTES, np.uint8)) for r in others}
        self._engine.keep_alive(list(self._nacks.values()))

    def _send_nacks(self) -> None:
        others = [r for r in self.view.active if r != self.rank]
        peers = self._peers(others)
        requests = []
        for r in others:
            header = self._nack_header(self.rank, r, self.view.epoch)
            buffer = np.empty(HEADER_BYTES, np.uint8)
            header.pack_into(memoryview(buffer))
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
        """Whether a peer's NACK of this epoch arrived; records peers whose NACK channel broke."""
        nacked = False
        for r, req in self._nacks.items():
            if req.completed:
                if req.error() is None:
                    nacked = True
                else:
                    self._seen_dead.add(r)
        self._suspects |= self._seen_dead
        return nacked

    def close(self) -> None:
        with self.lock:
            self._closed = True
        self._engine.remove_watch(self._check_nacks)
