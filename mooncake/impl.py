"""Which implementation serves a call: ``MOONCAKE_IMPL`` = ``ref``, ``fast`` or ``auto`` (default).

``auto`` picks fast where it is available for the tensors' device, else ref, and says why once.
"""

from __future__ import annotations

import functools
import logging
import os

from .control.errors import ArgumentError

_log = logging.getLogger("mooncake")
CHOICES = ("ref", "fast", "auto")


def requested() -> str:
    value = os.environ.get("MOONCAKE_IMPL", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ArgumentError(f"MOONCAKE_IMPL={value!r} is not one of {', '.join(CHOICES)}")
    return value


def fast_unavailable_reason(device: str, what: str = "pg") -> str | None:
    """Why the fast path cannot serve ``device`` tensors of ``what`` ("pg" or "ep") here, or None if it can."""
    if what == "ep":
        if device == "cuda":  # kernels over CUDA IPC between the ranks of a host (mooncake.fast.cuda)
            from .fast.cuda import unavailable_reason
            return unavailable_reason()
        return f"the fast EP data plane for {device} tensors is not part of this release yet"
    if device == "cpu":  # shared memory between the ranks of a host (mooncake.fast.cpu)
        from .fast import cpu as fast_cpu
        return fast_cpu.unavailable_reason()
    if device == "cuda":  # CUDA IPC between the ranks of a host (mooncake.fast.cuda.pg)
        from .fast.cuda import pg_unavailable_reason
        return pg_unavailable_reason()
    return f"the fast data plane for {device} tensors is not part of this release yet"


@functools.lru_cache(maxsize=None)
def select(device: str, what: str = "pg") -> tuple[str, str]:
    """``(implementation, reason)`` for ``device`` ("cpu" or "cuda") and ``what`` ("pg" or "ep"); logged once."""
    wanted = requested()
    reason = fast_unavailable_reason(device, what)
    if wanted == "fast" and reason:
        raise ArgumentError(f"MOONCAKE_IMPL=fast but {reason}; use MOONCAKE_IMPL=ref or auto")
    if wanted == "ref":
        choice = ("ref", "MOONCAKE_IMPL=ref")
    elif reason:
        choice = ("ref", f"auto: {reason}")
    else:
        choice = ("fast", f"{wanted}: fast path available for {device}")
    _log.info("mooncake %s %s: using %s (%s)", what, device, *choice)
    return choice
