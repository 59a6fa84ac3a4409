"""The compiled helpers of the shared-memory plane (``csrc/cpu/mooncake_shm.c``), with fallbacks.

Where the library comes from (``origin``), first match wins:

* ``package``: the copy a wheel ships (``mooncake/fast/cpu/libmooncake_shm.so``, built by setup.py
  with portable flags, no compiler needed at install or run time).  In a source checkout it is used
  only while its recorded source hash (``libmooncake_shm.json``) matches ``csrc/``, so an edited C
  file is never shadowed by a stale build;
* ``cache``: compiled on first use with the system C compiler (``$CC``, else ``cc``) and the same
  portable flags, into the user's cache (``mooncake._nativebuild``: ``$MOONCAKE_CACHE_DIR``, else
  ``~/.cache/mooncake``, sub-directory ``cpu``; created 0700, refused when owned by someone else or
  writable by others), keyed by the source's hash, the compiler and its version, the flags and the
  machine.  Concurrent ranks compiling at once each write a private temporary file and rename it
  into place.

If neither works, or ``MOONCAKE_FAST_CPU_NATIVE=0``, every helper falls back to torch / Python code
with the same results (only slower): ``native.lib`` is then None, ``native.reason`` says why,
``native.problem`` / ``native.fix`` name the cause (a ``_nativebuild.NativeProblem`` code) and its fix.

Helpers:

* ``copy(dst, src, nt)``: tensor bytes copy; ``nt`` asks for non-temporal stores (large buffers
  nobody reads soon).
* ``sum_into(out, inputs, nt)``: left-fold SUM of float32 / float64 inputs (returns False when it
  cannot serve the dtype, so the caller uses torch).
* ``Futex``: process-shared futex wait / wake on an int32 word of a shared mapping.
* ``store_fence(addr, value)``: a store followed by a full fence.
* ``copy_ptr`` / ``sum_ptr``: the same on raw addresses (no tensor objects on the small-message path).
* ``vm_read(pid, dst, src, nbytes)``: copy out of another process's memory (``process_vm_readv``),
  for point-to-point messages (``p2p.py``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import threading
from pathlib import Path

import torch

from ... import _nativebuild as nb

_ABI = 4

lib: ctypes.CDLL | None = None
reason: str | None = None
#: why the library is not in use: a NativeProblem code (``source-missing``, ``cache-not-owned``,
#: ``cache-writable-by-others``, ``cache-not-writable``, ``no-compiler``, ``compiler-failed``,
#: ``library-unsafe``), ``load-failed``, ``disabled`` or ``unsupported-os``; None when loaded
problem: str | None = None
fix: str | None = None
#: ``package`` (prebuilt, from the wheel) or ``cache`` (compiled on first use); path of the library
origin: str | None = None
path: str | None = None
#: the vector width the folds use (``sse2``, ``avx``, ``avx512f``, ``scalar``)
isa: str | None = None
_lock = threading.Lock()
_loaded = False


def _prebuilt_matches() -> bool:
    """Whether the packaged library may be used: always in an installed package, and in a checkout (or
    with ``MOONCAKE_CSRC``) only while it was built from the source that is there now."""
    if not nb.CPU_PREBUILT.is_file():
        return False
    root, source_origin = nb.csrc_root()
    if source_origin == "package":
        return True
    source = root / nb.CPU_SOURCE
    try:
        built = json.loads(nb.CPU_PREBUILT_INFO.read_text()).get("source_sha256")
        return source.is_file() and built == nb.sha256_file(source)
    except (OSError, ValueError):
        return False


def _compile_cached() -> Path:
    """The first-use build: compile the source into the user's cache unless it is there already."""
    source = nb.source_path(nb.CPU_SOURCE)
    cc = nb.c_compiler()
    key = nb.cpu_key(source.read_bytes(), cc, nb.compiler_version(cc))
    out_dir = nb.secure_dir(nb.cache_dir("cpu"))
    target = out_dir / f"libmooncake_shm-{key}.so"
    if not target.exists():
        nb.compile_c(source, target, cc)
    nb.check_file(target)
    return target


