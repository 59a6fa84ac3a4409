"""PG conformance suite for ``mooncake-cpu``: every result compared BITWISE with the global-view
model (``mooncake.model.collectives``, computed here in the test process) and, where the result is
exact, with gloo.

Written once for every implementation: ``IMPLS`` lists the values of ``MOONCAKE_IMPL`` the
clusters run under.  Add "fast" when the fast CPU data plane lands; nothing else changes.

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
from pg import jobs
from pg.conftest import PYTHONPATH

# MOONCAKE_IMPL values to run the whole suite under; append "fast" once it serves CPU tensors.
IMPLS = ["ref"]

BACKEND = "mooncake-cpu"
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
        return ("pg.jobs.make_options", (self.mask, self.capacity, self.extension), {})


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
    # inactive highest rank: dist.get_world_size() (3) < number of processes (4)
    Config("w4tail3", 4, (1, 1, 1, 0), None, (3,)),
]
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}
FULL = ["w1", "w2", "w3", "w4"]  # compared with gloo as well


def mooncake_cluster(cluster_factory, cfg: Config, impl: str):
    return cluster_factory(cfg.world, BACKEND, options=cfg.options(), env={"MOONCAKE_IMPL": impl},
                           timeout_s=TIMEOUT_S)


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
            cases = GLOO_CASES[cfg_name]
        else:
            cluster = mooncake_cluster(cluster_factory, cfg, impl)
            cases = CASES[cfg_name]
        _RESULTS[key] = cluster.run(jobs.run_grid, cases, cfg.extension, timeout_s=240)
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


GRID_PARAMS = [pytest.param(impl, cfg.name, i, id=f"CPU-{impl}-{cfg.name}-{case['id']}")
               for impl in IMPLS for cfg in CONFIGS for i, case in enumerate(CASES[cfg.name])]
GLOO_PARAMS = [pytest.param(impl, name, i, id=f"CPU-{impl}-{name}-{case['id']}")
               for impl in IMPLS for name in FULL for i, case in enumerate(GLOO_CASES[name])]


class TestViewCPU:
    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("impl,cfg_name", [pytest.param(i, c.name, id=f"CPU-{i}-{c.name}")
                                               for i in IMPLS for c in CONFIGS])
    def test_initial_view(self, cluster_factory, impl, cfg_name):
        cfg = CONFIG_BY_NAME[cfg_name]
        for rank, info in enumerate(mooncake_cluster(cluster_factory, cfg, impl).run(jobs.describe)):
            assert info["rank"] == rank
            assert info["impl"] == impl
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
