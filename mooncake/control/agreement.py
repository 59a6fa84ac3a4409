"""Failure agreement: survivors of a view decide, through the Store, who failed and which of the
view's operations stand.

Why it works (docs/semantics.md, "Failures"): every collective ends with a DONE round, and a rank
commits an operation only with DONE from every other active rank.  So one rank's commit proves
that every rank held every payload of that operation.  When a rank cannot commit (a peer's
connection broke, a deadline passed, or a peer's NACK arrived), it stops committing anything of
its epoch, tells every peer (NACK), and writes a *report* to the Store: which peers it suspects,
and which operations of the epoch it committed.  Every live member reports, either from a stuck
operation or from its progress thread on a NACK.  A *decision* is made once every member that
nobody suspects has reported (those that stay silent past the window count as failed): failed =
suspects + silent members; an operation stands if any reporter committed it, and every other
operation of the epoch is re-run under the new view (or raises, in framework-managed mode).  The
first decision written wins (``compare_set``), so all survivors adopt the same one.

Reports and decisions are fixed little-endian structs with rank masks of MAX_RANKS bytes (so a
capacity mismatch cannot garble them): nothing read from the Store is unpickled.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from typing import Callable, Iterable

from .errors import MooncakeError, WireError
from .wire import MAX_RANKS

_REPORT = struct.Struct("<IIHIH")    # magic, epoch, rank, low, number of extra committed seqs
_DECISION = struct.Struct("<IIIH")   # magic, new epoch, low, number of extra committed seqs
_MAGIC_REPORT = 0x52455054          # "REPT"
_MAGIC_DECISION = 0x44454349        # "DECI"
POLL_S = 0.005


@dataclasses.dataclass(frozen=True)
class Report:
    """One member's evidence for ``epoch``: every op with seq < ``low`` or in ``extra`` committed
    here; ``suspects`` are the peers it saw fail or time out."""

    epoch: int
    rank: int
    low: int
    extra: frozenset[int]
    suspects: frozenset[int]

    def encode(self) -> bytes:
        return (_REPORT.pack(_MAGIC_REPORT, self.epoch, self.rank, self.low, len(self.extra))
                + _mask(self.suspects) + b"".join(struct.pack("<I", s) for s in sorted(self.extra)))

    @classmethod
    def decode(cls, data: bytes) -> "Report":
        magic, epoch, rank, low, num_extra = _unpack(_REPORT, data, _MAGIC_REPORT, "report")
        suspects = _unmask(data[_REPORT.size:_REPORT.size + MAX_RANKS])
        extra = _seqs(data[_REPORT.size + MAX_RANKS:], num_extra)
        return cls(epoch, rank, low, extra, suspects)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The survivors' verdict on one epoch: the next view and which of the epoch's ops stand."""

    epoch: int                 # the new view's epoch
    active: tuple[int, ...]
    failed: tuple[int, ...]
    low: int                   # ops with seq < low stand...
    extra: frozenset[int]      # ...and so do these

    def committed(self, seq: int) -> bool:
        return seq < self.low or seq in self.extra

    def encode(self) -> bytes:
        return (_DECISION.pack(_MAGIC_DECISION, self.epoch, self.low, len(self.extra))
                + _mask(self.active) + _mask(self.failed)
                + b"".join(struct.pack("<I", s) for s in sorted(self.extra)))

    @classmethod
    def decode(cls, data: bytes) -> "Decision":
        magic, epoch, low, num_extra = _unpack(_DECISION, data, _MAGIC_DECISION, "decision")
        base = _DECISION.size
        active = tuple(sorted(_unmask(data[base:base + MAX_RANKS])))
        failed = tuple(sorted(_unmask(data[base + MAX_RANKS:base + 2 * MAX_RANKS])))
        return cls(epoch, active, failed, low, _seqs(data[base + 2 * MAX_RANKS:], num_extra))


def _suspects(reports: dict[int, Report], seen_dead: Iterable[int]) -> set[int]:
    return set(seen_dead).union(*(r.suspects for r in reports.values()))


