"""One UCX worker per process, driven by our own progress loop (no ucxx progress thread, no asyncio).

Endpoints are created with error handling on, so a dead peer is reported (UCX 1.21 then uses TCP only;
over shared memory a SIGKILLed peer is never reported): pending endpoint-bound receives fail with
``UCXCanceledError`` and in-flight sends with ``UCXConnectionResetError`` within tens of milliseconds,
and the endpoint's close callback marks the peer dead.  Receives are always posted on the endpoint,
never on the worker, so a dead peer's receive can never steal a replacement's message.

Threads: callers post and progress under one lock; a single named background thread drives the
registered operations (pollers) while nobody else is waiting on one, and otherwise sleeps, with no
timeout when idle, on one ``select`` over: the worker's event fd (``arm``), its own *kick* eventfd
(``kick()``: an operation whose caller will not wait on it, a future somebody waits on, a decision),
a timer fd (the deadline of an operation registered while it slept), and, while operations are
pending, the doorbells of the shared-memory planes (``add_sleeper``).  It
wakes at the earliest deadline of a pending operation, never on a timer, so an idle rank uses no CPU
and an operation nobody waits on completes (its Work, its future and the callbacks chained on it)
as soon as the event that commits it arrives.

CUDA memory.  Once per process, when the engine starts, ``cuda_choice`` decides whether messages may live
in CUDA device memory (``MOONCAKE_UCX_CUDA``: ``auto`` (default) uses it where UCX can take it, ``on``
requires it, ``off`` stages every payload through host memory): UCX must report CUDA among the memory
types of its context (``ucp_context_query``; ucxx's own ``cuda_support`` flag tests the host bit and is
true without a GPU) and list its ``cuda_copy`` transport, and torch must see a GPU.  Which CUDA transport
then moves the bytes (``cuda_copy`` staging through UCX's pipeline, ``cuda_ipc``, GPUDirect RDMA) is
UCX's choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import select
import socket
import threading
import time
from typing import Callable, NamedTuple

import numpy as np
import torch

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets UCX_MEMTYPE_CACHE, unused here
try:
    import ucxx._lib.libucxx as ucx_api  # import before mpi4py: both ship libucp, ucxx's must load first
    from ucxx._lib.arr import Array
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
    if exc.name is None or not exc.name.startswith("ucxx"):
        raise
    raise ModuleNotFoundError(
        "mooncake needs UCX (the ucxx module), which comes from one of its extras: "
        "pip install 'mooncake-ft[cu13]' (or 'mooncake-ft[cu12]' for a CUDA 12 driver; either works without a GPU)",
        name=exc.name) from exc

from .. import log as _log  # noqa: F401 - applies MOONCAKE_LOG_LEVEL before the first group logs
from ..control.errors import ArgumentError, MooncakeError

_SPIN_S = 50e-6  # busy-progress this long before sleeping on the event fd
# A poller registered without a deadline (an older caller) is re-run at least this often while
# pending, as before; pollers that give their deadline are woken only by events and that deadline.
_NO_DEADLINE_SLICE_S = 0.002
# A pending plane operation with its own blocking wait and no doorbell here (CUDA IPC futex, P2P):
# the background thread sleeps in that wait for at most this long, then looks at its other work.
_BLOCKER_SLICE_S = 0.002


class _Poller(NamedTuple):
    poll: Callable[[], None]
    deadline: Callable[[], float] | None  # monotonic time by which it must run again (inf: only on events)
    blocker: Callable[[float], object] | None  # the plane's own wait(timeout_s), when no fd covers it


class _Sleeper(NamedTuple):
    fd: int
    arm: Callable[[], bool]  # before sleeping: ask to be rung; False if something moved (do not sleep)
    disarm: Callable[[], None]  # after waking
    own_fd: int  # the engine's duplicate of ``fd``: a plane may close its fd while the thread selects on it


Buffer = np.ndarray | torch.Tensor  # host bytes, or a contiguous uint8 CUDA tensor (device memory)


class Request:
    """One posted send or receive; ``buffer`` stays referenced until the request completes.  ``head``:
    a host copy of a received device buffer's header, once its reader made one."""

    __slots__ = ("handle", "buffer", "peer_key", "head", "_completed")

    def __init__(self, handle, buffer: Buffer, peer_key: bytes):
        self.handle, self.buffer, self.peer_key = handle, buffer, peer_key
        self.head: np.ndarray | None = None
        self._completed = False

    @property
    def completed(self) -> bool:
        """Asks UCX until it says yes (each ask costs a call into ucxx), then remembers."""
        if not self._completed:
            self._completed = self.handle.completed
        return self._completed

    def error(self) -> BaseException | None:
        """The UCX error of a completed request, or None when it succeeded."""
        try:
            self.handle.check_error()
        except Exception as exc:  # ucxx raises typed UCXError subclasses
            return exc
        return None


