"""PG conformance suite for ``mooncake-cpu``: every result compared BITWISE with the global-view
model (``mooncake.model.collectives``, computed here in the test process) and, where the result is
exact, with gloo.

Written once for every implementation: ``IMPLS`` lists the values of ``MOONCAKE_IMPL`` the
clusters run under, plus ``fast-hosts2``: the fast plane with the ranks spread over two emulated hosts
(rank r on host r % 2), so every operation of a group of three or more runs hybrid (UCX between the
hosts, shared memory within each).

Cost control: a cluster start costs seconds, so each configuration runs ALL its grid cases in one
job (``pg.jobs.run_grid``) the first time one of its tests asks, and the per-case tests read a
module-level cache.  Every test id contains ``CPU`` (``-k CPU`` selects them all).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import zlib

import pytest
import torch

from mooncake.model import collectives as M
from mooncake.model.reduce import ReduceOp, check_reducible
from mooncake.testing.compare import bitwise_equal
from mooncake.testing.impls import EMULATED_HOSTS, impl_env
from pg import jobs
from pg.conftest import PYTHONPATH

# MOONCAKE_IMPL values to run the whole suite under (see impl_env).
IMPLS = ["ref", "fast"]

# MOONCAKE_TEST_DEVICE=cuda runs the grid on CUDA tensors through backend "mooncake" (the GPU machine,
# scripts/gpu_pg_conformance.sh), with an 8-rank configuration added; the rest of the suite is CPU-only.
DEVICE = os.environ.get("MOONCAKE_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"MOONCAKE_TEST_DEVICE must be 'cpu' or 'cuda', got {DEVICE!r}")
TAG = DEVICE.upper()
if DEVICE == "cpu":
    IMPLS.append(EMULATED_HOSTS)

BACKEND = "mooncake" if DEVICE == "cuda" else "mooncake-cpu"
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors only (MOONCAKE_TEST_DEVICE=cuda runs the grid)")
TIMEOUT_S = 60  # cluster run deadline and process-group timeout
DTYPE_NAMES = list(jobs.DTYPES)
REDUCTIONS = [op.name for op in ReduceOp]


# ============================================================================= configurations

@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    world: int
    mask: tuple | None = None        # active_ranks passed at init (length = capacity)
    capacity: int | None = None      # max_world_size
    extension: tuple = ()            # ranks whose own mask entry is 0: started with is_extension

    @property
    def C(self) -> int:  # noqa: N802
        return self.capacity or self.world

    @property
    def active(self) -> list[int]:
        """The initial view's mask: {r < world : mask[r] == 1}; all-zero / none = all active."""
        if self.mask is None or not any(self.mask):
            return [1 if r < self.world else 0 for r in range(self.C)]
        return [1 if r < self.world and self.mask[r] else 0 for r in range(self.C)]

    @property
    def ranks(self) -> list[int]:
        return [r for r, a in enumerate(self.active) if a]

    @property
    def size(self) -> int:
        """dist.get_world_size(): highest active rank + 1."""
        return self.ranks[-1] + 1

    @property
    def slot_counts(self) -> list[int]:
        return sorted({self.size, self.C})

    def options(self):
        if self.mask is None:
            return None
        return ("pg.jobs.make_options", (self.mask, self.capacity, self.extension), {"device": DEVICE})


CONFIGS = [
    Config("w1", 1),
    Config("w2", 2),
    Config("w3", 3),
    Config("w4", 4),
    # reserved slots: capacity 4 > world 2 (k = 2 and k = 4 slot outputs)
    Config("w2cap4", 2, (1, 1, 0, 0), 4),
    # inactive middle rank (an extension rank, local-only) plus one reserved slot
    Config("w3mid1cap4", 3, (1, 0, 1, 0), 4, (1,)),
    Config("w4mid2cap6", 4, (1, 1, 0, 1, 0, 0), 6, (2,)),
    # an all-zero mask (upstream's test default) means every rank is active
    Config("w2zeros", 2, (0, 0)),
    # inactive highest rank: dist.get_world_size() (3) < number of processes (4)
    Config("w4tail3", 4, (1, 1, 1, 0), None, (3,)),
] + ([Config("w8", 8)] if DEVICE == "cuda" else [])
if os.environ.get("MOONCAKE_TEST_CONFIGS"):  # a comma-separated subset of the names above (GPU runs in parts)
    CONFIGS = [c for c in CONFIGS if c.name in os.environ["MOONCAKE_TEST_CONFIGS"].split(",")]
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}
FULL = [n for n in ("w1", "w2", "w3", "w4") if n in CONFIG_BY_NAME]  # compared with gloo as well


