"""``monitored_barrier`` for mooncake groups, with gloo's contract (``dist.monitored_barrier`` itself
accepts only gloo groups, so call ``group.monitored_barrier(timeout, wait_all_ranks)`` or this
function).

The lowest active rank waits, up to ``timeout``, for every other active rank to arrive, then releases
them; a rank that does not arrive in time is named in the ``OpTimeoutError`` the lowest rank raises
(the first one only, or all of them with ``wait_all_ranks=True``), as gloo names it.  The other ranks
raise ``OpTimeoutError`` if no release comes within ``timeout``.  It runs through the group's Store,
not the data plane: it is a debugging aid that must report a hung or dead rank, never hang on it.
"""

from __future__ import annotations

import time
from datetime import timedelta

from ..control.errors import ArgumentError, OpTimeoutError


def monitored_barrier(group, timeout: timedelta | None = None, wait_all_ranks: bool = False) -> None:
    """gloo's ``monitored_barrier`` on a mooncake group (see the module docstring)."""
    if timeout is None:
        timeout = group.timeout
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise ArgumentError(f"monitored_barrier: timeout must be a positive datetime.timedelta, got {timeout!r}")
    group._check_open()
    active = list(group.view.active)
    me, root = group.rank(), min(active)
    count = getattr(group, "_monitored_count", 0)
    group._monitored_count = count + 1
    prefix = f"{group._prefix}/monitored/{count}"
    store = group._store
    limit_ms = int(timeout.total_seconds() * 1000)
    deadline = time.monotonic() + timeout.total_seconds()
    if me != root:
        store.set(f"{prefix}/arrived/{me}", b"1")
        try:
            store.wait([f"{prefix}/release"], timeout)
        except Exception:  # noqa: BLE001 - torch raises DistStoreError on the timeout
            raise OpTimeoutError(f"[Rank {me}]: monitored_barrier was not released by rank {root} within "
                                 f"{limit_ms} ms", (root,)) from None
        return
    late: list[int] = []
    for r in (r for r in active if r != root):  # in rank order, each wait with what is left of the timeout
        key = f"{prefix}/arrived/{r}"
        if late:  # past the deadline: only look
            if not store.check([key]):
                late.append(r)
            continue
        try:
            store.wait([key], timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        except Exception:  # noqa: BLE001 - torch raises DistStoreError on the timeout
            late.append(r)
            if not wait_all_ranks:
                break
    if late:
        if wait_all_ranks:
            raise OpTimeoutError(f"[Rank {me}]: Ranks {', '.join(map(str, late))} failed to pass "
                                 f"monitoredBarrier in {limit_ms} ms", tuple(late))
        raise OpTimeoutError(f"[Rank {me}]: Rank {late[0]} failed to pass monitoredBarrier in {limit_ms} ms",
                             (late[0],))
    store.set(f"{prefix}/release", b"1")