class FailedRequest:
    """A request that could not even be posted (no endpoint to the peer): failed from the start."""

    __slots__ = ("buffer", "peer_key", "_error")
    completed = True

    def __init__(self, buffer: Buffer, peer_key: bytes, error: BaseException):
        self.buffer, self.peer_key, self._error = buffer, peer_key, error

    def error(self) -> BaseException:
        return self._error


class Peer:
    """An endpoint to one remote worker; ``alive`` turns False once UCX reports the peer gone."""

    def __init__(self, engine: "Engine", address: bytes):
        self.address = address
        self.alive = True
        self._engine = engine
        remote = ucx_api.UCXAddress.create_from_buffer(address)
        self.endpoint = ucx_api.UCXEndpoint.create_from_worker_address(
            engine.worker, remote, endpoint_error_handling=True)
        self.endpoint.set_close_callback(self._on_close)

    def _on_close(self, *args) -> None:
        self.alive = False
        self._engine.peer_closed(self)


def _failed(peer: "Peer | UnreachablePeer", buffer: Buffer) -> FailedRequest:
    """A request to a peer known gone fails at once, never touching its endpoint: UCX must not be asked
    to post on an endpoint it has failed."""
    error = getattr(peer, "error", None) or ConnectionResetError("UCX closed the endpoint: the peer is gone")
    return FailedRequest(buffer, peer.address, error)


class UnreachablePeer:
    """A peer UCX could not connect to (it is gone): every request to it fails at once."""

    alive = False

    def __init__(self, address: bytes, error: BaseException):
        self.address, self.error = address, error


CUDA_ENV = "MOONCAKE_UCX_CUDA"
CUDA_MODES = ("auto", "on", "off")
_MEMORY_TYPE_CUDA = 1  # ucs_memory_type_t: UCS_MEMORY_TYPE_HOST = 0, UCS_MEMORY_TYPE_CUDA = 1
_ATTR_FIELD_MEMORY_TYPES = 1 << 2  # UCP_ATTR_FIELD_MEMORY_TYPES
_CUDA_TRANSPORTS = ("cuda_copy", "cuda_ipc", "gdr_copy")
_RESOURCE = re.compile(r"^#\s*resource\s+\d+\s*:.*?\s(\S+)/\S+\s*$", re.M)


class CudaChoice(NamedTuple):
    """Whether this process hands CUDA device memory to UCX (``on``), and why."""

    on: bool
    mode: str  # MOONCAKE_UCX_CUDA: auto | on | off
    reason: str
    memory_types: int | None  # UCX's bit mask of ucs_memory_type_t (None: could not ask)
    transports: tuple[str, ...]  # UCX's CUDA transports in this context


class _ContextAttr(ctypes.Structure):
    """The head of ``ucp_context_attr_t`` up to ``memory_types`` (the only field asked for)."""

    _fields_ = [("field_mask", ctypes.c_uint64), ("request_size", ctypes.c_size_t),
                ("thread_mode", ctypes.c_int), ("memory_types", ctypes.c_uint64),
                ("tail", ctypes.c_char * 64)]  # name and later fields: never written for this mask