def mooncake_cluster(cluster_factory, cfg: Config, impl: str):
    return cluster_factory(cfg.world, BACKEND, options=cfg.options(), env=impl_env(impl),
                           timeout_s=TIMEOUT_S, device=DEVICE)


# ============================================================================= the grid

def _case(cid, op, dtype, *, red=None, root=None, k, variant="plain", explicit_k=False):
    return {"id": cid, "op": op, "dtype": dtype, "red": red, "root": root, "k": k,
            "variant": variant, "explicit_k": explicit_k, "seed": zlib.crc32(cid.encode())}


def grid_cases(cfg: Config) -> list[dict]:
    cases = []
    roots = cfg.ranks
    n = 0

    def root():
        nonlocal n
        n += 1
        return roots[n % len(roots)]

    def add(*args, **kw):
        cid = "-".join(str(a) for a in [args[0], args[1], kw.get("red"), kw.get("variant", "plain")]
                       + ([f"k{kw['k']}"] if "k" in kw else []) if a is not None)
        if kw.get("root") is not None:
            cid += f"-root{kw['root']}"
        cases.append(_case(cid, *args, **kw))

    for dt in DTYPE_NAMES:
        dtype = jobs.DTYPES[dt]
        reds = [r for r in REDUCTIONS if check_reducible(ReduceOp[r], dtype) is None]
        for red in reds:
            add("all_reduce", dt, red=red, k=cfg.C)
            add("all_reduce", dt, red=red, k=cfg.C, variant="noncontig")
            add("reduce", dt, red=red, root=root(), k=cfg.C)
            if dt in jobs.FLOATS and red in ("SUM", "MIN", "MAX", "AVG"):
                add("all_reduce", dt, red=red, k=cfg.C, variant="special")
        add("reduce", dt, red=reds[0], root=root(), k=cfg.C, variant="noncontig")
        add("broadcast", dt, root=root(), k=cfg.C)
        add("broadcast", dt, root=root(), k=cfg.C, variant="noncontig")
        for k in cfg.slot_counts:
            for v in ("plain", "inplace", "noncontig"):
                add("all_gather", dt, k=k, variant=v)
                add("all_gather_into_tensor", dt, k=k, variant=v)
                add("gather", dt, root=root(), k=k, variant=v)
                add("scatter", dt, root=root(), k=k, variant=v)
            for i, red in enumerate(reds):
                variants = ("plain", "inplace", "noncontig") if i in (0, len(reds) - 1) else ("plain",)
                for v in variants:
                    add("reduce_scatter", dt, red=red, k=k, variant=v)
                    add("reduce_scatter_tensor", dt, red=red, k=k, variant=v)
            for v in ("plain", "noncontig"):
                add("all_to_all", dt, k=k, variant=v)
            add("all_to_all_single", dt, k=k, explicit_k=(k != cfg.size))
            add("all_to_all_single", dt, k=k, variant="uneven")
            add("all_to_all_single", dt, k=k, variant="noncontig", explicit_k=(k != cfg.size))
    add("barrier", "float32", k=cfg.C)
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


CASES = {cfg.name: grid_cases(cfg) for cfg in CONFIGS}


def gloo_exact(case) -> bool:
    """Cases whose result is exact on gloo: no AVG (gloo lacks it), no NaN payload games, and for
    floats only reductions whose order cannot matter (MIN / MAX) or no arithmetic at all.
    Contiguous tensors only: gloo reads / writes non-contiguous tensors' raw storage (measured:
    reduce_scatter of transposed bool inputs gives wrong values, scatter / reduce_scatter into a
    strided view overwrite the memory between its elements, all_to_all_single refuses them)."""
    if case["variant"] in ("special", "noncontig") or case["red"] == "AVG":
        return False
    return not (case["dtype"] in jobs.FLOATS and case["red"] in ("SUM", "PRODUCT"))


GLOO_CASES = {name: [c for c in CASES[name] if gloo_exact(c)] for name in FULL}

_RESULTS: dict[tuple, list] = {}


