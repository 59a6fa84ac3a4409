"""The EP reference ``Buffer``: DeepEP-low-latency-style dispatch / combine over any process group.

Data moves as point-to-point messages of the group's backend (``mooncake-cpu``, ``mooncake``, gloo,
nccl); all math and placement come from ``mooncake.model.ep`` (docs/ep-semantics.md), so results are
bit-for-bit the global-view model's.  Per call and source pair the messages are: the per-expert row
counts, then (if any rows) the token indices and the bf16 rows; combine sends the expert outputs
back in the order they were received.  A source that has not delivered by ``timeout_us`` gets
``active_ranks[src] = 0`` and contributes nothing; a source already at 0 is not waited for.

Preconditions every rank must honour (as upstream): the same sequence of dispatch / combine calls,
the same ``num_experts`` and ``num_max_dispatch_tokens_per_rank``, and the same ``active_ranks`` at
the start of each call.
"""

from __future__ import annotations

import itertools
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..control.errors import ArgumentError
from ..model import ep as model

_TAG_COUNTS, _TAG_INDEX, _TAG_ROWS, _TAG_COMBINE = 16380, 16381, 16382, 16383
_buffer_ids = itertools.count()


class EventOverlap:
    """A completion handle for ``async_finish=True`` (DeepEP's class of the same name).

    ``current_stream_wait()`` makes the current CUDA stream wait for the operation; on CPU, and when
    the operation already finished on the host, it is a valid no-op.  Also a context manager.
    """

    def __init__(self, event: "torch.cuda.Event | None" = None, extra_tensors: tuple = ()):
        self.event = event
        self.extra_tensors = extra_tensors  # kept alive until the event is consumed

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()


class Handle(tuple):
    """Upstream's handle ``(src_info, layout_range, T, H, E)``, plus what combine needs to check it."""

    def __new__(cls, result: model.DispatchResult, T: int, H: int, E: int, **state):
        obj = super().__new__(cls, (result.src_info, result.layout_range, T, H, E))
        obj.result = result
        obj.__dict__.update(state)
        return obj


