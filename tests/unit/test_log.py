"""The ``mooncake`` logger: its level from MOONCAKE_LOG_LEVEL, and what a view change reports."""

from __future__ import annotations

import logging
import subprocess
import sys

from mooncake import log


def test_view_change_levels(caplog):
    caplog.set_level(logging.DEBUG, logger="mooncake")
    log.view_change(0, 3, 4, (0, 1, 2), (0, 2), failed=(1,), detect_s=0.05, agree_s=0.012)
    log.view_change(0, 4, 5, (0, 2), (0, 1, 2))
    failed, joined = caplog.records[-2:]
    assert failed.levelno == logging.WARNING and joined.levelno == logging.INFO
    assert "epoch 3 -> 4" in failed.getMessage() and "failed rank(s) [1]" in failed.getMessage()
    assert "detected 50 ms" in failed.getMessage() and "agreement took 12 ms" in failed.getMessage()
    assert "joined rank(s) [1]" in joined.getMessage()


def test_level_from_environment():
    code = ("import logging, mooncake.log as l; lg = l.setup(); "
            "print(lg.level, len(lg.handlers)); lg.info('hello from mooncake')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"MOONCAKE_LOG_LEVEL": "info", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(logging.INFO), "1"]
    assert "INFO hello from mooncake" in out.stderr
