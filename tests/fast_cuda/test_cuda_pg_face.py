"""The PG face (backend ``mooncake``) on CUDA tensors, for ref and fast: stream ordering of ``Work.wait``,
CUDA graph capture (refused, or captured and replayed bitwise), P2P of CUDA tensors.  Skipped where no CUDA
device is usable.  On a machine with several GPUs the ranks spread over them (rank % device_count), so the
fast plane's cross-GPU lanes are exercised as well."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pg_jobs as J  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
IMPLS = ["ref", "fast"]


def _dist(cluster_factory, world, impl):
    return cluster_factory(world, "mooncake", device="cuda", env={"MOONCAKE_IMPL": impl}, timeout_s=120)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", IMPLS)
def test_wait_orders_the_callers_stream(cluster_factory, impl):
    wrong = _dist(cluster_factory, 2, impl).run(J.wait_on_other_stream, 1 << 24, 5, timeout_s=240)
    assert wrong == [[0] * 5] * 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", IMPLS)
def test_graph_capture_is_refused_then_group_works(cluster_factory, impl):
    c = _dist(cluster_factory, 2, impl)
    for err, after in c.run(J.capture_refused, "reduce_scatter_list", timeout_s=120):
        assert err is not None and err[0] == "ArgumentError" and "CUDA graph capture" in err[1], err
        assert after == [3.0] * 4
    if impl == "ref":  # captured by the fast plane only
        for op in ("all_reduce", "broadcast", "reduce"):
            for err, after in c.run(J.capture_refused, op, timeout_s=120):
                assert err is not None and err[0] == "ArgumentError" and "cannot be captured" in err[1], err
                assert after == [3.0] * 4
    for err, after in c.run(J.capture_refused, "premul", timeout_s=120):
        assert err is not None and err[0] == "ArgumentError" and "PREMUL_SUM" in err[1], err
        assert after == [3.0] * 4
    for err, after in c.run(J.capture_refused, "uneven", timeout_s=120):
        assert err is not None and err[0] == "ArgumentError" and "input_split_sizes" in err[1], err
        assert after == [3.0] * 4


@pytest.mark.timeout(300)
def test_all_reduce_captured_and_replayed_bitwise(cluster_factory):
    """The fast plane's captured all_reduce: every replay's outputs equal the model's fold, bit for bit."""
    import pg_graph as G
    for bad, *_ in _dist(cluster_factory, 2, "fast").run(G.graph_run, 1000, 3, "float32", timeout_s=240):
        assert not bad, bad[:5]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_all_reduce_on_pool_tensors_captured_bitwise(cluster_factory, dtype):
    """Captured in-place all_reduces in parts on tensors of ``mooncake.pg.mem_pool()`` run on the ranks'
    tensors (no lane) and give the model's fold bit for bit; tensors of ordinary memory keep the lanes."""
    import pg_graph as G
    c = cluster_factory(3, "mooncake", device="cuda", timeout_s=120,
                        env={"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_PARTS_MIN": "4096"})
    for use_pool in (True, False):
        for bad, _, _, in_place in c.run(G.graph_run, 5000, 3, dtype, use_pool, timeout_s=240):
            assert not bad, bad[:5]
            assert in_place == use_pool


@pytest.mark.timeout(300)
def test_pool_memory_goes_back_once_its_graphs_and_tensors_are_gone(cluster_factory):
    """Pool tensors that captured ops read on every rank: once each rank drops the graph, the tensor and the
    pool, the peers unmap the segments at the group's next collective or capture (one made at once, with no
    collective between, also lets go of them) and the device gets the memory back (else every rank's segments
    stayed mapped by its peers until the group was destroyed)."""
    import pg_graph as G
    numel = 32 << 20  # 128 MiB a rank
    c = cluster_factory(3, "mooncake", device="cuda", timeout_s=120,
                        env={"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_PARTS_MIN": "4096"})
    for rounds in c.run(G.pool_release, numel, 2, timeout_s=240):
        for free_before, free_after, mapped, remapped, left, freed_here, in_place, exact in rounds:
            assert in_place and exact
            assert (mapped, remapped, left, freed_here) == (2, 2, 0, True)
        free_before, free_after = rounds[-1][:2]
        assert free_after >= free_before - (32 << 20), (free_before - free_after) >> 20


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_collectives_captured_and_replayed_bitwise(cluster_factory, dtype):
    """all_reduce, reduce_scatter_tensor, all_gather(_into_tensor), broadcast and all_to_all_single captured
    in one graph on the fast plane: every replay's outputs equal the model's, bit for bit."""
    import pg_graph as G
    for numel in (3, 1000):
        for bad, _ in _dist(cluster_factory, 2, "fast").run(G.graph_collectives, numel, 2, dtype, timeout_s=240):
            assert not bad, bad[:8]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", IMPLS)
def test_p2p_of_cuda_tensors(cluster_factory, impl):
    world = 3
    results = _dist(cluster_factory, world, impl).run(J.p2p_ring, 1 << 20, timeout_s=120)
    for rank, (ring, pair) in enumerate(results):
        assert torch.equal(ring, torch.full((1 << 20,), float((rank - 1) % world + 1)))
        want = torch.arange(3, dtype=torch.float32) if rank == 1 else torch.full((3,), -1.0)
        assert torch.equal(pair, want)
