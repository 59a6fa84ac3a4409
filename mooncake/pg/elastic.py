"""Training that goes on through rank failures: DDP's gradient average over the ranks that are
actually there, and bringing a replacement rank up to date (docs/launcher.md, "Training").

On every rank, under ``mooncake-run`` (or any launcher that sets ``MOONCAKE_REPLACEMENT``)::

    from mooncake.pg import elastic
    elastic.init_process_group("mooncake-cpu")        # a replacement starts as an extension rank
    group = dist.group.WORLD
    model, opt = Net(), torch.optim.SGD(...)
    step = elastic.join_and_catch_up(group, model, opt) if elastic.is_replacement() else 0
    ddp = elastic.wrap_ddp(model, group)
    while step < steps:
        if elastic.admit_replacements(group, model, opt, step):   # survivors, every step boundary
            ddp = elastic.wrap_ddp(model, group)                  # the replacement wraps here too
        ... forward / backward through ddp, opt.step() ...
        step += 1

Why the re-wrap: a fresh ``DistributedDataParallel`` broadcasts its bucket layout from rank 0 in its
second iteration; the survivors' DDP did that long ago, the replacement's would do it alone.
Wrapping again on every rank at the admission boundary keeps their collectives paired.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..control.errors import ArgumentError, OpTimeoutError, PeerFailureError, RemovedError

CATCH_UP_ATTEMPTS = 8   # a catch-up whose source rank dies is retried from the next survivor


def is_replacement() -> bool:
    """True in a process the launcher started to replace a rank that died (``MOONCAKE_REPLACEMENT=1``):
    it must create its group with ``is_extension=True`` and join (``join_and_catch_up``)."""
    return os.environ.get("MOONCAKE_REPLACEMENT", "0") == "1"


def init_process_group(backend: str = "mooncake-cpu", *, failure_mode: str = "complete",
                       max_world_size: int | None = None, timeout: timedelta | None = None, **kwargs) -> None:
    """``dist.init_process_group`` from the launcher's environment (``env://``), with mooncake options:
    a replacement (``is_replacement()``) starts as an extension rank, local-only until it joins."""
    from .options import MooncakeBackendOptions
    world = int(os.environ["WORLD_SIZE"]) if "world_size" not in kwargs else kwargs["world_size"]
    capacity = max_world_size or world
    opts = MooncakeBackendOptions(torch.zeros(capacity, dtype=torch.int32), is_extension=is_replacement(),
                                  max_world_size=capacity, failure_mode=failure_mode)
    if timeout is not None:
        kwargs["timeout"] = timeout
    dist.init_process_group(backend, pg_options=opts, **kwargs)


# -- DDP ---------------------------------------------------------------------------------------
def ddp_comm_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: SUM the bucket over the group, then divide by the number of ranks
    whose gradients the sum holds — not by the world size DDP was built with.

    The count travels in the same all_reduce, as one extra element set to 1 on every rank, so it is
    exactly the set the op committed under: the survivors when the op was re-run over them after a
    failure, everyone (the dead rank included) when the op stood because it had committed somewhere
    before the failure.  ``state`` is the process group (None: the default group).
    Register with ``ddp.register_comm_hook(group, ddp_comm_hook)`` (``wrap_ddp`` does)."""
    group = state if state is not None else dist.group.WORLD
    buffer = bucket.buffer()
    n = buffer.numel()
    packed = torch.empty(n + 1, dtype=buffer.dtype, device=buffer.device)
    packed[:n].copy_(buffer)
    packed[n] = 1
    fut = dist.all_reduce(packed, group=group, async_op=True).get_future()

    def average(done: torch.futures.Future) -> torch.Tensor:
        out = done.value()[0]
        buffer.copy_(out[:n]).div_(out[n])
        return buffer

    return fut.then(average)


# DDP checks the hook's annotations at run time; this module's are strings (PEP 563)
ddp_comm_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                 "return": torch.futures.Future[torch.Tensor]}