def _grid_results(cluster_factory, impl: str, cfg_name: str, backend: str) -> list:
    key = (impl, cfg_name, backend)
    if key not in _RESULTS:
        cfg = CONFIG_BY_NAME[cfg_name]
        if backend == "gloo":
            cluster = cluster_factory(cfg.world, "gloo", timeout_s=TIMEOUT_S)
            cases, device = GLOO_CASES[cfg_name], "cpu"
        else:
            cluster = mooncake_cluster(cluster_factory, cfg, impl)
            cases, device = CASES[cfg_name], DEVICE
        _RESULTS[key] = cluster.run(jobs.run_grid, cases, cfg.extension, device, timeout_s=240)
    return _RESULTS[key]


def expected(cfg: Config, case) -> list:
    """The model's outputs, one entry per rank slot (None where the rank gets none)."""
    active, k, op = cfg.active, case["k"], case["op"]
    ins = [jobs.case_inputs(case, r) if active[r] else None for r in range(cfg.C)]
    red = ReduceOp[case["red"]] if case["red"] else None
    root = case["root"]
    if op == "all_reduce":
        return M.all_reduce(ins, red, active)
    if op == "broadcast":
        return M.broadcast(ins, root, active)
    if op == "reduce":
        return M.reduce(ins, red, root, active)
    if op == "all_gather":
        return M.all_gather(ins, active, num_slots=k)
    if op == "all_gather_into_tensor":
        return M.all_gather_into_tensor(ins, active, num_slots=k)
    if op == "gather":
        return M.gather(ins, root, active, num_slots=k)
    if op == "scatter":
        return M.scatter(ins[root], root, active, num_slots=k)
    if op == "reduce_scatter":
        return M.reduce_scatter(ins, red, active, num_slots=k)
    if op == "reduce_scatter_tensor":
        return M.reduce_scatter_tensor(ins, red, active, num_slots=k)
    if op == "all_to_all":
        return M.all_to_all(ins, active, num_slots=k)
    if op == "all_to_all_single":
        in_splits = [jobs.in_splits(case, s) if active[s] else None for s in range(cfg.C)]
        out_splits = [[jobs.in_splits(case, s)[r] for s in range(k)] if active[r] else None
                      for r in range(cfg.C)]
        return M.all_to_all_single(ins, active, in_splits, out_splits, num_slots=k)
    if op == "barrier":
        M.barrier(active)
        return [None] * cfg.C
    raise AssertionError(op)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{tuple(value.shape)} {value.tolist()}"
    if isinstance(value, list):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    return repr(value)


def assert_same(got, want, where: str) -> None:
    if isinstance(got, tuple) and got and got[0] == "error":
        pytest.fail(f"{where}: raised {got[1]}: {got[2]}")
    if want is None or got is None:
        assert got is None and want is None, f"{where}: got {_describe(got)}, expected {_describe(want)}"
        return
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), \
            f"{where}: got {_describe(got)}, expected {len(want)} slots"
        for i, (g, w) in enumerate(zip(got, want)):
            assert bitwise_equal(g, w), f"{where} slot {i}: got {_describe(g)}, expected {_describe(w)}"
        return
    assert bitwise_equal(got, want), f"{where}: got {_describe(got)}, expected {_describe(want)}"


GRID_PARAMS = [pytest.param(impl, cfg.name, i, id=f"{TAG}-{impl}-{cfg.name}-{case['id']}")
               for impl in IMPLS for cfg in CONFIGS for i, case in enumerate(CASES[cfg.name])]
GLOO_PARAMS = [pytest.param(impl, name, i, id=f"{TAG}-{impl}-{name}-{case['id']}")
               for impl in IMPLS for name in FULL for i, case in enumerate(GLOO_CASES[name])]


class TestViewCPU:
    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("impl,cfg_name", [pytest.param(i, c.name, id=f"{TAG}-{i}-{c.name}")
                                               for i in IMPLS for c in CONFIGS])
    def test_initial_view(self, cluster_factory, impl, cfg_name):
        cfg = CONFIG_BY_NAME[cfg_name]
        for rank, info in enumerate(mooncake_cluster(cluster_factory, cfg, impl).run(jobs.describe)):
            assert info["rank"] == rank
            assert info["impl"] == impl_env(impl)["MOONCAKE_IMPL"]
            if rank in cfg.extension:  # local-only until it joins: declared size, own slot only
                assert info["world_size"] == cfg.world
                continue
            assert info["world_size"] == cfg.size
            assert info["capacity"] == cfg.C
            assert info["active"] == cfg.active


