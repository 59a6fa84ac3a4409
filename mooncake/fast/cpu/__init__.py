"""The fast CPU data plane: collectives through shared memory between the ranks of one host.

``open_group(info)`` returns the ``PlaneGroup`` (``mooncake.control.plane``) the control plane
drives.  While every rank of the group runs on this host, collectives move through shared-memory
segments (``group.py`` has the protocol), with hot loops in C (``csrc/cpu/mooncake_shm.c``, compiled
on first use; torch fallbacks when no compiler is found).  An operation whose view has a rank on
another host runs hybrid (``hybrid.py``): shared memory between this host's ranks, UCX to the others.
Results are bitwise equal to ``mooncake.model`` / ref in every case.
"""

from __future__ import annotations

import os
import sys

__all__ = ["open_group", "unavailable_reason", "native_reason"]


def unavailable_reason() -> str | None:
    """Why this process cannot run the shared-memory plane, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"the shared-memory CPU plane needs Linux (memfd, futex, pidfd), not {sys.platform}"
    for what in ("memfd_create", "pidfd_open"):
        if not hasattr(os, what):
            return f"os.{what} is missing (needs Linux >= 5.3 and Python >= 3.9)"
    if not os.path.isdir("/proc/self/fd"):
        return "/proc is not mounted (peers attach segments through /proc/<pid>/fd)"
    return None


def native_reason() -> str | None:
    """Why the compiled helpers are not in use (their torch fallbacks are), or None."""
    from . import native
    native.load()
    return native.reason


def open_group(info):
    """The fast CPU plane of one group (``info``: ``mooncake.control.plane.GroupInfo``)."""
    from .group import FastCpuGroup
    return FastCpuGroup(info)
