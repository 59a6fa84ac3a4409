"""What /proc says about a process of this PID namespace (peers' liveness where no pidfd is at hand)."""

from __future__ import annotations


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in ``/proc/<pid>/stat`` ("R", "S", "T" stopped, "Z" zombie, ...);
    "X" (dead) if there is no such process; None if /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"
    except (OSError, IndexError):
        return None


def exited(state: str | None) -> bool | None:
    """Whether a process in ``state`` has exited (a zombie has); None if the state is unknown."""
    return None if state is None else state in ("Z", "X")
