"""Device memory shared between the processes of one host that stays mapped while an importer keeps it.

Memory exported with ``cudaIpcGetMemHandle`` is freed with the process that exported it, and a peer still
reading it faults (its CUDA context is lost).  Memory made with ``cuMemCreate`` is reference counted: every
mapping holds a reference, so a survivor keeps reading a dead peer's lanes and words until it lets them go.
Its exported handle is a POSIX file descriptor, which only travels between processes over a Unix socket:

* ``export(fd)`` hands the descriptor to this process's server (one per process, a daemon thread on an
  abstract Unix socket that answers only processes of this user) and returns the 32-byte handle peers use:
  ``(pid, server nonce, token, size)``; ``withdraw(token)`` closes it (the memory lives on while mapped);
  a forked child closes its copies of the descriptors and starts its own server when it exports;
  ``export_source(source, size)`` serves memory that someone else owns and may free: the server asks ``source()``
  for a descriptor at each request and holds none in between;
* ``fetch(handle, timeout_s)`` asks the owner's server for the descriptor: a duplicate in this process.

``allocate(lib, device, nbytes, what)`` and ``attach(lib, device, handle, timeout_s)`` put the two together
with the library's ``mc_vmm_alloc`` / ``mc_vmm_import`` / ``mc_vmm_free`` (``csrc/mooncake_ep_cuda.cu``,
"shareable device memory"): the PG plane's lanes and the EP buffer use them.  Abstract sockets belong to a
network namespace: the ranks of one host must share one.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import struct
import threading
from typing import Callable

HANDLE = struct.Struct("<qqqq")  # owner pid, its server's nonce, token, allocation size in bytes
_TOKEN = struct.Struct("<q")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_SERVE_TIMEOUT_S = 1.0  # an asker has this long to send its token


class FetchError(OSError):
    """The owner's server did not hand the descriptor over (gone, withdrawn, or not answering)."""


def _address(pid: int, nonce: int) -> str:
    return f"\0mooncake-cuda-shared-{pid}-{nonce:x}"


class _Server:
    def __init__(self):
        self.pid = os.getpid()
        self.nonce = secrets.randbits(62)
        self.fds: dict[int, int | Callable[[], int | None]] = {}  # token -> descriptor, or its source
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(_address(self.pid, self.nonce))
        self.sock.listen(128)
        threading.Thread(target=self._serve, name="mooncake-cuda-shared", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    _, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 _PEERCRED.size))
                    if uid != os.getuid():
                        continue
                    conn.settimeout(_SERVE_TIMEOUT_S)
                    raw = b""
                    while len(raw) < _TOKEN.size:
                        more = conn.recv(_TOKEN.size - len(raw))
                        if not more:
                            break
                        raw += more
                    if len(raw) != _TOKEN.size:
                        continue
                    with self.lock:  # a withdraw closes the descriptor only after it went out
                        fd = self.fds.get(_TOKEN.unpack(raw)[0])
                        source = fd if callable(fd) else None
                        if source is not None:
                            try:
                                fd = source()
                            except Exception:  # noqa: BLE001 - the asker gets a refusal, the server lives on
                                fd = None
                        try:
                            if fd is None:
                                conn.sendall(b"\0")
                            else:
                                socket.send_fds(conn, [b"\1"], [fd])
                        finally:
                            if source is not None and fd is not None:
                                os.close(fd)
                except OSError:
                    continue  # the asker went away or stalled: it gets a FetchError

    def forget_in_child(self) -> None:
        """In a forked child: the descriptors are the parent's to serve (each keeps its memory alive)."""
        for fd in self.fds.values():
            try:
                if not callable(fd):
                    os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.sock.close()


_server: _Server | None = None
_server_lock = threading.Lock()


def _this_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None:
            _server = _Server()
        return _server


