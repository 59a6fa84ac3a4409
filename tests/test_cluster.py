"""The test-cluster harness itself (mooncake.testing.cluster), over gloo."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from mooncake.testing.cluster import Cluster, ClusterError, worker_context

# ---------------------------------------------------------------- jobs (run in workers)


def all_reduce_rank():
    ctx = worker_context()
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    return ctx.rank, dist.get_rank(), dist.get_world_size(), t


def fail_on(rank):
    if worker_context().rank == rank:
        raise ValueError(f"boom on rank {rank}")
    return worker_context().rank


def sleep_on(rank, seconds):
    if worker_context().rank == rank:
        time.sleep(seconds)
    return worker_context().rank


def exit_on(rank):
    if worker_context().rank == rank:
        os._exit(3)
    return worker_context().rank


def add(a, b=0):
    return a + b


def describe():
    ctx = worker_context()
    return ctx.rank, ctx.world_size, dist.is_initialized(), os.getpid()


def record_options(rank, world_size, *args, **kwargs):
    """pg_options factory: remembers its call in the worker, returns no options."""
    os.environ["RECORDED_OPTIONS"] = repr((rank, world_size, args, kwargs))


def read_env(*names):
    return [os.environ.get(n) for n in names] + [torch.get_num_threads()]


# ---------------------------------------------------------------- tests


def test_run_returns_per_rank_results(cluster_factory):
    c = cluster_factory(3, "gloo")
    results = c.run(all_reduce_rank)
    assert [r[:3] for r in results] == [(0, 0, 3), (1, 1, 3), (2, 2, 3)]
    assert all(torch.equal(r[3], torch.tensor([6.0])) for r in results)
    assert c.run(add, 2, b=3, ranks=[1]) == [None, 5, None]


def test_run_each_sends_different_calls(cluster_factory):
    c = cluster_factory(2, "gloo")
    assert c.run_each({0: (add, (1,), {"b": 1}), 1: (describe, (), {})})[0] == 2
    assert c.run_each({1: (add, ("x", "y"), {})}) == [None, "xy"]


def test_exception_reports_that_ranks_traceback(cluster_factory):
    c = cluster_factory(2, "gloo")
    with pytest.raises(ClusterError) as info:
        c.run(fail_on, 1)
    err = info.value
    assert list(err.errors) == [1]
    assert err.errors[1].kind == "raised" and err.errors[1].exc_type == "ValueError"
    for text in ("rank 1", "Traceback", "in fail_on", "ValueError: boom on rank 1"):
        assert text in str(err)
    assert err.results == [0, None]
    assert c.run(add, 1) == [1, 1]  # a raised job does not break the cluster


def test_timeout_names_rank_breaks_and_restart_recovers(cluster_factory):
    c = cluster_factory(2, "gloo")
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as info:
        c.run(sleep_on, 1, 30, timeout_s=1)
    assert time.monotonic() - t0 < 5
    assert list(info.value.errors) == [1] and info.value.errors[1].kind == "timeout"
    assert "rank 1: timeout" in str(info.value)
    assert c.broken and not c.intact
    with pytest.raises(ClusterError, match="broken"):
        c.run(add, 1)
    c.restart()
    assert c.intact
    assert [r[3] for r in c.run(all_reduce_rank)] == [torch.tensor([3.0])] * 2


def test_worker_death_during_a_job_is_reported(cluster_factory):
    c = cluster_factory(2, "gloo")
    with pytest.raises(ClusterError) as info:
        c.run(exit_on, 0)
    assert info.value.errors[0].kind == "died" and "code 3" in str(info.value)
    assert info.value.results == [None, 1]
    assert not c.alive(0) and c.alive(1) and not c.intact


def test_kill_and_spawn_replace_a_worker(cluster_factory):
    c = cluster_factory(3, "gloo")
    old_pid = c.pids[2]
    c.kill(2)
    assert not c.alive(2) and not psutil.pid_exists(old_pid)
    assert c.run(add, 1, ranks=[0, 1]) == [1, 1, None]
    with pytest.raises(ClusterError, match="not alive"):
        c.run(add, 1)
    c.spawn(2, init=False)
    assert c.alive(2)
    rank, world_size, initialized, pid = c.run(describe, ranks=[2])[2]
    assert (rank, world_size, initialized) == (2, 3, False) and pid == c.pids[2] != old_pid
    assert c.run(add, 1, ranks=[0, 1, 2]) == [1, 1, 1]
    with pytest.raises(ClusterError, match="still alive"):
        c.spawn(2)


def test_env_options_and_close_leave_no_children():
    options = (f"{__name__}.record_options", (7,), {"k": 1})
    c = Cluster(2, "gloo", options=options, env={"MOONCAKE_TEST_FLAG": "x"}, timeout_s=30)
    pids = c.pids
    assert c.run(read_env, "MOONCAKE_TEST_FLAG", "OMP_NUM_THREADS", "RECORDED_OPTIONS") == [
        ["x", "1", repr((r, 2, (7,), {"k": 1})), 1] for r in range(2)
    ]
    c.close()
    c.close()  # idempotent
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert not children & set(pids)
    assert not any(p.pid in pids for p in __import__("multiprocessing").active_children())
    with pytest.raises(ClusterError, match="closed"):
        c.run(add, 1)


def test_workers_exit_when_the_parent_dies(tmp_path):
    script = (
        "import sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "from mooncake.testing.cluster import Cluster\n"
        "if __name__ == '__main__':\n"
        "    c = Cluster(1, 'gloo', init=False)\n"
        "    print(c.pids[0], flush=True)\n"
        "    time.sleep(600)\n"
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(parent.stdout.readline())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(worker_pid):
        time.sleep(0.1)
    assert not _running(worker_pid)


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
