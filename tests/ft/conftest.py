"""tests/ft: make the job module importable as ``ft.jobs`` here and in spawned cluster workers."""

import os
import sys

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)


import pytest  # noqa: E402

from mooncake import impl as _impl  # noqa: E402
from mooncake.testing.impls import EMULATED_HOSTS  # noqa: E402

# every fault and elastic case runs against each data plane; fast-hosts2: the fast plane with the ranks
# on two emulated hosts (rank r on host r % 2), so operations of three or more ranks run hybrid
IMPLS = ["ref", "fast", EMULATED_HOSTS]


@pytest.fixture(params=IMPLS)
def impl(request):
    """An entry of ``IMPLS``; fast is skipped (with the reason) where it cannot run."""
    if request.param.startswith("fast"):
        reason = _impl.fast_unavailable_reason("cpu")
        if reason:
            pytest.skip(f"fast CPU plane unavailable: {reason}")
    return request.param
