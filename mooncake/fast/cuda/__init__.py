"""CUDA fast path: kernels in ``csrc/`` (built by ``build.py``, loaded with ctypes by ``lib.py``) over CUDA IPC.

* ``load() -> (lib, None) | (None, reason)`` and ``unavailable_reason()``: whether it can run here and, if
  not, what is missing (CPU-only torch, no GPU, no nvcc and no cached build, driver older than the build).
* ``FastEPBuffer`` (``mooncake.fast.cuda.ep``): EP dispatch / combine with the ref ``Buffer``'s signatures.

Importing this package needs no GPU and no compiler; nothing is built until ``load()`` is called.
"""

from __future__ import annotations

from .lib import load, unavailable_reason

__all__ = ["load", "unavailable_reason", "FastEPBuffer", "FastUnavailable", "open_group"]


def __getattr__(name):
    if name in ("FastEPBuffer", "FastUnavailable", "FastHandle", "quantize_fp8"):
        from . import ep

        return getattr(ep, name)
    raise AttributeError(name)


def open_group(info):
    """PG data plane for CUDA tensors: not part of this release (EP only); the PG keeps using ref."""
    from ...control.errors import MooncakeError

    raise MooncakeError("the CUDA fast data plane serves EP dispatch/combine only; PG collectives on CUDA "
                        "tensors use the ref data plane (MOONCAKE_IMPL=ref or auto)")
