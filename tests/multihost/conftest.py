"""The two "hosts" the tests of this folder run on (mooncake.testing.netns.TwoHosts), one pair per module."""

import pytest

from mooncake.testing.netns import TwoHosts


@pytest.fixture(scope="module")
def hosts():
    why = TwoHosts.unavailable()
    if why:
        pytest.skip(f"two-host tests need network namespaces: {why}")
    h = TwoHosts()
    yield h
    h.close()