def _locate() -> tuple[Path, str]:
    if _prebuilt_matches():
        nb.check_file(nb.CPU_PREBUILT, allow_root=True)
        return nb.CPU_PREBUILT, "package"
    return _compile_cached(), "cache"


def _declare(cdll: ctypes.CDLL) -> None:
    c = ctypes
    cdll.mc_abi.restype = c.c_int
    cdll.mc_load.argtypes = [c.c_void_p]
    cdll.mc_load.restype = c.c_int64
    cdll.mc_store.argtypes = [c.c_void_p, c.c_int64]
    cdll.mc_store_fence.argtypes = [c.c_void_p, c.c_int64]
    cdll.mc_fence.argtypes = []
    cdll.mc_futex_wait.argtypes = [c.c_void_p, c.c_int32, c.c_int64]
    cdll.mc_futex_wait.restype = c.c_int
    cdll.mc_futex_bump_wake.argtypes = [c.c_void_p]
    cdll.mc_spin_until_ge.argtypes = [c.c_void_p, c.c_int64, c.c_int64]
    cdll.mc_spin_until_ge.restype = c.c_int
    cdll.mc_copy.argtypes = [c.c_void_p, c.c_void_p, c.c_size_t, c.c_int]
    for name in ("mc_sum_f32", "mc_sum_f64"):
        getattr(cdll, name).argtypes = [c.c_void_p, c.c_void_p, c.c_int, c.c_size_t, c.c_int]
    cdll.mc_vm_read.argtypes = [c.c_int, c.c_void_p, c.c_uint64, c.c_size_t]
    cdll.mc_vm_read.restype = c.c_int
    cdll.mc_isa.restype = c.c_char_p
    cdll.mc_isa_limit.argtypes = [c.c_int]
    cdll.mc_isa_limit.restype = c.c_int


def _fail(code: str, why: str, how: str | None) -> None:
    global reason, problem, fix
    reason, problem, fix = why, code, how


def load() -> ctypes.CDLL | None:
    """The compiled library, or None (``reason`` says why); located and loaded once per process."""
    global lib, origin, path, isa, _loaded
    with _lock:
        if _loaded:
            return lib
        _loaded = True
        if os.environ.get("MOONCAKE_FAST_CPU_NATIVE", "1").strip() == "0":
            _fail("disabled", "MOONCAKE_FAST_CPU_NATIVE=0", None)
            return None
        if not sys.platform.startswith("linux"):
            _fail("unsupported-os", f"the shared-memory plane's helpers need Linux (futex), not {sys.platform}", None)
            return None
        try:
            where, came_from = _locate()
        except nb.NativeProblem as exc:
            _fail(exc.code, f"no compiled helpers for csrc/cpu/mooncake_shm.c: {exc}", exc.fix)
            return None
        except OSError as exc:
            _fail("cache-not-writable", f"no compiled helpers for csrc/cpu/mooncake_shm.c: {exc}",
                  "make the cache writable or set MOONCAKE_CACHE_DIR to a directory of your own")
            return None
        try:
            cdll = ctypes.CDLL(str(where))
            _declare(cdll)
            if cdll.mc_abi() != _ABI:
                raise RuntimeError(f"ABI {cdll.mc_abi()} != {_ABI}")
        except Exception as exc:  # noqa: BLE001 - any failure means: use the fallbacks
            _fail("load-failed", f"could not load {where} ({type(exc).__name__}: {exc})",
                  f"remove {where} so that it is rebuilt, or reinstall mooncake")
            return None
        lib, origin, path, isa = cdll, came_from, str(where), cdll.mc_isa().decode()
        return lib


# ---- helpers with fallbacks ----------------------------------------------------------------------

def copy(dst: torch.Tensor, src: torch.Tensor, nt: bool = False) -> None:
    """``dst.copy_(src)`` for contiguous tensors of the same byte size (dtypes may differ only when
    the caller copies raw bytes of a uint8 view)."""
    n = dst.numel() * dst.element_size()
    if lib is not None and n >= 4096:
        lib.mc_copy(dst.data_ptr(), src.data_ptr(), n, 1 if nt else 0)
    else:
        dst.copy_(src)


