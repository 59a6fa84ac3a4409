"""Test-only hook for ``pg_check.py --emulate`` (CPU machines): backend ``mooncake-cpu`` with
``MOONCAKE_IMPL=fast`` opens the CUDA plane in its CPU emulation (``MOONCAKE_FAST_CUDA_EMULATE=cpu``)
instead of the shared-memory CPU plane, so the PG face, the failure agreement and the CUDA plane's
protocol run together without a GPU."""

from __future__ import annotations

import os

_applied: dict = {}


def apply() -> None:
    """Patch this process (idempotent)."""
    import mooncake.impl as impl
    from mooncake.control.plane import GroupInfo
    from mooncake.fast.cuda import open_group, pg_unavailable_reason
    from mooncake.pg import backend

    if _applied:
        return
    original_reason = impl.fast_unavailable_reason

    def fast_unavailable_reason(device: str, *args, **kwargs):
        what = args[0] if args else kwargs.get("what", "pg")
        if device == "cpu" and what == "pg":
            return pg_unavailable_reason()
        return original_reason(device, *args, **kwargs)

    impl.fast_unavailable_reason = fast_unavailable_reason
    impl.select.cache_clear()
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
    _applied.update(reason=original_reason, open_plane=original_open)


def options(rank: int, world_size: int):
    """Cluster ``options`` factory: patch this worker before ``init_process_group``; default options."""
    apply()
    return None
