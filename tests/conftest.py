"""Shared fixtures: a session-wide cache of running test clusters (mooncake.testing.cluster)."""

import collections
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # tests import mooncake from the checkout, installed or not
    sys.path.insert(0, REPO_ROOT)

from mooncake.testing.cluster import Cluster  # noqa: E402

MAX_LIVE_CLUSTERS = 4  # beyond this the least recently used cluster is closed (memory, 2 cores)


def _freeze(value):
    """A hashable, order-independent key for Cluster arguments."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@pytest.fixture(scope="session")
def cluster_factory():
    """get(world_size, backend="gloo", **Cluster_kwargs) -> a running Cluster.

    Identical arguments reuse the same cluster; one that is no longer intact
    (broken by a timeout, a rank killed, died or replaced) is restarted first.
    All clusters are closed at the end of the session.
    """
    clusters = collections.OrderedDict()

    def get(world_size, backend="gloo", **kwargs):
        key = (world_size, backend, _freeze(kwargs))
        cluster = clusters.pop(key, None)
        if cluster is None:
            while len(clusters) >= MAX_LIVE_CLUSTERS:
                clusters.popitem(last=False)[1].close()
            cluster = Cluster(world_size, backend, **kwargs)
        elif not cluster.intact:
            try:
                cluster.restart()
            except BaseException:
                cluster.close()
                raise
        clusters[key] = cluster
        return cluster

    yield get
    for cluster in clusters.values():
        cluster.close()
