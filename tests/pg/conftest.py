"""tests/pg: make the job module importable as ``pg.jobs`` in the test process and in every
spawned cluster worker (spawn children inherit the parent's sys.path; PG_ENV also carries it
through PYTHONPATH for launcher subprocesses)."""

import os
import sys

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

PYTHONPATH = os.pathsep.join([TESTS_DIR, REPO_ROOT] + ([os.environ["PYTHONPATH"]]
                                                       if os.environ.get("PYTHONPATH") else []))
