"""CUDA fast path: kernels in ``csrc/`` (built by ``build.py``, loaded with ctypes by ``lib.py``) over CUDA IPC.

* ``load() -> (lib, None) | (None, reason)`` and ``unavailable_reason()``: whether it can run here and, if
  not, what is missing (CPU-only torch, no GPU, no nvcc and no cached build, driver older than the build).
* ``FastEPBuffer`` (``mooncake.fast.cuda.ep``): EP dispatch / combine with the ref ``Buffer``'s signatures.
* ``open_group(info)`` (``mooncake.fast.cuda.pg``): the PG data plane for CUDA tensors (CUDA IPC between the
  ranks of one host, the ref plane across hosts); ``pg_unavailable_reason()`` says why it cannot run here.

Importing this package needs no GPU and no compiler; nothing is built until ``load()`` is called.
"""

from __future__ import annotations

from .lib import load, unavailable_reason

__all__ = ["load", "unavailable_reason", "pg_unavailable_reason", "FastEPBuffer", "FastUnavailable", "open_group"]


def __getattr__(name):
    if name in ("FastEPBuffer", "FastUnavailable", "FastHandle", "quantize_fp8"):
        from . import ep

        return getattr(ep, name)
    raise AttributeError(name)


def pg_unavailable_reason() -> str | None:
    """Why the PG plane for CUDA tensors cannot run in this process, or None when it can."""
    from .pg import unavailable_reason as reason

    return reason()


def open_group(info):
    """The PG data plane for CUDA tensors of one group (``info``: ``mooncake.control.plane.GroupInfo``)."""
    from .pg import open_group as open_pg

    return open_pg(info)