_SUM = {torch.float32: "mc_sum_f32", torch.float64: "mc_sum_f64"}


def sum_into(out: torch.Tensor, inputs: list[torch.Tensor], nt: bool = False) -> bool:
    """``out = ((inputs[0] + inputs[1]) + ...)`` for float32 / float64 (contiguous, same numel).

    Returns False (doing nothing) when the compiled kernel cannot serve the call.
    """
    name = _SUM.get(out.dtype)
    if lib is None or name is None or len(inputs) < 2:
        return False
    ptrs = (ctypes.c_void_p * len(inputs))(*[x.data_ptr() for x in inputs])
    getattr(lib, name)(out.data_ptr(), ptrs, len(inputs), out.numel(), 1 if nt else 0)
    return True


def store_fence(addr: int, value: int) -> None:
    """Store the int64 ``value`` at ``addr``, then a full memory fence (plain store without the
    library: the futex sleeps are bounded, so a missed wake-up only costs one sleep slice)."""
    if lib is not None:
        lib.mc_store_fence(addr, value)
    else:
        ctypes.c_int64.from_address(addr).value = value


def copy_ptr(dst: int, src: int, nbytes: int, nt: bool = False) -> None:
    """Copy ``nbytes`` between raw addresses (non-temporal stores for large ``nt`` copies)."""
    if nbytes <= 0:
        return
    if lib is not None and nbytes >= 4096:
        lib.mc_copy(dst, src, nbytes, 1 if nt else 0)
    else:
        ctypes.memmove(dst, src, nbytes)


def sum_ptr(dtype: torch.dtype, out: int, inputs: list[int], numel: int, nt: bool = False) -> bool:
    """``out = ((in0 + in1) + ...)`` over raw addresses of float32 / float64 arrays; False (doing
    nothing) when the compiled kernel is unavailable for ``dtype``."""
    name = _SUM.get(dtype)
    if lib is None or name is None or len(inputs) < 2:
        return False
    ptrs = (ctypes.c_void_p * len(inputs))(*inputs)
    getattr(lib, name)(out, ptrs, len(inputs), numel, 1 if nt else 0)
    return True


def spin_until_ge(addr: int, target: int, spin_s: float) -> bool | None:
    """Spin (with the CPU's pause hint, the GIL released) until the int64 at ``addr`` is at least ``target``
    (True) or ``spin_s`` passed (False); None without the library (the caller polls in Python)."""
    if lib is None:
        return None
    return bool(lib.mc_spin_until_ge(addr, target, int(spin_s * 1e9)))


def futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleep while the int32 at ``addr`` equals ``expected`` (at most ``timeout_s``)."""
    if lib is not None:
        lib.mc_futex_wait(addr, expected, max(int(timeout_s * 1e9), 1000))
    else:
        import time
        time.sleep(timeout_s)


def futex_bump_wake(addr: int) -> None:
    """Change the int32 at ``addr`` and wake every process sleeping on it."""
    if lib is not None:
        lib.mc_futex_bump_wake(addr)
    else:
        word = ctypes.c_int32.from_address(addr)
        word.value = (word.value + 1) & 0x7FFFFFFF


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = None


def vm_read(pid: int, dst: int, src: int, nbytes: int) -> int:
    """Copy ``nbytes`` from address ``src`` of process ``pid`` to ``dst`` in this process
    (``process_vm_readv``, partial reads continued).  Returns 0, or the errno of the failure
    (``ESRCH``: no such process; ``EPERM``: not permitted; ``EFAULT``: the remote range is not
    mapped).  Without the compiled library, libc is called through ctypes."""
    if nbytes <= 0:
        return 0
    if lib is not None:
        return lib.mc_vm_read(pid, dst, src, nbytes)
    global _libc
    if _libc is None:
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.process_vm_readv.restype = ctypes.c_ssize_t
        libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                          ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
        _libc = libc
    while nbytes > 0:
        local, remote = _IoVec(dst, nbytes), _IoVec(src, nbytes)
        got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            return err
        if got == 0:
            return errno.EFAULT
        dst, src, nbytes = dst + got, src + got, nbytes - got
    return 0