def cuda_mode() -> str:
    """``MOONCAKE_UCX_CUDA`` (default ``auto``); ``ArgumentError`` for any other value."""
    mode = os.environ.get(CUDA_ENV, "auto").strip().lower() or "auto"
    if mode not in CUDA_MODES:
        raise ArgumentError(f"MOONCAKE_UCX_CUDA must be one of auto, on, off, got {os.environ[CUDA_ENV]!r}")
    return mode


def memory_types(context) -> int | None:
    """The memory types UCX supports in ``context`` (``ucp_context_query``), or None when the UCX library
    that ucxx loaded cannot be found."""
    try:
        lib = ctypes.CDLL("libucp.so.0", mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)  # the copy ucxx loaded
    except OSError:
        return None
    attr = _ContextAttr(field_mask=_ATTR_FIELD_MEMORY_TYPES)
    lib.ucp_context_query.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ContextAttr)]
    lib.ucp_context_query.restype = ctypes.c_int
    if lib.ucp_context_query(context.handle, ctypes.byref(attr)) != 0:
        return None
    return int(attr.memory_types)


def cuda_transports(info: str) -> tuple[str, ...]:
    """The CUDA transports among the resources ``ucp_context_print_info`` lists (the context's ``info``)."""
    found = [tl for tl in _RESOURCE.findall(info) if tl.startswith(_CUDA_TRANSPORTS)]
    return tuple(dict.fromkeys(found))


def decide_cuda(mode: str, gpu: bool, mem_types: int | None, transports: tuple[str, ...]) -> CudaChoice:
    """The choice for ``mode`` given the facts: torch sees a GPU, UCX's memory types and CUDA transports."""
    def choice(on: bool, reason: str) -> CudaChoice:
        return CudaChoice(on, mode, reason, mem_types, transports)

    if mode == "off":
        return choice(False, f"{CUDA_ENV}=off: CUDA tensors are staged through host memory")
    if not gpu:
        return choice(False, "torch sees no CUDA device")
    if mem_types is None:
        return choice(False, "could not ask UCX for its memory types (libucp.so.0 is not loaded by that name)")
    if not mem_types & (1 << _MEMORY_TYPE_CUDA):
        return choice(False, "UCX does not support CUDA memory here (built without CUDA, or its CUDA module "
                             "failed to load)")
    if "cuda_copy" not in transports:
        return choice(False, "UCX has no cuda_copy transport in this context (check UCX_TLS)")
    return choice(True, f"UCX takes CUDA memory (transports: {', '.join(transports)})")


def cuda_choice(context) -> CudaChoice:
    """The choice for this process's UCX ``context`` and ``MOONCAKE_UCX_CUDA``."""
    return decide_cuda(cuda_mode(), torch.cuda.is_available(), memory_types(context),
                       cuda_transports(context.info))


def _ucx_config(net_devices: str | None) -> dict[str, str]:
    config = {"TCP_TX_SEG_SIZE": "1M", "TCP_RX_SEG_SIZE": "1M"}
    if "UCX_LOG_LEVEL" not in os.environ:  # a dead peer is expected here, not an error to print
        config["LOG_LEVEL"] = "fatal"
    if net_devices and "UCX_NET_DEVICES" not in os.environ:
        config["NET_DEVICES"] = net_devices
    return config


