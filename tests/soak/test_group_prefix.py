"""A group created after a subgroup that left some ranks out: every member must find the others.

torch creates no backend on the ranks outside a subgroup, so a per-process count of the groups
created differs between ranks afterwards; mooncake's Store keys used that count, and the next
group's ranks waited for each other under different keys until the timeout.  The correctness soak
found it (its subgroups are partitions, so that it can run past it).  Now the key counts the groups
of one torch name and member list (``_next_backend_index`` in mooncake/pg/backend.py).
"""

import pytest

from mooncake.testing.cluster import Cluster

pytestmark = pytest.mark.timeout(180)


def subgroup_then_world():
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    dist.new_group([0, 1], timeout=timedelta(seconds=8))
    everyone = dist.new_group([0, 1, 2], timeout=timedelta(seconds=8))
    t = torch.tensor([rank + 1], dtype=torch.int64)
    dist.all_reduce(t, group=everyone)
    return int(t.item())


@pytest.mark.parametrize("which", ["ref", "fast"])
def test_group_after_partial_subgroup(which):
    with Cluster(3, backend="mooncake-cpu", env={"MOONCAKE_IMPL": which}, timeout_s=30) as c:
        assert c.run(subgroup_then_world, timeout_s=60) == [6, 6, 6]
