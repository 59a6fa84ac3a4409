"""Shared-memory segments without names: ``memfd`` files, attached by peers through ``/proc``.

A rank creates each of its segments with ``memfd_create`` and keeps the descriptor open; a peer on
the same host (same kernel, same pid namespace) attaches by opening ``/proc/<pid>/fd/<fd>``, maps
it and closes what it opened.  Nothing is ever entered in ``/dev/shm``, so there is nothing to
unlink and nothing to leak: the kernel frees a segment's memory when the last mapping and
descriptor of it are gone, which is also what happens to the segments of a rank that crashes
(SIGKILL included) once its peers unmap them (on ``close()`` of their group, or at their exit).

Mappings are made with libc ``mmap`` through ctypes rather than Python's ``mmap`` module, so that
views handed to torch never block unmapping (the plane drops its views before closing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import socket

import torch

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


class SegmentError(OSError):
    """A segment could not be created or attached."""


class Segment:
    """One mapped shared-memory file: ``addr`` .. ``addr + size``."""

    def __init__(self, fd: int | None, addr: int, size: int, owner: bool):
        self.fd = fd  # kept open by the owner (peers attach through it); None on attachers
        self.addr = addr
        self.size = size
        self.owner = owner
        self._buffer = (ctypes.c_uint8 * size).from_address(addr)
        self.bytes = torch.frombuffer(self._buffer, dtype=torch.uint8)  # the whole segment

    @classmethod
    def create(cls, name: str, size: int) -> "Segment":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, _map(fd, size), size, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, pid: int, fd: int, size: int) -> "Segment":
        path = f"/proc/{pid}/fd/{fd}"
        try:
            local = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SegmentError(exc.errno, f"cannot open the shared segment of process {pid} at {path} "
                                          f"({exc.strerror})") from None
        try:
            actual = os.fstat(local).st_size
            if actual < size:
                raise SegmentError(0, f"segment {path} holds {actual} bytes, expected {size}")
            return cls(None, _map(local, size), size, owner=False)
        finally:
            os.close(local)

    def words(self, offset: int, count: int) -> memoryview:
        """``count`` int64 words at byte ``offset`` (a memoryview: indexing gives Python ints, and
        an aligned 8-byte load or store is one instruction, atomic on the architectures we run on)."""
        return memoryview(self._buffer).cast("B")[offset:offset + 8 * count].cast("q")

    def close(self) -> None:
        """Unmap (and close the descriptor of an owned segment).  Views must no longer be used."""
        if self.addr:
            _libc.munmap(self.addr, self.size)
            self.addr = 0
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _map(fd: int, size: int) -> int:
    addr = _libc.mmap(None, size, _PROT_RW, _MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise SegmentError(err, f"mmap of {size} bytes failed: {os.strerror(err)}")
    return addr


def host_identity() -> bytes:
    """16 bytes equal for processes that can attach each other's segments: same kernel boot,
    same pid namespace (for ``/proc/<pid>``), same host name.  ``MOONCAKE_FAST_CPU_HOST_ID``
    overrides it (tests of the cross-host path on one host): ``per-process`` makes every process its own
    host, ``rank-mod-N`` puts global rank ``$RANK`` on host ``RANK % N``, anything else names the host."""
    override = os.environ.get("MOONCAKE_FAST_CPU_HOST_ID")
    if override == "per-process":
        override = f"pid-{os.getpid()}"
    elif override and override.startswith("rank-mod-"):
        if not os.environ.get("RANK", "").isdigit():
            raise ValueError("MOONCAKE_FAST_CPU_HOST_ID=rank-mod-N needs this process's global rank in RANK "
                             f"(got {os.environ.get('RANK')!r}), as torchrun sets it")
        override = f"host-{int(os.environ['RANK']) % int(override[len('rank-mod-'):])}"
    if override:
        return hashlib.sha256(override.encode()).digest()[:16]
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
    except OSError:
        boot = b"?"
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino).encode()
    except OSError:
        pidns = b"?"
    return hashlib.sha256(b"|".join([boot, pidns, socket.gethostname().encode()])).digest()[:16]