class TestGridCPU:
    @pytest.mark.timeout(300)
    @pytest.mark.parametrize("impl,cfg_name,index", GRID_PARAMS)
    def test_matches_model(self, cluster_factory, impl, cfg_name, index):
        cfg = CONFIG_BY_NAME[cfg_name]
        case = CASES[cfg_name][index]
        results = _grid_results(cluster_factory, impl, cfg_name, BACKEND)
        want = expected(cfg, case)
        for rank in range(cfg.world):
            if rank in cfg.extension:
                assert results[rank] is None
                continue
            assert_same(results[rank][index], want[rank], f"{case['id']} rank {rank}")

    @pytest.mark.timeout(300)
    @pytest.mark.skipif(len(IMPLS) < 2, reason="needs two implementations")
    @pytest.mark.parametrize("cfg_name", [pytest.param(c.name, id=f"{TAG}-{c.name}") for c in CONFIGS])
    def test_impls_agree(self, cluster_factory, cfg_name):
        """Every implementation gives the same bits (and the same errors) as the first, case by case."""
        cfg = CONFIG_BY_NAME[cfg_name]
        first, *others = [_grid_results(cluster_factory, impl, cfg_name, BACKEND) for impl in IMPLS]
        for impl, results in zip(IMPLS[1:], others):
            for rank in range(cfg.world):
                if rank in cfg.extension:
                    continue
                for case, got, want in zip(CASES[cfg_name], results[rank], first[rank]):
                    if isinstance(want, tuple) and want and want[0] == "error":
                        assert isinstance(got, tuple) and got[:2] == want[:2], \
                            f"{case['id']} rank {rank}: {IMPLS[0]} raised {want[1]}, {impl} gave {_describe(got)}"
                        continue
                    assert_same(got, want, f"{case['id']} rank {rank} ({impl} vs {IMPLS[0]})")


class TestGlooOracleCPU:
    @pytest.mark.timeout(300)
    @pytest.mark.parametrize("impl,cfg_name,index", GLOO_PARAMS)
    def test_matches_gloo(self, cluster_factory, impl, cfg_name, index):
        case = GLOO_CASES[cfg_name][index]
        full_index = CASES[cfg_name].index(case)
        ours = _grid_results(cluster_factory, impl, cfg_name, BACKEND)
        gloo = _grid_results(cluster_factory, impl, cfg_name, "gloo")
        for rank in range(CONFIG_BY_NAME[cfg_name].world):
            if case["op"] == "reduce" and rank != case["root"]:
                continue  # torch leaves a non-root's reduce buffer unspecified (gloo uses it as scratch)
            theirs = gloo[rank][index]
            if isinstance(theirs, tuple) and theirs and theirs[0] == "error":
                pytest.skip(f"gloo fails {case['op']} {case['dtype']} {case['red'] or ''}: "
                            f"{theirs[1]}: {theirs[2].splitlines()[0][:160]}")
            assert_same(ours[rank][full_index], theirs, f"{case['id']} rank {rank} (vs gloo)")


# ============================================================================= async

def _model_all_reduce(values, op=ReduceOp.SUM):
    return M.all_reduce(values, op, [1] * len(values))[0]


