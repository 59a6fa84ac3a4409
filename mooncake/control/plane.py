"""What a data plane gives the control plane: the contract every implementation (ref, fast) keeps.

A plane moves one collective's bytes and does its math; the control plane (``mooncake.pg``)
numbers operations, applies deadlines, runs failure agreement and re-posts an operation under a
new view when the survivors decide so.  To make agreement possible, every collective ends with a
commit round: a rank that has every payload it needs tells every other active rank so ("DONE"),
and an operation is *committed* on a rank once its own data is complete and every other active
rank has said DONE.  A committed operation on any rank therefore proves that every rank holds
every payload it needs, which is what lets survivors agree on one outcome (docs/semantics.md,
"Failures").
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


@dataclasses.dataclass
class GroupInfo:
    """What a plane needs to open one group (handed over once the founders have rendezvoused)."""

    store: object              # the c10d Store (hosted outside the ranks for fault tolerance)
    key_prefix: str            # unique per group: prefix every Store key with it
    rank: int
    capacity: int              # slots: ranks are 0 .. capacity-1
    group_key: int             # 16-bit group id carried in wire tags
    timeout_s: float
    engine: object             # mooncake.ref.ucx.Engine, process-wide
    addresses: dict[int, bytes]  # UCX worker address of every rank known so far
    device: str                # "cpu" or "cuda": the device of the user's tensors


@dataclasses.dataclass(frozen=True)
class GraphCall:
    """A collective issued while the caller's stream is captured into a CUDA graph (docs/semantics.md,
    "CUDA graphs"), its arguments checked by the PG face; contiguous tensors on this rank's device.

    ``kind``: "all_reduce" and "broadcast" (``input`` is ``output``; ``root`` the broadcast's group rank),
    "reduce_scatter" (``input`` holds ``slots`` slots of ``output``'s size, slot r for rank r),
    "all_gather" (``output`` holds ``slots`` slots of ``input``'s size), "all_to_all" (``input`` and
    ``output`` both hold ``slots`` equal slots).  ``op``: the ``ReduceOp`` of the reducing kinds."""

    kind: str
    input: torch.Tensor
    output: torch.Tensor
    slots: int = 1
    op: int = 0
    root: int = -1


class PlaneOp(Protocol):
    """One collective posted on one rank."""

    data_complete: bool   # every payload this rank needs has arrived
    committed: bool       # data_complete here and DONE from every other active rank

    def progress(self) -> None:
        """Advance without blocking (may be a no-op when a background thread does it)."""

    def failed_peers(self) -> frozenset[int]:
        """Peers known dead (lost connection, dead process): evidence for agreement."""

    def pending_ranks(self) -> tuple[int, ...]:
        """Peers whose payload or DONE has not arrived yet."""

    def finish(self) -> None:
        """Write the outputs (only once data_complete); raises on malformed messages."""

    def abandon(self) -> None:
        """Give up on the operation: nothing that arrives later may reach the user's tensors."""


class PlaneGroup(Protocol):
    """A plane's per-group state.  Collective methods take validated contiguous tensors on the
    plane's device and an ``OpContext`` (view, seq, rank) and return a ``PlaneOp``."""

    def all_reduce(self, ctx, tensor: torch.Tensor, op) -> PlaneOp: ...
    def broadcast(self, ctx, tensor: torch.Tensor, root: int) -> PlaneOp: ...
    def reduce(self, ctx, tensor: torch.Tensor, op, root: int) -> PlaneOp: ...
    def all_gather(self, ctx, outputs: list[torch.Tensor], tensor: torch.Tensor) -> PlaneOp: ...
    def gather(self, ctx, outputs: list[torch.Tensor] | None, tensor: torch.Tensor, root: int) -> PlaneOp: ...
    def scatter(self, ctx, tensor: torch.Tensor, inputs: list[torch.Tensor] | None, root: int) -> PlaneOp: ...
    def reduce_scatter(self, ctx, output: torch.Tensor, inputs: list[torch.Tensor], op) -> PlaneOp: ...
    def all_to_all(self, ctx, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> PlaneOp: ...
    def barrier(self, ctx) -> PlaneOp: ...

    def add_ranks(self, addresses: dict[int, bytes]) -> None:
        """Ranks that joined (their UCX addresses); called before the first op that includes them."""

    def close(self) -> None:
        """Release every resource of the group (segments, buffers)."""
