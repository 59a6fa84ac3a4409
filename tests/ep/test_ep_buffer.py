"""mooncake.ep.Buffer over real process groups, bit for bit against the global-view model (mooncake.model.ep).

Every case is run in cluster workers (jobs in ep_jobs.py, many cases per job call because a cluster start costs
seconds) and re-evaluated in the parent from the same seeded inputs; only the normative outputs are compared
(valid rows of recv_x / scales / src_info, recv_count, layout_range, combined output, active_ranks).

Device: the ``...CPU`` classes run on CPU tensors; the ``...CUDA`` classes put every tensor on the one GPU
(``MOONCAKE_TEST_DEVICE=cuda``, see run_cuda.sh) and skip otherwise.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch

import ep_jobs
from conftest import EP_ENV
from mooncake.model import ep as model
from mooncake.model.fp8 import dequantize_fp8
from mooncake.testing.cluster import ClusterError
from mooncake.testing.compare import bitwise_equal

CUDA_WANTED = os.environ.get("MOONCAKE_TEST_DEVICE", "cpu").lower().startswith("cuda")
CUDA_READY = CUDA_WANTED and torch.cuda.is_available()
CUDA_SKIP = pytest.mark.skipif(
    not CUDA_READY,
    reason="CUDA variants need MOONCAKE_TEST_DEVICE=cuda and a GPU" if not CUDA_WANTED else "no CUDA device",
)

# (backend, world size, every n-th grid case) per device; gloo and the CUDA backend run a subset
GRID_GROUPS = {
    "cpu": [("mooncake-cpu", 1, 1), ("mooncake-cpu", 2, 1), ("mooncake-cpu", 3, 2), ("mooncake-cpu", 4, 1),
            ("gloo", 2, 3), ("gloo", 4, 4)],
    "cuda": [("gloo", 1, 3), ("gloo", 2, 1), ("gloo", 4, 2), ("mooncake", 2, 3)],
}
MODES = ("plain", "async", "hook")
CLUSTER_TIMEOUT_S = 120.0


def _cluster(factory, R, backend, device, **extra):
    return factory(R, backend, env=EP_ENV, timeout_s=CLUSTER_TIMEOUT_S, device=device, **extra)


# ----------------------------------------------------------------------------------------------- cases


def grid_cases(R: int, every: int) -> list[dict]:
    """The grid for R ranks: E x K x fp8 x mode x zero_copy, with H, T, token counts, -1 entries, out=
    and a pre-masked inactive rank rotating through the cases."""
    cases = []
    experts = [e for e in ((3, 6, 12) if R == 3 else (4, 8, 16)) if e % R == 0]
    for i, (E, K, fp8, mode, zc) in enumerate(itertools.product(experts, (1, 2, 4), (True, False), MODES,
                                                                 (False, True))):
        if K > E or i % every:
            continue
        H = (128, 256)[i % 2] if fp8 else (64, 128, 256)[i % 3]
        T = (8, 16)[(i // 2) % 2]
        g = torch.Generator().manual_seed(1000 + i)
        n = [int(v) for v in torch.randint(1, T + 1, (R,), generator=g)]
        if R > 1:
            n[i % R] = 0  # a rank without tokens
            n[(i + 1) % R] = T  # and a full one
        mask = [1] * R
        if R > 1 and i % 7 == 6:
            mask[(i // 7) % R] = 0  # marked inactive on every rank; it is alive and takes part (still receives)
        cases.append(dict(R=R, T=T, H=H, E=E, K=K, fp8=fp8, mode=mode, zc=zc, seed=i, n=n, mask=mask,
                          mask_p=(0.0, 0.25, 0.5)[i % 3], out=bool(i % 2),
                          timeout_us=ep_jobs.BIG_TIMEOUT_US))
    return cases


def case_id(c: dict) -> str:
    inactive = [r for r, m in enumerate(c["mask"]) if not m]
    return (f"E{c['E']}-H{c['H']}-K{c['K']}-T{c['T']}-{'fp8' if c['fp8'] else 'bf16'}-{c['mode']}"
            f"-{'zc' if c['zc'] else 'copy'}" + (f"-inactive{inactive[0]}" if inactive else ""))


# ----------------------------------------------------------------------------------------------- model side


def model_case(case: dict, R: int, failed=frozenset(), inputs=ep_jobs.make_inputs, combine_mask=None,
               scale_fn=lambda e: 1.0 + 0.1 * e) -> dict:
    """The global-view model for one case: dispatch results, masks and combined outputs of every rank."""
    xs, topks, ws = zip(*(inputs(case, r) for r in range(R)))
    mask = torch.tensor(case.get("mask", [1] * R), dtype=torch.int32)
    results, active_out = model.dispatch(list(xs), list(topks), case["E"], case["T"], mask, failed=failed,
                                         use_fp8=case["fp8"])
    L = case["E"] // R
    ys = [ep_jobs.expert_output(res.recv_x, res.recv_scales, res.recv_count, r, L, case["fp8"], scale_fn)
          for r, res in enumerate(results)]
    cmask = active_out if combine_mask is None else combine_mask
    combined = model.combine(ys, results, list(topks), list(ws), cmask)
    return dict(results=results, active_out=active_out, combine_mask=cmask, combined=combined, xs=xs, topks=topks,
                ws=ws)


def diff_dispatch(got: dict, res: model.DispatchResult, fp8: bool, active_out, where: str) -> list[str]:
    bad = []
    if not bitwise_equal(got["count"], res.recv_count):
        bad.append(f"{where}: recv_count {got['count'].tolist()} != model {res.recv_count.tolist()}")
        return bad
    if not bitwise_equal(got["layout"], res.layout_range):
        bad.append(f"{where}: layout_range {got['layout'].tolist()} != model {res.layout_range.tolist()}")
    if not bitwise_equal(got["active_dispatch"], active_out):
        bad.append(f"{where}: active_ranks after dispatch {got['active_dispatch'].tolist()} != {active_out.tolist()}")
    expect_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    if got["recv_dtype"] != str(expect_dtype) or tuple(got["recv_shape"]) != tuple(res.recv_x.shape):
        bad.append(f"{where}: recv_x is {got['recv_dtype']} {got['recv_shape']}, expected {expect_dtype} "
                   f"{tuple(res.recv_x.shape)}")
    if fp8 and got["scales_stride"] != tuple(res.recv_scales.stride()):
        bad.append(f"{where}: scales strides {got['scales_stride']} != column-major {tuple(res.recv_scales.stride())}")
    for l, c in enumerate(res.recv_count.tolist()):
        rows = res.recv_x[l, :c].view(torch.uint8) if fp8 else res.recv_x[l, :c]
        if not bitwise_equal(got["rows"][l], rows):
            bad.append(f"{where}: recv_x rows of local expert {l} differ")
        if fp8 and not bitwise_equal(got["scales"][l], res.recv_scales[l, :c].contiguous()):
            bad.append(f"{where}: scales of local expert {l} differ")
        if not bitwise_equal(got["src"][l], res.src_info[l, :c]):
            bad.append(f"{where}: src_info of local expert {l}: {got['src'][l].tolist()} != {res.src_info[l, :c].tolist()}")
    return bad


def diff_pair(got: dict, m: dict, rank: int, fp8: bool, where: str) -> list[str]:
    bad = diff_dispatch(got, m["results"][rank], fp8, m["active_out"], where)
    if not bitwise_equal(got["combined"], m["combined"][rank]):
        d = (got["combined"].float() - m["combined"][rank].float()).abs()
        bad.append(f"{where}: combined differs from the model in {int((d != 0).sum())} values "
                   f"(NaN: {int(got['combined'].isnan().sum())})")
    if not bitwise_equal(got["active_combine"], m["combine_mask"]):
        bad.append(f"{where}: active_ranks after combine {got['active_combine'].tolist()} != "
                   f"{m['combine_mask'].tolist()}")
    if "types_ok" in got and not got["types_ok"]:
        bad.append(f"{where}: event/hook/zero-copy buffer/out= not as documented")
    return bad


# ----------------------------------------------------------------------------------------------- caches


@pytest.fixture(scope="module")
def cache():
    return {}


def _grid(cache, factory, device, backend, R, every):
    key = ("grid", device, backend, R)
    if key not in cache:
        cases = grid_cases(R, every)
        t0 = time.monotonic()
        out = _cluster(factory, R, backend, device).run(ep_jobs.grid_job, cases)
        problems, stats = {}, {}
        for i, case in enumerate(cases):
            m = model_case(case, R)
            problems[case_id(case)] = [p for r in range(R)
                                       for p in diff_pair(out[r]["results"][i], m, r, case["fp8"], f"rank {r}")]
            problems[case_id(case)] += [f"rank {r}: a rank waited {out[r]['results'][i]['t_dispatch']:.2f}s"
                                        for r in range(R) if 0 in case["mask"]
                                        and out[r]["results"][i]["t_dispatch"] > 1.0]
            for r in range(R):
                stats.setdefault((case["E"], r), torch.zeros(case["E"] // R, dtype=torch.int32)).add_(
                    m["results"][r].recv_count)
        stats_bad = [f"rank {r} E={E}: stats {out[r]['stats'][E].tolist()} != sum of recv_count {s.tolist()}"
                     for (E, r), s in stats.items() if not bitwise_equal(out[r]["stats"][E], s)]
        devices = {res["device"] for r in range(R) for res in out[r]["results"]}
        cache[key] = dict(problems=problems, stats_bad=stats_bad, devices=devices, seconds=time.monotonic() - t0)
    return cache[key]


def _grid_params(device):
    return [pytest.param(backend, R, every, case_id(c), id=f"{device.upper()}-{backend}-R{R}-{case_id(c)}")
            for backend, R, every in GRID_GROUPS[device] for c in grid_cases(R, every)]


def _stats_params(device):
    return [pytest.param(b, R, every, id=f"{device.upper()}-{b}-R{R}") for b, R, every in GRID_GROUPS[device]]


# ----------------------------------------------------------------------------------------------- preconditions

# name -> fragment of the message
PRECONDITIONS = {
    "buffer_too_small": "num_ep_buffer_bytes",
    "tokens_above_max": "num_max_dispatch_tokens_per_rank",
    "experts_not_multiple_of_ranks": "multiple of num_ranks",
    "expert_id_too_large": "is not an expert",
    "expert_id_below_minus_one": "is not an expert",
    "duplicate_expert_in_row": "duplicate expert",
    "active_ranks_dtype": "active_ranks must be an int32 tensor",
    "active_ranks_shape": "active_ranks must be an int32 tensor",
    "active_ranks_values": "active_ranks entries must be 0 or 1",
    "handle_from_other_buffer": "another Buffer",
    "handle_from_other_dispatch": "topk_idx differs",
    "zero_copy_without_combine_buffer": "get_next_combine_buffer",
    "combine_hidden_mismatch": "hidden size",
    "dispatch_async_and_hook": "async_finish and return_recv_hook",
    "combine_async_and_hook": "async_finish and return_recv_hook",
    "dispatch_timeout_negative": "timeout_us",
    "dispatch_timeout_float": "timeout_us",
    "dispatch_timeout_bool": "timeout_us",
    "combine_timeout_negative": "timeout_us",
    "combine_weights_dtype": "topk_weights",
    "combine_before_recv_hook": "recv hook",
    "nonfinite_x_bf16": "finite",
    "nonfinite_x_fp8": "finite",
}


def _precondition_params(device):
    return [pytest.param(name, id=f"{device.upper()}-{name}") for name in PRECONDITIONS]


def _preconditions(cache, factory, device):
    key = ("pre", device)
    if key not in cache:
        R = 2
        backend = "mooncake-cpu" if device == "cpu" else "gloo"
        out = _cluster(factory, R, backend, device).run(ep_jobs.precondition_job, list(PRECONDITIONS))
        m = model_case(dict(ep_jobs.CHECK_CASE, mask=[1] * R), R)
        cache[key] = (out, m)
    return cache[key]


# ----------------------------------------------------------------------------------------------- upstream-style

UPSTREAM_SHAPE = dict(T=64, H=256, E=32, K=8)  # upstream: T=256, H=2048, E=288, K=8 (too big for 2 CPU cores)
UPSTREAM_R = 4


def upstream_cases():
    cases = []
    for fp8, zc, mode, fail_rank in itertools.product((False, True), (False, True), MODES, (-1, 1)):
        cases.append(dict(UPSTREAM_SHAPE, R=UPSTREAM_R, fp8=fp8, zc=zc, mode=mode, fail_rank=fail_rank, out=True,
                          mask=[0 if r == fail_rank else 1 for r in range(UPSTREAM_R)],
                          ))
    return cases


def upstream_id(c):
    return f"{'fp8' if c['fp8'] else 'bf16'}-{'zc' if c['zc'] else 'copy'}-{c['mode']}-fail{c['fail_rank']}"


def _upstream(cache, factory, device):
    key = ("upstream", device)
    if key not in cache:
        backend = "mooncake-cpu" if device == "cpu" else "gloo"
        cases = upstream_cases()
        out = _cluster(factory, UPSTREAM_R, backend, device).run(ep_jobs.upstream_grid_job, cases)
        verdicts = {}
        for i, case in enumerate(cases):
            m = model_case(case, UPSTREAM_R, inputs=ep_jobs.upstream_inputs, scale_fn=ep_jobs.upstream_scale)
            bitwise = [p for r in range(UPSTREAM_R)  # the failed rank included: alive and masked
                       for p in diff_pair(out[r][i], m, r, case["fp8"], f"rank {r}")]
            float_bad = []
            for r in range(UPSTREAM_R):
                if r == case["fail_rank"]:
                    continue  # masked: all zeros (checked bitwise above)
                x, topk, w = m["xs"][r], m["topks"][r], m["ws"][r]
                L = case["E"] // UPSTREAM_R
                factor = (w * (0.1 * topk.float() + 1.0) * ((topk // L) != case["fail_rank"]).float()).sum(dim=1)
                expected = (x.float() * factor[:, None]).to(torch.bfloat16)
                tol = dict(rtol=0.15, atol=5e-3) if case["fp8"] else dict(rtol=5e-2, atol=1e-3)
                try:
                    torch.testing.assert_close(out[r][i]["combined"].float(), expected.float(), **tol)
                except AssertionError as exc:
                    float_bad.append(f"rank {r}: {exc}")
            verdicts[upstream_id(case)] = (bitwise, float_bad)
        cache[key] = verdicts
    return cache[key]


# ----------------------------------------------------------------------------------------------- failures

FAIL_CASE = dict(T=8, H=128, E=6, K=2, fp8=True, mode="plain", seed=5, n=[8, 3, 6], mask_p=0.2, zc=False, out=False)
FAIL_TIMEOUT_US = 2_000_000
FAIL_BOUND_S = 2 * FAIL_TIMEOUT_US * 1e-6 + 3.0  # dispatch + combine deadlines, plus slack for 2 cores


def _fresh_cluster(factory, backend, device):
    # a key of its own (timeout_s) so that killing a rank never disturbs the grid clusters; the fixture
    # restarts it when a previous failure test left it not intact
    return factory(3, backend, env=EP_ENV, timeout_s=45.0, device=device)


def _check_survivors(results, survivors, dead, t_wall):
    R = 3
    m = model_case(dict(FAIL_CASE, mask=[1] * R), R, failed=frozenset({dead}))
    bad = []
    for r in survivors:
        got = results[r]
        bad += diff_pair(got, m, r, FAIL_CASE["fp8"], f"rank {r}")
        bad += diff_pair(got["second"], m, r, FAIL_CASE["fp8"], f"rank {r} second call")
        if got["t_second"] > 1.0:
            bad.append(f"rank {r}: the call after the failure waited {got['t_second']:.2f}s for the masked rank")
    if t_wall > FAIL_BOUND_S:
        bad.append(f"survivors took {t_wall:.1f}s (bound {FAIL_BOUND_S:.1f}s)")
    return bad


# ----------------------------------------------------------------------------------------------- the tests


def make_suite(device: str):
    """The whole suite for one device (the class names carry the device: ...CPU / ...CUDA)."""

    class Suite:
        DEVICE = device

        @pytest.mark.timeout(400)
        @pytest.mark.parametrize("backend,R,every,cid", _grid_params(device))
        def test_grid(self, cache, cluster_factory, backend, R, every, cid):
            grid = _grid(cache, cluster_factory, device, backend, R, every)
            assert not grid["problems"][cid], "\n".join(grid["problems"][cid])

        @pytest.mark.timeout(400)
        @pytest.mark.parametrize("backend,R,every", _stats_params(device))
        def test_recv_stats_accumulate_and_device(self, cache, cluster_factory, backend, R, every):
            grid = _grid(cache, cluster_factory, device, backend, R, every)
            assert not grid["stats_bad"], "\n".join(grid["stats_bad"])
            expect = "cuda" if device == "cuda" else "cpu"
            assert all(d.split("/")[0].split(":")[0] == expect for d in grid["devices"]), grid["devices"]

        @pytest.mark.timeout(300)
        @pytest.mark.parametrize("name", _precondition_params(device))
        def test_precondition(self, cache, cluster_factory, name):
            from mooncake.pg import ArgumentError

            out, m = _preconditions(cache, cluster_factory, device)
            fragment = PRECONDITIONS[name]
            if name == "buffer_too_small":
                c = ep_jobs.PRE_CASE
                fragment = str(model.get_ep_buffer_size_hint(2 * c["T"], c["H"], 2, c["E"]))  # the needed bytes
            for r, per_rank in enumerate(out):
                err, check = per_rank[name]
                assert err is not None, f"rank {r}: {name} was accepted"
                assert err["is_argument_error"], f"rank {r}: {err['type']} is not {ArgumentError.__name__}: {err['msg']}"
                assert fragment in err["msg"], f"rank {r}: {fragment!r} not in {err['msg']!r}"
            bad = [p for r in range(len(out)) for p in diff_pair(out[r][name][1], m, r, True, f"rank {r} after")]
            assert not bad, "the Buffer is not usable after the rejected call:\n" + "\n".join(bad)

        @pytest.mark.timeout(300)
        @pytest.mark.parametrize("cid", [pytest.param(upstream_id(c), id=f"{device.upper()}-{upstream_id(c)}")
                                         for c in upstream_cases()])
        def test_upstream_grid(self, cache, cluster_factory, cid):
            bitwise, float_bad = _upstream(cache, cluster_factory, device)[cid]
            assert not float_bad, "upstream tolerance check failed:\n" + "\n".join(float_bad)
            assert not bitwise, "\n".join(bitwise)

        @pytest.mark.timeout(200)
        @pytest.mark.parametrize("backend", ["mooncake-cpu", "gloo"] if device == "cpu" else ["gloo"])
        def test_rank_exits_between_dispatch_and_combine(self, cluster_factory, backend):
            """Every rank dispatches, rank 2 exits; the survivors' combine skips it within the deadline."""
            c = _fresh_cluster(cluster_factory, backend, device)
            t0 = time.monotonic()
            with pytest.raises(ClusterError) as info:
                c.run(ep_jobs.dispatch_then_exit_job, FAIL_CASE, FAIL_TIMEOUT_US, 2)
            wall = time.monotonic() - t0
            assert {r: e.kind for r, e in info.value.errors.items()} == {2: "died"}, str(info.value)
            R = 3
            mask = torch.ones(R, dtype=torch.int32)
            m = model_case(dict(FAIL_CASE, mask=[1] * R), R, combine_mask=torch.tensor([1, 1, 0], dtype=torch.int32))
            bad = []
            for r in (0, 1):
                got = info.value.results[r]
                bad += diff_dispatch(got, m["results"][r], True, mask, f"rank {r}")
                if not bitwise_equal(got["combined"], m["combined"][r]):
                    bad.append(f"rank {r}: combined differs from the model with rank 2 inactive in combine")
                if got["active_combine"].tolist() != [1, 1, 0]:
                    bad.append(f"rank {r}: active_ranks after combine {got['active_combine'].tolist()}")
                if got["t_combine"] > FAIL_TIMEOUT_US * 1e-6 + 2.0:
                    bad.append(f"rank {r}: combine took {got['t_combine']:.2f}s")
            assert wall < FAIL_BOUND_S, wall
            assert not bad, "\n".join(bad)

        @pytest.mark.timeout(200)
        @pytest.mark.parametrize("backend,warm", [
            # isend to the dead rank raises (mooncake-cpu: UCXXUnreachableError, also without earlier
            # traffic; gloo: "Connection closed by peer"): the Buffer must mask it, not raise
            pytest.param("mooncake-cpu", True, id=f"{device.upper()}-mooncake-cpu-after-warmup"),
            pytest.param("mooncake-cpu", False, id=f"{device.upper()}-mooncake-cpu-no-prior-traffic"),
            pytest.param("gloo", True, id=f"{device.upper()}-gloo-after-warmup"),
        ])
        def test_killed_rank(self, cluster_factory, backend, warm):
            """Rank 2 is SIGKILLed before the dispatch; survivors (timeout 2 s) mask it and match failed={2};
            their next call (rank 2 masked, still sent to as an alive masked rank would be) does not wait."""
            if device == "cuda" and backend == "mooncake-cpu":
                pytest.skip("mooncake-cpu carries CPU tensors only")
            c = _fresh_cluster(cluster_factory, backend, device)
            if warm:
                c.run(ep_jobs.warmup_job, dict(FAIL_CASE, mask=[1, 1, 1]))
            c.kill(2)
            time.sleep(1.0)  # let the survivors' transports notice the closed connections (else a race decides)
            t0 = time.monotonic()
            results = c.run(ep_jobs.survivor_job, FAIL_CASE, FAIL_TIMEOUT_US, ranks=[0, 1])
            bad = _check_survivors(results, (0, 1), 2, time.monotonic() - t0)
            assert not bad, "\n".join(bad)

        @pytest.mark.timeout(200)
        @pytest.mark.parametrize("backend", [pytest.param(b, id=f"{device.upper()}-{b}") for b in ("mooncake-cpu", "gloo")])
        def test_dropped_buffer_keeps_sends(self, cluster_factory, backend):
            """Rank 0 drops its Buffer right after its combine; rank 1's (hooked) combine must still get the data
            (gloo loses a send whose work object dies before the peer matched it: the outbox keeps it)."""
            if device == "cuda" and backend == "mooncake-cpu":
                pytest.skip("mooncake-cpu carries CPU tensors only")
            case = dict(T=8, H=128, E=4, K=2, fp8=False, seed=11, n=[8, 6], mask_p=0.0)
            out = _cluster(cluster_factory, 2, backend, device).run(ep_jobs.dropped_buffer_job, case, 0.5)
            assert [o["active_combine"].tolist() for o in out] == [[1, 1], [1, 1]]

        @pytest.mark.timeout(200)
        def test_fixed_size_mask(self, cluster_factory):
            """A mask allocated longer than the group (upstream's elastic tests use a fixed size) is
            read and written in its first R entries: the same outputs as an [R] mask, the tail untouched."""
            if device == "cuda":
                pytest.skip("CPU tensors: the CUDA path shares the view (same data pointer)")
            case = dict(T=8, H=128, E=4, K=2, fp8=False, seed=12, n=[8, 6], mask_p=0.0)
            out = _cluster(cluster_factory, 2, "mooncake-cpu", device).run(ep_jobs.fixed_size_mask_job, case, 128)
            assert all(o["same"] for o in out), out
            assert all(o["tail"] == [7] * 126 for o in out)

        @pytest.mark.timeout(200)
        @pytest.mark.parametrize("backend", [pytest.param(b, id=f"{device.upper()}-{b}") for b in ("mooncake-cpu", "gloo")])
        def test_masked_rank_still_receives(self, cluster_factory, backend):
            """Both ranks call dispatch with active_ranks = [1, 0]: rank 1 must get rank 0's rows at once (it waits
            for no source), rank 0 must not wait for rank 1, and the mask stays as it was."""
            if device == "cuda":
                pytest.skip("covered on CPU")
            case = dict(T=8, H=128, E=4, K=2, fp8=False, seed=31, n=[8, 5], mask_p=0.0)
            c = cluster_factory(2, backend, env=EP_ENV, timeout_s=46.0, device=device)
            out = c.run(ep_jobs.masked_rank_job, case, 1, 5_000_000)
            m = model_case(dict(case, mask=[1, 0]), 2)
            bad = [p for r in range(2) for p in diff_dispatch(out[r], m["results"][r], False, m["active_out"], f"rank {r}")]
            bad += [f"rank {r} waited {out[r]['t_dispatch']:.2f}s" for r in range(2) if out[r]["t_dispatch"] > 1.0]
            assert not bad, "\n".join(bad)

        @pytest.mark.timeout(200)
        @pytest.mark.parametrize("backend", [pytest.param(b, id=f"{device.upper()}-{b}") for b in ("mooncake-cpu", "gloo")])
        def test_late_data_not_used_in_next_call(self, cluster_factory, backend):
            """Rank 1 dispatches 1 s late, rank 0 times it out (0.2 s); the next call (all active, new routing)
            must equal the model: late data of call 1 is never used (docs/ep-semantics.md, Failures), and on
            gloo the timeout must not break the group."""
            if device == "cuda":
                pytest.skip("covered on CPU")
            a = dict(T=8, H=128, E=4, K=2, fp8=False, seed=21, n=[8, 8], mask_p=0.0)
            b = dict(a, seed=22, n=[5, 7])
            c = cluster_factory(2, backend, env=EP_ENV, timeout_s=47.0, device=device)
            out = c.run(ep_jobs.late_data_job, a, b, 1, 1.0, 200_000, timeout_s=40)
            R = 2
            first = model_case(dict(a, mask=[1, 1]), R, failed=frozenset({1}))
            assert "error" not in out[0]["first"], out[0]["first"]
            assert not diff_dispatch(out[0]["first"], first["results"][0], False, first["active_out"], "rank 0 call 1")
            second = model_case(dict(b, mask=[1, 1]), R)
            bad = []
            for r in range(R):
                got = out[r]["second"]
                if "error" in got:
                    bad.append(f"rank {r} call 2 raised {got['error']}")
                else:
                    bad += diff_dispatch(got, second["results"][r], False, second["active_out"], f"rank {r} call 2")
            assert not bad, "\n".join(bad)

        @pytest.mark.timeout(200)
        @pytest.mark.parametrize("backend", [pytest.param(b, id=f"{device.upper()}-{b}") for b in ("mooncake-cpu", "gloo")])
        def test_update_ep_member_resyncs(self, cluster_factory, backend):
            """Rank 1 makes a dispatch rank 0 never makes (it times rank 0 out); after update_ep_member on both,
            a dispatch + combine pair matches the model (call ids in step, the lone call's data dropped)."""
            if device == "cuda":
                pytest.skip("covered on CPU")
            case = dict(T=8, H=128, E=4, K=2, fp8=True, mode="plain", seed=41, n=[7, 8], mask_p=0.2)
            out = _cluster(cluster_factory, 2, backend, device).run(ep_jobs.resync_job, case, 1)
            assert out[1]["lone"].tolist() == [0, 1], out[1]["lone"]
            m = model_case(dict(case, mask=[1, 1]), 2)
            bad = [p for r in range(2) for p in diff_pair(out[r], m, r, True, f"rank {r}")]
            assert not bad, "\n".join(bad)

    return Suite


class TestEPBufferCPU(make_suite("cpu")):
    """CPU tensors; backends mooncake-cpu and gloo."""


@CUDA_SKIP
class TestEPBufferCUDA(make_suite("cuda")):
    """CUDA tensors on the one GPU (all ranks share it); gloo with CPU staging, and the mooncake CUDA backend."""
