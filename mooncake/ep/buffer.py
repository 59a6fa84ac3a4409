"""The EP reference ``Buffer``: DeepEP-low-latency-style dispatch / combine over any process group.

Data moves as point-to-point messages of the group's backend (``mooncake-cpu``, ``mooncake``, gloo);
all math and placement come from ``mooncake.model.ep`` (docs/ep-semantics.md), so results are bit
for bit the global-view model's, and so are the peer lists.  Dispatch: an active rank sends to every
other rank (a masked but alive rank still receives), and every rank waits for every other active
rank.  Combine: only active ranks send to and wait for each other; a masked rank's output is zeros.

Messages: every call takes the next call id of its process group on this rank (a rejected call
too), so all ranks must make the same sequence of EP calls on a group, over all its Buffers.  A call
sends at most one message to a peer: a header ``int64 [call id, kind, payload bytes]`` (tag 16380),
then the payload (tag 16381), ``int64 [call id, kind]`` followed by, for dispatch, the ``int64``
row counts of the peer's ``L`` experts, the ``int64`` token indices and the ``bf16`` rows; for
combine, the ``bf16`` expert rows in the order dispatch received them.

Per peer, one reader thread at a time receives these in order and files them under their call id;
a call waits for its messages until ``timeout_us``.  A receive it gave up on stays posted and
matched to the message it was posted for, which is dropped when it arrives: late data is used
neither in its call nor in a later one.  Each wait of a reader is bounded by the backend's own
timeout (gloo: a receive unmatched for the group's timeout breaks the group, gloo's own rule).
Posted sends live in a module-wide outbox until they complete or fail, so dropping a Buffer loses
nothing (at interpreter exit the outbox is flushed for at most ``_EXIT_FLUSH_S`` seconds).  A peer
whose send or receive raises (dead, unreachable) is a failed source: ``active_ranks[peer] = 0``.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import threading
import time
import weakref
from typing import Callable

import torch
import torch.distributed as dist

from .. import impl
from .. import log as _log
from ..control.errors import ArgumentError, WireError
from ..model import ep as model

_TAG_HEADER, _TAG_PAYLOAD = 16380, 16381
_DISPATCH, _COMBINE = 1, 2
_KINDS = {_DISPATCH: "dispatch", _COMBINE: "combine"}
_PREFIX_BYTES = 16  # the payload's own int64 [call id, kind]
_EXIT_FLUSH_S = 10.0  # longest wait for posted sends when the interpreter exits
_buffer_ids = itertools.count()


def _decline_fast(exc: Exception) -> str:
    """The CUDA fast EP path turned out unusable while being set up (e.g. a rank on another host: every rank
    sees the same host table, so all decline alike).  Under ``MOONCAKE_IMPL=fast`` that is an error; under
    ``auto`` the Buffer uses the ref EP path and says why (the ``mooncake`` logger, WARNING)."""
    if impl.requested() == "fast":
        raise exc
    reason = f"auto: {exc}; using the ref EP path (UCX)"
    _log.logger.warning("mooncake ep cuda: fast path declined (%s)", reason)
    return reason


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
        group: a process group (``mooncake-cpu``, ``mooncake``, gloo); ranks are its group ranks.
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
        self._calls = _group_calls(group)
        self._combine_buffer: torch.Tensor | None = None
        self._combine_buffer_handle: Handle | None = None
        self._fast = None  # mooncake.fast.cuda.ep.FastEPBuffer once a call ran on the CUDA fast path
        self._fast_declined: str | None = None  # why auto chose the ref EP path after trying fast

    def _fast_plane(self, x):
        """The CUDA fast data plane for this call, or None (ref).  Chosen at the first call with CUDA tensors
        when ``impl.select("cuda", "ep")`` says fast (MOONCAKE_IMPL=fast/auto and the kernels load); creating
        it is collective, so every rank must make that first call with CUDA tensors and the same MOONCAKE_IMPL.
        From then on every call of this Buffer runs there."""
        if self._fast is None and self._fast_declined is None and isinstance(x, torch.Tensor) \
                and x.device.type == "cuda" and self.num_ep_buffer_bytes > 0 \
                and impl.select("cuda", "ep")[0] == "fast":
            from ..fast.cuda.ep import FastEPBuffer, FastUnavailable
            try:
                self._fast = FastEPBuffer(self.group, self.num_ep_buffer_bytes, device=x.device,
                                          event_factory=EventOverlap)
            except FastUnavailable as exc:
                self._fast_declined = _decline_fast(exc)
        return self._fast

    @property
    def implementation(self) -> str:
        """``"fast"`` once this Buffer runs on the CUDA fast path, else ``"ref"``."""
        return "ref" if self._fast is None else "fast"

    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                num_experts: int) -> int:
        """Bytes a Buffer needs for these sizes: ``16*E + 4*E*T*(2*H + 32)`` (upstream's formula)."""
        return model.get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def update_ep_member(self) -> None:
        """Re-read the group's membership after the PG changed it (collective over the group).

        Also brings the EP call ids of all ranks in step (the largest wins) and lets EP talk again
        to peers whose messages it had given up on.
        """
        self._calls.resync(self.group)
        if self._fast is not None:
            self._fast.update_ep_member()
        self.rank = self.group.rank()
        self.num_ranks = self.group.size()

    # -- dispatch ------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, active_ranks: torch.Tensor,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, timeout_us: int,
                 use_fp8: bool = True, async_finish: bool = False, return_recv_hook: bool = False,
                 cumulative_local_expert_recv_stats: torch.Tensor | None = None):
        """Send each token to the ranks owning its top-k experts.

        Arguments:
            x: ``[N, H]`` bfloat16, finite, ``N <= num_max_dispatch_tokens_per_rank``, ``H % 128 == 0``
                for FP8.
            topk_idx: ``[N, K]`` int64 expert ids in ``[0, num_experts)`` or -1 (masked); no repeats in a row.
            active_ranks: ``[R]`` int32 of 0/1, 1 = alive, the same on every rank; sources that time out
                or fail are set to 0 in place.  A rank whose own entry is 0 sends nothing and still receives.
                A longer 1-D mask (upstream allocates a fixed size) is read and written in its first R entries.
            num_max_dispatch_tokens_per_rank: ``T``, the same on every rank.
            num_experts: ``E``, a multiple of ``R``.
            timeout_us: per-call deadline in microseconds for the sources' data (counted from the
                hook's call with ``return_recv_hook``); -1: no EP deadline (each message still waits
                at most the group's own timeout).
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
        active_ranks = self._rank_mask(active_ranks)
        fast = self._fast_plane(x)
        if fast is not None:
            return self._dispatch_fast(fast, x, topk_idx, active_ranks, num_max_dispatch_tokens_per_rank,
                                       num_experts, timeout_us, use_fp8, async_finish, return_recv_hook,
                                       cumulative_local_expert_recv_stats)
        call = self._calls.open_next()
        try:
            T, E, R = num_max_dispatch_tokens_per_rank, num_experts, self.num_ranks
            self._check_dispatch(x, topk_idx, active_ranks, T, E, timeout_us, async_finish, return_recv_hook,
                                 cumulative_local_expert_recv_stats, use_fp8)
            H, L, me = x.shape[1], E // R, self.rank
            device = x.device
            x_cpu, topk_cpu = x.detach().to("cpu"), topk_idx.detach().to("cpu")
            mask = active_ranks.detach().to("cpu").clone()
            selections = [model.select_rows_for_expert(topk_cpu, e) for e in range(E)]
            failed = set()
            if int(mask[me]) == 1:
                for d in range(R):
                    if d != me:
                        idx = [selections[d * L + l] for l in range(L)]
                        counts = torch.tensor([len(i) for i in idx], dtype=torch.int64)
                        flat = torch.cat(idx)
                        if not self._post(call, _DISPATCH, d, (counts, flat, x_cpu[flat])):
                            failed.add(d)
        except BaseException:
            self._calls.close(call)
            raise
        outputs = _empty_dispatch_outputs(L, R, T, H, use_fp8, device)
        state = dict(buffer_id=self._id, topk_idx=topk_cpu.clone(), num_tokens=x.shape[0],
                     selections=selections, received=None)
        handle = Handle(outputs, T, H, E, **state)

        def receive() -> None:
            contributes = [int(mask[s]) == 1 for s in range(R)]
            blocks = {}
            if contributes[me]:
                for l in range(L):
                    sel = selections[me * L + l]
                    blocks[(l, me)] = (sel, x_cpu[sel])
            sources = [s for s in range(R) if s != me and contributes[s] and s not in failed]
            for s, body in self._calls.receive(call, _DISPATCH, sources, _deadline(timeout_us)).items():
                if body is None:
                    failed.add(s)
                    continue
                counts, flat, rows = _unpack_dispatch(body, L, H, s)
                for l, (idx, part) in enumerate(zip(flat.split(counts), rows.split(counts))):
                    blocks[(l, s)] = (idx, part)
            for s in failed:
                mask[s] = 0
                contributes[s] = False
            placed = model.place_dispatch(blocks, L, R, T, H, use_fp8, contributes)
            _copy_result(outputs, placed)
            if failed:  # EP only ever writes 0 into the caller's mask
                active_ranks[sorted(failed)] = 0
            handle.received = placed  # the CPU copy combine reads (outputs may live on the GPU)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(
                    placed.recv_count.to(cumulative_local_expert_recv_stats.device))

        hook = _run_once(receive) if return_recv_hook else _noop
        if not return_recv_hook:
            receive()
        recv_x = (outputs.recv_x, outputs.recv_scales) if use_fp8 else outputs.recv_x
        event = _event(device, (outputs.recv_x,)) if async_finish else None
        return recv_x, outputs.recv_count, handle, event, hook

    def _dispatch_fast(self, fast, x, topk_idx, active_ranks, T, E, timeout_us, use_fp8, async_finish,
                       return_recv_hook, stats):
        """Dispatch on the CUDA fast path: the same checks, then the kernels (a rejected call still counts)."""
        try:
            self._check_dispatch(x, topk_idx, active_ranks, T, E, timeout_us, async_finish, return_recv_hook,
                                 stats, use_fp8)
        except BaseException:
            fast.skip_call("dispatch")
            raise
        recv_x, recv_count, fh, event, hook = fast.dispatch(
            x, topk_idx, active_ranks, T, E, timeout_us, use_fp8=use_fp8, async_finish=async_finish,
            return_recv_hook=return_recv_hook, cumulative_local_expert_recv_stats=stats, check=False)
        handle = Handle(fh.result, T, x.shape[1], E, buffer_id=self._id, topk_idx=topk_idx.detach().cpu().clone(),
                        num_tokens=x.shape[0], selections=None, received=None, fast=fh)
        if not return_recv_hook:
            handle.received = fh.result
            return recv_x, recv_count, handle, event, hook

        def receive() -> None:
            hook()
            handle.received = fh.result

        return recv_x, recv_count, handle, event, _run_once(receive)

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
            active_ranks: ``[R]`` int32 of 0/1, the same on every rank; owners that time out or fail
                are set to 0 and their experts skipped.  A rank whose own entry is 0 gets all zeros.
                A longer 1-D mask is read and written in its first R entries, as in ``dispatch``.
            timeout_us: per-call deadline in microseconds for the owners' rows; -1: no EP deadline
                (each message still waits at most the group's own timeout).
            handle: from ``dispatch``.
            out: optional ``[N, H]`` bfloat16 tensor to write into.

        Returns:
            ``(combined_x [N, H] bf16, event, hook)``: fp32 accumulation in top-k order, one bf16 rounding.
        """
        active_ranks = self._rank_mask(active_ranks)
        if self._fast is not None:
            try:
                self._check_combine(x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy,
                                    async_finish, return_recv_hook, out)
                if getattr(handle, "fast", None) is None:
                    raise ArgumentError("handle comes from a dispatch that did not run on this Buffer's CUDA fast path")
            except BaseException:
                self._fast.skip_call("combine")
                raise
            return self._fast.combine(self._combine_buffer if zero_copy else x, topk_idx, topk_weights,
                                      active_ranks, timeout_us, handle.fast, async_finish=async_finish,
                                      return_recv_hook=return_recv_hook, out=out)
        call = self._calls.open_next()
        try:
            self._check_combine(x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy,
                                async_finish, return_recv_hook, out)
            _, _, T, H, E = handle
            R, L, me = self.num_ranks, E // self.num_ranks, self.rank
            device = topk_idx.device
            expert_out = (self._combine_buffer if zero_copy else x).detach().to("cpu")
            topk_cpu, weights_cpu = topk_idx.detach().to("cpu"), topk_weights.detach().to("cpu")
            mask = active_ranks.detach().to("cpu").clone()
            peers = [r for r in range(R) if r != me and mask[r] == 1] if mask[me] == 1 else []
            failed = set()
            for d in peers:
                rows = torch.cat([model.combine_block(handle.received, expert_out, l, d)[1] for l in range(L)])
                if not self._post(call, _COMBINE, d, (rows,)):
                    failed.add(d)
        except BaseException:
            self._calls.close(call)
            raise
        result = out if out is not None else torch.empty(handle.num_tokens, H, dtype=torch.bfloat16,
                                                         device=device)

        def receive() -> None:
            selections = handle.selections
            blocks = {}
            if mask[me] == 1:
                for l in range(L):
                    blocks[me * L + l] = model.combine_block(handle.received, expert_out, l, me)
            owners = [o for o in peers if o not in failed]
            for o, body in self._calls.receive(call, _COMBINE, owners, _deadline(timeout_us)).items():
                if body is None:
                    failed.add(o)
                    continue
                sizes = [len(selections[o * L + l]) for l in range(L)]
                rows = _unpack_rows(body, sum(sizes), H, o)
                for l, part in enumerate(rows.split(sizes)):
                    blocks[o * L + l] = (selections[o * L + l], part)
            for o in failed:
                mask[o] = 0
            expert_rows, _ = model.place_combine(topk_cpu, blocks, H)
            entry_active = model.combine_entry_active(topk_cpu, mask, L, me)
            combined = model.combine_rows(topk_cpu, weights_cpu, expert_rows, entry_active)
            result.copy_(combined.to(result.device))
            if failed:
                active_ranks[sorted(failed)] = 0

        hook = _run_once(receive) if return_recv_hook else _noop
        if not return_recv_hook:
            receive()
        event = _event(device, (result,)) if async_finish else None
        return result, event, hook

    # -- messaging -----------------------------------------------------------------------------
    def _post(self, call: int, kind: int, dst: int, parts: tuple[torch.Tensor, ...]) -> bool:
        """Send one message (header, then payload) to ``dst``; False if the backend refused it."""
        payload = torch.cat([torch.tensor([call, kind], dtype=torch.int64).view(torch.uint8)]
                            + [p.contiguous().reshape(-1).view(torch.uint8) for p in parts])
        header = torch.tensor([call, kind, payload.numel()], dtype=torch.int64)
        device = self._calls.device
        return (_OUTBOX.send(self.group, header.to(device), dst, _TAG_HEADER)
                and _OUTBOX.send(self.group, payload.to(device), dst, _TAG_PAYLOAD))

    # -- checks --------------------------------------------------------------------------------
    def _rank_mask(self, active_ranks):
        """The ``[R]`` view of a mask allocated longer (upstream's elastic tests allocate a fixed size):
        a view, so that failed sources marked 0 show in the caller's tensor; anything else as given
        (checked later)."""
        if isinstance(active_ranks, torch.Tensor) and active_ranks.dim() == 1 \
                and active_ranks.numel() > self.num_ranks:
            return active_ranks[:self.num_ranks]
        return active_ranks

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
        if handle.received is None:
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


