"""An idle rank uses about no CPU, and its threads are few and named."""

from ft import jobs
from mooncake.testing.impls import impl_env
from ft.test_failures import TIMEOUT_S


def test_idle_rank_sleeps(cluster_factory, impl):
    cluster = cluster_factory(3, "mooncake-cpu", timeout_s=TIMEOUT_S, env=impl_env(impl),
                              options=("ft.jobs.make_options", (), {}))
    for cpu_s, threads in cluster.run(jobs.idle_cpu, 2.0):
        assert cpu_s < 0.1, f"an idle rank burned {cpu_s:.3f} CPU seconds in 2 s"
        ours = [t for t in threads if t.startswith("mooncake")]
        assert ours == ["mooncake-ucx-progress"], threads
