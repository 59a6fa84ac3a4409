"""One UCX worker per process, driven by our own progress loop (no ucxx progress thread, no asyncio).

Endpoints are created with error handling on, so a dead peer is reported (UCX then uses TCP only,
see DESIGN §8): pending endpoint-bound receives fail with ``UCXCanceledError`` and in-flight sends
with ``UCXConnectionResetError`` within tens of milliseconds, and the endpoint's close callback
marks the peer dead.  Receives are always posted on the endpoint, never on the worker, so a dead
peer's receive can never steal a replacement's message.

Threads: callers post and progress under one lock; a single named background thread progresses
only while requests are in flight and nobody else is waiting, and sleeps on the worker's event fd
(``arm`` + ``select``) otherwise, so an idle rank uses no CPU.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Callable

import numpy as np

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets UCX_MEMTYPE_CACHE, unused here
import ucxx._lib.libucxx as ucx_api  # import before mpi4py: both ship libucp, ucxx's must load first
from ucxx._lib.arr import Array

from ..control.errors import MooncakeError

_SPIN_S = 50e-6  # busy-progress this long before sleeping on the event fd
_IDLE_SLEEP_S = 1.0  # with only watches registered, sleep on the event fd up to this long
_PARKED_S = 0.005  # while a caller waits, the background thread re-checks this often


class Request:
    """One posted send or receive; ``buffer`` stays referenced until the request completes."""

    __slots__ = ("handle", "buffer", "peer_key")

    def __init__(self, handle, buffer: np.ndarray, peer_key: bytes):
        self.handle, self.buffer, self.peer_key = handle, buffer, peer_key

    @property
    def completed(self) -> bool:
        return self.handle.completed

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

    def __init__(self, buffer: np.ndarray, peer_key: bytes, error: BaseException):
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


def _failed(peer: "Peer | UnreachablePeer", buffer: np.ndarray) -> FailedRequest:
    """A request to a peer known gone fails at once, never touching its endpoint: UCX must not be asked
    to post on an endpoint it has failed."""
    error = getattr(peer, "error", None) or ConnectionResetError("UCX closed the endpoint: the peer is gone")
    return FailedRequest(buffer, peer.address, error)


class UnreachablePeer:
    """A peer UCX could not connect to (it is gone): every request to it fails at once."""

    alive = False

    def __init__(self, address: bytes, error: BaseException):
        self.address, self.error = address, error


def _ucx_config(net_devices: str | None) -> dict[str, str]:
    config = {"TCP_TX_SEG_SIZE": "1M", "TCP_RX_SEG_SIZE": "1M"}
    if "UCX_LOG_LEVEL" not in os.environ:  # a dead peer is expected here, not an error to print
        config["LOG_LEVEL"] = "fatal"
    if net_devices and "UCX_NET_DEVICES" not in os.environ:
        config["NET_DEVICES"] = net_devices
    return config


class Engine:
    """The process-wide UCX context, worker, endpoint cache and progress machinery."""

    def __init__(self, net_devices: str | None):
        self.net_devices = net_devices
        self.context = ucx_api.UCXContext(config_dict=_ucx_config(net_devices),
                                          feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self.worker = ucx_api.UCXWorker(self.context)
        self.worker.init_blocking_progress_mode()
        self.address: bytes = bytes(self.worker.address)
        self.lock = threading.RLock()
        self._peers: dict[bytes, Peer | UnreachablePeer] = {}
        self._close_listeners: list[Callable[[bytes], None]] = []
        self._in_flight = 0
        self._waiters = 0
        self._parked_idle = False  # the background thread sleeps until notified (nothing registered)
        self._pollers: list[Callable[[], None]] = []
        self._watches: list[Callable[[], None]] = []
        self._abandoned: list[Request] = []
        self._wake = threading.Condition(threading.Lock())
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
    def send(self, peer: Peer | UnreachablePeer, tag: int, buffer: np.ndarray) -> Request | FailedRequest:
        if not peer.alive:
            return _failed(peer, buffer)
        with self.lock:
            handle = peer.endpoint.tag_send(Array(buffer), ucx_api.UCXXTag(tag))
        return Request(handle, buffer, peer.address)

    def recv(self, peer: Peer | UnreachablePeer, tag: int, buffer: np.ndarray) -> Request | FailedRequest:
        if not peer.alive:
            return _failed(peer, buffer)
        with self.lock:
            handle = peer.endpoint.tag_recv(Array(buffer), ucx_api.UCXXTag(tag))
        return Request(handle, buffer, peer.address)

    def probe(self, tag: int) -> bool:
        with self.lock:
            self.worker.progress()
            return self.worker.tag_probe(ucx_api.UCXXTag(tag)).matched

    def keep_alive(self, requests: list[Request]) -> None:
        """Hold requests whose operation gave up (deadline) until UCX is done with their buffers."""
        with self.lock:
            self._abandoned = [r for r in self._abandoned if not r.completed] + list(requests)

    # -- progress ------------------------------------------------------------------------------
    def add_poller(self, poll: Callable[[], None]) -> None:
        """Register work the background thread should drive (called with no lock held).  A thread
        that is parked while a caller waits picks it up within ``_PARKED_S``; it is not woken here,
        because a caller usually waits on the new operation at once, and a woken thread would only
        fight it for the GIL (measured: 2x the latency of a small send/recv pair on 2 cores; waking it
        from its sleep on the event fd through an eventfd cost as much).  So an operation nobody
        waits on moves within ``_PARKED_S`` of being registered, or at the next UCX event, or within
        ``_IDLE_SLEEP_S`` (as before: a sleep on the event fd never was cut short for it)."""
        with self._wake:
            self._pollers.append(poll)
            if self._parked_idle:
                self._wake.notify()

    def remove_poller(self, poll: Callable[[], None]) -> None:
        with self._wake:
            if poll in self._pollers:
                self._pollers.remove(poll)

    def add_watch(self, watch: Callable[[], None]) -> None:
        """Register a check to run after every wake-up of the background thread, even when no
        operation is in flight (incoming control messages wake it: no timer, no CPU when idle)."""
        with self._wake:
            self._watches.append(watch)
            if self._parked_idle:
                self._wake.notify()

    def remove_watch(self, watch: Callable[[], None]) -> None:
        with self._wake:
            if watch in self._watches:
                self._watches.remove(watch)

    def progress(self) -> None:
        with self.lock:
            self.worker.progress()

    def wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Progress until ``done()`` or the monotonic ``deadline``; returns ``done()``."""
        with self._wake:
            self._waiters += 1
        try:
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
        finally:
            with self._wake:
                self._waiters -= 1

    def _sleep_on_events(self, timeout_s: float) -> None:
        with self.lock:
            armed = self.worker.arm()
        if armed:
            select.select([self.worker.epoll_file_descriptor], [], [], max(timeout_s, 0.0))

    def _background(self) -> None:
        while True:
            with self._wake:
                while self._waiters or not (self._pollers or self._watches):
                    self._parked_idle = not (self._pollers or self._watches)
                    self._wake.wait(timeout=None if self._parked_idle else _PARKED_S)
                    self._parked_idle = False
                pollers = list(self._pollers)
                watches = list(self._watches)
            self.progress()
            for poll in pollers + watches:
                poll()
            self._sleep_on_events(0.002 if pollers else _IDLE_SLEEP_S)


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

