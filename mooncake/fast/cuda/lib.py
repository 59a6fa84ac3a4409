"""Load ``libmooncake_ep_cuda.so`` with ctypes: ``load() -> (lib, None)`` or ``(None, reason)``.

The reason names what is missing: a CPU-only torch, no visible GPU, no nvcc and no cached build, a
library built for a newer CUDA than the driver supports, or one built from other sources / ABI.
Nothing here is imported by ``import mooncake``; importing this module needs only ctypes and torch.
"""

from __future__ import annotations

import ctypes
import functools
import os

#: McEpArgs in csrc/mooncake_ep_cuda.cu, in order; every field is an int64.
EP_ARG_FIELDS = (
    "stream",
    "rank", "num_ranks", "num_local_experts", "num_experts", "max_tokens", "hidden", "num_topk", "num_tokens",
    "use_fp8", "timeout_ns", "peers", "local_base", "ws", "tab", "active",
    "off_dsig", "off_csig", "off_dcount", "off_ddata", "off_cdata",
    "msg_stride", "half_dcount", "half_ddata", "half_cdata",
    "x", "topk", "weights", "out",
    "recv_x", "recv_scales", "recv_count", "src_info", "layout_range",
    "grid_hint", "src_k", "stage_cap", "dead",
)
ABI_VERSION = 12
#: McPgDevArgs in csrc/mooncake_pg_cuda.cu: the device protocol's ranks per group at most
DEV_MAX_RANKS = 16


class McEpArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in EP_ARG_FIELDS]