# -- messages ----------------------------------------------------------------------------------


class _Outbox:
    """Posted sends of this process, each kept (with its tensor) until it completes or fails.

    gloo loses a send whose work object dies before the peer matched it, so the works must outlive
    the Buffer that posted them; a drain thread waits for them in order (each wait bounded by the
    backend's own timeout).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._draining = False

    def send(self, group: dist.ProcessGroup, tensor: torch.Tensor, dst: int, tag: int) -> bool:
        """Post a send of ``tensor`` to group rank ``dst``; False if the backend raised (dead peer...)."""
        try:
            work = dist.isend(tensor, group=group, group_dst=dst, tag=tag)
        except Exception:  # noqa: BLE001 - any failure to post means the peer cannot be reached
            return False
        with self._cond:
            self._pending.append((work, tensor))
            if not self._draining:
                self._draining = True
                threading.Thread(target=self._drain, name="mooncake-ep-outbox", daemon=True).start()
        return True

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._draining = False
                    self._cond.notify_all()
                    return
                work, _ = self._pending[0]
            try:
                work.wait()
            except Exception:  # noqa: BLE001 - the receiver sees the failure as a missing message
                pass
            with self._cond:
                self._pending.popleft()

    def flush(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` seconds for every posted send to finish."""
        with self._cond:
            self._cond.wait_for(lambda: not self._pending, timeout=timeout_s)


