"""The trace analysis of tests/fast_cuda/pg_profile.py on records whose times are known (no GPU)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pg_profile as P  # noqa: E402
from mooncake.testing.layers import EAGER_ALL_REDUCE, QUICK_ALL_REDUCE  # noqa: E402


def _record(key: int, start_ns: int, steps_ns: list[int]) -> dict:
    ns = [start_ns]
    for d in steps_ns:
        ns.append(ns[-1] + d)
    return {"key": key, "ns": ns, "clock": [2 * t for t in ns], "blocks": 1}


def test_spans_gaps_and_skew_across_ranks():
    base = (1 << 40) | (1 << 39)
    ranks = []
    for r in range(2):  # rank 1 starts every op 1000 ns later; each op 6 steps of 500 ns, 2000 ns between ops
        recs = [_record(base + n, n * 5000 + r * 1000, [500] * 6) for n in range(P.OPS)]
        if r == 1:  # it publishes last, so rank 0 waits for it: its own wait is short
            for rec in recs:
                rec["ns"][4] = rec["ns"][3] + 100
        ranks.append(recs)
    summary, table = P.analyse_trace(ranks)
    spans = summary["spans"]
    assert summary["ops_matched"] == P.OPS
    assert summary["sm_clock_ghz_p50"] == 2.0
    assert spans["whole kernel"]["p50_us"] == 3.0
    assert spans["go: own count / trouble / epoch words"]["p50_us"] == 0.5
    assert spans["gap: previous kernel's end to this one's start"]["p50_us"] == 2.0
    assert spans["gap: previous kernel's end to this one's start"]["n"] == 2 * (P.OPS - 1)
    assert spans["period: start to the next op's start"]["p50_us"] == 5.0
    assert spans["ranks apart at start"]["p50_us"] == 1.0
    assert spans["ranks apart at publish"]["p50_us"] == 1.0
    assert spans["last publisher's wait for the others"]["p50_us"] == 0.1
    assert "wait for every peer's publish" in table


def test_ops_one_rank_did_not_finish_are_left_out():
    base = (1 << 40) | (1 << 39)
    ranks = [[_record(base + n, n * 5000, [500] * 6) for n in range(3)] for _ in range(2)]
    ranks[1][2]["ns"][6] = 0  # gave up before its finish
    del ranks[0][0]  # not recorded on rank 0
    summary, _ = P.analyse_trace(ranks)
    assert summary["ops_matched"] == 1


def test_eager_records_count_every_next_key_and_host_spans():
    ranks = [[_record(7 + n, n * 5000 + r * 1000, [500] * 6) for n in range(3)] for r in range(2)]
    summary, _ = P.analyse_trace(ranks, 0)
    assert summary["spans"]["gap: previous kernel's end to this one's start"]["n"] == 2 * 2
    assert summary["spans"]["gap: previous kernel's end to this one's start"]["p50_us"] == 2.0
    # rank 1 starts each call 3 µs after rank 0 and takes 10 µs more to return
    host = [[(n * 100_000 + r * 3000, n * 100_000 + r * 3000 + 20_000 + r * 10_000, n * 100_000 + 50_000)
             for n in range(4)] for r in range(2)]
    rows, table = P.analyse_host(host)
    assert rows["call: start to return (slowest rank)"]["p50_us"] == 30.0
    assert rows["ranks apart at the call's start"]["p50_us"] == 3.0
    assert rows["ranks apart at return"]["p50_us"] == 13.0
    assert rows["period: one call's start to the next (rank 0)"]["n"] == 3
    assert rows["period: one call's start to the next (rank 0)"]["p50_us"] == 100.0
    assert "ranks apart" in table


EMU = {"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_EMULATE": "cpu", "MOONCAKE_FAST_CUDA_EMULATE_LAG": "0",
       "MOONCAKE_FAST_CUDA_DEVICE": "on", "MOONCAKE_FAST_CUDA_QUICK": "off"}  # the usual path's layers


def test_eager_host_case_times_every_layer_on_the_emulated_plane(cluster_factory):
    """The ehost case on the plane's CPU emulation: every layer of the path is found and timed (those only a
    GPU runs excepted), nested layers take no more than the layer that calls them, and the launches took the
    device path."""
    c = cluster_factory(2, "mooncake-cpu", env=EMU, timeout_s=60, options=("pg_integration.options", (), {}))
    res = c.run(P.eager_host_case, 40, timeout_s=120)
    gpu_only = {"          launch", "          event record", "    event sync (gave up spinning)"}
    for r in res:
        layers = r["layers_us"]
        assert set(layers) == {label for label, _, _ in EAGER_ALL_REDUCE}
        sometimes = {"  plane wait", "    device_landed"}  # not when the op is over before Work.wait looks
        assert all(v > 0 for k, v in layers.items() if k not in gpu_only | sometimes), \
            {k: v for k, v in layers.items() if v <= 0}
        assert all(layers[k] == 0 for k in gpu_only), layers
        assert layers["    plane.all_reduce"] <= layers["  _post"] <= layers["face: _issue"]
        assert layers["        device path post"] <= layers["      enqueue"] <= layers["    plane.all_reduce"]
        calls = r["calls"]
        assert 0 < calls["wall_us"]["median"] < r["wall_us_per_op"] * 2
        assert calls["thread_cpu_us"]["median"] > 0
        assert r["outcomes"]["done"] >= 40
    rows, table = P.analyse_layers(res)
    assert rows["face: _issue"][0] == round(res[0]["layers_us"]["face: _issue"], 2)
    assert rows["wall_us"][2] == round(max(r["calls"]["wall_us"]["median"] for r in res), 2)
    assert "involuntary_switches" in table and "synchronize_us" in table
    assert all(r["threads_cpu_us"] for r in res) and "CPU per call by thread" in table
    for r in res:  # the caller's thread does the calls: it is the busiest
        assert max(r["threads_cpu_us"], key=r["threads_cpu_us"].get) == "MainThread", r["threads_cpu_us"]


def test_layer_timer_nests_and_counts_calls():
    """LayerTimer on functions of a module: a wrapped function's time includes the wrapped one it calls;
    clear() forgets; report() divides by the calls."""
    import time
    import types
    from mooncake.testing.layers import LayerTimer
    mod = types.ModuleType("layer_probe")

    class K:
        @staticmethod
        def inner():
            time.sleep(0.002)

        def outer(self):
            time.sleep(0.001)
            K.inner()

    mod.K = K
    sys.modules["layer_probe"] = mod
    try:
        timer = LayerTimer([("outer", "layer_probe", "K.outer"), ("inner", "layer_probe", "K.inner")])
        timer.install()
        K().outer()
        timer.clear()
        for _ in range(3):
            with timer.call():
                K().outer()
        rep = timer.report(3)
    finally:
        del sys.modules["layer_probe"]
    assert rep["layers_us"]["inner"] >= 2000
    assert rep["layers_us"]["outer"] >= rep["layers_us"]["inner"] + 1000
    assert rep["calls"]["wall_us"]["median"] >= 3000
    assert rep["calls"]["voluntary_switches"]["median"] >= 1  # the sleeps


def test_eager_host_case_times_the_quick_lane(cluster_factory):
    """With the quick lane on (the default), the ehost case times its layers: every one is found, nested
    layers take no more than the layer that calls them, and the calls took the lane."""
    env = {**EMU, "MOONCAKE_FAST_CUDA_QUICK": "on"}
    c = cluster_factory(2, "mooncake-cpu", env=env, timeout_s=60, options=("pg_integration.options", (), {}))
    res = c.run(P.eager_host_case, 40, timeout_s=120)
    gpu_only = {"      launch + event", "    spin on DONE"}
    for r in res:
        layers = r["layers_us"]
        assert set(layers) == {label for label, _, _ in QUICK_ALL_REDUCE}
        assert all(v > 0 for k, v in layers.items() if k not in gpu_only), layers
        assert all(layers[k] == 0 for k in gpu_only), layers
        assert layers["    quick_post"] <= layers["  quick: all_reduce"] <= layers["face: allreduce"]
        assert layers["    commit (membership)"] <= layers["  quick: finish"] <= layers["face: Work.wait"]
        assert r["outcomes"]["done"] >= 40
    rows, table = P.analyse_layers(res)
    assert "  quick: all_reduce" in rows and "face: _issue" not in rows