class Buffer:
    """Expert-parallel communication buffer over ``group``.

    Arguments:
        group: a process group (``mooncake-cpu``, ``mooncake``, gloo, nccl); ranks are its group ranks.
        num_ep_buffer_bytes: communication budget; every call checks it against
            ``get_ep_buffer_size_hint(T, H, R, E)`` (as upstream) and says how many bytes it needs.
    """

    def __init__(self, group: dist.ProcessGroup, num_ep_buffer_bytes: int = 0):
        if not isinstance(num_ep_buffer_bytes, int) or num_ep_buffer_bytes < 0:
            raise ArgumentError(f"num_ep_buffer_bytes must be a non-negative int, got {num_ep_buffer_bytes!r}")
        self.group = group
        self.num_ep_buffer_bytes = num_ep_buffer_bytes
        self.rank = group.rank()
        self.num_ranks = group.size()
        self._id = next(_buffer_ids)
        self._calls = 0
        self._sends: list = []  # in-flight send works, reaped as they complete
        self._combine_buffer: torch.Tensor | None = None
        self._combine_buffer_handle: Handle | None = None

    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                num_experts: int) -> int:
        """Bytes a Buffer needs for these sizes: ``16*E + 4*E*T*(2*H + 32)`` (upstream's formula)."""
        return model.get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def update_ep_member(self) -> None:
        """Re-read the group's membership after the PG changed it (collective over the group)."""
        self._reap_sends(wait=True)
        dist.barrier(group=self.group)
        self.rank = self.group.rank()
        self.num_ranks = self.group.size()

    # -- dispatch ------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, active_ranks: torch.Tensor,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, timeout_us: int,
                 use_fp8: bool = True, async_finish: bool = False, return_recv_hook: bool = False,
                 cumulative_local_expert_recv_stats: torch.Tensor | None = None):
        """Send each token to the ranks owning its top-k experts.

        Arguments:
            x: ``[N, H]`` bfloat16, ``N <= num_max_dispatch_tokens_per_rank``, ``H % 128 == 0`` for FP8.
            topk_idx: ``[N, K]`` int64 expert ids in ``[0, num_experts)`` or -1 (masked); no repeats in a row.
            active_ranks: ``[R]`` int32, 1 = alive; sources that time out are set to 0 in place.
            num_max_dispatch_tokens_per_rank: ``T``, the same on every rank.
            num_experts: ``E``, a multiple of ``R``.
            timeout_us: per-source deadline in microseconds; -1 waits as long as the group's timeout.
            use_fp8: FP8 (e4m3fn, per-128-channel fp32 scales) instead of bf16.
            async_finish: return an ``EventOverlap`` to wait on instead of ``None``.
            return_recv_hook: post the sends now; the returned ``hook()`` receives and fills the outputs.
            cumulative_local_expert_recv_stats: optional ``[L]`` int32, incremented by the rows received.

        Returns:
            ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` is ``[L, R*T, H]`` bf16, or
            ``(fp8 [L, R*T, H], scales [L, R*T, H/128] fp32 column-major)`` with FP8; ``recv_count``
            ``[L]`` int32; ``handle`` for combine; ``event`` an ``EventOverlap`` or None; ``hook`` a
            callable (a no-op unless ``return_recv_hook``).
        """
        T, E, R = num_max_dispatch_tokens_per_rank, num_experts, self.num_ranks
        self._check_dispatch(x, topk_idx, active_ranks, T, E, timeout_us, async_finish, return_recv_hook,
                             cumulative_local_expert_recv_stats, use_fp8)
        H, L = x.shape[1], E // R
        device = x.device
        x_cpu, topk_cpu = x.detach().to("cpu"), topk_idx.detach().to("cpu")
        mask = active_ranks.detach().to("cpu")
        selections = [model.select_rows_for_expert(topk_cpu, e) for e in range(E)]
        call = self._next_call()
        peers = [r for r in range(R) if r != self.rank and mask[r] == 1]
        if mask[self.rank] == 1:
            for d in peers:
                idx = [selections[d * L + l] for l in range(L)]
                counts = torch.tensor([len(i) for i in idx], dtype=torch.int64)
                self._send(counts, d, _TAG_COUNTS)
                if int(counts.sum()):
                    flat = torch.cat(idx)
                    self._send(flat, d, _TAG_INDEX)
                    self._send(x_cpu[flat].contiguous(), d, _TAG_ROWS)
        outputs = _empty_dispatch_outputs(L, R, T, H, use_fp8, device)
        state = dict(buffer_id=self._id, call=call, topk_idx=topk_cpu.clone(), num_tokens=x.shape[0],
                     selections=selections, active_after=None)
        handle = Handle(outputs, T, H, E, **state)

        def receive() -> None:
            blocks, contributes = {}, [False] * R
            if mask[self.rank] == 1:
                contributes[self.rank] = True
                for l in range(L):
                    sel = selections[self.rank * L + l]
                    blocks[(l, self.rank)] = (sel, x_cpu[sel])
            counts_work = {s: self._recv(torch.empty(L, dtype=torch.int64), s, _TAG_COUNTS) for s in peers}
            deadline = _deadline(timeout_us)
            for s, (work, counts) in counts_work.items():
                if not _wait(work, deadline):
                    mask[s] = 0
                    continue
                total = int(counts.sum())
                flat = torch.empty(total, dtype=torch.int64)
                rows = torch.empty(total, H, dtype=torch.bfloat16)
                if total and not (_wait(self._recv(flat, s, _TAG_INDEX)[0], deadline)
                                  and _wait(self._recv(rows, s, _TAG_ROWS)[0], deadline)):
                    mask[s] = 0
                    continue
                contributes[s] = True
                for l, (idx, part) in enumerate(zip(flat.split(counts.tolist()), rows.split(counts.tolist()))):
                    blocks[(l, s)] = (idx, part)
            placed = model.place_dispatch(blocks, L, R, T, H, use_fp8, contributes)
            _copy_result(outputs, placed)
            active_ranks.copy_(mask.to(active_ranks.device))
            handle.active_after = mask.clone()
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(
                    placed.recv_count.to(cumulative_local_expert_recv_stats.device))

        hook = _run_once(receive) if return_recv_hook else _noop
        if not return_recv_hook:
            receive()
        recv_x = (outputs.recv_x, outputs.recv_scales) if use_fp8 else outputs.recv_x
        event = _event(device, (outputs.recv_x,)) if async_finish else None
        return recv_x, outputs.recv_count, handle, event, hook

    # -- combine -------------------------------------------------------------------------------
    def get_next_combine_buffer(self, handle: Handle) -> torch.Tensor:
        """The ``[L, R*T, H]`` bf16 tensor to write expert outputs into for ``combine(zero_copy=True)``."""
        self._check_handle(handle)
        _, _, T, H, E = handle
        shape = (E // self.num_ranks, self.num_ranks * T, H)
        device = handle.result.recv_x.device
        if self._combine_buffer is None or tuple(self._combine_buffer.shape) != shape \
                or self._combine_buffer.device != device:
            self._combine_buffer = torch.zeros(shape, dtype=torch.bfloat16, device=device)
        self._combine_buffer_handle = handle
        return self._combine_buffer

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                active_ranks: torch.Tensor, timeout_us: int, handle: Handle, zero_copy: bool = False,
                async_finish: bool = False, return_recv_hook: bool = False,
                out: torch.Tensor | None = None):
        """Return expert outputs to the token owners and reduce them with the top-k weights.

        Arguments:
            x: ``[L, R*T, H]`` bfloat16 expert outputs, row-aligned with dispatch's ``recv_x``
                (ignored with ``zero_copy``, which reads ``get_next_combine_buffer(handle)``).
            topk_idx: ``[N, K]`` int64, the routing given to the dispatch that made ``handle``.
            topk_weights: ``[N, K]`` float32.
            active_ranks: ``[R]`` int32; owners that time out are set to 0 and their experts skipped.
            timeout_us: per-owner deadline in microseconds; -1 waits as long as the group's timeout.
            handle: from ``dispatch``.
            out: optional ``[N, H]`` bfloat16 tensor to write into.

        Returns:
            ``(combined_x [N, H] bf16, event, hook)``: fp32 accumulation in top-k order, one bf16 rounding.
        """
        self._check_combine(x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy,
                            async_finish, return_recv_hook, out)
        _, _, T, H, E = handle
        R, L = self.num_ranks, E // self.num_ranks
        device = topk_idx.device
        expert_out = (self._combine_buffer if zero_copy else x).detach().to("cpu")
        topk_cpu, weights_cpu = topk_idx.detach().to("cpu"), topk_weights.detach().to("cpu")
        mask = active_ranks.detach().to("cpu")
        self._next_call()
        peers = [r for r in range(R) if r != self.rank and mask[r] == 1]
        if mask[self.rank] == 1:
            for d in peers:
                rows = [model.combine_block(handle.result, expert_out, l, d)[1] for l in range(L)]
                self._send(torch.cat(rows).contiguous(), d, _TAG_COMBINE)
        result = out if out is not None else torch.empty(handle.num_tokens, H, dtype=torch.bfloat16,
                                                         device=device)

        def receive() -> None:
            selections = handle.selections
            blocks = {}
            if mask[self.rank] == 1:
                for l in range(L):
                    blocks[self.rank * L + l] = model.combine_block(handle.result, expert_out, l, self.rank)
            works = {}
            for o in peers:
                sizes = [len(selections[o * L + l]) for l in range(L)]
                works[o] = (self._recv(torch.empty(sum(sizes), H, dtype=torch.bfloat16), o, _TAG_COMBINE),
                            sizes)
            deadline = _deadline(timeout_us)
            for o, ((work, rows), sizes) in works.items():
                if not _wait(work, deadline):
                    mask[o] = 0
                    continue
                for l, part in enumerate(rows.split(sizes)):
                    blocks[o * L + l] = (selections[o * L + l], part)
            expert_rows, _ = model.place_combine(topk_cpu, blocks, H)
            entry_active = model.combine_entry_active(topk_cpu, mask, L, self.rank)
            combined = model.combine_rows(topk_cpu, weights_cpu, expert_rows, entry_active)
            result.copy_(combined.to(result.device))
            active_ranks.copy_(mask.to(active_ranks.device))

        hook = _run_once(receive) if return_recv_hook else _noop
        if not return_recv_hook:
            receive()
        event = _event(device, (result,)) if async_finish else None
        return result, event, hook

    # -- messaging -----------------------------------------------------------------------------
    def _next_call(self) -> int:
        self._reap_sends(wait=False)
        self._calls += 1
        return self._calls

    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.to(self._comm_device())
        self._sends.append((dist.isend(tensor, group=self.group, group_dst=dst, tag=tag), tensor))

    def _recv(self, tensor: torch.Tensor, src: int, tag: int):
        comm = tensor.to(self._comm_device())
        work = dist.irecv(comm, group=self.group, group_src=src, tag=tag)
        return _Received(work, comm, tensor), tensor

    def _comm_device(self) -> str:
        return "cuda" if dist.get_backend(self.group) in ("nccl", "mooncake") else "cpu"

    def _reap_sends(self, wait: bool) -> None:
        still = []
        for work, tensor in self._sends:
            if wait:
                _wait(work, _deadline(-1))
            elif not work.is_completed():
                still.append((work, tensor))
        self._sends = still

    # -- checks --------------------------------------------------------------------------------
    def _check_mask(self, active_ranks: torch.Tensor) -> None:
        try:  # the model's definition of a mask: int32 [R], entries 0 or 1
            model._check_mask(active_ranks, self.num_ranks, "active_ranks")
        except ValueError as exc:
            raise ArgumentError(str(exc)) from None

    def _check_budget(self, T: int, H: int, E: int) -> None:
        needed = self.get_ep_buffer_size_hint(T, H, self.num_ranks, E)
        if needed > self.num_ep_buffer_bytes:
            raise ArgumentError(f"num_ep_buffer_bytes={self.num_ep_buffer_bytes} is too small for this call: "
                                f"it needs {needed} bytes = Buffer.get_ep_buffer_size_hint({T}, {H}, "
                                f"{self.num_ranks}, {E})")

    @staticmethod
    def _check_timeout(timeout_us) -> None:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or (timeout_us < 0 and timeout_us != -1):
            raise ArgumentError(f"timeout_us must be a non-negative int or -1 (no EP deadline), got {timeout_us!r}")

    @staticmethod
    def _check_modes(async_finish: bool, return_recv_hook: bool) -> None:
        if async_finish and return_recv_hook:
            raise ArgumentError("async_finish and return_recv_hook cannot both be set (as upstream)")

    def _check_dispatch(self, x, topk_idx, active_ranks, T, E, timeout_us, async_finish,
                        return_recv_hook, stats, use_fp8) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
            raise ArgumentError(f"x must be a 2-D bfloat16 tensor [num_tokens, hidden], got "
                                f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if isinstance(E, bool) or not isinstance(E, int) or isinstance(T, bool) or not isinstance(T, int):
            raise ArgumentError(f"num_experts and num_max_dispatch_tokens_per_rank must be ints, got {E!r}, {T!r}")
        if isinstance(topk_idx, torch.Tensor) and topk_idx.dim() == 2 and topk_idx.shape[0] != x.shape[0]:
            raise ArgumentError(f"topk_idx has {topk_idx.shape[0]} rows but x has {x.shape[0]} tokens")
        if not bool(torch.isfinite(x).all()):
            raise ArgumentError("x must be finite (inf/NaN tokens have no defined FP8 scale or combine result)")
        if use_fp8 and x.shape[1] % 128:
            raise ArgumentError(f"FP8 dispatch needs hidden % 128 == 0, got hidden {x.shape[1]}")
        try:
            model.validate_routing(topk_idx, E, T, self.num_ranks)
        except ValueError as exc:
            raise ArgumentError(str(exc)) from None
        self._check_mask(active_ranks)
        self._check_timeout(timeout_us)
        self._check_modes(async_finish, return_recv_hook)
        L = E // self.num_ranks
        if stats is not None and (stats.dtype != torch.int32 or tuple(stats.shape) != (L,)):
            raise ArgumentError(f"cumulative_local_expert_recv_stats must be int32 [{L}], got "
                                f"{stats.dtype} {tuple(stats.shape)}")
        self._check_budget(T, x.shape[1], E)

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, Handle):
            raise ArgumentError(f"handle must be the handle returned by Buffer.dispatch, got {type(handle).__name__}")
        if handle.buffer_id != self._id:
            raise ArgumentError("handle comes from another Buffer's dispatch")
        if handle.active_after is None:
            raise ArgumentError("handle's dispatch has not received yet: call its recv hook first")

    def _check_combine(self, x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy,
                       async_finish, return_recv_hook, out) -> None:
        self._check_handle(handle)
        _, _, T, H, E = handle
        L, RT = E // self.num_ranks, self.num_ranks * T
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 \
                or tuple(topk_idx.shape) != tuple(handle.topk_idx.shape) \
                or not torch.equal(topk_idx.detach().cpu(), handle.topk_idx):
            raise ArgumentError("topk_idx differs from the dispatch that produced handle: a handle from "
                                "another dispatch? keep dispatch and combine paired")
        if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32 \
                or tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise ArgumentError(f"topk_weights must be float32 of shape {tuple(topk_idx.shape)}, got "
                                f"{getattr(topk_weights, 'dtype', None)} {tuple(getattr(topk_weights, 'shape', ()))}")
        if zero_copy:
            if self._combine_buffer_handle is not handle:
                raise ArgumentError("zero_copy=True needs the expert outputs written into "
                                    "get_next_combine_buffer(handle) first (it was not requested for this handle)")
        elif not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or tuple(x.shape) != (L, RT, H):
            shape = tuple(getattr(x, "shape", ()))
            what = (f"hidden size {shape[2]} differs from dispatch's {H}" if len(shape) == 3 and shape[2] != H
                    else f"got {getattr(x, 'dtype', type(x))} {shape}")
            raise ArgumentError(f"x must be bfloat16 [{L}, {RT}, {H}] (expert outputs laid out as dispatch's "
                                f"recv_x): {what}")
        self._check_mask(active_ranks)
        self._check_timeout(timeout_us)
        self._check_modes(async_finish, return_recv_hook)
        if out is not None and (out.dtype != torch.bfloat16 or tuple(out.shape) != (handle.num_tokens, H)):
            raise ArgumentError(f"out must be bfloat16 [{handle.num_tokens}, {H}], got {out.dtype} {tuple(out.shape)}")
        self._check_budget(T, H, E)


