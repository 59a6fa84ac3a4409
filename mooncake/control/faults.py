"""Fault injection for tests: kill or stall this process at a named point of an operation.

Production code calls ``hit(point)`` at each point; it costs one dict lookup unless armed.  Arm
from a test job with ``arm(point, action)``, or for a whole process with the environment variable
``MOONCAKE_FAULT=point:action[:skip]`` (read at import), e.g. ``after_data:kill:2`` kills the
process the third time an operation reaches ``after_data``.

Points:
    before_send       a collective is about to post its messages
    mid_transfer      a collective has posted its first send, not the rest
    after_data        every payload of a collective arrived, before its DONEs go out
    during_agreement  a failure agreement is about to write this rank's report
    during_join       ``join_group`` published its request, before it waits to be admitted
Actions: ``kill`` (SIGKILL, no cleanup: like a crash) and ``stall`` (SIGSTOP for ``stall_s``, default
an hour, then SIGCONT: like a hung process.  Every thread stops, so the rank is alive but silent
whichever thread reached the point; sleeping in that thread alone would leave the others answering).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

POINTS = ("before_send", "mid_transfer", "after_data", "during_agreement", "during_join")
ACTIONS = ("kill", "stall")
_armed: dict[str, tuple[str, int, float]] = {}


def arm(point: str, action: str, skip: int = 0, stall_s: float = 3600.0) -> None:
    """Make the ``skip+1``-th arrival at ``point`` perform ``action``."""
    if point not in POINTS:
        raise ValueError(f"fault point {point!r} is not one of {', '.join(POINTS)}")
    if action not in ACTIONS:
        raise ValueError(f"fault action {action!r} is not one of {', '.join(ACTIONS)}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    _armed[point] = (action, skip, stall_s)


def disarm() -> None:
    _armed.clear()


def armed() -> bool:
    """Some fault is armed in this process (code paths without fault points step aside)."""
    return bool(_armed)


def hit(point: str) -> None:
    if not _armed or point not in _armed:
        return
    action, skip, stall_s = _armed[point]
    if skip > 0:
        _armed[point] = (action, skip - 1, stall_s)
        return
    del _armed[point]
    if action == "kill":
        signal.pthread_kill(threading.get_ident(), signal.SIGKILL)
    if stall_s > 0:
        _freeze(stall_s)


def _freeze(stall_s: float) -> None:
    """Stop this whole process for ``stall_s`` seconds: a detached shell sends the SIGCONT.

    The SIGSTOP is aimed at the calling thread.  Every thread stops either way, but a signal sent
    to the process is taken by whichever thread the kernel picks (often the main one), and until
    that thread stops the group the caller runs on: it would write the very message the fault is
    meant to hold back."""
    subprocess.Popen(["/bin/sh", "-c", f"sleep {stall_s:.3f}; kill -CONT {os.getpid()}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def _arm_from_env() -> None:
    spec = os.environ.get("MOONCAKE_FAULT", "").strip()
    if spec:
        point, action, *rest = spec.split(":")
        arm(point, action, int(rest[0]) if rest else 0)


_arm_from_env()
