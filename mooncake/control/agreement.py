"""Failure agreement: the members of a view decide, through the Store, who failed and what became
of each of the view's operations — one verdict per operation, adopted by every member.

Why it works (docs/semantics.md, "One verdict per operation"): every collective ends with a DONE
round, and a rank commits an operation only with DONE from every other active rank.  So one rank's
commit proves that every rank held every payload of that operation.  When a rank cannot commit (a
peer's connection broke, a deadline passed, a peer's NACK arrived, or it rejected a call locally),
it stops committing anything of its epoch, tells every peer (NACK), and writes a *report* to the
Store: which operations of the epoch it committed, how far it got (``high``: the next sequence
number it would give), which operations timed out or failed on it for a reason every rank must
share (a local rejection), and which peers it saw fail.  Every live member reports, either from
a stuck operation or from its progress thread on a NACK.  A *decision* is made once every member
that nobody suspects has reported (those that stay silent past the window count as failed):

* failed = suspects + silent members; the next view is the rest;
* an operation stands (``committed``) if any reporter committed it;
* an operation that some reporter rejected fails everywhere with that rejection; one that timed
  out while every member is alive fails everywhere with ``OpTimeoutError`` naming the members
  that had not called it (``high`` <= its number) or that the timed-out ranks waited on;
* every other operation below ``high`` is run again under the new view — or, in the
  framework-managed mode, raises ``PeerFailureError`` when a member failed.

A member that reported ``high`` below an operation's number had not called it yet: when it does, it
takes the decided verdict without sending anything.  The first decision written wins
(``compare_set``), so every member adopts the same one.

Reports and decisions are fixed little-endian structs with rank masks of MAX_RANKS bytes (so a
capacity mismatch cannot garble them), validated field by field on decode: nothing read from the
Store is unpickled, and a malformed record raises ``WireError`` naming it.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import time
from typing import Callable, Iterable

from .auth import AuthError
from .errors import MooncakeError, WireError
from .wire import MAX_RANKS

_REPORT = struct.Struct("<IIHIIHH")      # magic, epoch, rank, high, #committed runs, #timed out, #failures
_DECISION = struct.Struct("<IIIIH")      # magic, new epoch, high, #committed runs, #verdicts
_MEMBERSHIP = struct.Struct("<BQI")      # flags, winning proposal's nonce (0: none), joiners' first seq
_PROPOSAL = struct.Struct("<IIHBQIH")    # magic, epoch, proposer, kind, nonce, proposer's next seq, #ranks
_PROPOSED = struct.Struct("<HQ")         # rank, incarnation of its join request (0: a member of the view)
_FAILURE = struct.Struct("<IBH")         # seq, kind, message length (then the message, UTF-8)
_VERDICT = struct.Struct("<IBH")         # seq, kind, message length (then a rank mask and the message)
_MAGIC_REPORT = 0x52455033               # "REP3"
_MAGIC_DECISION = 0x44454334             # "DEC4"
_MAGIC_PROPOSAL = 0x50524f31             # "PRO1"
KEEP_FAILED = 1                          # manual mode: failed members stay in the view, suspended
MAX_MESSAGE_BYTES = 1024
MAX_SEQ = (1 << 32) - 1
POLL_S = 0.005


class VerdictKind(enum.IntEnum):
    """Why an operation failed on every member (the exception class each one raises)."""

    REJECTED = 1   # a rank rejected the call locally: ArgumentError
    MISMATCH = 2   # the ranks called it with different arguments: MismatchError
    TIMEOUT = 3    # it did not complete in time although every member is alive: OpTimeoutError


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The shared outcome of one failed operation: its kind, the ranks at fault, and the cause
    (the same text on every member)."""

    kind: VerdictKind
    ranks: tuple[int, ...]
    message: str


Runs = tuple[tuple[int, int], ...]   # ascending, disjoint [start, end) ranges of sequence numbers


