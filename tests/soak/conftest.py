"""tests/soak: the repository root and benchmarks/ importable here and in spawned cluster workers."""

import os
import sys

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