class _Received:
    """A receive whose data lands in a comm-device tensor and is copied to the caller's on success."""

    def __init__(self, work, comm: torch.Tensor, target: torch.Tensor):
        self.work, self.comm, self.target = work, comm, target

    def wait(self, timeout: timedelta | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        if not _wait(self.work, deadline):
            return False
        if self.comm is not self.target:
            self.target.copy_(self.comm)
        return True

    def is_completed(self) -> bool:
        return self.work.is_completed()


def _deadline(timeout_us: int) -> float | None:
    return None if timeout_us == -1 else time.monotonic() + timeout_us * 1e-6


def _wait(work, deadline: float | None) -> bool:
    """Wait for ``work`` until the monotonic ``deadline`` (None: the group's own timeout);
    False on expiry or on a peer failure reported by the backend."""
    try:
        if deadline is None:
            return work.wait() is not False
        remaining = deadline - time.monotonic()
        if remaining <= 0 and not work.is_completed():
            return False
        return work.wait(timedelta(seconds=max(remaining, 1e-6))) is not False
    except RuntimeError:
        return False


def _empty_dispatch_outputs(L, R, T, H, use_fp8, device) -> model.DispatchResult:
    return model.place_dispatch({}, L, R, T, H, use_fp8, [False] * R, device=device)


def _copy_result(dst: model.DispatchResult, src: model.DispatchResult) -> None:
    dst.recv_x.copy_(src.recv_x)
    if dst.recv_scales is not None:
        dst.recv_scales.copy_(src.recv_scales)
    dst.recv_count.copy_(src.recv_count)
    dst.src_info.copy_(src.src_info)
    dst.layout_range.copy_(src.layout_range)


def _event(device: torch.device, tensors: tuple) -> EventOverlap:
    if device.type != "cuda":
        return EventOverlap(None, tensors)
    event = torch.cuda.Event()
    event.record()
    return EventOverlap(event, tensors)


def _run_once(fn: Callable[[], None]) -> Callable[[], None]:
    done = []

    def hook() -> None:
        if not done:
            done.append(True)
            fn()

    return hook


def _noop() -> None:
    pass
