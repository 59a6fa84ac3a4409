"""tests/security: make ``security.attack_jobs`` importable here and in spawned cluster workers."""

import os
import sys

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _path in (TESTS_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import pytest  # noqa: E402

from mooncake import impl as _impl  # noqa: E402


@pytest.fixture(params=["ref", "fast"])
def impl(request):
    """MOONCAKE_IMPL of the workers; fast is skipped (with the reason) where it cannot run."""
    if request.param == "fast":
        reason = _impl.fast_unavailable_reason("cpu")
        if reason:
            pytest.skip(f"fast CPU plane unavailable: {reason}")
    return request.param
