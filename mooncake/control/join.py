"""Joining: the Store records a joiner and the healthy ranks exchange (docs/semantics.md, "Joining").

* ``join/request/{rank}``  written by ``join_group`` on the joiner: who it is (an incarnation id,
  new for every process, so a request left by a dead predecessor is never mistaken for a live
  one), its capacity and its UCX address.  ``get_peer_state`` reads it.
* ``join/admit/{rank}/{incarnation}``  written by ``recover_ranks`` on every healthy rank (the
  first write wins; the others must match it): the view the joiner enters and the sequence
  number of its first collective.
* ``view``  the latest epoch any member adopted; a founding rank that finds it set knows the
  group is already running and must join instead.

All records are fixed little-endian structs (no pickle).
"""

from __future__ import annotations

import dataclasses
import struct

from .errors import WireError
from .wire import MAX_RANKS

_REQUEST = struct.Struct("<IQHH")   # magic, incarnation, capacity, world_size; then the address
_ADMIT = struct.Struct("<IIIH")     # magic, epoch, next seq, capacity; then the active mask
_MAGIC_REQUEST = 0x4A4F494E        # "JOIN"
_MAGIC_ADMIT = 0x41444D54          # "ADMT"


@dataclasses.dataclass(frozen=True)
class JoinRequest:
    incarnation: int
    capacity: int
    world_size: int
    address: bytes

    def encode(self) -> bytes:
        return _REQUEST.pack(_MAGIC_REQUEST, self.incarnation, self.capacity, self.world_size) + self.address

    @classmethod
    def decode(cls, data: bytes) -> "JoinRequest":
        if len(data) < _REQUEST.size or _REQUEST.unpack_from(data)[0] != _MAGIC_REQUEST:
            raise WireError("malformed join request record in the Store")
        _, incarnation, capacity, world_size = _REQUEST.unpack_from(data)
        return cls(incarnation, capacity, world_size, bytes(data[_REQUEST.size:]))


@dataclasses.dataclass(frozen=True)
class Admission:
    epoch: int
    next_seq: int
    capacity: int
    active: tuple[int, ...]

    def encode(self) -> bytes:
        mask = bytearray(MAX_RANKS)
        for r in self.active:
            mask[r] = 1
        return _ADMIT.pack(_MAGIC_ADMIT, self.epoch, self.next_seq, self.capacity) + bytes(mask)

    @classmethod
    def decode(cls, data: bytes) -> "Admission":
        if len(data) != _ADMIT.size + MAX_RANKS or _ADMIT.unpack_from(data)[0] != _MAGIC_ADMIT:
            raise WireError("malformed join admission record in the Store")
        _, epoch, next_seq, capacity = _ADMIT.unpack_from(data)
        active = tuple(i for i, v in enumerate(data[_ADMIT.size:]) if v)
        return cls(epoch, next_seq, capacity, active)


def request_key(prefix: str, rank: int) -> str:
    return f"{prefix}/join/request/{rank}"


def admit_key(prefix: str, rank: int, incarnation: int) -> str:
    return f"{prefix}/join/admit/{rank}/{incarnation}"


def view_key(prefix: str) -> str:
    return f"{prefix}/view"