def wrap_ddp(model: torch.nn.Module, group=None, **ddp_kwargs):
    """``DistributedDataParallel(model)`` that averages over the active ranks (``ddp_comm_hook``).

    Defaults: ``init_sync=False`` (no collective at construction: the survivors and a replacement
    wrap at the same boundary after the catch-up made their parameters equal; founders that do not
    start from the same seed pass ``init_sync=True`` on their first wrap) and
    ``forward_sync_buffers=False`` (no broadcast from rank 0 before each forward, which fails while
    rank 0 is dead)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp_kwargs.setdefault("init_sync", False)
    if "broadcast_buffers" not in ddp_kwargs:
        ddp_kwargs.setdefault("forward_sync_buffers", False)
    ddp = DDP(model, process_group=group, **ddp_kwargs)
    ddp.register_comm_hook(group, ddp_comm_hook)
    return ddp


# -- membership and catch-up -------------------------------------------------------------------
def _group(group):
    return dist.group.WORLD if group is None else group


def missing_ranks(group=None) -> list[int]:
    """Ranks of the group (below its capacity) that are not active now: failed, not yet replaced."""
    from . import get_active_ranks
    return [r for r, v in enumerate(get_active_ranks(_group(group)).tolist()) if not v]


def admit_replacements(group, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
                       *, wait: bool = False, timeout: timedelta | None = None, poll_s: float = 0.05) -> list[int]:
    """Call on every active rank at the same step boundary (no collective in flight).

    If every rank is active: returns ``[]`` at once, without communicating.  Otherwise asks the
    group which missing ranks have a replacement waiting in ``join_group`` (``get_peer_state``, one
    small collective), admits them (``recover_ranks``) and sends them, from the lowest surviving
    rank, ``step``, the optimizer's state and the model's parameters and buffers.  Returns the
    admitted ranks; the caller then wraps DDP again (``wrap_ddp``), as the replacement does.

    ``wait=True`` blocks (polling every ``poll_s``) until every missing rank is admitted, or
    ``timeout`` passes (``OpTimeoutError``).  A survivor that reaches the boundary after a peer admitted
    the replacements (the agreement applies the peer's ``recover_ranks`` on every member) finds them
    admitted already and takes part in their catch-up all the same."""
    from . import _backend, get_peer_state, recover_ranks
    group = _group(group)
    deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
    while True:
        # a peer reached this boundary first and its recover_ranks is applied here already: join its catch-up
        ready = _backend(group).admitted_at_this_boundary()
        if ready:
            break
        missing = missing_ranks(group)
        if not missing:
            return []
        ready = [r for r, ok in zip(missing, get_peer_state(group, missing)) if ok]
        if ready and (not wait or len(ready) == len(missing)):
            recover_ranks(group, ready)
            break
        if not wait:
            return []
        if deadline is not None and time.monotonic() > deadline:
            raise OpTimeoutError(f"admit_replacements: rank(s) {missing} not back within {timeout}", tuple(missing))
        time.sleep(poll_s)
    _catch_up(group, model, optimizer, step, joining=False)
    return ready


def join_and_catch_up(group, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                      timeout: timedelta | None = None) -> int:
    """On a replacement (``is_replacement()``): ``join_group``, then receive the step counter, the
    optimizer state and the parameters and buffers from a survivor; returns the step to resume at.
    Afterwards this rank's model and optimizer hold exactly the survivors' bits."""
    from . import join_group
    group = _group(group)
    join_group(group, timeout)
    return _catch_up(group, model, optimizer, None, joining=True)


def _catch_up(group, model, optimizer, step, joining: bool) -> int:
    """Every active rank: pick the lowest rank that was active before this admission, broadcast
    its state.  If that rank dies meanwhile, every rank gets the same PeerFailureError and all
    start again from the next one."""
    from . import get_capacity
    capacity = get_capacity(group)
    for attempt in range(CATCH_UP_ATTEMPTS):
        try:
            return _send_state(group, model, optimizer, step, joining, capacity)
        except RemovedError:
            raise
        except PeerFailureError:
            if attempt == CATCH_UP_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _send_state(group, model, optimizer, step, joining: bool, capacity: int) -> int:
    me = dist.get_rank(group)
    candidate = torch.tensor([capacity if joining else me], dtype=torch.int64)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    src = int(candidate.item())
    if src >= capacity:
        raise ArgumentError("catch-up: no rank of the group holds the training state (every active "
                            "rank is joining)")
    objects = [None]
    if me == src:
        objects = [(step, optimizer.state_dict() if optimizer is not None else None)]
    dist.broadcast_object_list(objects, group=group, group_src=src)
    got_step, optim_state = objects[0]
    tensors = [p.detach() for p in model.parameters()] + [b for b in model.buffers()]
    with torch.no_grad():
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in same]) if me == src else \
                torch.empty(sum(t.numel() for t in same), dtype=dtype)
            dist.broadcast(flat, group=group, group_src=src)
            if joining:
                offset = 0
                for t in same:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
    if joining and optimizer is not None and optim_state is not None:
        optimizer.load_state_dict(optim_state)
    return got_step
