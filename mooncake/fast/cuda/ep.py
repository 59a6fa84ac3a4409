"""EP dispatch / combine on CUDA tensors: kernels in ``csrc/`` over shared device memory between the ranks of
one host.

``FastEPBuffer`` has the ref ``Buffer``'s ``dispatch`` / ``combine`` / ``get_next_combine_buffer``
signatures and gives the same bits (docs/ep-semantics.md; checked against ``mooncake.model.ep``).
Every rank allocates one device buffer (``mooncake.fast.cuda.shared``: memory the peers' mappings keep
alive, so a rank that dies never leaves the others writing freed memory) and maps every peer's buffer
(handles are exchanged with one ``all_gather`` over the group at construction).  Senders write
token messages straight into the receivers' staging slots (slot = rank of the token among the sender's
tokens routed to that expert: deterministic, no atomics), then raise a per-source signal; receivers wait
for each active source on the device with a ``timeout_us`` deadline (expiry writes ``active_ranks[src] = 0``),
lay blocks out by ascending source rank (exclusive prefix) and compact them into fresh output tensors.
Combine writes each expert output row into the token owner's slot ``(expert, token)``; the owner reduces
in fp32 in top-k order with separate multiply and add and rounds once to bf16.

All work is enqueued on the caller's current stream; no host synchronisation except for a CPU
``active_ranks`` tensor (copied to the device and back).  Sequence numbers live on the device, so
dispatch / combine can be captured in a CUDA graph (``timeout_us`` is then frozen at capture).
Liveness: a watchdog thread per buffer reads /proc for the peers' PIDs every 20 ms and sets a pinned
``dead[r]`` flag that the device-side waits poll, so a peer whose process exits ends the waits for it
(``active_ranks[r] = 0``) even with ``timeout_us = -1``; a peer that is alive but stuck is only ended by
``timeout_us``.  Calls rejected by the checks still count (``skip_call``); ``update_ep_member`` brings
the ranks' sequence numbers back in step.

Buffer regions per rank (offsets identical on all ranks, see ``_Layout``): signals, per-source counts,
dispatch staging ``[2 halves][R sources][T*min(K, L)]`` messages, combine ``[2 halves][T][K]`` bf16 rows;
all within upstream's ``get_ep_buffer_size_hint`` (plus 64 KiB).  Preconditions beyond the contract's:
all ranks use the same ``num_topk`` (as upstream) and ``hidden % 8 == 0``.

Preconditions as upstream (all ranks: the same call sequence, ``T``, ``H``, ``E``, masks); with
``check=True`` the contract's routing checks run first (they synchronise with the host).
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import socket
import threading
import weakref
from typing import Callable

import torch
import torch.distributed as dist

from ...control.errors import ArgumentError, MooncakeError
from ...control.procs import exited, process_state
from ...model import ep as model
from . import shared
from .lib import McEpArgs, check, load

_ids = itertools.count()
_INFO_WORDS = 16  # int64 words exchanged per rank at construction
_SHARE_FETCH_S = 10.0  # a peer's process hands over its buffer's descriptor within this
_CONTROL_SLACK = 1 << 16  # bytes beyond num_ep_buffer_bytes for signals and counts


class FastUnavailable(MooncakeError):
    """The CUDA fast path cannot serve this group / process; the message says why."""


class EventOverlap:
    """DeepEP's completion handle (same interface as ``mooncake.ep.EventOverlap``)."""

    def __init__(self, event: "torch.cuda.Event | None" = None, extra_tensors: tuple = ()):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()


class FastHandle(tuple):
    """Upstream's handle ``(src_info, layout_range, T, H, E)``; ``.result`` is the ``model.DispatchResult``."""

    def __new__(cls, result: model.DispatchResult, T: int, H: int, E: int, **state):
        obj = super().__new__(cls, (result.src_info, result.layout_range, T, H, E))
        obj.result = result
        obj.__dict__.update(state)
        return obj


def _pid_alive(pid: int) -> bool | None:
    """True / False for a process of this PID namespace, None if it cannot be told (no /proc)."""
    gone = exited(process_state(pid))
    return None if gone is None else not gone