class _DeadlineTimer:
    """A one-shot timer fd on time.monotonic's clock (Linux timerfd, CLOCK_MONOTONIC): the background
    thread sleeps on it too, so an operation registered while it sleeps can move its wake-up earlier
    without waking it now.  ``at`` is the armed time (inf: not armed); callers hold the engine's _wake."""

    _CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self._settime = libc.timerfd_settime
        self.fd = libc.timerfd_create(self._CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.at = math.inf

    def arm(self, at: float) -> None:
        """Fire at monotonic time ``at`` (at once if it passed)."""
        at = max(at, 1e-9)  # 0 would disarm it
        sec = int(at)
        spec = (ctypes.c_long * 4)(0, 0, sec, int((at - sec) * 1e9))  # it_interval 0: one shot; it_value
        if self._settime(self.fd, self._TFD_TIMER_ABSTIME, spec, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self.at = at

    def take(self) -> None:
        """After a sleep: consume a firing (else the fd stays readable) and forget a passed time."""
        if self.at == math.inf:  # not armed: nothing to read (no system call per wake-up)
            return
        try:
            os.read(self.fd, 8)
            self.at = math.inf
        except BlockingIOError:
            if self.at <= time.monotonic():
                self.at = math.inf


class Engine:
    """The process-wide UCX context, worker, endpoint cache and progress machinery."""

    def __init__(self, net_devices: str | None):
        self.net_devices = net_devices
        self.context = ucx_api.UCXContext(config_dict=_ucx_config(net_devices),
                                          feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self.cuda = cuda_choice(self.context)
        self.device_messages = 0  # messages posted in device memory (benchmarks/ucx_cuda.py reports them)
        # calls of the worker's progress so far: a receive posted earlier completes only in one of them
        # (progress() and probe() are the only callers that drive the worker)
        self.progressed = 0
        self._cuda_device: int | None = None  # the device of the first CUDA buffer posted
        self.worker = ucx_api.UCXWorker(self.context)
        self.worker.init_blocking_progress_mode()
        self.address: bytes = bytes(self.worker.address)
        self.lock = threading.RLock()
        self._peers: dict[bytes, Peer | UnreachablePeer] = {}
        self._close_listeners: list[Callable[[bytes], None]] = []
        self._in_flight = 0
        self._waiters = 0
        self._waiting_from = 0  # self.progressed when the first of the current waiters came
        self._parked = False  # the background thread waits on ``_wake`` (nothing to do, or a caller waits)
        self._sleeping = False  # the background thread is in (or about to enter) its select
        self._kicked = False  # woken while running: look again before sleeping
        self._sleep_armed = False  # its select covers UCX, the kick fd and the doorbells in _sleep_fds
        self._sleep_fds: frozenset[int] = frozenset()
        self._selecting = False  # the background thread is inside its select on the doorbells
        self._closing: list[int] = []  # removed doorbells' own_fd, closed once that select returns
        self._sleep_until = math.inf  # its select's timeout, as a monotonic time
        self._pollers: dict[Callable[[], None], _Poller] = {}
        self._watches: list[Callable[[], None]] = []
        self._sleepers: dict[int, _Sleeper] = {}
        self._abandoned: list[Request] = []
        self._wake = threading.Condition(threading.Lock())
        self._kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._timer = _DeadlineTimer()
        self._thread = threading.Thread(target=self._background, name="mooncake-ucx-progress",
                                        daemon=True)
        self._thread.start()

    # -- endpoints ---------------------------------------------------------------------------
    def peer(self, address: bytes) -> Peer | UnreachablePeer:
        """The endpoint to the worker at ``address``, created on first use.  A peer found gone
        stays gone: a worker address belongs to one process, so reconnecting could only reach a
        dead one, and UCX must not be asked to wire up to it again and again (a survivor that
        re-created endpoints to a killed peer on every call aborted inside UCX, stubs.c:107)."""
        with self.lock:
            peer = self._peers.get(address)
            if peer is None:
                try:
                    peer = Peer(self, address)
                except Exception as exc:  # ucxx raises UCXUnreachableError & co.
                    peer = UnreachablePeer(address, exc)
                self._peers[address] = peer
            return peer

    def peer_alive(self, address: bytes) -> bool:
        """False once UCX reported the endpoint to ``address`` closed (its process is gone)."""
        with self.lock:
            peer = self._peers.get(address)
            return peer is None or peer.alive

    def reachable(self, address: bytes, within_s: float = 0.02) -> bool:
        """Connect to ``address`` (or reuse the endpoint) and give a refused connection
        ``within_s`` to show; False once UCX reports it gone."""
        if isinstance(self.peer(address), UnreachablePeer):
            return False
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and self.peer_alive(address):
            self.progress()
            time.sleep(0.001)
        return self.peer_alive(address)

    def add_close_listener(self, listener: Callable[[bytes], None]) -> None:
        with self.lock:
            self._close_listeners.append(listener)

    def remove_close_listener(self, listener: Callable[[bytes], None]) -> None:
        with self.lock:
            if listener in self._close_listeners:
                self._close_listeners.remove(listener)

    def peer_closed(self, peer: Peer) -> None:
        for listener in list(self._close_listeners):
            listener(peer.address)

    # -- posting -------------------------------------------------------------------------------
    def check_cuda(self) -> None:
        """Raise ``MooncakeError`` when ``MOONCAKE_UCX_CUDA=on`` asks for what this process cannot do."""
        if self.cuda.mode == "on" and not self.cuda.on:
            raise MooncakeError(f"MOONCAKE_UCX_CUDA=on, but CUDA memory cannot go to UCX: {self.cuda.reason} "
                                "(set MOONCAKE_UCX_CUDA=auto to stage through host memory instead)")

    def _note_device(self, buffer: Buffer) -> None:
        """Count a device buffer; remember the device of the first: the background thread makes it
        current before it drives UCX (a thread's current CUDA device is its own)."""
        if isinstance(buffer, torch.Tensor):
            self.device_messages += 1
            if self._cuda_device is None:
                self._cuda_device = buffer.device.index

    def send(self, peer: Peer | UnreachablePeer, tag: int, buffer: Buffer) -> Request | FailedRequest:
        if not peer.alive:
            return _failed(peer, buffer)
        self._note_device(buffer)
        with self.lock:
            handle = peer.endpoint.tag_send(Array(buffer), ucx_api.UCXXTag(tag))
        return Request(handle, buffer, peer.address)

    def recv(self, peer: Peer | UnreachablePeer, tag: int, buffer: Buffer) -> Request | FailedRequest:
        if not peer.alive:
            return _failed(peer, buffer)
        self._note_device(buffer)
        with self.lock:
            handle = peer.endpoint.tag_recv(Array(buffer), ucx_api.UCXXTag(tag))
        return Request(handle, buffer, peer.address)

    def probe(self, tag: int) -> bool:
        with self.lock:
            try:
                self.worker.progress()
            finally:
                self.progressed += 1
            return self.worker.tag_probe(ucx_api.UCXXTag(tag)).matched

    def keep_alive(self, requests: list[Request]) -> None:
        """Hold requests whose operation gave up (deadline) until UCX is done with their buffers."""
        with self.lock:
            self._abandoned = [r for r in self._abandoned if not r.completed] + list(requests)

    # -- progress ------------------------------------------------------------------------------
    def add_poller(self, poll: Callable[[], None], *, deadline: Callable[[], float] | None = None,
                   urgent: bool = False, blocker: Callable[[float], object] | None = None) -> None:
        """Register an operation for the background thread to drive until it is removed (called with
        no lock held).  ``poll()`` advances it; ``deadline()`` is the monotonic time by which it must
        run again even if no event comes (its timeout; ``math.inf`` while only an event can move it);
        ``blocker(timeout_s)`` is the plane's own wait, for planes whose progress no fd here announces.

        ``urgent`` makes sure the background thread will drive it: pass it when the caller may not wait
        on the operation itself (``async_op``, a DDP bucket).  If the thread already sleeps on every
        doorbell and UCX's events with an earlier deadline (another operation is pending: DDP's second
        bucket), it is not woken: this thread asks the doorbells to ring instead (``arm``), which costs
        no wake-up and no GIL hand-over; else it is kicked.  Without ``urgent`` the thread is not woken,
        because a caller usually waits at once, and a woken thread would only fight it for the GIL
        (measured: 2x the latency of a small send/recv pair on 2 cores); it picks the operation up at its
        next wake-up: when that caller stops waiting, someone asks for the future (``kick``), or at the
        latest at the operation's deadline (a sleeping thread's timer is moved earlier for it), so an
        operation nobody waits on still ends by its deadline."""
        ride = False
        with self._wake:
            self._pollers[poll] = _Poller(poll, deadline, blocker)
            if deadline is None:  # a caller that gives no deadline gets the old, safe wake-up
                self._kick_locked()
            elif urgent:
                ride = (self._sleeping and self._sleep_armed and blocker is None
                        and self._sleep_fds == frozenset(self._sleepers) and deadline() >= self._sleep_until)
                if not ride:
                    self._kick_locked()
            elif self._parked and not self._waiters:  # parked with nothing to drive: it looks at none
                self._kick_locked()
            elif self._sleeping:  # its timeout was taken without this operation: wake it by the deadline
                at = deadline()  # (_sleep_until is the select's own only once it is selecting)
                if at < self._timer.at and not (self._selecting and self._sleep_until <= at):
                    self._timer.arm(at)
        if ride and not all(s.arm() for s in list(self._sleepers.values())):
            self.kick()  # it moved while asking to be rung: the thread must look now

    def remove_poller(self, poll: Callable[[], None]) -> None:
        with self._wake:
            self._pollers.pop(poll, None)

    def add_watch(self, watch: Callable[[], None]) -> None:
        """Register a check to run after every wake-up of the background thread, even when no
        operation is in flight (incoming control messages wake it: no timer, no CPU when idle)."""
        with self._wake:
            self._watches.append(watch)
            self._kick_locked()

    def remove_watch(self, watch: Callable[[], None]) -> None:
        with self._wake:
            if watch in self._watches:
                self._watches.remove(watch)

    def add_sleeper(self, fd: int, arm: Callable[[], bool], disarm: Callable[[], None]) -> None:
        """A doorbell fd the background thread also sleeps on while operations are pending (a
        shared-memory plane: peers ring it when they move and this rank asked to be rung).
        ``arm()`` runs before each such sleep: it asks to be rung and returns False if an operation
        moved meanwhile (the thread then runs its pollers again); ``disarm()`` runs after waking."""
        with self._wake:
            self._sleepers[fd] = _Sleeper(fd, arm, disarm, os.dup(fd))

    def remove_sleeper(self, fd: int) -> None:
        """Stop sleeping on ``fd``; the caller may close it at once (the thread selects on its own
        duplicate, closed here or, while a select is on it, when that select returns)."""
        with self._wake:
            sleeper = self._sleepers.pop(fd, None)
            if sleeper is None:
                return
            if self._selecting:
                self._closing.append(sleeper.own_fd)
                self._kick_locked()
            else:
                os.close(sleeper.own_fd)

    def kick(self) -> None:
        """Make the background thread run its pollers now (a future somebody waits on, an agreement
        decision, an operation nobody waits on).  Cheap when it is already awake."""
        with self._wake:
            self._kick_locked()

    def _kick_locked(self) -> None:
        if self._parked:
            self._wake.notify()
        elif self._sleeping:
            self._sleeping = False  # one write is enough until it sleeps again
            try:
                os.eventfd_write(self._kick_fd, 1)
            except BlockingIOError:  # the counter is saturated: it is readable anyway
                pass
        else:
            self._kicked = True

    @contextlib.contextmanager
    def waiting(self):
        """A caller blocks on an operation itself (a plane's own wait): the background thread stays
        parked meanwhile, so the two never fight for the GIL; when the last caller stops waiting and
        operations are still pending, the thread is woken to drive them, and a thread that parked is
        sent back to its sleep on UCX's events (watches: a NACK may come), as is one that slept on while
        the callers drove UCX themselves (their progress may have completed, or their ``arm`` consumed,
        what its watches look at).  A thread still asleep with nothing new is left alone: waking it for
        nothing would fight the returning caller for the GIL."""
        with self._wake:
            if not self._waiters:
                self._waiting_from = self.progressed  # a caller's progress may complete what a watch looks at
            self._waiters += 1
        try:
            yield
        finally:
            with self._wake:
                self._waiters -= 1
                if not self._waiters and (self._pollers or (self._watches and (
                        self._parked or self.progressed != self._waiting_from))):
                    self._kick_locked()

    def progress(self) -> None:
        with self.lock:
            try:
                self.worker.progress()
            finally:
                self.progressed += 1

    def wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Progress until ``done()`` or the monotonic ``deadline``; returns ``done()``."""
        with self.waiting():
            spin_until = time.monotonic() + _SPIN_S
            while True:
                self.progress()
                if done():
                    return True
                now = time.monotonic()
                if now >= deadline:
                    return done()
                if now >= spin_until:
                    self._sleep_on_events(min(deadline - now, 0.005))

    def _sleep_on_events(self, timeout_s: float) -> None:
        with self.lock:
            armed = self.worker.arm()
        if armed:
            select.select([self.worker.epoll_file_descriptor], [], [], max(timeout_s, 0.0))

    def _background(self) -> None:
        bound_device = None
        while True:
            with self._wake:
                while self._waiters or not (self._pollers or self._watches):
                    self._parked = True
                    self._wake.wait()  # notified by a kick, a registration or the last waiter leaving
                    self._parked = False
                self._kicked = False
                pollers = list(self._pollers.values())
                watches = list(self._watches)
            if self._cuda_device is not None and bound_device is None:
                bound_device = self._cuda_device
                torch.cuda.set_device(bound_device)
            self.progress()
            for p in pollers:
                p.poll()
            for watch in watches:
                watch()
            self._sleep()

    def _sleep(self) -> None:
        """Sleep until an event, a kick, a doorbell of a pending operation, or the earliest deadline."""
        with self._wake:
            pollers = list(self._pollers.values())
            if self._kicked or self._waiters:
                return  # new work came while running, or a caller now waits (the loop parks)
            sleepers = list(self._sleepers.values()) if pollers else []
            self._sleeping = True
        now = time.monotonic()
        timeout = math.inf
        blocker = None
        for p in pollers:
            if p.deadline is None:
                timeout = min(timeout, _NO_DEADLINE_SLICE_S)
            else:
                timeout = min(timeout, max(p.deadline() - now, 0.0))
            if p.blocker is not None and blocker is None:
                blocker = p.blocker
        try:
            for sleeper in sleepers:
                if not sleeper.arm():
                    return  # an operation moved while asking to be rung: run the pollers again
            with self.lock:
                if not self.worker.arm():
                    return  # UCX has events to process
            if blocker is not None:  # sleep in the plane's own wait, woken by its peers
                blocker(min(timeout, _BLOCKER_SLICE_S))
            else:
                with self._wake:  # what add_poller may rely on without waking it
                    self._sleep_armed = bool(pollers)
                    self._sleep_fds = frozenset(s.fd for s in sleepers)
                    self._sleep_until = now + timeout
                    live = [s for s in sleepers if self._sleepers.get(s.fd) is s]  # not removed since
                    self._selecting = True
                fds = [self.worker.epoll_file_descriptor, self._kick_fd, self._timer.fd] + [s.own_fd for s in live]
                select.select(fds, [], [], None if timeout == math.inf else timeout)
        finally:
            with self._wake:
                self._sleeping = False
                self._sleep_armed = False
                self._selecting = False
                self._timer.take()
                for fd in self._closing:
                    os.close(fd)
                self._closing.clear()
            try:
                os.eventfd_read(self._kick_fd)
            except BlockingIOError:
                pass
            for s in sleepers:
                s.disarm()


_ENGINE: Engine | None = None
_ENGINE_LOCK = threading.Lock()


def engine(net_devices: str | None = None) -> Engine:
    """The process-wide engine, created on first use with the given network devices."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = Engine(net_devices)
        elif net_devices and _ENGINE.net_devices != net_devices:
            raise MooncakeError(
                f"UCX is already running on devices {_ENGINE.net_devices!r}; set_host_ip / "
                "set_device_filter must be called before the first mooncake process group is created")
        return _ENGINE


def engine_started() -> bool:
    return _ENGINE is not None


def interface_of(ip: str) -> str:
    """The name of the local network interface that owns ``ip`` (for UCX_NET_DEVICES)."""
    if ip in ("127.0.0.1", "localhost", "::1"):
        return "lo"
    import fcntl
    import struct as _struct
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, _struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    raise MooncakeError(f"no local network interface has the address {ip!r} (see `ip addr`)")