_OUTBOX = _Outbox()
atexit.register(_OUTBOX.flush, _EXIT_FLUSH_S)


class _GroupCalls:
    """This rank's EP calls on one process group: call ids, the calls still receiving, one inbox per peer."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = weakref.ref(group)
        cuda = dist.get_backend(group) in ("nccl", "mooncake")
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.cond = threading.Condition()
        self.last_call = 0  # the id of the latest call started on this rank
        self.open: set[int] = set()  # calls whose messages are still wanted
        self.inboxes: dict[int, _Inbox] = {}

    def open_next(self) -> int:
        """Start a call: take the next id and keep its messages until ``close``."""
        with self.cond:
            self.last_call += 1
            self.open.add(self.last_call)
            return self.last_call

    def close(self, call: int) -> None:
        """The call is over: drop its filed messages and any that arrive later, and stop reading for it."""
        with self.cond:
            self.open.discard(call)
            for inbox in self.inboxes.values():
                inbox.mail.pop(call, None)
                inbox.wanted.discard(call)

    def receive(self, call: int, kind: int, sources: list[int], deadline: float | None) -> dict:
        """``{src: payload body (uint8 CPU tensor) or None}`` of ``call`` from each of ``sources``;
        None for a source that failed, skipped the call or missed ``deadline``.  Closes the call."""
        try:
            with self.cond:
                for s in sources:
                    if s not in self.inboxes:
                        self.inboxes[s] = _Inbox(self, s)
                    self.inboxes[s].expect(call)
                inboxes = {s: self.inboxes[s] for s in sources}
            return {s: inbox.take(call, kind, deadline) for s, inbox in inboxes.items()}
        finally:
            self.close(call)

    def resync(self, group: dist.ProcessGroup) -> None:
        """Collective: every rank continues from the largest call id; failed peers get another chance."""
        ids = torch.tensor([self.last_call], dtype=torch.int64, device=self.device)
        dist.all_reduce(ids, op=dist.ReduceOp.MAX, group=group)
        with self.cond:
            self.last_call = int(ids.item())
            for inbox in self.inboxes.values():
                inbox.lost = None


_GROUPS: "weakref.WeakKeyDictionary[dist.ProcessGroup, _GroupCalls]" = weakref.WeakKeyDictionary()
_GROUPS_LOCK = threading.Lock()


def _group_calls(group: dist.ProcessGroup) -> _GroupCalls:
    with _GROUPS_LOCK:
        if group not in _GROUPS:
            _GROUPS[group] = _GroupCalls(group)
        return _GROUPS[group]


class _Inbox:
    """The messages from group rank ``src``, received in order by one reader thread at a time.

    The reader runs while a call waits for a message not yet seen and always finishes the message it
    posted a receive for; it files messages of open calls and of calls this rank has not started yet
    and drops the others (late).  Messages from one peer arrive in call order, so once one of a later
    call is seen the waited-for call will never come.  After a receive from the peer failed, the peer
    counts as failed (its message order can no longer be trusted) until ``update_ep_member``.
    """

    def __init__(self, calls: _GroupCalls, src: int):
        self.calls, self.src = calls, src
        self.mail: dict[int, tuple[int, torch.Tensor]] = {}  # call id -> (kind, payload body)
        self.last = 0  # call id of the latest message received
        self.wanted: set[int] = set()
        self.reading = False
        self.lost: str | None = None  # why the link failed

    def expect(self, call: int) -> None:
        """Register interest in ``call`` and make sure the reader runs (caller holds the lock)."""
        self.wanted.add(call)
        if not self.reading and self.lost is None and call > self.last:
            self.reading = True
            threading.Thread(target=self._read, name=f"mooncake-ep-inbox-{self.src}", daemon=True).start()

    def take(self, call: int, kind: int, deadline: float | None) -> torch.Tensor | None:
        with self.calls.cond:
            try:
                while call not in self.mail:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if self.lost is not None or self.last >= call or (remaining is not None and remaining <= 0):
                        return None
                    self.calls.cond.wait(remaining)
                got, body = self.mail.pop(call)
            finally:
                self.wanted.discard(call)
        if got != kind:
            raise WireError(f"EP call {call}: rank {self.src} sent {_KINDS.get(got, got)} data, this rank is in "
                            f"{_KINDS[kind]}: the ranks made different sequences of EP calls on the group")
        return body

    def _read(self) -> None:
        cond = self.calls.cond
        while True:
            with cond:
                if not any(c > self.last for c in self.wanted):
                    self.reading = False
                    return
            try:
                call, kind, size = self._receive(torch.empty(3, dtype=torch.int64), _TAG_HEADER).tolist()
                payload = self._receive(torch.empty(size, dtype=torch.uint8), _TAG_PAYLOAD)
                if payload[:_PREFIX_BYTES].view(torch.int64).tolist() != [call, kind]:
                    raise WireError(f"payload does not belong to header [{call}, {kind}, {size}]")
            except Exception as exc:  # noqa: BLE001 - any failure: the peer is lost
                with cond:
                    self.lost = f"{type(exc).__name__}: {exc}"
                    self.reading = False
                    cond.notify_all()
                return
            with cond:
                self.last = call
                if call in self.calls.open or call > self.calls.last_call:
                    self.mail[call] = (kind, payload[_PREFIX_BYTES:])
                cond.notify_all()

    def _receive(self, tensor: torch.Tensor, tag: int) -> torch.Tensor:
        group = self.calls.group()
        if group is None:
            raise RuntimeError("the process group is gone")
        comm = tensor.to(self.calls.device)
        if dist.irecv(comm, group=group, group_src=self.src, tag=tag).wait() is False:
            raise RuntimeError(f"receive from rank {self.src} did not complete")
        return comm.cpu()


def _unpack_dispatch(body: torch.Tensor, L: int, H: int, src: int):
    """``(counts [L] list, token indices [n] int64, rows [n, H] bf16)`` of a dispatch payload body."""
    counts = body[:8 * L].view(torch.int64) if body.numel() >= 8 * L else None
    total = int(counts.sum()) if counts is not None and bool((counts >= 0).all()) else -1
    if total < 0 or body.numel() != 8 * L + total * (8 + 2 * H):
        raise WireError(f"dispatch data from rank {src} has {body.numel()} bytes, which does not fit {L} local "
                        f"experts of hidden {H}: the ranks disagree on num_experts or hidden")
    flat = body[8 * L:8 * (L + total)].view(torch.int64)
    return counts.tolist(), flat, body[8 * (L + total):].view(torch.bfloat16).view(total, H)


def _unpack_rows(body: torch.Tensor, n: int, H: int, src: int) -> torch.Tensor:
    """The ``[n, H]`` bf16 rows of a combine payload body."""
    if body.numel() != 2 * n * H:
        raise WireError(f"combine data from rank {src} has {body.numel()} bytes, expected {n} rows of hidden {H} "
                        f"({2 * n * H} bytes): a handle of another dispatch, or the ranks disagree on masks")
    return body.view(torch.bfloat16).view(n, H)


def _deadline(timeout_us: int) -> float | None:
    return None if timeout_us == -1 else time.monotonic() + timeout_us * 1e-6


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