class _Watchdog:
    """One daemon thread per buffer: every ``period_s`` it checks the peers' processes and writes 1 into
    the pinned ``dead[r]`` flag the device-side waits poll, so a dead peer ends a wait even with
    ``timeout_us = -1``.  Reads /proc only (about 0% of a core)."""

    def __init__(self, dead: torch.Tensor, pids: dict[int, int], period_s: float = 0.02):
        self._flags = dead.numpy()  # pinned host memory, shared with the device
        self._pids = dict(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), name="mooncake-ep-watch", daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        while self._pids and not self._stop.wait(period_s):
            for r, pid in list(self._pids.items()):
                if _pid_alive(pid) is False:
                    self._flags[r] = 1
                    del self._pids[r]

    def stop(self) -> None:
        self._stop.set()


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _host_id() -> int:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    digest = hashlib.sha256(f"{socket.gethostname()}/{boot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)


class _Layout:
    """Offsets in every rank's shared buffer for (T, H, E, R, K); identical on all ranks.

    Dispatch staging: per source ``T * min(K, L)`` message slots (rows for this rank's experts, ordered by
    local expert then token); combine: one bf16 row per (token, top-k position).  Both are at most the
    ``E * T`` rows that upstream's size hint budgets for.
    """

    def __init__(self, T: int, H: int, E: int, R: int, K: int):
        L = E // R
        self.msg_stride = _align(16 + 2 * H, 16)  # the larger of the bf16 and FP8 messages
        self.stage_cap = T * min(K, L)
        self.off_dsig = 0
        self.off_csig = 8 * R
        self.off_dcount = _align(16 * R, 256)
        self.half_dcount = _align(4 * R * L, 256)
        self.off_ddata = self.off_dcount + 2 * self.half_dcount
        self.half_ddata = _align(R * self.stage_cap * self.msg_stride, 256)
        self.off_cdata = self.off_ddata + 2 * self.half_ddata
        self.half_cdata = _align(T * K * 2 * H, 256)
        self.total = self.off_cdata + 2 * self.half_cdata


class FastEPBuffer:
    """EP buffer in shared device memory over ``group`` (all ranks on one host; collective constructor).

    Arguments:
        group: any process group (used once, to exchange the buffers' handles with ``all_gather``).
        num_ep_buffer_bytes: upstream's budget (``get_ep_buffer_size_hint``); this many bytes (plus 64 KiB of
            control space) are allocated on the device.
        device: the CUDA device (default: the current one).
        event_factory: ``(event, tensors) -> EventOverlap``-like object for ``async_finish``.
    """

    def __init__(self, group: dist.ProcessGroup, num_ep_buffer_bytes: int, device=None,
                 event_factory: Callable | None = None):
        lib, reason = load()
        if lib is None:
            raise FastUnavailable(f"CUDA fast path unavailable: {reason}")
        if not isinstance(num_ep_buffer_bytes, int) or num_ep_buffer_bytes <= 0:
            raise ArgumentError(f"num_ep_buffer_bytes must be a positive int (see get_ep_buffer_size_hint), "
                                f"got {num_ep_buffer_bytes!r}")
        self._lib = lib
        self.group = group
        self.rank, self.num_ranks = group.rank(), group.size()
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None
                                   else torch.device(device).index or 0)
        self.num_ep_buffer_bytes = num_ep_buffer_bytes
        self._event_factory = event_factory or EventOverlap
        self._id = next(_ids)
        self._bytes = _align(num_ep_buffer_bytes + _CONTROL_SLACK, 4096)
        self._set_device()
        # memory the peers' mappings keep alive: a rank that dies never leaves its peers writing freed memory
        self._mem = shared.allocate(lib, self.device.index, self._bytes, "EP buffer")
        self._base = self._mem.addr
        self._opened: list[shared.Mapping] = []
        try:
            self._connect()
        except BaseException:
            self._release()
            raise
        sms = ctypes.c_int(0)
        check(lib, lib.mc_sm_count(self.device.index, ctypes.byref(sms)), "SM count")
        self._sms = sms.value
        self._ws = torch.zeros(16, dtype=torch.int64, device=self.device)
        self._tabs: dict[int, torch.Tensor] = {}
        self._mask_scratch = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        self._combine_buffer: torch.Tensor | None = None
        self._combine_buffer_handle = None
        # liveness: peers whose process the host sees die end the device-side waits for them
        self._dead = torch.zeros(self.num_ranks, dtype=torch.int32).pin_memory()
        visible = {r: pid for r, pid in self._pids.items() if r != self.rank and _pid_alive(pid)}
        self._watchdog = None
        if len(visible) == self.num_ranks - 1:  # every peer is a process this host (PID namespace) sees
            self._watchdog = _Watchdog(self._dead, visible)
            weakref.finalize(self, self._watchdog.stop)

    # -- set-up ---------------------------------------------------------------------------------
    def _set_device(self) -> None:
        check(self._lib, self._lib.mc_set_device(self.device.index), f"cudaSetDevice({self.device.index})")

    def _comm_device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        return self.device if backend in ("nccl", "mooncake") else torch.device("cpu")

    def _connect(self) -> None:
        lib = self._lib
        info = torch.zeros(_INFO_WORDS, dtype=torch.int64)
        info[:4] = torch.frombuffer(bytearray(self._mem.handle), dtype=torch.int64)
        info[8], info[9], info[10] = _host_id(), os.getpid(), self._bytes
        comm = self._comm_device()
        parts = [torch.empty(_INFO_WORDS, dtype=torch.int64, device=comm) for _ in range(self.num_ranks)]
        dist.all_gather(parts, info.to(comm), group=self.group)
        parts = [p.cpu() for p in parts]
        self._pids = {r: int(p[9]) for r, p in enumerate(parts)}
        for r, p in enumerate(parts):
            if int(p[8]) != int(info[8]):
                raise FastUnavailable(f"rank {r} runs on another host: the CUDA fast path needs every rank of "
                                      "the group on this host")
            if int(p[10]) != self._bytes:
                raise ArgumentError(f"num_ep_buffer_bytes differs across ranks (rank {r}: {int(p[10])} bytes "
                                    f"allocated, this rank {self._bytes})")
        peers = []
        for r, p in enumerate(parts):
            if r == self.rank:
                peers.append(self._base)
                continue
            try:
                m = shared.attach(lib, self.device.index, p[:4].numpy().tobytes(), _SHARE_FETCH_S)
            except shared.FetchError as exc:
                raise MooncakeError(f"EP buffer of rank {r}: {exc}") from None
            self._opened.append(m)
            peers.append(m.addr)
        self._peers = torch.tensor(peers, dtype=torch.int64, device=self.device)

    def _release(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.stop()
        for m in getattr(self, "_opened", []):
            m.close()
        self._opened = []
        if getattr(self, "_base", 0):
            self._mem.close()
            self._base = 0

    def destroy(self) -> None:
        """Free the device buffer after every rank is done with it (collective: a barrier first)."""
        if not getattr(self, "_base", 0):
            return
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._release()

    def __del__(self):
        try:
            if getattr(self, "_base", 0):
                torch.cuda.synchronize(self.device)
                self._release()
        except Exception:
            pass

    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                num_experts: int) -> int:
        return model.get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def supports(hidden: int, use_fp8: bool) -> str | None:
        """Why these sizes cannot run on the kernels (None if they can)."""
        if hidden % 8:
            return f"hidden ({hidden}) must be a multiple of 8 for the CUDA kernels"
        if use_fp8 and hidden % 128:
            return f"FP8 dispatch needs hidden % 128 == 0, got {hidden}"
        if 16 + 4 * hidden + 4 * 64 + 4 * 4096 > 200 * 1024:
            return f"hidden ({hidden}) is too large for the CUDA kernels' shared-memory staging"
        return None

    # -- helpers ---------------------------------------------------------------------------------
    def _layout(self, T: int, H: int, E: int, K: int) -> _Layout:
        lay = _Layout(T, H, E, self.num_ranks, K)
        if lay.total > self._bytes:
            need = self.get_ep_buffer_size_hint(T, H, self.num_ranks, E)
            raise ArgumentError(f"num_ep_buffer_bytes={self.num_ep_buffer_bytes} is too small for this call: it "
                                f"needs {need} bytes = get_ep_buffer_size_hint({T}, {H}, {self.num_ranks}, {E})")
        return lay

    def _table(self, E: int) -> torch.Tensor:
        tab = self._tabs.get(E)
        if tab is None:
            # begin | count | stage (each [L*R]) | rowbase[L] | total  (the dispatch wait kernel), then
            # counts[E] | pre[E]  (the dispatch send prologue)
            tab = self._tabs[E] = torch.zeros(6 * E + 4, dtype=torch.int32, device=self.device)
        return tab

    def _dev(self, t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            raise ArgumentError(f"{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t))}")
        if t.device != self.device:
            if t.device.type == "cuda":
                raise ArgumentError(f"{name} is on {t.device}, this buffer on {self.device}")
            t = t.to(self.device)
        t = t.contiguous()
        if t.data_ptr() % 16:
            t = t.clone()
        return t

    def _mask(self, active_ranks: torch.Tensor):
        """(device int32 [R] the kernels use, writeback or None)."""
        if not isinstance(active_ranks, torch.Tensor) or active_ranks.dtype != torch.int32 \
                or tuple(active_ranks.shape) != (self.num_ranks,):
            raise ArgumentError(f"active_ranks must be an int32 tensor of shape [{self.num_ranks}] (1 = alive), got "
                                f"{getattr(active_ranks, 'dtype', type(active_ranks))} "
                                f"{tuple(getattr(active_ranks, 'shape', ()))}")
        if active_ranks.device == self.device and active_ranks.is_contiguous():
            return active_ranks, None
        self._mask_scratch.copy_(active_ranks)
        return self._mask_scratch, active_ranks

    @staticmethod
    def _timeout_ns(timeout_us) -> int:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or (timeout_us < 0 and timeout_us != -1):
            raise ArgumentError(f"timeout_us must be a non-negative int or -1 (no EP deadline), got {timeout_us!r}")
        return -1 if timeout_us == -1 else timeout_us * 1000

    def _args(self, lay: _Layout, mask: torch.Tensor, T: int, H: int, E: int, K: int, N: int, timeout_ns: int,
              **ptrs) -> McEpArgs:
        a = McEpArgs()
        a.stream = torch.cuda.current_stream(self.device).cuda_stream
        a.rank, a.num_ranks, a.num_local_experts, a.num_experts = self.rank, self.num_ranks, E // self.num_ranks, E
        a.max_tokens, a.hidden, a.num_topk, a.num_tokens = T, H, K, N
        a.timeout_ns = timeout_ns
        a.peers, a.local_base, a.ws, a.tab = self._peers.data_ptr(), self._base, self._ws.data_ptr(), \
            self._table(E).data_ptr()
        a.active = mask.data_ptr()
        for name in ("off_dsig", "off_csig", "off_dcount", "off_ddata", "off_cdata", "msg_stride",
                     "half_dcount", "half_ddata", "half_cdata", "stage_cap"):
            setattr(a, name, getattr(lay, name))
        for name, value in ptrs.items():
            setattr(a, name, value)
        a.grid_hint = self._sms
        a.dead = self._dead.data_ptr() if self._watchdog is not None else 0
        return a

    def _launch(self, fn, args: McEpArgs, phase: int, what: str) -> None:
        self._set_device()
        check(self._lib, fn(ctypes.byref(args), phase), what)

    def update_ep_member(self) -> None:
        """Bring every rank's call sequence numbers in step (collective: the largest wins).

        After ranks made different numbers of calls (a rank that died and came back, a call skipped on
        one rank only), the next call would otherwise wait for signals that never come.  Signals are
        monotonic, so jumping forward never mistakes an old signal for a new one.
        """
        torch.cuda.synchronize(self.device)
        seqs = self._ws[:2].cpu()
        comm = self._comm_device()
        parts = [torch.empty(2, dtype=torch.int64, device=comm) for _ in range(self.num_ranks)]
        dist.all_gather(parts, seqs.to(comm), group=self.group)
        top = torch.stack([p.cpu() for p in parts]).amax(dim=0)
        self._ws[:2].copy_(top.to(self.device))
        torch.cuda.synchronize(self.device)

    def skip_call(self, kind: str) -> None:
        """Count a call this rank rejected (``kind`` "dispatch" or "combine") without taking part in it.

        The contract counts rejected calls (docs/ep-semantics.md): the other ranks time this rank out, and
        the next call must use the same sequence number and buffer half everywhere.
        """
        which = {"dispatch": 0, "combine": 1}[kind]
        self._set_device()
        check(self._lib, self._lib.mc_ep_skip(self._ws.data_ptr(), which,
                                              torch.cuda.current_stream(self.device).cuda_stream), "skip_call")

    # -- dispatch --------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, active_ranks: torch.Tensor,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, timeout_us: int,
                 use_fp8: bool = True, async_finish: bool = False, return_recv_hook: bool = False,
                 cumulative_local_expert_recv_stats: torch.Tensor | None = None, check: bool = True):
        """Same arguments and results as ``mooncake.ep.Buffer.dispatch`` (docs/ep-semantics.md).

        A call rejected by the checks still counts as a call (``skip_call``), as the contract says.
        """
        try:
            return self._dispatch(x, topk_idx, active_ranks, num_max_dispatch_tokens_per_rank, num_experts,
                                  timeout_us, use_fp8, async_finish, return_recv_hook,
                                  cumulative_local_expert_recv_stats, check)
        except ArgumentError:
            self.skip_call("dispatch")
            raise

    def _dispatch(self, x, topk_idx, active_ranks, num_max_dispatch_tokens_per_rank, num_experts, timeout_us,
                  use_fp8, async_finish, return_recv_hook, cumulative_local_expert_recv_stats, check):
        T, E, R = num_max_dispatch_tokens_per_rank, num_experts, self.num_ranks
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.dim() != 2:
            raise ArgumentError(f"x must be a 2-D bfloat16 tensor [num_tokens, hidden], got "
                                f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        N, H = x.shape
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != N:
            raise ArgumentError(f"topk_idx must be 2-D with {N} rows (one per token of x)")
        if async_finish and return_recv_hook:
            raise ArgumentError("async_finish and return_recv_hook cannot both be set (as upstream)")
        if not isinstance(E, int) or not isinstance(T, int) or E < 1 or E % R or T < 1 or N > T:
            raise ArgumentError(f"need num_experts % num_ranks == 0 and num_tokens ({N}) <= "
                                f"num_max_dispatch_tokens_per_rank, got E={E!r}, R={R}, T={T!r}")
        why = self.supports(H, use_fp8)
        if why:
            raise ArgumentError(why)
        if check:
            try:
                model.validate_routing(topk_idx, E, T, R)
            except ValueError as exc:
                raise ArgumentError(str(exc)) from None
            if not bool(torch.isfinite(x).all()):
                raise ArgumentError("x must be finite (inf/NaN tokens have no defined FP8 scale or combine result)")
        timeout_ns = self._timeout_ns(timeout_us)
        L, K, S = E // R, topk_idx.shape[1], H // 128
        lay = self._layout(T, H, E, K)
        x_d, topk_d = self._dev(x, torch.bfloat16, "x"), self._dev(topk_idx, torch.int64, "topk_idx")
        mask, writeback = self._mask(active_ranks)
        dev = self.device
        recv_x = torch.empty(L, R * T, H, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
        recv_scales = (torch.empty(L, S, R * T, dtype=torch.float32, device=dev).transpose(1, 2)
                       if use_fp8 else None)
        recv_count = torch.empty(L, dtype=torch.int32, device=dev)
        src_info = torch.full((L, R * T), -1, dtype=torch.int32, device=dev)
        layout_range = torch.empty(L, R, dtype=torch.int64, device=dev)
        src_k = torch.empty(L, R * T, dtype=torch.int32, device=dev)  # top-k position of each row at its source
        args = self._args(lay, mask, T, H, E, K, N, timeout_ns, use_fp8=int(bool(use_fp8)), x=x_d.data_ptr(),
                          topk=topk_d.data_ptr(), recv_x=recv_x.data_ptr(),
                          recv_scales=recv_scales.data_ptr() if use_fp8 else 0, recv_count=recv_count.data_ptr(),
                          src_info=src_info.data_ptr(), layout_range=layout_range.data_ptr(),
                          src_k=src_k.data_ptr())
        result = model.DispatchResult(recv_x, recv_scales, recv_count, src_info, layout_range)
        handle = FastHandle(result, T, H, E, buffer_id=self._id, num_tokens=N, topk_idx=topk_idx, use_fp8=use_fp8,
                            received=False, src_k=src_k)
        keep = [x_d, topk_d, mask]  # referenced until the receive kernels are enqueued

        def receive(launch: bool = True) -> None:
            if launch:
                self._launch(self._lib.mc_ep_dispatch, args, 2, "dispatch (receive)")
            if writeback is not None:
                _write_zeros(writeback, mask)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.device))
            handle.received = True
            keep.clear()

        if return_recv_hook:
            self._launch(self._lib.mc_ep_dispatch, args, 1, "dispatch (send)")
            hook = _once(receive)
        else:
            self._launch(self._lib.mc_ep_dispatch, args, 3, "dispatch")
            receive(launch=False)
            hook = _noop
        recv = (recv_x, recv_scales) if use_fp8 else recv_x
        event = self._event((recv_x, x_d, topk_d)) if async_finish else None
        return recv, recv_count, handle, event, hook

    # -- combine ---------------------------------------------------------------------------------
    def get_next_combine_buffer(self, handle: FastHandle) -> torch.Tensor:
        """The ``[L, R*T, H]`` bf16 tensor to write expert outputs into for ``combine(zero_copy=True)``."""
        self._check_handle(handle)
        _, _, T, H, E = handle
        shape = (E // self.num_ranks, self.num_ranks * T, H)
        if self._combine_buffer is None or tuple(self._combine_buffer.shape) != shape:
            self._combine_buffer = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        self._combine_buffer_handle = handle
        return self._combine_buffer

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, FastHandle) or handle.buffer_id != self._id:
            raise ArgumentError("handle must be the handle returned by this buffer's dispatch")
        if not handle.received:
            raise ArgumentError("handle's dispatch has not received yet: call its recv hook first")

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                active_ranks: torch.Tensor, timeout_us: int, handle: FastHandle, zero_copy: bool = False,
                async_finish: bool = False, return_recv_hook: bool = False, out: torch.Tensor | None = None):
        """Same arguments and results as ``mooncake.ep.Buffer.combine`` (docs/ep-semantics.md)."""
        try:
            return self._combine(x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy,
                                 async_finish, return_recv_hook, out)
        except ArgumentError:
            self.skip_call("combine")
            raise

    def _combine(self, x, topk_idx, topk_weights, active_ranks, timeout_us, handle, zero_copy, async_finish,
                 return_recv_hook, out):
        self._check_handle(handle)
        if async_finish and return_recv_hook:
            raise ArgumentError("async_finish and return_recv_hook cannot both be set (as upstream)")
        _, _, T, H, E = handle
        R, L, N = self.num_ranks, E // self.num_ranks, handle.num_tokens
        if zero_copy:
            if self._combine_buffer_handle is not handle:
                raise ArgumentError("zero_copy=True needs the expert outputs written into "
                                    "get_next_combine_buffer(handle) first (it was not requested for this handle)")
            x = self._combine_buffer
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or tuple(x.shape) != (L, R * T, H):
            raise ArgumentError(f"x must be bfloat16 [{L}, {R * T}, {H}] (expert outputs laid out as dispatch's "
                                f"recv_x), got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        if not isinstance(topk_idx, torch.Tensor) or tuple(topk_idx.shape) != tuple(handle.topk_idx.shape):
            raise ArgumentError(f"topk_idx must have the shape of the dispatch's, {tuple(handle.topk_idx.shape)}")
        if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32 \
                or tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise ArgumentError(f"topk_weights must be float32 of shape {tuple(topk_idx.shape)}")
        if out is not None and (out.dtype != torch.bfloat16 or tuple(out.shape) != (N, H)):
            raise ArgumentError(f"out must be bfloat16 [{N}, {H}], got {out.dtype} {tuple(out.shape)}")
        timeout_ns = self._timeout_ns(timeout_us)
        K = topk_idx.shape[1]
        lay = self._layout(T, H, E, K)
        x_d = self._dev(x, torch.bfloat16, "x")
        topk_d = self._dev(topk_idx, torch.int64, "topk_idx")
        w_d = self._dev(topk_weights, torch.float32, "topk_weights")
        mask, writeback = self._mask(active_ranks)
        direct = out is not None and out.device == self.device and out.is_contiguous() and out.data_ptr() % 16 == 0
        result = out if direct else torch.empty(N, H, dtype=torch.bfloat16, device=self.device)
        src_info, layout_range = handle[0], handle[1]
        args = self._args(lay, mask, T, H, E, K, N, timeout_ns, x=x_d.data_ptr(), topk=topk_d.data_ptr(),
                          weights=w_d.data_ptr(), out=result.data_ptr(), src_info=src_info.data_ptr(),
                          layout_range=layout_range.data_ptr(), src_k=handle.src_k.data_ptr())
        keep = [x_d, topk_d, w_d, mask]

        def receive(launch: bool = True) -> None:
            if launch:
                self._launch(self._lib.mc_ep_combine, args, 2, "combine (receive)")
            if writeback is not None:
                _write_zeros(writeback, mask)
            if out is not None and not direct:
                out.copy_(result)
            keep.clear()

        if return_recv_hook:
            self._launch(self._lib.mc_ep_combine, args, 1, "combine (send)")
            hook = _once(receive)
        else:
            self._launch(self._lib.mc_ep_combine, args, 3, "combine")
            receive(launch=False)
            hook = _noop
        final = out if out is not None else result
        event = self._event((final, x_d)) if async_finish else None
        return final, event, hook

    def _event(self, tensors: tuple):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return self._event_factory(event, tensors)

    # -- single-kernel helpers (tests) ---------------------------------------------------------
    def quantize_fp8(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dispatch kernel's FP8 quantizer on its own: ``(q [N, H] e4m3fn, scale_inv [N, H/128] fp32)``."""
        return quantize_fp8(x)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 ptp128c quantization by the CUDA kernel (same code as dispatch); ``x`` ``[N, H]`` bf16 on CUDA."""
    lib, reason = load()
    if lib is None:
        raise FastUnavailable(f"CUDA fast path unavailable: {reason}")
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.device.type != "cuda" or x.shape[1] % 128:
        raise ArgumentError("quantize_fp8 needs a 2-D bfloat16 CUDA tensor with hidden % 128 == 0")
    x = x.contiguous()
    n, h = x.shape
    q = torch.empty(n, h, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(n, h // 128, dtype=torch.float32, device=x.device)
    check(lib, lib.mc_set_device(x.device.index), "cudaSetDevice")
    check(lib, lib.mc_quantize_fp8(x.data_ptr(), q.data_ptr(), s.data_ptr(), n, h,
                                   torch.cuda.current_stream(x.device).cuda_stream), "quantize_fp8")
    return q, s


def _write_zeros(target: torch.Tensor, mask: torch.Tensor) -> None:
    """EP only ever writes 0 into the caller's mask: copy the failures, never the snapshot (a 0 the
    caller set meanwhile must stay)."""
    target.masked_fill_(mask.to(target.device) == 0, 0)


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = []

    def hook() -> None:
        if not done:
            done.append(True)
            fn()

    return hook


def _noop() -> None:
    pass
