"""``import mooncake.pg`` registers the torch.distributed backends ``mooncake-cpu`` (CPU tensors) and
``mooncake`` (CUDA tensors) and exposes the membership API.

Every function taking ``backend`` accepts the group object torch returns (``dist.group.WORLD`` or
a ``dist.new_group`` result), which for mooncake *is* the backend.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..control.errors import (ArgumentError, MooncakeError, NotApplicableError, OpTimeoutError,
                              PeerFailureError, WireError)
from .backend import MooncakeProcessGroup, RootInactiveError, create_cpu, create_cuda
from .options import MooncakeBackendOptions, get_device_filter, set_device_filter, set_host_ip, set_job_secret
from .membership import (ProposalResponse, ProposalStatus, SyncAfterFailureResponse, SyncAfterFailureStatus,
                         ViewUpdateStatus)
from .quick import QuickWork
from .work import ComposedWork, MooncakeWork
from . import elastic  # noqa: E402 - training through failures (mooncake-run, DDP hook, catch-up)
from .elastic import ddp_comm_hook, is_replacement

__all__ = [
    "MooncakeBackendOptions", "MooncakeProcessGroup", "MooncakeWork",
    "ArgumentError", "RootInactiveError", "MooncakeError", "NotApplicableError", "OpTimeoutError", "PeerFailureError",
    "WireError",
    "set_host_ip", "set_job_secret", "set_device_filter", "get_device_filter", "set_transfer_engine",
    "get_preferred_hca", "get_active_ranks", "get_num_synced_ranks", "get_capacity", "set_timeout",
    "get_implementation", "extend_group_size_to", "get_peer_state", "recover_ranks", "join_group",
    "activate_ranks", "deactivate_ranks", "sync_after_failure", "get_current_epoch", "get_local_success",
    "get_failed_ranks_hint", "ProposalStatus", "ViewUpdateStatus", "ProposalResponse", "SyncAfterFailureStatus",
    "SyncAfterFailureResponse", "mem_pool",
    "elastic", "ddp_comm_hook", "is_replacement",
]

dist.Backend.register_backend("mooncake-cpu", create_cpu, extended_api=True, devices=["cpu"])
dist.Backend.register_backend("mooncake", create_cuda, extended_api=True, devices=["cuda"])


def _backend(backend) -> MooncakeProcessGroup:
    group = dist.group.WORLD if backend is None else backend
    if not isinstance(group, MooncakeProcessGroup):
        raise ArgumentError(f"expected a mooncake process group (dist.group.WORLD or a dist.new_group "
                            f"result created with a mooncake backend), got {type(group).__name__}")
    return group


def get_active_ranks(backend) -> torch.Tensor:
    """The group's mask: int32 [capacity] on the backend's device, 1 = active.

    When ``active_ranks`` was passed in the options, this is that very tensor, kept up to date.
    """
    return _backend(backend).active_ranks_tensor()


def mem_pool() -> "torch.cuda.MemPool":
    """A ``torch.cuda.MemPool`` on the current device whose memory the other ranks on this host can map.

    An all_reduce of 1 MiB or more, in place, captured in a CUDA graph on the ``mooncake`` backend
    (``MOONCAKE_IMPL=fast``) runs on the ranks' tensors directly when every rank's tensor was allocated
    from such a pool (``with torch.cuda.use_mem_pool(pool): grads = torch.empty(...)``): each rank reads
    the message once and writes it once, with no copy through a staging buffer.  Other tensors work as
    before.  A segment the ranks' graphs read goes back to the device once every rank destroyed those graphs
    and dropped the pool, at the group's next collective.  The pool's memory is mapped for the current
    device only: use its tensors on that GPU (another GPU of this process cannot read them).  Raises
    ``MooncakeError`` where the CUDA library or shareable memory is unavailable.
    """
    from ..fast.cuda.pool import mem_pool as make
    return make()


def get_capacity(backend) -> int:
    """Number of rank slots (``max_world_size``, else the world size)."""
    return _backend(backend).capacity


def get_num_synced_ranks(backend) -> int:
    """Number of ranks in this rank's current view (collective among the active ranks:
    the MIN over them of their view size, so every caller returns the same number)."""
    group = _backend(backend)
    count = torch.tensor([len(group.view.active)], dtype=torch.int64, device=group._device())
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    group.allreduce([count], opts).wait()
    return int(count.item())


def extend_group_size_to(backend, size: int) -> None:
    """Reserve rank slots up to ``size`` (capacity); the new slots stay inactive until
    ``recover_ranks`` admits ranks into them.  Every active rank calls it at the same op boundary;
    ``size`` below the visible size or above 256 raises.  The ``active_ranks`` tensor given in the
    options is resized in place."""
    _backend(backend).extend_group_size_to(size)


def get_peer_state(backend, ranks: list[int]) -> list[bool]:
    """Collective among the active ranks (call it in the same order on all of them): for each of
    ``ranks``, True if it is active or has called ``join_group`` and can be admitted."""
    return _backend(backend).get_peer_state(ranks)


def recover_ranks(backend, ranks: list[int]) -> ProposalResponse:
    """Alias of ``activate_ranks`` (upstream keeps both names)."""
    return _backend(backend).recover_ranks(ranks)


def activate_ranks(backend, ranks: list[int]) -> ProposalResponse:
    """Propose that ``ranks`` enter the view: ranks that called ``join_group`` (joiners,
    replacements, a removed rank rejoining in place) or, in manual mode, suspended members that are
    reachable again.  Call it at an op boundary (no collective of this group in flight).  One call
    from any member suffices (the others adopt the change at the same op boundary through the
    agreement); several members may call it with the same ranks.  Returns a ``ProposalResponse``:
    ``status`` Applied / AppliedWithDroppedRanks (``dropped_ranks``: ranks found failed meanwhile or
    whose join request was left by a dead process) / Rejected (``reject_reason``: another
    proposal won the epoch), and ``new_epoch``."""
    return _backend(backend).activate_ranks(ranks)


def deactivate_ranks(backend, ranks: list[int]) -> ProposalResponse:
    """Propose that ``ranks`` leave the view (a rank may name itself to leave gracefully, then
    destroy its group).  Same rules and response as ``activate_ranks``; a deactivated rank's later
    calls raise ``RemovedError`` until it rejoins with ``join_group``."""
    return _backend(backend).deactivate_ranks(ranks)


def sync_after_failure(backend) -> SyncAfterFailureResponse:
    """Settle what this rank knows of failed peers through the failure agreement and adopt its
    decision before returning: ``Reconciled`` (an agreement ran, or was awaited), ``NoPending``
    (nothing to settle), ``Rejected`` (this rank was removed, or the Store is gone; see
    ``reject_reason``).  In manual mode the view keeps the failed ranks (suspended) afterwards."""
    return _backend(backend).sync_after_failure()


def get_current_epoch(backend) -> int:
    """The epoch of this rank's current view (increases by one at every view change)."""
    return _backend(backend).view.epoch


