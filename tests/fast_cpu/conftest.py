"""tests/fast_cpu: make ``fast_cpu.planeharness`` importable in the test process and in spawned
cluster workers (spawn children inherit sys.path)."""

import os
import sys

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
