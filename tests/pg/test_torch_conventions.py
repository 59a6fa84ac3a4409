"""torch.distributed conventions the mooncake-cpu backend follows, checked on ref and fast:
``Work.wait(timeout)`` raises, errors are ``DistBackendError``s, ``_get_backend``, PREMUL_SUM (bitwise,
so ref == fast), the ``*_object`` collectives, ``monitored_barrier``, ``torch.distributed.checkpoint``,
and futures that complete with nobody calling ``wait()``.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist

from mooncake import impl as _impl
from mooncake.control import errors
from mooncake.model.reduce import premul, premul_sum
from mooncake.testing.compare import bitwise_equal
from pg import conventions_jobs as jobs

TIMEOUT_S = 60


@pytest.fixture(params=["ref", "fast"])
def cluster(request, cluster_factory):
    if request.param == "fast" and _impl.fast_unavailable_reason("cpu"):
        pytest.skip(f"fast CPU plane unavailable: {_impl.fast_unavailable_reason('cpu')}")
    return cluster_factory(2, "mooncake-cpu", timeout_s=TIMEOUT_S, env={"MOONCAKE_IMPL": request.param})


def test_errors_are_dist_backend_errors():
    for cls in (errors.MooncakeError, errors.ArgumentError, errors.OpTimeoutError, errors.PeerFailureError,
                errors.WireError, errors.NotApplicableError):
        assert issubclass(cls, dist.DistBackendError) and issubclass(cls, RuntimeError), cls
    assert issubclass(errors.ArgumentError, ValueError)
    assert issubclass(errors.OpTimeoutError, TimeoutError)
    exc = errors.OpTimeoutError("late", (1,))
    assert exc.pending_ranks == (1,) and isinstance(exc, dist.DistError)


def test_wait_timeout_raises_and_the_op_goes_on(cluster):
    first, second = cluster.run(jobs.wait_timeout, 1.0)
    assert first["raised"] == "OpTimeoutError" and first["is_timeout"] and first["is_backend_error"]
    assert "keeps running" in first["message"]
    assert bitwise_equal(first["result"], torch.full((4,), 3.0)) and bitwise_equal(second["result"], first["result"])


def test_a_blocking_call_its_waiter_left_still_ends(cluster):
    """Nothing waits forever, also when the waiter leaves: a blocking call whose wait(timeout) raised is driven
    to its end by the engine's thread."""
    first, second = cluster.run(jobs.left_blocking_call, 1.0)
    assert first["raised"] == "OpTimeoutError" and first["success"], first
    assert bitwise_equal(first["result"], torch.full((4,), 3.0)) and bitwise_equal(second["result"], first["result"])


def test_get_backend(cluster):
    for res in cluster.run(jobs.get_backend):
        assert res == {"same": True, "name": "mooncake-cpu", "cuda": "ArgumentError"}


def test_premul_sum_is_bitwise_the_model(cluster):
    factor = 1 / 3
    dtypes = ["float32", "bfloat16", "float16", "float64"]
    results = cluster.run(jobs.premul_sum, factor, dtypes)
    for name in dtypes:
        inputs = [res[f"input/{name}"] for res in results]
        want = premul_sum(inputs, factor)
        for r, res in enumerate(results):
            assert bitwise_equal(res[f"all_reduce/{name}"], want), (name, r)
            assert bitwise_equal(res[f"reduce_scatter_tensor/{name}"], want.reshape(2, -1)[r]), (name, r)
    assert all(res["int"] == "ArgumentError" for res in results)


def test_premul_model():
    """PREMUL_SUM = SUM of the inputs each scaled in the accumulator dtype and rounded once, i.e. x * f."""
    xs = [torch.tensor([1.0, 3.0, -2.5], dtype=torch.bfloat16), torch.tensor([0.5, 1.0, 7.0], dtype=torch.bfloat16)]
    assert bitwise_equal(premul(xs[0], 0.1), xs[0] * 0.1)
    want = (xs[0].float() * torch.tensor(0.1, dtype=torch.float32)).to(torch.bfloat16)
    assert bitwise_equal(premul(xs[0], 0.1), want)
    total = (premul(xs[0], 0.1).float() + premul(xs[1], 0.1).float()).to(torch.bfloat16)
    assert bitwise_equal(premul_sum(xs, 0.1), total)
    assert bitwise_equal(premul_sum(xs, torch.tensor([0.1])), total)  # a one-element tensor factor, as torch allows
    with pytest.raises(ValueError, match="floating"):
        premul_sum([torch.ones(2, dtype=torch.int32)], 2.0)


def test_object_collectives(cluster):
    results = cluster.run(jobs.object_collectives)
    for r, res in enumerate(results):
        assert res["all_gather_object"] == [{"rank": 0, "s": ""}, {"rank": 1, "s": "x"}]
        assert res["broadcast_object_list"] == [10, "hello"]
        assert res["scatter_object_list"] == f"to {r}"
    assert results[0]["gather_object"] == [(0, "g"), (1, "g")]
    assert results[1]["recv_object_list"] == {"from": 0}


def test_monitored_barrier(cluster):
    assert cluster.run(jobs.monitored, False, None) == ["ok", "ok"]
    root, late = cluster.run(jobs.monitored, False, 1)
    assert late.startswith("OpTimeoutError") and "not released by rank 0" in late
    assert root.startswith("OpTimeoutError") and "Ranks 1 failed to pass monitoredBarrier" in root


def test_monitored_barrier_method(cluster):
    assert cluster.run(jobs.monitored, True, None) == ["ok", "ok"]


def test_checkpoint_save_load(cluster):
    with tempfile.TemporaryDirectory() as path:
        for r, back in enumerate(cluster.run(jobs.checkpoint, path)):
            assert bitwise_equal(back["shared"], torch.arange(6, dtype=torch.float32))
            assert bitwise_equal(back[f"own{r}"], torch.full((3,), float(r)))
            assert back["step"] == 7


def test_futures_complete_without_wait(cluster):
    """Nobody calls wait(): the engine's thread (or whichever thread commits) completes every future
    and runs the chained callbacks (DDP's pattern)."""
    count = 8
    for res in cluster.run(jobs.futures, count):
        for i, value in enumerate(res["values"]):
            assert bitwise_equal(value, torch.full((1000,), float(2 * (1 + 2 * i))))
        assert res["threads"], "no callback ran"


def test_p2p_nobody_waits_on_fails_at_its_deadline(cluster):
    """Nothing waits forever: an irecv and an isend kept but never waited on, whose peer never takes part,
    fail at the group's timeout, driven by the engine's thread alone."""
    for res in cluster.run(jobs.unwaited_p2p, 1.0, timeout_s=60):
        assert res["error"] == "OpTimeoutError" and 0.9 <= res["after_s"] < 4.0, res


def test_blocking_calls_leave_the_engines_thread_asleep(cluster_factory):
    """On the shared-memory plane a blocking collective is driven by its caller: waiting and returning does
    not wake the engine's thread, which would fight the returning caller for the GIL on every call.  (On
    the ref plane UCX's traffic wakes that thread during the wait; it then parks and is sent back to sleep.)"""
    if _impl.fast_unavailable_reason("cpu"):
        pytest.skip(f"fast CPU plane unavailable: {_impl.fast_unavailable_reason('cpu')}")
    c = cluster_factory(2, "mooncake-cpu", timeout_s=TIMEOUT_S, env={"MOONCAKE_IMPL": "fast"})
    for kicks in c.run(jobs.engine_kicks, 200):
        assert kicks < 20, kicks