def runs_of(seqs: Iterable[int]) -> Runs:
    """Sequence numbers as ascending [start, end) runs."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return tuple((a, b) for a, b in out)


def in_runs(runs: Runs, seq: int) -> bool:
    return any(a <= seq < b for a, b in runs)


def merge_runs(*many: Runs) -> Runs:
    out: list[list[int]] = []
    for a, b in sorted(r for runs in many for r in runs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


@dataclasses.dataclass(frozen=True)
class Report:
    """One member's evidence for ``epoch``: the ops it committed in this epoch (``committed``
    runs); ``high``, the next seq this rank would give (it had not called any op from there);
    ``timed_out`` ops, which passed their deadline here still waiting on ``slow``; ``failures``,
    ops that failed here for a reason every member must share; ``suspects``, peers seen failed."""

    epoch: int
    rank: int
    committed: Runs
    high: int
    suspects: frozenset[int] = frozenset()
    timed_out: frozenset[int] = frozenset()
    slow: frozenset[int] = frozenset()
    failures: tuple[tuple[int, VerdictKind, str], ...] = ()   # (seq, kind, message), ascending seq

    def encode(self) -> bytes:
        out = [_REPORT.pack(_MAGIC_REPORT, self.epoch, self.rank, self.high, len(self.committed),
                            len(self.timed_out), len(self.failures)),
               _mask(self.suspects), _mask(self.slow), _pack_runs(self.committed), _pack_seqs(self.timed_out)]
        for seq, kind, message in self.failures:
            text = _text(message)
            out.append(_FAILURE.pack(seq, int(kind), len(text)) + text)
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes, what: str = "report") -> "Report":
        r = _Reader(data, what)
        magic, epoch, rank, high, num_runs, num_timed, num_failures = r.struct(_REPORT)
        if magic != _MAGIC_REPORT:
            raise WireError(f"agreement {what} has bad magic 0x{magic:08x}")
        if rank >= MAX_RANKS:
            raise WireError(f"agreement {what} names rank {rank}")
        suspects, slow = r.mask(), r.mask()
        committed, timed_out = r.runs(num_runs), r.seqs(num_timed)
        failures = []
        for _ in range(num_failures):
            seq, kind, length = r.struct(_FAILURE)
            failures.append((seq, _kind(kind, what), r.text(length)))
        r.end()
        return cls(epoch, rank, committed, high, suspects, timed_out, slow, tuple(failures))


class ProposalKind(enum.IntEnum):
    """What a membership proposal asks for (``deactivate_ranks`` / ``activate_ranks``)."""

    DEACTIVATE = 1
    ACTIVATE = 2


@dataclasses.dataclass(frozen=True)
class Proposal:
    """One rank's request to change the view of ``epoch``: written once per epoch with
    ``compare_set`` (the first proposal wins; the next agreement applies it), then carried out by
    that epoch's agreement like a failure, so every member adopts it at the same op boundary.
    ``incarnations`` pairs each activated rank outside the view with its join request (0 for a
    member: a suspended rank taken back in place)."""

    epoch: int
    rank: int
    kind: ProposalKind
    ranks: tuple[int, ...]
    nonce: int
    high: int = 0
    incarnations: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.incarnations:
            object.__setattr__(self, "incarnations", (0,) * len(self.ranks))

    def same_change(self, other: "Proposal") -> bool:
        return self.kind == other.kind and set(self.ranks) == set(other.ranks)

    def describe(self) -> str:
        verb = "deactivate" if self.kind is ProposalKind.DEACTIVATE else "activate"
        return f"rank {self.rank}'s proposal to {verb} rank(s) {list(self.ranks)} at epoch {self.epoch}"

    def encode(self) -> bytes:
        incarnations = self.incarnations or (0,) * len(self.ranks)
        return (_PROPOSAL.pack(_MAGIC_PROPOSAL, self.epoch, self.rank, int(self.kind), self.nonce, self.high,
                               len(self.ranks))
                + b"".join(_PROPOSED.pack(r, i) for r, i in zip(self.ranks, incarnations)))

    @classmethod
    def decode(cls, data: bytes, what: str = "proposal") -> "Proposal":
        r = _Reader(data, what)
        magic, epoch, rank, kind, nonce, high, count = r.struct(_PROPOSAL)
        if magic != _MAGIC_PROPOSAL:
            raise WireError(f"membership {what} has bad magic 0x{magic:08x}")
        try:
            kind = ProposalKind(kind)
        except ValueError:
            raise WireError(f"membership {what} names an unknown kind {kind}") from None
        pairs = [r.struct(_PROPOSED) for _ in range(count)]
        r.end()
        if rank >= MAX_RANKS or any(p >= MAX_RANKS for p, _ in pairs):
            raise WireError(f"membership {what} names a rank out of range")
        return cls(epoch, rank, kind, tuple(p for p, _ in pairs), nonce, high, tuple(i for _, i in pairs))


@dataclasses.dataclass(frozen=True)
class Decision:
    """The members' verdict on one epoch: the next view, which of the epoch's ops stand
    (``committed`` runs), which failed everywhere (``verdicts``), and ``high``: every op below it
    was called by some member in this epoch (the rest run again or, called late, take their
    verdict)."""

    epoch: int                 # the new view's epoch
    active: tuple[int, ...]
    failed: tuple[int, ...]
    committed_runs: Runs = ()
    high: int = 0
    verdicts: tuple[tuple[int, Verdict], ...] = ()   # (seq, verdict), ascending seq
    # membership changes (docs/semantics.md, "Manual membership and proposals")
    left: tuple[int, ...] = ()        # members deactivated by the winning proposal
    joined: tuple[int, ...] = ()      # ranks outside the view activated by it
    suspended: tuple[int, ...] = ()   # manual mode: failed ranks kept in the next view, every op fails
    proposal: int = 0                 # nonce of the proposal this decision applied (0: none)
    join_seq: int = 0                 # the first op of the joined ranks
    keep_failed: bool = False         # manual mode: ``failed`` stay in ``active``

    def committed(self, seq: int) -> bool:
        return in_runs(self.committed_runs, seq)

    def verdict(self, seq: int) -> Verdict | None:
        for s, v in self.verdicts:
            if s == seq:
                return v
        return None

    def encode(self) -> bytes:
        out = [_DECISION.pack(_MAGIC_DECISION, self.epoch, self.high, len(self.committed_runs),
                              len(self.verdicts)),
               _mask(self.active), _mask(self.failed), _pack_runs(self.committed_runs)]
        for seq, v in self.verdicts:
            text = _text(v.message)
            out.append(_VERDICT.pack(seq, int(v.kind), len(text)) + _mask(v.ranks) + text)
        out += [_MEMBERSHIP.pack(KEEP_FAILED if self.keep_failed else 0, self.proposal, self.join_seq),
                _mask(self.left), _mask(self.joined), _mask(self.suspended)]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes, members: Iterable[int] | None = None, what: str = "decision") -> "Decision":
        """Decode and validate; with ``members`` (the decided epoch's active set), the new view and
        the failed set must split exactly those ranks."""
        r = _Reader(data, what)
        magic, epoch, high, num_runs, num_verdicts = r.struct(_DECISION)
        if magic != _MAGIC_DECISION:
            raise WireError(f"agreement {what} has bad magic 0x{magic:08x}")
        active, failed = tuple(sorted(r.mask())), tuple(sorted(r.mask()))
        committed = r.runs(num_runs)
        verdicts = []
        for _ in range(num_verdicts):
            seq, kind, length = r.struct(_VERDICT)
            ranks = tuple(sorted(r.mask()))
            verdicts.append((seq, Verdict(_kind(kind, what), ranks, r.text(length))))
        flags, proposal, join_seq = r.struct(_MEMBERSHIP)
        left, joined, suspended = (tuple(sorted(r.mask())) for _ in range(3))
        r.end()
        if flags & ~KEEP_FAILED:
            raise WireError(f"agreement {what} has unknown flags 0x{flags:02x}")
        keep = bool(flags & KEEP_FAILED)
        if not set(suspended) <= set(active) or set(left) & set(joined):
            raise WireError(f"agreement {what} holds inconsistent membership changes")
        if members is not None:
            members = set(members)
            gone = set(left) | (set() if keep else set(failed))
            if (not set(failed) | set(left) <= members or set(joined) & members
                    or set(active) != (members - gone) | set(joined)):
                raise WireError(f"agreement {what} names active ranks {list(active)} and failed ranks "
                                f"{list(failed)}, which do not split the view's members {sorted(members)}")
        return cls(epoch, active, failed, committed, high, tuple(verdicts), left, joined, suspended, proposal,
                   join_seq, keep)


def _suspects(reports: dict[int, Report], seen_dead: Iterable[int]) -> set[int]:
    return set(seen_dead).union(*(r.suspects for r in reports.values()))


def decide(epoch: int, members: Iterable[int], reports: dict[int, Report],
           seen_dead: Iterable[int] = (), proposal: Proposal | None = None,
           suspended: Iterable[int] = (), keep_failed: bool = False) -> Decision:
    """The verdict from the reports in hand (and the deciding rank's own evidence ``seen_dead``).

    ``proposal`` (the epoch's winning membership proposal, if any) is applied on top of the
    failures: its deactivated ranks leave; its activated ranks join (those outside the view) or,
    suspended members that reported, are taken back.  With ``keep_failed`` (manual mode) failed
    members stay in the view, suspended (with ``suspended``, those already suspended), until a
    proposal removes or takes them back."""
    members = set(members)
    failed = (members - set(reports)) | (_suspects(reports, seen_dead) & members)
    left: set[int] = set()
    joined: set[int] = set()
    retake: set[int] = set()
    join_seq = applied = 0
    if proposal is not None and proposal.epoch == epoch:
        applied = proposal.nonce
        if proposal.kind is ProposalKind.DEACTIVATE:
            left = set(proposal.ranks) & members
        elif proposal.rank in reports:   # a proposer that vanished cannot vouch for its joiners
            joined = set(proposal.ranks) - members
            retake = (set(proposal.ranks) & members) - failed
            join_seq = reports[proposal.rank].high
        else:
            applied = 0
        if not members - left - (set() if keep_failed else failed):
            left, joined, retake, applied = set(), set(), set(), 0   # never an empty view: it lapses
    gone = left | (set() if keep_failed else failed)
    alive = tuple(sorted((members - gone) | joined))
    still = ((set(suspended) | failed) - retake - left) & set(alive) if keep_failed else set()
    committed = merge_runs(*(r.committed for r in reports.values()))
    high = max((r.high for r in reports.values()), default=0)
    verdicts = []
    for seq in sorted({s for r in reports.values() for s, _, _ in r.failures}
                      | {s for r in reports.values() for s in r.timed_out}):
        if seq >= high or in_runs(committed, seq):
            continue
        verdict = _failure_verdict(seq, reports) or (None if failed else _timeout_verdict(seq, members, reports))
        if verdict is not None:
            verdicts.append((seq, verdict))
    return Decision(epoch + 1, alive, tuple(sorted(failed)), committed, high, tuple(verdicts), tuple(sorted(left)),
                    tuple(sorted(joined)), tuple(sorted(still)), applied, join_seq, keep_failed)


def _failure_verdict(seq: int, reports: dict[int, Report]) -> Verdict | None:
    """A rejection (first by rank) wins over a mismatch: the rejecting rank raised its own reason."""
    found = sorted((kind, rank, message) for rank, r in reports.items()
                   for s, kind, message in r.failures if s == seq)
    if not found:
        return None
    kind, _, message = found[0]
    ranks = tuple(sorted({rank for k, rank, _ in found if k == kind}))
    return Verdict(kind, ranks, message)


def _timeout_verdict(seq: int, members: set[int], reports: dict[int, Report]) -> Verdict | None:
    timed = sorted(rank for rank, r in reports.items() if seq in r.timed_out)
    if not timed:
        return None
    late = tuple(sorted(m for m in members if m in reports and reports[m].high <= seq))
    if late:
        return Verdict(VerdictKind.TIMEOUT, late,
                       f"rank(s) {list(late)} had not called it when the group timeout passed on "
                       f"rank(s) {timed} (every rank is alive: a rank is late, or the ranks issue "
                       "collectives in different orders)")
    slow = tuple(sorted(set().union(*(reports[r].slow for r in timed)) & members))
    return Verdict(VerdictKind.TIMEOUT, slow,
                   f"every rank had called it, but it did not complete before the group timeout passed "
                   f"on rank(s) {timed}" + (f", which still waited on rank(s) {list(slow)}" if slow else "")
                   + " (every rank is alive: a rank was too slow or starved of CPU)")


def ready_to_decide(members: Iterable[int], reports: dict[int, Report], seen_dead: Iterable[int] = ()) -> bool:
    """Every member that nobody suspects has reported."""
    suspects = _suspects(reports, seen_dead)
    return all(m in reports or m in suspects for m in members)


class StoreAgreement:
    """Runs one epoch's agreement for one rank through the Store (blocking; call off the
    caller's thread or with a deadline).  Keys live under ``{prefix}/agree/{epoch}/``."""

    def __init__(self, store, prefix: str):
        self._store, self._prefix = store, prefix

    @property
    def raw(self):
        """The Store client itself (the agreement's own connection)."""
        return self._store

    def _key(self, epoch: int, what: str) -> str:
        return f"{self._prefix}/agree/{epoch}/{what}"

    def report(self, report: Report) -> None:
        self._store.set(self._key(report.epoch, f"report/{report.rank}"), report.encode())

    def propose(self, proposal: Proposal) -> Proposal:
        """Write ``proposal`` for its epoch unless one is there already; returns the one that won."""
        key = self._key(proposal.epoch, "proposal")
        record = proposal.encode()
        won = self._store.compare_set(key, "", record)
        return proposal if won == record else Proposal.decode(won, what=f"proposal in the Store at {key!r}")

    def proposal(self, epoch: int) -> Proposal | None:
        """The epoch's winning proposal; a malformed record counts as none (it never decides)."""
        key = self._key(epoch, "proposal")
        if not self._store.check([key]):
            return None
        try:
            proposal = Proposal.decode(self._store.get(key), what=f"proposal in the Store at {key!r}")
        except WireError:
            return None
        return proposal if proposal.epoch == epoch else None

    def _decode_decision(self, epoch: int, data: bytes, members) -> Decision:
        key = self._key(epoch, "decision")
        decision = Decision.decode(data, members, what=f"decision in the Store at {key!r}")
        if decision.epoch != epoch + 1:
            raise WireError(f"agreement decision in the Store at {key!r} is for epoch {decision.epoch - 1}, "
                            f"not {epoch}")
        return decision

    def decision(self, epoch: int, members) -> Decision | None:
        """The epoch's decision, None while there is none.  With a job secret, a record that is not
        signed for this key (forged, garbage, truncated, copied from another epoch) counts as none:
        ``run`` replaces it with an authentic decision."""
        key = self._key(epoch, "decision")
        if not self._store.check([key]):
            return None
        try:
            data = self._store.get(key)
        except AuthError:
            return None
        return self._decode_decision(epoch, data, members)

    def _report_of(self, epoch: int, member: int) -> Report | None:
        """A member's report, or None while absent.  A malformed one counts as absent (that member
        then counts as silent): garbage in the Store never decides for a rank."""
        key = self._key(epoch, f"report/{member}")
        if not self._store.check([key]):
            return None
        try:
            report = Report.decode(self._store.get(key), what=f"report in the Store at {key!r}")
        except WireError:
            return None
        return report if report.epoch == epoch and report.rank == member else None

    def run(self, epoch: int, members: tuple[int, ...], window_s: float,
            seen_dead: Callable[[], Iterable[int]] = tuple, suspended: Iterable[int] = (),
            keep_failed: bool = False) -> Decision:
        """Wait for the reports (at most ``window_s``; members ``seen_dead()`` reports dead are not
        waited for), then propose a decision; returns the one that won.  Raises MooncakeError
        when the Store itself is gone or holds a malformed decision."""
        deadline = time.monotonic() + window_s
        reports: dict[int, Report] = {}
        try:
            while True:
                decided = self.decision(epoch, members)
                if decided is not None:
                    return decided
                for m in members:
                    if m not in reports:
                        report = self._report_of(epoch, m)
                        if report is not None:
                            reports[m] = report
                dead = tuple(seen_dead())
                if ready_to_decide(members, reports, dead) or time.monotonic() >= deadline:
                    proposal = decide(epoch, members, reports, dead, self.proposal(epoch), suspended,
                                      keep_failed).encode()
                    won = self._store.compare_set(self._key(epoch, "decision"), "", proposal)
                    return self._decode_decision(epoch, won, members)
                time.sleep(POLL_S)
        except WireError as exc:
            raise MooncakeError(f"failure agreement for epoch {epoch}: {exc}; the group cannot agree "
                                "on its next view (was the Store written by another job or by hand?)") from None
        except MooncakeError:
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


def _pack_runs(runs: Runs) -> bytes:
    return b"".join(struct.pack("<II", a, b) for a, b in runs)


def _pack_seqs(seqs: Iterable[int]) -> bytes:
    seqs = sorted(seqs)
    return struct.pack(f"<{len(seqs)}I", *seqs)


def _text(message: str) -> bytes:
    return message.encode("utf-8")[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore").encode("utf-8")


def _kind(value: int, what: str) -> VerdictKind:
    try:
        return VerdictKind(value)
    except ValueError:
        raise WireError(f"agreement {what} names an unknown verdict kind {value}") from None


class _Reader:
    """Reads a record front to back; every read is bounds-checked and names the record."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = bytes(data), 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise WireError(f"agreement {self.what} of {len(self.data)} bytes is too short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def struct(self, layout: struct.Struct) -> tuple:
        return layout.unpack(self.take(layout.size))

    def mask(self) -> frozenset[int]:
        raw = self.take(MAX_RANKS)
        if any(v > 1 for v in raw):
            raise WireError(f"agreement {self.what} holds a malformed rank mask")
        return frozenset(i for i, v in enumerate(raw) if v)

    def seqs(self, count: int) -> frozenset[int]:
        return frozenset(struct.unpack(f"<{count}I", self.take(4 * count))) if count else frozenset()

    def runs(self, count: int) -> Runs:
        runs = tuple(struct.unpack("<II", self.take(8)) for _ in range(count))
        if any(a >= b for a, b in runs) or any(runs[i][1] > runs[i + 1][0] for i in range(len(runs) - 1)):
            raise WireError(f"agreement {self.what} holds malformed sequence ranges")
        return runs

    def text(self, length: int) -> str:
        if length > MAX_MESSAGE_BYTES:
            raise WireError(f"agreement {self.what} holds a message of {length} bytes")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"agreement {self.what} holds a message that is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"agreement {self.what} has {len(self.data) - self.pos} trailing bytes")