@cpu_only
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"CPU-{i}")
class TestAsyncCPU:
    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("world", [2, 3])
    def test_async_work(self, cluster_factory, impl, world):
        cfg = CONFIG_BY_NAME[f"w{world}"]
        results = mooncake_cluster(cluster_factory, cfg, impl).run(jobs.async_ops)
        n = world
        ranks = range(n)
        want_t = _model_all_reduce([torch.full((4,), float(r + 1)) for r in ranks])
        want_max = _model_all_reduce([torch.arange(6, dtype=torch.int64) * (r + 1) for r in ranks],
                                     ReduceOp.MAX)
        want_ts = [_model_all_reduce([torch.full((3,), float(10 * i + r)) for r in ranks]) for i in range(5)]
        want_g = M.all_gather([torch.tensor([r, -r], dtype=torch.int32) for r in ranks], [1] * n)[0]
        want_b = M.broadcast([torch.full((2,), r, dtype=torch.int16) for r in ranks], n - 1, [1] * n)[0]
        for rank, res in enumerate(results):
            assert res["wait"] is True and res["completed_after_wait"] is True
            assert bitwise_equal(res["t_wait"], want_t)
            assert res["wait_timeout"] is True
            assert bitwise_equal(res["t_wait_timeout"], want_t)
            assert len(res["future_value"]) == 1 and bitwise_equal(res["future_value"][0], want_max)
            assert res["future_value_is_output"], "the future's value must be the output tensor"
            assert res["reverse_waits"] == [True] * 7
            assert res["reverse_completed"] == [True] * 7
            assert_same(res["reverse_ts"], want_ts, f"rank {rank} in-flight all_reduces")
            assert_same(res["reverse_gathered"], want_g, f"rank {rank} in-flight all_gather")
            assert bitwise_equal(res["reverse_b"], want_b)
            assert res["barrier_wait"] is True


# ============================================================================= P2P

@cpu_only
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"CPU-{i}")
class TestP2PCPU:
    @pytest.mark.timeout(180)
    def test_pairs(self, cluster_factory, impl):
        r0, r1 = mooncake_cluster(cluster_factory, CONFIG_BY_NAME["w2"], impl).run(jobs.p2p_basic)
        assert bitwise_equal(r1["recv"], torch.arange(5, dtype=torch.float32))
        assert bitwise_equal(r0["irecv"], torch.full((3,), 41, dtype=torch.int64))
        assert bitwise_equal(r1["irecv"], torch.full((3,), 40, dtype=torch.int64))
        # tags honoured: tag 22 received first although sent second
        assert r1["tag22"].item() == 2.0 and r1["tag11"].item() == 1.0
        assert r1["fifo"] == [0, 1, 2, 3]
        assert r0["anysrc_rank"] == 1 and r0["anysrc_value"].item() == 7.5
        for label, fragment in (("short", "bytes"), ("long", "sizes must agree")):
            err = r1[f"mismatch_{label}"]
            assert err is not None, f"receiving a {label} message into a wrong-sized buffer succeeded"
            assert err["wire_error"], err
            assert fragment in err["msg"], err
            assert r0[f"mismatch_{label}_sender"] == "ok"
        assert r0["after_p2p"].tolist() == [1.0, 1.0] and r1["after_p2p"].tolist() == [0.0, 0.0]
        assert r0["after_allreduce"].item() == 3.0 and r1["after_allreduce"].item() == 3.0

    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("world", [3, 4])
    def test_ring_and_any_source(self, cluster_factory, impl, world):
        results = mooncake_cluster(cluster_factory, CONFIG_BY_NAME[f"w{world}"], impl).run(jobs.p2p_ring)
        for rank, res in enumerate(results):
            prev = (rank - 1) % world
            assert bitwise_equal(res["ring"], torch.arange(4, dtype=torch.int64) + 100 * prev)
        got = sorted(results[0]["anysrc"])
        assert got == [(r, [r, 10 * r]) for r in range(1, world)]


# ============================================================================= subgroups

@cpu_only
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"CPU-{i}")
class TestSubgroupsCPU:
    @pytest.mark.timeout(180)
    def test_even_odd(self, cluster_factory, impl):
        n = 4
        results = mooncake_cluster(cluster_factory, CONFIG_BY_NAME["w4"], impl).run(jobs.subgroups)
        for rank, res in enumerate(results):
            members = [r for r in range(n) if r % 2 == rank % 2]
            me = members.index(rank)
            act = [1] * len(members)
            assert res["group_rank"] == me and res["group_size"] == len(members)
            assert res["backend"] == "MooncakeProcessGroup"
            x = [jobs.rand_values("float32", (4,), jobs._gen(77, r, 0)) for r in members]
            assert bitwise_equal(res["all_reduce"], M.all_reduce(x, ReduceOp.SUM, act)[me])
            y = [jobs.rand_values("int32", (3,), jobs._gen(78, r, 0), "bits") for r in members]
            assert bitwise_equal(res["all_reduce_bxor"], M.all_reduce(y, ReduceOp.BXOR, act)[me])
            g = [torch.tensor([r, r * r], dtype=torch.int64) for r in members]
            assert_same(res["all_gather"], M.all_gather(g, act)[me], f"rank {rank} all_gather")
            b = [jobs.rand_values("bfloat16", (5,), jobs._gen(79, r, 0)) for r in members]
            assert bitwise_equal(res["broadcast"], M.broadcast(b, len(members) - 1, act)[me])
            red = [jobs.rand_values("int16", (3,), jobs._gen(80, r, 0)) for r in members]
            assert bitwise_equal(res["reduce"], M.reduce(red, ReduceOp.MIN, 0, act)[me])
            a2a = [torch.arange(len(members) * 2, dtype=torch.float64) + r for r in members]
            assert bitwise_equal(res["all_to_all_single"], M.all_to_all_single(a2a, act)[me])
            peer = members[1 - me]
            assert res["p2p"].item() == float(peer)
            assert res["world_all_reduce"].item() == n * (n + 1) // 2
            assert [t.item() for t in res["world_all_gather"]] == list(range(n))


