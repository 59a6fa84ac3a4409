"""The ``mooncake`` logger (stdlib ``logging``).

``MOONCAKE_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or a number) sets its level and,
when set, gives it a stderr handler of its own (unless the application configured handlers for it);
unset, records go wherever the application's logging sends them (by default: WARNING and above to
stderr, through Python's last-resort handler).

What it reports, each event once:

* the implementation chosen for a device (``mooncake.impl``): INFO;
* every view change: ranks that failed (WARNING: who, the new epoch and active set, how long
  detection and the agreement took) and ranks that joined or capacity that grew (INFO);
* an operation that missed its deadline (WARNING), a ``Work.wait(timeout)`` that expired (INFO).

Nothing is logged per operation above DEBUG.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

logger = logging.getLogger("mooncake")
_configured = False


def setup() -> logging.Logger:
    """Apply ``MOONCAKE_LOG_LEVEL`` once (idempotent); returns the ``mooncake`` logger."""
    global _configured
    if _configured:
        return logger
    _configured = True
    value = os.environ.get("MOONCAKE_LOG_LEVEL", "").strip()
    if not value:
        return logger
    level = int(value) if value.isdigit() else logging.getLevelName(value.upper())
    if not isinstance(level, int):
        logger.warning("MOONCAKE_LOG_LEVEL=%r is not a logging level (DEBUG, INFO, WARNING, ERROR)", value)
        return logger
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[mooncake pid {os.getpid()}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def view_change(rank: int, old_epoch: int, new_epoch: int, old_active: Iterable[int],
                new_active: Iterable[int], failed: Iterable[int] = (), detect_s: float | None = None,
                agree_s: float | None = None, why: str = "") -> None:
    """Report one adopted view change (WARNING if ranks failed, INFO otherwise)."""
    old, new, failed = sorted(old_active), sorted(new_active), sorted(failed)
    joined = [r for r in new if r not in old]
    gone = failed or [r for r in old if r not in new]
    timing = ""
    if detect_s is not None:
        timing += f"; detected {detect_s * 1e3:.0f} ms after the oldest pending operation was issued"
    if agree_s is not None:
        timing += f"; agreement took {agree_s * 1e3:.0f} ms"
    parts = []
    if gone:
        parts.append(f"failed rank(s) {gone}")
    if joined:
        parts.append(f"joined rank(s) {joined}")
    what = ", ".join(parts) or why or "new view"
    level = logging.WARNING if gone else logging.INFO
    logger.log(level, "rank %d: view change, epoch %d -> %d: %s; active now %s%s", rank, old_epoch,
               new_epoch, what, new, timing)


setup()
