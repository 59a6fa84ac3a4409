"""Wire format: a fixed, versioned 64-byte header followed by raw payload bytes, and 64-bit tags.

Nothing read from the network is ever unpickled or evaluated: a header is unpacked with ``struct``
and checked field by field against what the receiver expects before a single payload byte is used.

Tag layout (UCX matches on it; it must separate groups, sources, views and operations)::

    63..62 kind (collective, p2p, done, nack)   61..46 group key   45..38 source rank
    37..30 epoch (mod 256)   29..0  sequence (collective, done; 0 for nack) /
                                    user tag 14 bits + seq 16 bits (p2p)

Header bytes 40..56 are zero, or, with a job secret, the message's MAC (control/auth.py): a receiver
that has a secret drops every message whose MAC does not verify before it reads a single field.

``DONE`` ends every collective: a header-only message saying "I hold every payload of this op"
(see control/plane.py).  ``NACK`` is one header-only message per view: "I could not commit an
operation of this epoch; join the agreement" (see control/agreement.py).
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from .errors import WireError

MAGIC = 0x4D4F4F4E  # "MOON"
VERSION = 1
HEADER_BYTES = 64
_LAYOUT = struct.Struct("<IHBBIHHIQQBBH")  # 40 bytes used, zero-padded to HEADER_BYTES
MAX_RANKS = 256
MAX_P2P_TAG = (1 << 14) - 1


class Kind(enum.IntEnum):
    COLLECTIVE = 0
    P2P = 1
    DONE = 2
    NACK = 3


class OpCode(enum.IntEnum):
    """Operation names, numbered for the wire: a mismatch is reported, never silently mixed."""

    ALL_REDUCE = 1
    BROADCAST = 2
    REDUCE = 3
    ALL_GATHER = 4
    GATHER = 5
    SCATTER = 6
    REDUCE_SCATTER = 7
    ALL_TO_ALL = 8
    BARRIER = 9
    SEND = 10
    NACK = 11


@dataclasses.dataclass(frozen=True)
class Header:
    kind: Kind
    op: OpCode
    group_key: int
    src: int
    dst: int
    epoch: int
    seq: int
    num_bytes: int
    dtype_code: int = 0
    reduce_op: int = 0
    user_tag: int = 0  # p2p only

    def tag(self) -> int:
        """The 64-bit UCX tag this message travels under."""
        if self.kind is Kind.P2P:
            return p2p_tag(self.group_key, self.src, self.epoch, self.user_tag, self.seq)
        return collective_tag(self.group_key, self.src, self.epoch, self.seq, self.kind)

    def pack_into(self, buf: memoryview) -> None:
        _LAYOUT.pack_into(buf, 0, MAGIC, VERSION, self.kind, self.op, self.group_key, self.src,
                          self.dst, self.epoch, self.seq, self.num_bytes, self.dtype_code,
                          self.reduce_op, self.user_tag)
        buf[_LAYOUT.size:HEADER_BYTES] = bytes(HEADER_BYTES - _LAYOUT.size)

    @classmethod
    def unpack(cls, buf: memoryview) -> "Header":
        if len(buf) < HEADER_BYTES:
            raise WireError(f"message of {len(buf)} bytes is shorter than the {HEADER_BYTES}-byte header")
        (magic, version, kind, op, group_key, src, dst, epoch, seq, num_bytes, dtype_code,
         reduce_op, user_tag) = _LAYOUT.unpack_from(buf, 0)
        if magic != MAGIC:
            raise WireError(f"bad magic 0x{magic:08x}: not a mooncake message")
        if version != VERSION:
            raise WireError(f"wire version {version} from a peer, this rank speaks {VERSION}: "
                            "all ranks must run the same mooncake release")
        try:
            return cls(Kind(kind), OpCode(op), group_key, src, dst, epoch, seq, num_bytes,
                       dtype_code, reduce_op, user_tag)
        except ValueError as exc:
            raise WireError(f"malformed header: {exc}") from None

    def check_matches(self, expected: "Header") -> None:
        """Raise WireError naming the first field where this received header differs."""
        for field in ("kind", "group_key", "src", "dst", "epoch", "seq", "user_tag", "op",
                      "dtype_code", "reduce_op", "num_bytes"):
            got, want = getattr(self, field), getattr(expected, field)
            if got != want:
                raise WireError(_mismatch_message(field, got, want, self))


def _mismatch_message(field: str, got, want, header: Header) -> str:
    if field == "op":
        return (f"rank {header.src} called {OpCode(got).name.lower()} while this rank called "
                f"{OpCode(want).name.lower()}: every rank must issue the same collectives in the same order")
    if field == "num_bytes":
        return (f"rank {header.src} sent {got} bytes for {header.op.name.lower()} but this rank expects "
                f"{want}: tensor sizes must agree across ranks")
    if field == "dtype_code":
        return f"rank {header.src} used dtype code {got}, this rank {want}: dtypes must agree across ranks"
    if field == "reduce_op":
        return f"rank {header.src} used reduce op {got}, this rank {want}: reduce ops must agree across ranks"
    return f"header field {field} is {got}, expected {want}"


def collective_tag(group_key: int, src: int, epoch: int, seq: int,
                   kind: Kind = Kind.COLLECTIVE) -> int:
    return (int(kind) << 62) | ((group_key & 0xFFFF) << 46) | ((src & 0xFF) << 38) \
        | ((epoch & 0xFF) << 30) | (seq & 0x3FFFFFFF)


def p2p_tag(group_key: int, src: int, epoch: int, user_tag: int, seq: int) -> int:
    return (Kind.P2P << 62) | ((group_key & 0xFFFF) << 46) | ((src & 0xFF) << 38) \
        | ((epoch & 0xFF) << 30) | ((user_tag & MAX_P2P_TAG) << 16) | (seq & 0xFFFF)