# ============================================================================= bad inputs

ARG, WIRE = "argument", "wire"
# name -> (config, expected error kind, message fragments, ranks that make the bad call)
BAD_INPUTS = {
    "complex64": ("w2", ARG, ["complex64"], None),
    "uint32": ("w2", ARG, ["torch.uint32", "supported"], None),
    "sparse": ("w2", ARG, ["Sparse"], None),
    "band_float": ("w2", ARG, ["BAND", "float32"], None),
    "avg_bool": ("w2", ARG, ["AVG", "bool"], None),
    "root_out_of_range": ("w2", ARG, ["broadcast src 9", "out of range"], None),
    "reduce_root_out_of_range": ("w2", ARG, ["reduce dst 9", "out of range"], None),
    "inactive_root_reserved": ("w2cap4", ARG, ["broadcast src 3", "not active"], None),
    "inactive_root_reserved_gather": ("w2cap4", ARG, ["gather dst 3", "not active"], None),
    "inactive_root_middle": ("w3mid1cap4", ARG, ["broadcast src 1", "not active"], (0, 2)),
    "all_gather_slots": ("w2", ARG, ["all_gather output list", "1 slots"], None),
    "all_gather_too_many_slots": ("w2cap4", ARG, ["all_gather output list", "5 slots"], None),
    "all_gather_numel": ("w2", ARG, ["output_tensor_list[0]", "5"], None),
    "all_gather_dtype": ("w2", ARG, ["output_tensor_list[0]", "float64"], None),
    "agit_numel": ("w2", ARG, ["all_gather_into_tensor output", "multiple"], None),
    "agit_dtype": ("w2", ARG, ["all_gather_into_tensor", "dtype"], None),
    "rst_numel": ("w2", ARG, ["reduce_scatter_tensor input", "multiple"], None),
    "a2as_splits_sum": ("w2", ARG, ["input_split_sizes", "add up"], None),
    "a2as_splits_len": ("w2", ARG, ["input_split_sizes", "1 slots"], None),
    "a2as_negative": ("w2", ARG, ["input_split_sizes", "non-negative"], None),
    "p2p_self": ("w2", ARG, ["send", "this rank"], None),
    "p2p_out_of_range": ("w2", ARG, ["rank 7", "out of range"], None),
    "p2p_tag": ("w2", ARG, ["tag 16384", "out of range"], None),
    "size_mismatch": ("w2", WIRE, ["rank 0 called all_reduce(float32, 4 elements", "rank 1 called all_reduce(float32, 5 elements"], None),
    "op_mismatch": ("w2", WIRE, ["all_reduce", "all_gather"], None),
    "dtype_mismatch": ("w2", WIRE, ["all_reduce(float32", "all_reduce(int32"], None),
    "redop_mismatch": ("w2", WIRE, ["SUM", "MAX"], None),
}


def _check_error(outcome, kind: str, fragments: list[str], where: str) -> None:
    assert isinstance(outcome, dict), f"{where}: expected an error, the call returned {outcome!r}"
    assert outcome["runtime_error"], outcome
    if kind == ARG:
        assert outcome["argument_error"] and outcome["value_error"], \
            f"{where}: expected ArgumentError, got {outcome['type']}: {outcome['msg']}"
    else:
        assert outcome["wire_error"], f"{where}: expected WireError, got {outcome['type']}: {outcome['msg']}"
    for fragment in fragments:
        assert fragment in outcome["msg"], f"{where}: {fragment!r} not in the message {outcome['msg']!r}"


