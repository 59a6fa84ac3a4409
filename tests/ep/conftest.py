"""tests/ep: make ``ep_jobs`` importable in the test process and in every spawned cluster worker.

Spawned workers inherit the parent's sys.path; ``EP_ENV`` also carries it through PYTHONPATH (the
cluster's ``env``) so the workers do not depend on how pytest was started.  ``MOONCAKE_TEST_DEVICE``
(cpu | cuda) selects the device of the CUDA-named test variants (see run_cuda.sh).
"""

import os
import sys

EP_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(EP_DIR))
for _path in (EP_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

EP_ENV = {"PYTHONPATH": os.pathsep.join([REPO_ROOT, EP_DIR] + ([os.environ["PYTHONPATH"]]
                                                                if os.environ.get("PYTHONPATH") else []))}