def _work(work):
    if not isinstance(work, (MooncakeWork, ComposedWork, QuickWork)):
        raise ArgumentError(f"expected a Work returned by a mooncake operation, got {type(work).__name__}")
    return work


def get_failed_ranks_hint(work) -> torch.Tensor:
    """Evidence, not a verdict: int32 0/1 per group rank (length: the group's capacity when the
    work belongs to a collective, else the highest rank named + 1), 1 for the peers this rank saw
    fail during the op (connection closed, still waited on at the deadline) or that the agreement
    found failed while it ran.  All zeros for an op that met no failure."""
    work = _work(work)
    ranks = work.failed_ranks_hint
    collective = getattr(work, "_collective", None)
    size = collective.membership.capacity if collective is not None else (max(ranks) + 1 if ranks else 0)
    mask = torch.zeros(max(size, max(ranks) + 1 if ranks else 0), dtype=torch.int32)
    for r in ranks:
        mask[r] = 1
    return mask


def get_local_success(work) -> bool:
    """True iff the op completed successfully on this rank and met no failed peer on the way
    (a result re-run over the survivors is correct but not a local success)."""
    work = _work(work)
    return bool(work.is_completed() and work.is_success() and not work.failed_ranks_hint)


def join_group(backend, timeout: timedelta | None = None) -> None:
    """On a rank started with ``is_extension=True``: ask to join, then block until the healthy
    ranks admit it with ``recover_ranks`` (at most ``timeout``, default the group timeout;
    ``OpTimeoutError`` after that).  Until it returns, this rank's collectives are local-only."""
    _backend(backend).join_group(timeout)


def get_implementation(backend) -> tuple[str, str]:
    """``(implementation, reason)``: which data plane serves this group ("ref" or "fast") and why."""
    group = _backend(backend)
    return group.implementation, group.implementation_reason


def set_timeout(backend, timeout: timedelta) -> None:
    """Deadline of every later operation of this group (default: the group's creation timeout)."""
    _backend(backend).set_timeout(timeout)


def set_transfer_engine(engine) -> None:
    """Upstream hands an external Mooncake TransferEngine to the backend; this implementation
    moves data over UCX (ref) or shared memory / CUDA IPC (fast) and has no transfer engine."""
    raise NotApplicableError("set_transfer_engine: mooncake's PG does not use Mooncake's TransferEngine "
                             "(data moves over UCX, shared memory or CUDA IPC); there is nothing to set. "
                             "Use set_host_ip / set_device_filter to choose interfaces.")


def get_preferred_hca(backend, location: str) -> str:
    """Upstream answers the RDMA device TransferEngine would use for ``location``; UCX chooses its
    own devices here, so the answer is the active device filter, if any."""
    _backend(backend)
    filters = get_device_filter()
    if not filters:
        raise NotApplicableError(f"get_preferred_hca({location!r}): no RDMA device is chosen by "
                                 "mooncake; UCX selects transports itself. Set one with "
                                 "set_device_filter([...]) or MOONCAKE_PGTEST_DEVICE_FILTERS.")
    return filters[0]