def _after_fork_in_child() -> None:
    global _server, _server_lock
    _server_lock = threading.Lock()  # another thread may have held it at the fork
    if _server is not None:
        _server.lock = threading.Lock()
        _server.forget_in_child()
        _server = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def export(fd: int, size: int) -> tuple[bytes, int]:
    """Serve ``fd`` (owned by the server from now on) to this user's processes; the handle and its token."""
    os.set_inheritable(fd, False)  # a child process must not keep the memory alive
    s = _this_server()
    with s.lock:
        token = secrets.randbits(62)
        s.fds[token] = fd
    return HANDLE.pack(s.pid, s.nonce, token, size), token


def export_source(source: Callable[[], int | None], size: int) -> tuple[bytes, int]:
    """Serve the memory ``source()`` gives a descriptor of (a new one per request, which the server closes
    once sent; None: it is gone) to this user's processes; the handle and its token."""
    s = _this_server()
    with s.lock:
        token = secrets.randbits(62)
        s.fds[token] = source
    return HANDLE.pack(s.pid, s.nonce, token, size), token


def withdraw(token: int) -> None:
    s = _server
    if s is None:
        return
    with s.lock:
        fd = s.fds.pop(token, None)
    if fd is not None and not callable(fd):
        os.close(fd)


def fetch(handle: bytes, timeout_s: float) -> tuple[int, int]:
    """The descriptor behind ``handle`` (a duplicate the caller closes) and the allocation's size."""
    pid, nonce, token, size = HANDLE.unpack_from(handle)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout_s)
            sock.connect(_address(pid, nonce))
            sock.sendall(_TOKEN.pack(token))
            msg, fds, _, _ = socket.recv_fds(sock, 1, 1)
    except OSError as exc:
        raise FetchError(f"process {pid} did not hand over shared device memory: {exc}") from None
    if msg != b"\1" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise FetchError(f"process {pid} no longer shares that device memory")
    return fds[0], size


class Mapping:
    """Shared device memory mapped in this process: ``addr``, ``size`` bytes (the whole allocation),
    ``handle`` (for peers' ``attach``); ``close()`` unmaps it (and stops serving it, for the owner)."""

    def __init__(self, addr: int, size: int, handle: bytes, release):
        self.addr, self.size, self.handle = addr, size, handle
        self._release = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def _driver_error(lib, rc: int) -> str:
    return f"CUDA driver error {rc} ({lib.mc_driver_error_string(rc).decode()})"


def allocate(lib, device: int, nbytes: int, what: str) -> Mapping:
    """At least ``nbytes`` of zeroed memory on ``device``, served to peers (raises ``MooncakeError``)."""
    from ...control.errors import MooncakeError
    ptr, got, fd = ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_int(-1)
    rc = lib.mc_vmm_alloc(device, nbytes, ctypes.byref(ptr), ctypes.byref(got), ctypes.byref(fd))
    if rc != 0:
        raise MooncakeError(f"shareable allocation of {nbytes} bytes ({what}, cuMemCreate) failed: "
                            f"{_driver_error(lib, rc)}")
    addr, size = ptr.value, got.value
    try:
        handle, token = export(fd.value, size)
    except BaseException:
        os.close(fd.value)
        lib.mc_vmm_free(addr, size)
        raise

    def release():
        withdraw(token)
        lib.mc_vmm_free(addr, size)

    return Mapping(addr, size, handle, release)


def attach(lib, device: int, handle: bytes, timeout_s: float) -> Mapping:
    """Map the memory behind a peer's ``handle`` for ``device`` (raises ``FetchError``)."""
    fd, size = fetch(handle, timeout_s)
    ptr = ctypes.c_int64(0)
    try:
        rc = lib.mc_vmm_import(device, fd, size, ctypes.byref(ptr))
    finally:
        os.close(fd)
    if rc != 0:
        raise FetchError(f"mapping shared device memory of process {HANDLE.unpack_from(handle)[0]} failed: "
                         f"{_driver_error(lib, rc)}")
    addr = ptr.value

    def release():
        rc = lib.mc_vmm_free(addr, size)
        if rc != 0:
            from ... import log
            log.logger.warning("unmapping %d bytes of process %d's shared device memory failed: %s", size,
                               HANDLE.unpack_from(handle)[0], _driver_error(lib, rc))

    return Mapping(addr, size, handle, release)
