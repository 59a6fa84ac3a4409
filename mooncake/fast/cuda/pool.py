"""Memory for tensors the CUDA PG plane reads and writes in place: a ``torch.cuda.MemPool`` whose segments
are shareable allocations (``mc_pool_alloc`` / ``mc_pool_free`` in ``csrc/mooncake_ep_cuda.cu``, the memory of
``shared.allocate``), so a peer process on the host maps them.

    pool = mooncake.pg.mem_pool()
    with torch.cuda.use_mem_pool(pool):
        grads = torch.empty(n, device="cuda")

An all_reduce of ``PARTS_MIN_BYTES`` or more captured in a CUDA graph, in place, on a tensor from such a pool
on every rank runs on the ranks' tensors directly (``mooncake/fast/cuda/pg.py``, "CUDA graphs"): no copy
into a lane, each rank reads the message once and writes it once.  Other tensors take the lanes.

``share(lib, addr)`` serves the segment holding ``addr`` to the process's peers (``shared.export_source``:
peers map it with ``shared.attach``) and returns its handle and ``addr``'s offset in it.  Serving holds no
reference: a request gets a descriptor only while the segment is in the pool, so a segment torch frees goes
back to the device as soon as no peer maps it (peers unmap it when the last graph captured on it is
destroyed: ``mooncake/fast/cuda/pg.py``, "CUDA graphs").
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from . import shared

_lock = threading.Lock()
_served: dict[int, tuple[int, bytes, int]] = {}  # segment base -> (segment id, handle, token)


def mem_pool() -> "torch.cuda.MemPool":
    """A new ``torch.cuda.MemPool`` over shareable memory (raises ``MooncakeError`` where the CUDA library
    or shareable memory is unavailable)."""
    from ...control.errors import MooncakeError
    from .lib import load
    lib, reason = load()
    if lib is None:
        raise MooncakeError(f"mem_pool: the CUDA library is unavailable: {reason}")
    why = ctypes.c_int(0)
    device = torch.cuda.current_device()
    if not lib.mc_vmm_supported(device, ctypes.byref(why)):
        raise MooncakeError(f"mem_pool: device {device} cannot share memory between processes "
                            f"(mc_vmm_supported reason {why.value})")
    allocator = torch.cuda.memory.CUDAPluggableAllocator(lib._name, "mc_pool_alloc", "mc_pool_free")
    return torch.cuda.MemPool(allocator.allocator())


def share(lib, addr: int) -> tuple[bytes, int] | None:
    """``(handle, offset)`` of the pool segment holding device address ``addr``, served from now on; None
    where ``addr`` is not pool memory."""
    with _lock:  # the lookup too: a stale one must not replace a newer export of the same address
        found = _find(lib, addr)
        if found is None:
            return None
        base, size, sid = found
        _forget_freed(lib)
        have = _served.get(base)
        if have is not None and have[0] == sid:
            return have[1], addr - base
        if have is not None:
            shared.withdraw(have[2])
        handle, token = shared.export_source(lambda: _descriptor(lib, base, sid), size)
        _served[base] = (sid, handle, token)
        return handle, addr - base


def _lookup(lib, addr: int) -> tuple[int, int, int, int] | None:
    """The pool segment holding ``addr``: (base, size, a new descriptor of it (-1: none could be made), id),
    or None."""
    base, size, fd, sid = ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_int(-1), ctypes.c_int64(0)
    if not lib.mc_pool_find(addr, ctypes.byref(base), ctypes.byref(size), ctypes.byref(fd), ctypes.byref(sid)):
        return None
    return base.value, size.value, fd.value, sid.value


def _find(lib, addr: int) -> tuple[int, int, int] | None:
    """The pool segment holding ``addr``: (base, size, id), or None."""
    found = _lookup(lib, addr)
    if found is None:
        return None
    base, size, fd, sid = found
    if fd >= 0:
        os.close(fd)
    return base, size, sid


def _descriptor(lib, base: int, sid: int) -> int | None:
    """A new descriptor of segment ``sid`` at ``base`` while the pool still has it, else None."""
    found = _lookup(lib, base)
    if found is None or found[2] < 0:
        return None
    at, _, fd, now = found
    try:
        if at != base or now != sid:
            os.close(fd)
            return None
        os.set_inheritable(fd, False)
    except OSError:
        os.close(fd)
        raise
    return fd


def _forget_freed(lib) -> None:
    """(Under ``_lock``) stop serving segments the pool freed (their base is gone, or holds a newer one)."""
    for b, (sid, _, token) in list(_served.items()):
        found = _find(lib, b)
        if found is None or found[0] != b or found[2] != sid:
            shared.withdraw(token)
            del _served[b]
