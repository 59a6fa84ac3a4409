"""Test-only runtime patch: what the PG face needs so that ``MOONCAKE_IMPL=fast`` on backend ``mooncake``
hands CUDA tensors to the CUDA plane (``mooncake/fast/cuda/pg.py``) instead of staging them through host
memory.  The files involved (``mooncake/impl.py``, ``mooncake/pg/backend.py``, ``mooncake/pg/work.py``)
belong to other owners; this module applies the same change in a worker process so the plane can be run
and measured end to end before it lands.  The change, as it should be made in those files (as a diff:
the PG-face change, now applied):

1. ``impl.fast_unavailable_reason("cuda", what="pg")`` returns ``mooncake.fast.cuda.pg_unavailable_reason()``.
2. ``MooncakeProcessGroup._stage`` returns the caller's tensor itself when it is on the group's device,
   contiguous, and the plane has ``takes_device_tensors`` (P2P keeps staging: it always goes through ref);
   a non-contiguous one is staged into a contiguous copy on its own device.
3. (latency, optional) ``MooncakeWork.wait`` sleeps in ``op.wait(slice)`` when the operation has one and no
   agreement decision is awaited, instead of the UCX event fd, which shared-memory and CUDA IPC traffic
   never wakes (without it every step of an operation costs up to the 5 ms select slice).
"""

from __future__ import annotations

import time
from datetime import timedelta

_applied: dict = {}


def apply(wait: bool = False, emulate: bool = False) -> None:
    """Patch this process.  ``emulate``: test mode on CPU machines -- backend ``mooncake-cpu`` with
    ``MOONCAKE_IMPL=fast`` opens the CUDA plane in its CPU emulation (``MOONCAKE_FAST_CUDA_EMULATE=cpu``)
    instead of the shared-memory CPU plane, so the PG face, the failure agreement and the plane run
    together without a GPU."""
    import mooncake.impl as impl
    from mooncake.fast.cuda import pg_unavailable_reason
    from mooncake.pg import backend

    if "reason" not in _applied:
        original = impl.fast_unavailable_reason
        plane_device = "cpu" if emulate else "cuda"

        def fast_unavailable_reason(device: str, *args, **kwargs):
            what = args[0] if args else kwargs.get("what", "pg")
            if device == plane_device and what == "pg":
                return pg_unavailable_reason()
            return original(device, *args, **kwargs)

        impl.fast_unavailable_reason = fast_unavailable_reason
        impl.select.cache_clear()
        _applied["reason"] = original

    if "stage" not in _applied and isinstance(backend.MooncakeProcessGroup.__dict__["_stage"], staticmethod):
        # (the PG face stages device tensors for planes that take them: nothing to do)
        cls = backend.MooncakeProcessGroup
        original_stage = cls.__dict__["_stage"].__func__

        def _stage(self, t, staged, is_output):
            if t.device.type != "cpu" and getattr(self._plane, "takes_device_tensors", False):
                if t.is_contiguous():
                    return t
                stage = t.detach().clone(memory_format=__import__("torch").contiguous_format)
                if is_output:
                    staged.append((t, stage))
                return stage
            return original_stage(t, staged, is_output)

        cls._stage = _stage
        _applied["stage"] = original_stage
    if emulate and "open_plane" not in _applied:
        import os

        from mooncake.control.plane import GroupInfo
        from mooncake.fast.cuda import open_group

        os.environ["MOONCAKE_FAST_CUDA_EMULATE"] = "cpu"
        cls = backend.MooncakeProcessGroup
        original_open = cls._open_plane

        def _open_plane(self):
            if self.implementation != "fast":
                return original_open(self)
            return open_group(GroupInfo(self._store, f"mooncake/{self._index}", self._rank, self._capacity,
                                        self._group_key, self._timeout_s, self._engine, self._addresses,
                                        self._device_type))

        cls._open_plane = _open_plane
        _applied["open_plane"] = original_open
    set_wait(wait)


def set_wait(on: bool) -> bool:
    """Use ``op.wait`` in ``MooncakeWork.wait`` (True) or the original wait (False)."""
    from mooncake.pg import work as W

    cls = W.MooncakeWork
    if "wait" not in _applied:
        _applied["wait"] = cls.wait
    if not on:
        cls.wait = _applied["wait"]
        return True

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        limit = None
        if timeout and timeout.total_seconds() > 0:
            limit = time.monotonic() + timeout.total_seconds()
        while not self._advance():
            now = time.monotonic()
            if limit is not None and now >= limit:
                return False
            slice_end = min(limit or now + W._WAIT_SLICE_S, now + W._WAIT_SLICE_S)
            op_wait = getattr(self._op, "wait", None)
            if op_wait is not None and not self._awaiting_decision:
                op_wait(max(0.0, slice_end - now))
            else:
                self._engine.wait_until(self._advance, slice_end)
        if self._state == W._FAILED:
            raise self._error
        return True

    cls.wait = wait
    return True


def options(rank: int, world_size: int, wait: bool = False, emulate: bool = False):
    """Cluster ``options`` factory: patch this worker before ``init_process_group``; default options."""
    apply(wait, emulate)
    return None