@cpu_only
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"CPU-{i}")
class TestBadInputsCPU:
    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("name", list(BAD_INPUTS))
    def test_error_then_group_works(self, cluster_factory, impl, name):
        cfg_name, kind, fragments, ranks = BAD_INPUTS[name]
        cfg = CONFIG_BY_NAME[cfg_name]
        results = mooncake_cluster(cluster_factory, cfg, impl).run(jobs.bad_input, name, ranks,
                                                                   cfg.extension)
        total = sum(r + 1 for r in cfg.ranks)
        for rank, res in enumerate(results):
            if rank in cfg.extension:
                continue
            _check_error(res["outcome"], kind, fragments, f"{name} rank {rank}")
            assert res["follow_up"] == total, f"{name}: the next all_reduce gave {res['follow_up']}"

    @pytest.mark.timeout(180)
    def test_op_mismatch_against_a_root(self, cluster_factory, impl):
        """Rank 0 broadcasts (it only sends), rank 1 all_reduces: both get the same MismatchError
        naming both collectives (the fingerprints travel in the commit round); the group goes on."""
        r0, r1 = mooncake_cluster(cluster_factory, CONFIG_BY_NAME["w2"], impl).run(
            jobs.bad_input, "op_mismatch_broadcast")
        for rank, res in enumerate((r0, r1)):
            _check_error(res["outcome"], WIRE, ["rank 0 called broadcast", "rank 1 called all_reduce"], f"rank {rank}")
        assert r0["outcome"]["msg"] == r1["outcome"]["msg"]
        assert r0["follow_up"] == r1["follow_up"] == 3


@cpu_only
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"CPU-{i}")
class TestDirectCallsCPU:
    @pytest.mark.timeout(180)
    def test_allgather_without_opts(self, cluster_factory, impl):
        """Methods called on the group object directly (no opts) use their defaults."""
        results = mooncake_cluster(cluster_factory, CONFIG_BY_NAME["w2"], impl).run(
            jobs.allgather_default_opts)
        want = [torch.tensor([r, 2 * r], dtype=torch.int32) for r in range(2)]
        for outs, out in results:
            assert_same(outs, want, "allgather")
            assert bitwise_equal(out, torch.cat(want))


# ============================================================================= options at init

@cpu_only
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"CPU-{i}")
class TestOptionsCPU:
    @pytest.mark.timeout(180)
    def test_bad_options_then_good_init(self, cluster_factory, impl):
        cluster = cluster_factory(2, BACKEND, init=False, env=impl_env(impl), timeout_s=TIMEOUT_S)
        for res in cluster.run(jobs.init_options_errors):
            for label, fragment in (("int64", "activeRanks must be int."),
                                    ("not_cpu", "activeRanks must be on CPU."),
                                    ("not_gpu", "activeRanks must be on GPU."),
                                    ("sized", "activeRanks must be sized to max_world_size when "
                                              "max_world_size is set"),
                                    ("capacity_small", "max_world_size must be >= process group size")):
                _check_error(res[label], ARG, [fragment], label)
                assert res[label + "_initialized_after"] is False
            assert res["good_all_reduce"] == 3
            assert res["good_world_size"] == 2
            assert res["good_mask"] == [1, 1, 0, 0]


# ============================================================================= launchers

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_allreduce.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], impl: str, timeout_s: float = 120) -> str:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "MOONCAKE_IMPL": impl, "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{argv} did not finish within {timeout_s} s:\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"{argv} exited with {proc.returncode}:\n{out}"
    return out


@cpu_only
@pytest.mark.parametrize("impl", ["ref", "fast"], ids=lambda i: f"CPU-{i}")
class TestLaunchersCPU:
    @pytest.mark.timeout(180)
    def test_torchrun(self, impl):
        out = _launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), SCRIPT], impl)
        for rank in range(2):
            assert f"OK rank={rank} world=2 value=3 impl={impl}" in out, out

    @pytest.mark.timeout(180)
    def test_mp_spawn(self, impl):
        out = _launch([sys.executable, SCRIPT, "--spawn", str(_free_port())], impl)
        for rank in range(2):
            assert f"OK rank={rank} world=2 value=3 impl={impl}" in out, out