def decide(epoch: int, members: Iterable[int], reports: dict[int, Report],
           seen_dead: Iterable[int] = ()) -> Decision:
    """The verdict from the reports in hand (and the deciding rank's own evidence ``seen_dead``):
    failed = suspected or silent members; an op stands if any reporter committed it."""
    members = set(members)
    failed = (members - set(reports)) | (_suspects(reports, seen_dead) & members)
    alive = tuple(sorted(members - failed))
    low = max((r.low for r in reports.values()), default=0)
    extra = frozenset(s for r in reports.values() for s in r.extra if s >= low)
    return Decision(epoch + 1, alive, tuple(sorted(failed)), low, extra)


def ready_to_decide(members: Iterable[int], reports: dict[int, Report], seen_dead: Iterable[int] = ()) -> bool:
    """Every member that nobody suspects has reported."""
    suspects = _suspects(reports, seen_dead)
    return all(m in reports or m in suspects for m in members)


class StoreAgreement:
    """Runs one epoch's agreement for one rank through the Store (blocking; call off the
    caller's thread or with a deadline).  Keys live under ``{prefix}/agree/{epoch}/``."""

    def __init__(self, store, prefix: str):
        self._store, self._prefix = store, prefix

    def _key(self, epoch: int, what: str) -> str:
        return f"{self._prefix}/agree/{epoch}/{what}"

    def report(self, report: Report) -> None:
        self._store.set(self._key(report.epoch, f"report/{report.rank}"), report.encode())

    def decision(self, epoch: int) -> Decision | None:
        key = self._key(epoch, "decision")
        if not self._store.check([key]):
            return None
        return Decision.decode(self._store.get(key))

    def run(self, epoch: int, members: tuple[int, ...], window_s: float,
            seen_dead: Callable[[], Iterable[int]] = tuple) -> Decision:
        """Wait for the reports (at most ``window_s``; members ``seen_dead()`` reports dead are not
        waited for), then propose a decision; returns the one that won.  Raises MooncakeError
        when the Store itself is gone."""
        deadline = time.monotonic() + window_s
        reports: dict[int, Report] = {}
        try:
            while True:
                decided = self.decision(epoch)
                if decided is not None:
                    return decided
                for m in members:
                    key = self._key(epoch, f"report/{m}")
                    if m not in reports and self._store.check([key]):
                        reports[m] = Report.decode(self._store.get(key))
                dead = tuple(seen_dead())
                if ready_to_decide(members, reports, dead) or time.monotonic() >= deadline:
                    proposal = decide(epoch, members, reports, dead).encode()
                    won = self._store.compare_set(self._key(epoch, "decision"), "", proposal)
                    return Decision.decode(won)
                time.sleep(POLL_S)
        except (WireError, MooncakeError):
            raise
        except Exception as exc:  # torch raises DistStoreError / DistNetworkError / RuntimeError
            raise MooncakeError(f"failure agreement for epoch {epoch} could not reach the Store "
                                f"({type(exc).__name__}: {exc}); the group cannot recover without "
                                "it: host the Store in a process that outlives the ranks (a launcher "
                                "or service process, not rank 0)") from None


def _mask(ranks: Iterable[int]) -> bytes:
    mask = bytearray(MAX_RANKS)
    for r in ranks:
        mask[r] = 1
    return bytes(mask)


def _unmask(data: bytes) -> frozenset[int]:
    return frozenset(i for i, v in enumerate(data) if v)


def _seqs(data: bytes, count: int) -> frozenset[int]:
    if len(data) != 4 * count:
        raise WireError(f"agreement record holds {len(data)} bytes of sequence numbers, expected {4 * count}")
    return frozenset(struct.unpack(f"<{count}I", data)) if count else frozenset()


def _unpack(layout: struct.Struct, data: bytes, magic: int, what: str):
    if len(data) < layout.size:
        raise WireError(f"agreement {what} of {len(data)} bytes is too short")
    fields = layout.unpack_from(data)
    if fields[0] != magic:
        raise WireError(f"agreement {what} has bad magic 0x{fields[0]:08x}")
    return fields