class McPgDevArgs(ctypes.Structure):
    """One operation of the PG device protocol (csrc/mooncake_pg_cuda.cu, ``McPgDevArgs``)."""

    _fields_ = [("ctl", ctypes.c_int64 * DEV_MAX_RANKS), ("note", ctypes.c_int64 * DEV_MAX_RANKS),
                ("lane", (ctypes.c_int64 * DEV_MAX_RANKS) * 2),
                ("base", ctypes.c_int64 * 2), ("src", ctypes.c_int64), ("dst", ctypes.c_int64),
                ("in_bytes", ctypes.c_int64), ("rd_off", ctypes.c_int64), ("count", ctypes.c_int64),
                ("part", ctypes.c_int64),
                ("key", ctypes.c_int64), ("fp", ctypes.c_int64 * 3), ("timeout_ns", ctypes.c_int64),
                ("flag", ctypes.c_int64), ("arrive", ctypes.c_int64), ("trace", ctypes.c_int64),
                ("n", ctypes.c_int32), ("me", ctypes.c_int32), ("op", ctypes.c_int32), ("dtype", ctypes.c_int32),
                ("phase", ctypes.c_int32), ("kind", ctypes.c_int32), ("graph", ctypes.c_int32),
                ("slots", ctypes.c_int32), ("root", ctypes.c_int32), ("stall", ctypes.c_int32),
                ("rank", ctypes.c_int32 * DEV_MAX_RANKS)]


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32 = ctypes.c_int64, ctypes.c_int
    pi32, pi64 = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64)
    sig = {
        "mc_abi_version": ([], i32), "mc_cudart_version": ([], i32), "mc_ep_args_size": ([], i32),
        "mc_error_string": ([i32], ctypes.c_char_p), "mc_driver_version": ([pi32], i32),
        "mc_device_count": ([pi32], i32), "mc_set_device": ([i32], i32), "mc_get_device": ([pi32], i32),
        "mc_sm_count": ([i32, pi32], i32),
        "mc_driver_error_string": ([i32], ctypes.c_char_p), "mc_vmm_supported": ([i32, pi32], i32),
        "mc_vmm_peer_access": ([i32, i32], i32), "mc_device_uuid": ([i32, ctypes.c_char_p], i32),
        "mc_vmm_alloc": ([i32, i64, pi64, pi64, pi32], i32), "mc_vmm_import": ([i32, i32, i64, pi64], i32),
        "mc_vmm_free": ([i64, i64], i32),
        "mc_pool_find": ([i64, pi64, pi64, pi32, pi64], i32),
        "mc_hold_new": ([], i64), "mc_hold_graphs": ([i64], i64), "mc_hold_drop": ([i64], None),
        "mc_hold_graph": ([i64, i64], i32),
        "mc_store64": ([i32, i64, i64], i32), "mc_load64": ([i32, i64, pi64], i32),
        "mc_ep_dispatch": ([ctypes.POINTER(McEpArgs), i32], i32),
        "mc_ep_combine": ([ctypes.POINTER(McEpArgs), i32], i32),
        "mc_quantize_fp8": ([i64, i64, i64, i64, i64, i64], i32),
        "mc_ep_skip": ([i64, i32, i64], i32),
        "mc_pg_fold_max_inputs": ([], i32),
        "mc_pg_fold": ([i32, i32, pi64, i32, i64, i64, i64, i64], i32),
        "mc_pg_dev_args_size": ([], i32), "mc_pg_dev_max_ranks": ([], i32), "mc_pg_dev_layout": ([pi64], None),
        "mc_pg_dev_trace_shape": ([pi32], None),
        "mc_pg_dev_launch": ([ctypes.POINTER(McPgDevArgs), i32, i64], i32),
        "mc_pg_dev_post": ([ctypes.POINTER(McPgDevArgs), i64, i32, i64, i64], i32),
        "mc_pg_quick_wait": ([pi64, i32, i32, i64, i64, i64, i64], i32),
        "mc_event_create": ([pi64], i32), "mc_event_destroy": ([i64], i32),
        "mc_event_query": ([i64], i32), "mc_event_sync": ([i64], i32),
        "mc_host_register": ([i64, i64, i32, pi64], i32), "mc_host_unregister": ([i64, i32], i32),
        "mc_capture_mode": ([i32, pi32], i32),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


class CudaError(RuntimeError):
    """A CUDA runtime call of the library failed."""


def check(lib, rc: int, what: str) -> None:
    if rc != 0:
        msg = lib.mc_error_string(rc)
        raise CudaError(f"{what}: CUDA error {rc} ({msg.decode() if msg else '?'})")


@functools.lru_cache(maxsize=None)
def load():
    """``(lib, None)`` when the CUDA fast path can run in this process, else ``(None, reason)``."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None, "torch is not installed"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build (no CUDA runtime)"
    if not torch.cuda.is_available():
        return None, "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    path = os.environ.get("MOONCAKE_CUDA_LIB")
    if not path:
        from . import build

        try:
            path = str(build.build())
        except build.BuildError as exc:
            return None, f"cannot build the CUDA library: {exc}"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    try:
        _declare(lib)
    except AttributeError as exc:
        return None, f"{path} is not a mooncake CUDA library of this version ({exc}); rebuild it"
    if (lib.mc_abi_version() != ABI_VERSION or lib.mc_ep_args_size() != ctypes.sizeof(McEpArgs)
            or lib.mc_pg_dev_args_size() != ctypes.sizeof(McPgDevArgs) or lib.mc_pg_dev_max_ranks() != DEV_MAX_RANKS):
        return None, (f"{path} has ABI {lib.mc_abi_version()}, EP args {lib.mc_ep_args_size()} B, PG device args "
                      f"{lib.mc_pg_dev_args_size()} B for {lib.mc_pg_dev_max_ranks()} ranks; this mooncake expects "
                      f"ABI {ABI_VERSION}, {ctypes.sizeof(McEpArgs)} B, {ctypes.sizeof(McPgDevArgs)} B for "
                      f"{DEV_MAX_RANKS} ranks: built from other sources; rebuild")
    driver = ctypes.c_int(0)
    rc = lib.mc_driver_version(ctypes.byref(driver))
    built = lib.mc_cudart_version()
    if rc != 0 or driver.value == 0:
        return None, f"no usable CUDA driver (cudaDriverGetVersion returned {rc})"
    if driver.value < built:
        return None, (f"{os.path.basename(path)} was built against CUDA {_version(built)} but the driver supports "
                      f"only CUDA {_version(driver.value)} (torch is built against CUDA {torch.version.cuda}); "
                      "rebuild with a matching nvcc (MOONCAKE_CUDA_CACHE, CUDA_HOME)")
    count = ctypes.c_int(0)
    if lib.mc_device_count(ctypes.byref(count)) != 0 or count.value == 0:
        return None, "the CUDA library sees no device"
    return lib, None


def unavailable_reason() -> str | None:
    """Why the CUDA fast path cannot run here, or None."""
    return load()[1]
