"""What one rank called, in a form every other rank can check before an operation commits.

Every collective carries a ``Fingerprint`` (op, dtype, reduce op, root, element count, slot count,
and for all_to_all the element count it sends to and expects from each slot).  Each plane makes
every rank see every other active rank's fingerprint before any output is written (ref: in the
DONE message; shared memory: in the lane's words), and each rank then computes ``mismatch`` over
the same fingerprints, so ranks that disagree on a call all raise ``MismatchError`` with the same
message, naming each side — never a timeout, never wrong data (docs/semantics.md).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Mapping

from ..model.reduce import CODE_DTYPES, ReduceOp
from .errors import WireError
from .wire import MAX_RANKS, OpCode

NO_DTYPE = 255
NO_ROOT = -1
_FIXED = struct.Struct("<BBBBhHQH")  # op, dtype, reduce op, has vectors, root, slots, numel, vector length
MAX_BYTES = _FIXED.size + 2 * 8 * MAX_RANKS


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """One rank's description of one collective call.  ``numel`` counts the elements of one
    slot (the tensor of all_reduce / broadcast / reduce, the input of all_gather / gather, the
    output of scatter / reduce_scatter); ``slots`` is the length of the slot lists every rank passes
    (all_gather, reduce_scatter, all_to_all; 0 where only a root has one).  ``sends[r]`` and
    ``recvs[r]`` (all_to_all only) are element counts sent to and expected from slot ``r``: they
    may differ between ranks, but rank a's ``sends[b]`` must equal rank b's ``recvs[a]``."""

    op: OpCode
    dtype_code: int = NO_DTYPE
    reduce_op: int = 0
    root: int = NO_ROOT
    numel: int = 0
    slots: int = 0
    sends: tuple[int, ...] = ()
    recvs: tuple[int, ...] = ()

    def __hash__(self) -> int:  # kept: a fingerprint keys the device path's launch cache on every call
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((int(self.op), self.dtype_code, self.reduce_op, self.root, self.numel, self.slots,
                      self.sends, self.recvs))
            self.__dict__["_hash"] = h
        return h

    def common(self) -> tuple:
        """The fields every rank must agree on."""
        return (self.op, self.dtype_code, self.reduce_op, self.root, self.numel, self.slots)

    def describe(self) -> str:
        parts = [self.op.name.lower()]
        args = []
        if self.dtype_code != NO_DTYPE:
            dtype = CODE_DTYPES.get(self.dtype_code)
            args.append(str(dtype).replace("torch.", "") if dtype is not None else f"dtype {self.dtype_code}")
        if self.op in (OpCode.ALL_TO_ALL,):
            args.append(f"{self.slots} slots")
        elif self.op is not OpCode.BARRIER:
            args.append(f"{self.numel} elements" + (f" x {self.slots} slots" if self.slots else ""))
        if self.op in (OpCode.ALL_REDUCE, OpCode.REDUCE, OpCode.REDUCE_SCATTER):
            args.append(ReduceOp(self.reduce_op).name if self.reduce_op in ReduceOp._value2member_map_
                        else f"reduce op {self.reduce_op}")
        if self.root != NO_ROOT:
            args.append(f"root {self.root}")
        return parts[0] + (f"({', '.join(args)})" if args else "")

    def encode(self) -> bytes:
        vectors = bool(self.sends or self.recvs)
        length = max(len(self.sends), len(self.recvs))
        out = _FIXED.pack(int(self.op), self.dtype_code, self.reduce_op, int(vectors), self.root,
                          self.slots, self.numel, length)
        if vectors:
            out += struct.pack(f"<{length}Q", *_padded(self.sends, length))
            out += struct.pack(f"<{length}Q", *_padded(self.recvs, length))
        return out

    @classmethod
    def decode(cls, data: bytes, source: str) -> "Fingerprint":
        """Decode a peer's fingerprint; anything malformed raises ``WireError`` naming ``source``."""
        if len(data) < _FIXED.size:
            raise WireError(f"{source}: a fingerprint of {len(data)} bytes is too short")
        op, dtype, redop, vectors, root, slots, numel, length = _FIXED.unpack_from(data)
        if op not in OpCode._value2member_map_ or vectors > 1 or length > MAX_RANKS:
            raise WireError(f"{source}: malformed fingerprint")
        want = _FIXED.size + (16 * length if vectors else 0)
        if len(data) != want:
            raise WireError(f"{source}: a fingerprint of {len(data)} bytes, expected {want}")
        sends = recvs = ()
        if vectors:
            sends = struct.unpack_from(f"<{length}Q", data, _FIXED.size)
            recvs = struct.unpack_from(f"<{length}Q", data, _FIXED.size + 8 * length)
        return cls(OpCode(op), dtype, redop, root, numel, slots, tuple(sends), tuple(recvs))


