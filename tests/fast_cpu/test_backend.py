"""The fast CPU plane behind ``mooncake-cpu`` (MOONCAKE_IMPL=fast): the backend reports it, every
collective matches the model, and a group whose ranks look like different hosts runs hybrid (UCX
between hosts, shared memory within one) with the same results."""

from __future__ import annotations

import pytest
import torch

from mooncake.model import collectives as M
from mooncake.model.reduce import ReduceOp
from mooncake.testing.compare import bitwise_equal

TIMEOUT_S = 60


def _job():
    import torch.distributed as dist

    import mooncake.pg as pg
    r, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(100 + r)
    out = {"impl": pg.get_implementation(None)}
    plane = dist.group.WORLD._plane
    out["hybrid"] = getattr(plane, "hybrid", "no plane attribute")
    x = torch.randn(1000, generator=g)
    dist.all_reduce(x)
    out["all_reduce"] = x
    big = torch.randn(600_000, generator=g)  # 2.4 MB: the pipelined all_reduce
    dist.all_reduce(big)
    out["big"] = big
    y = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    dist.all_reduce(y, op=dist.ReduceOp.AVG)
    out["avg_bf16"] = y
    ag = torch.empty(n * 4, dtype=torch.int64)
    dist.all_gather_into_tensor(ag, torch.arange(4) + 10 * r)
    out["all_gather"] = ag
    a2a = torch.empty(n * 2, dtype=torch.float64)
    dist.all_to_all_single(a2a, torch.arange(n * 2, dtype=torch.float64) + 100 * r)
    out["all_to_all"] = a2a
    b = torch.full((7,), float(r))
    dist.broadcast(b, src=n - 1)
    out["broadcast"] = b
    works = [dist.all_reduce(torch.full((5,), float(r + i)), async_op=True) for i in range(4)]
    for w in reversed(works):
        w.wait()
    dist.barrier()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("host", ["same", "per-process", "rank-mod-2"])
def test_backend_fast(cluster_factory, host):
    env = {"MOONCAKE_IMPL": "fast"}
    if host != "same":
        env["MOONCAKE_FAST_CPU_HOST_ID"] = host
    n = 3
    c = cluster_factory(n, "mooncake-cpu", env=env, timeout_s=TIMEOUT_S)
    res = c.run(_job)
    act = [1] * n
    gens = [torch.Generator().manual_seed(100 + r) for r in range(n)]
    xs = [torch.randn(1000, generator=g) for g in gens]
    bigs = [torch.randn(600_000, generator=g) for g in gens]
    ys = [torch.randn(3, 5, generator=g).to(torch.bfloat16) for g in gens]
    want = {"all_reduce": M.all_reduce(xs, ReduceOp.SUM, act), "big": M.all_reduce(bigs, ReduceOp.SUM, act),
            "avg_bf16": M.all_reduce(ys, ReduceOp.AVG, act)}
    for r in range(n):
        assert res[r]["impl"][0] == "fast", res[r]["impl"]
        if host == "same":
            assert res[r]["hybrid"] is None
        else:  # rank-mod-2: ranks 0 and 2 share a host (shared memory), rank 1 is on the other
            remote = [s for s in range(n) if s != r and (host == "per-process" or s % 2 != r % 2)]
            assert res[r]["hybrid"].startswith(f"hybrid: rank(s) {remote} run on other hosts"), res[r]["hybrid"]
        for k, w in want.items():
            assert bitwise_equal(res[r][k], w[r]), (r, k)
        assert res[r]["all_gather"].tolist() == [v + 10 * s for s in range(n) for v in range(4)]
        assert res[r]["all_to_all"].tolist() == [float(2 * r + j + 100 * s) for s in range(n) for j in range(2)]
        assert res[r]["broadcast"].tolist() == [float(n - 1)] * 7
