"""tests/ft: make the job module importable as ``ft.jobs`` here and in spawned cluster workers."""

import os
import sys

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)