def _padded(values: tuple[int, ...], length: int) -> tuple[int, ...]:
    return tuple(values) + (0,) * (length - len(values))


def mismatch(seq: int, fingerprints: Mapping[int, Fingerprint]) -> str | None:
    """Why the ranks' calls of op ``seq`` disagree (the same text on every rank that sees the same
    fingerprints), or None when they agree."""
    ranks = sorted(fingerprints)
    groups: dict[tuple, list[int]] = {}
    for r in ranks:
        groups.setdefault(fingerprints[r].common(), []).append(r)
    if len(groups) > 1:
        sides = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {_ranks(rs)} called "
                          f"{fingerprints[rs[0]].describe()}" for rs in groups.values())
        return (f"op {seq}: the ranks called different collectives or arguments: {sides} (every rank "
                "must issue the same collectives, with the same arguments, in the same order)")
    problems = []
    for a in ranks:
        for b in ranks:
            fa, fb = fingerprints[a], fingerprints[b]
            if a == b or not (fa.sends or fb.recvs):
                continue
            sent = fa.sends[b] if b < len(fa.sends) else 0
            expected = fb.recvs[a] if a < len(fb.recvs) else 0
            if sent != expected:
                problems.append(f"rank {a} sends {sent} elements to rank {b}, which expects {expected}")
    if problems:
        return (f"op {seq}: {fingerprints[ranks[0]].describe()} split sizes disagree: "
                + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return None


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def variant_mismatch(seq: int, variants: Mapping[int, int]) -> str | None:
    """Why ranks that agree on the call disagree on the plane's algorithm for it, or None."""
    if len(set(variants.values())) <= 1:
        return None
    sides = "; ".join(f"rank(s) {_ranks(sorted(r for r, v in variants.items() if v == value))} use "
                      f"algorithm {value}" for value in sorted(set(variants.values())))
    return (f"op {seq}: the ranks chose different algorithms for the same call ({sides}): the data plane's "
            "tuning environment variables (MOONCAKE_FAST_*) must agree across ranks")


class LaneWords:
    """Where a shared-memory plane keeps a call's fingerprint among a lane's int64 words: ``meta``
    (op | dtype << 8 | reduce op << 16 | (root + 1) << 24 | variant << 40), ``numel``, ``slots``,
    and from ``vectors`` the sends then the recvs (``capacity`` words each)."""

    def __init__(self, meta: int, numel: int, slots: int, vectors: int, capacity: int):
        self.meta, self.numel, self.slots, self.vectors, self.capacity = meta, numel, slots, vectors, capacity

    @staticmethod
    def head(fp: Fingerprint, variant: int = 0) -> tuple[int, int, int]:
        """The ``meta``, ``numel`` and ``slots`` words of a call (all of it but the all_to_all vectors)."""
        return (int(fp.op) | fp.dtype_code << 8 | fp.reduce_op << 16 | (fp.root + 1) << 24 | variant << 40,
                fp.numel, fp.slots)

    def write(self, ctl, base: int, fp: Fingerprint, variant: int = 0) -> None:
        ctl[base + self.meta], ctl[base + self.numel], ctl[base + self.slots] = self.head(fp, variant)
        at = base + self.vectors
        for i, (sent, expected) in enumerate(zip(fp.sends, fp.recvs)):
            ctl[at + i] = sent
            ctl[at + self.capacity + i] = expected

    def read(self, ctl, base: int) -> tuple[Fingerprint, int]:
        """A peer's fingerprint and variant as its words say (unknown values kept, so that they
        differ from any real call's)."""
        meta = int(ctl[base + self.meta])
        slots = int(ctl[base + self.slots])
        code = meta & 0xFF
        op = OpCode(code) if code in OpCode._value2member_map_ else OpCode.NACK
        n = slots if op is OpCode.ALL_TO_ALL and 0 < slots <= self.capacity else 0
        at = base + self.vectors
        fp = Fingerprint(op, meta >> 8 & 0xFF, meta >> 16 & 0xFF, ((meta >> 24) & 0xFFFF) - 1,
                         int(ctl[base + self.numel]), slots,
                         tuple(int(ctl[at + i]) for i in range(n)),
                         tuple(int(ctl[at + self.capacity + i]) for i in range(n)))
        return fp, meta >> 40 & 0xFF

    def verdict(self, seq: int, base: int, me: int, mine: Fingerprint, variant: int, peer_ctls) -> str | None:
        """The mismatch of op ``seq`` (``mismatch``, then ``variant_mismatch``) from this rank's own call
        and the words every peer published in its lane (``peer_ctls``: rank -> its words), or None."""
        prints, variants = {me: mine}, {me: variant}
        for r, ctl in peer_ctls.items():
            prints[r], variants[r] = self.read(ctl, base)
        return mismatch(seq, prints) or variant_mismatch(seq, variants)
