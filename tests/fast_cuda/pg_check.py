#!/usr/bin/env python3
"""The CUDA PG plane on a GPU machine, in one process tree (run by scripts/gpu_pg_check.sh under MPS).

Steps (``--steps``, default all), for each R in ``--ranks`` (all ranks share the current GPU):

* ``plane``: the plane driven directly (tests/fast_cuda/pg_harness.py): every collective x every dtype x
  every valid reduce op, slot counts R and R + 1 (a reserved slot), sizes 1 / 37 / 5000, an inactive
  middle rank, async posting with large all_reduce; every output bitwise vs ``mooncake.model``.
* ``pg``: torch.distributed on backend ``mooncake`` with CUDA tensors, ``MOONCAKE_IMPL=fast`` and
  ``MOONCAKE_IMPL=ref``: every collective
  form (incl. *_into_tensor / *_tensor, ragged all_to_all_single), every output bitwise vs the model and
  fast vs ref.
* ``fail``: R ranks, fast: rank 1 is killed inside all_reduce after it holds every payload but before its
  DONE (fault point ``after_data``) and, separately, after writing its payload (``mid_transfer``);
  survivors must return the model's result over the survivors with the mask showing the failure, and the
  next all_reduce must work.
* ``bench``: all_reduce SUM float32 of 64 / 128 / 256 MiB: the plane alone (``op.wait``), dist.all_reduce
  (``Work.wait``); and the device-to-device copy of the same size
  (one process, and R processes at once) for the HBM floor = R x (one copy): every rank's input read once and
  its output written once.

Prints PASS / FAIL lines, writes ``<out>/pg_check.json``.  Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for p in (HERE, REPO):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

import pg_cases as C  # noqa: E402
import pg_harness as H  # noqa: E402
import pg_jobs as J  # noqa: E402
from mooncake.model import collectives as M  # noqa: E402
from mooncake.model.reduce import ReduceOp, check_reducible  # noqa: E402
from mooncake.testing.cluster import Cluster, ClusterError  # noqa: E402

RESULTS: dict = {"checks": [], "bench": []}
FAILED = []
EMULATE = {"on": False}  # --emulate: CPU tensors, the plane's CPU emulation, backend mooncake-cpu
EMU_ENV = {"MOONCAKE_FAST_CUDA_EMULATE": "cpu", "MOONCAKE_FAST_CUDA_EMULATE_LAG": "2",
           "MOONCAKE_FAST_CUDA_PARTS_MIN": "100"}
FAIL_NUMEL = 300_001  # 1.2 MB of float32: the two-phase (parts) all_reduce


def log(msg: str) -> None:
    print(msg, flush=True)


OUT = {"dir": ".", "deadline": float("inf")}


def save() -> None:
    RESULTS["failed"] = FAILED
    with open(os.path.join(OUT["dir"], "pg_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def record(name: str, ok: bool, detail: str = "", seconds: float = 0.0) -> None:
    RESULTS["checks"].append({"name": name, "ok": ok, "detail": detail, "seconds": round(seconds, 2)})
    log(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.1f} s){': ' + detail if detail else ''}")
    if not ok:
        FAILED.append(name)
    save()


def guarded(name: str, fn, *args, need_s: float = 0.0) -> None:
    if time.monotonic() + need_s > OUT["deadline"]:
        log(f"SKIP {name}: not enough time left before --deadline")
        RESULTS["checks"].append({"name": name, "ok": None, "detail": "skipped: time"})
        save()
        return
    t0 = time.monotonic()
    try:
        ok, detail = fn(*args)
    except BaseException as exc:  # noqa: BLE001 - every step reports and the run goes on
        ok, detail = False, f"{type(exc).__name__}: {exc}"[:3000]
        traceback.print_exc()
    record(name, ok, detail, time.monotonic() - t0)


# ================================================================================== plane

def plane_grid(c: Cluster, world: int):
    active = list(range(world))
    capacity = world + 1
    prefix = C.prefix(f"plane{world}")
    c.run(H.open_plane, prefix, capacity, active)
    try:
        cases = C.grid(active, capacity, C.ALL_DTYPES, [1, 37, 5000])
        results = c.run(H.run_cases, prefix, cases)
        bad = C.mismatches(cases, results, active, capacity)
        return not bad, f"{len(cases)} cases x {world} ranks" + (f"; {len(bad)} mismatches, e.g. {bad[:6]}" if bad else "")
    finally:
        c.run(H.close_plane, prefix)


def plane_inactive(c: Cluster, world: int):
    active = [r for r in range(world) if r != 1]  # rank 1 never opens the plane
    capacity = world + 1
    prefix = C.prefix(f"plane-inactive{world}")
    c.run(H.open_plane, prefix, capacity, active, ranks=active)
    try:
        cases = C.grid(active, capacity, ["bool", "int64", "bfloat16", "float32"], [37, 5000])
        results = c.run(H.run_cases, prefix, cases, ranks=active)
        bad = C.mismatches(cases, results, active, capacity)
        return not bad, f"active {active} of {capacity}: {len(cases)} cases" + (f"; {len(bad)} mismatches {bad[:6]}" if bad else "")
    finally:
        c.run(H.close_plane, prefix, ranks=active)


def plane_async_large(c: Cluster, world: int):
    active = list(range(world))
    prefix = C.prefix(f"plane-async{world}")
    c.run(H.open_plane, prefix, world, active)
    try:
        cases = [C.case("all_reduce", d, 3_000_001, red=r, salt="big") for d in ("float32", "bfloat16", "float16")
                 for r in ("SUM", "AVG", "MAX")]
        cases += [C.case("all_reduce", "float32", 2_000_000, red="SUM", salt="clean", specials=False),
                  C.case("all_gather", "int64", 33, k=world), C.case("all_to_all", "float64", 1001, k=world),
                  C.case("reduce_scatter", "float16", 7001, red="SUM", k=world),
                  C.case("broadcast", "int8", 100, root=world - 1)]
        results = c.run(H.run_cases, prefix, cases, "async")
        bad = C.mismatches(cases, results, active, world)
        return not bad, f"{len(cases)} cases posted before any wait" + (f"; mismatches {bad[:6]}" if bad else "")
    finally:
        c.run(H.close_plane, prefix)


MIB = 1 << 20


def copy_floor(c: Cluster, world: int, sizes):
    out = {}
    for size in sizes:
        one = c.run(J.copy_time, size, ranks=[0])[0]
        key = f"copy-{world}-{size}-{time.monotonic_ns()}"
        many = c.run(J.copy_time, size, 10, key)
        out[size] = {"copy_1proc_s": one, "copy_Rproc_s": max(many)}
    return out


def plane_bench(c: Cluster, world: int, sizes, iters: int):
    active = list(range(world))
    prefix = C.prefix(f"plane-bench{world}")
    c.run(H.open_plane, prefix, world, active)
    try:
        floors = copy_floor(c, world, sizes)
        for label, parts_min, fold in (("plane, parts", 1 << 20, "kernel"),
                                       ("plane, parts, torch fold", 1 << 20, "torch"),
                                       ("plane, every rank folds all", 1 << 62, "kernel")):
            c.run(H.set_parts_min, parts_min)
            c.run(H.set_fold, prefix, fold)
            for size in sizes:
                times = c.run(H.bench_all_reduce, prefix, size // 4, iters)
                _bench_row(label, world, size, times, floors[size])
        c.run(H.set_parts_min, 1 << 20)
    finally:
        c.run(H.close_plane, prefix)
    return floors


def _bench_row(path: str, world: int, size: int, times, floor) -> None:
    per_iter = [max(ts) for ts in zip(*times)]  # the slowest rank of each iteration
    med = statistics.median(per_iter)
    floor = floor or {"copy_1proc_s": float("nan"), "copy_Rproc_s": float("nan")}
    floor_s = world * floor["copy_1proc_s"]
    row = {"path": path, "ranks": world, "bytes": size, "median_s": med, "min_s": min(per_iter),
           "algbw_GBps": size / med / 1e9, "copy_1proc_s": floor["copy_1proc_s"],
           "copy_Rproc_s": floor["copy_Rproc_s"], "hbm_floor_s": floor_s, "x_floor": med / floor_s}
    RESULTS["bench"].append(row)
    log(f"BENCH {path:28s} R={world} {size // MIB:4d} MiB: median {med * 1e3:8.3f} ms (min {min(per_iter) * 1e3:.3f}), "
        f"algbw {row['algbw_GBps']:7.1f} GB/s, copy {floor['copy_1proc_s'] * 1e3:.3f} ms "
        f"(R at once {floor['copy_Rproc_s'] * 1e3:.3f} ms), floor R x copy {floor_s * 1e3:.3f} ms -> "
        f"{row['x_floor']:.2f}x floor")


# ================================================================================== dist

def dist_cases(world: int) -> list[dict]:
    out = []
    for dtype in C.ALL_DTYPES:
        for numel in (37, 5000):
            for red in ReduceOp:
                if not check_reducible(red, H.DTYPES[dtype]):
                    out.append(C.case("all_reduce", dtype, numel, red=red.name, salt="d"))
            red = "MAX" if dtype == "bool" else "SUM"
            out += [C.case("broadcast", dtype, numel, root=world - 1, salt="d"),
                    C.case("reduce", dtype, numel, red=red, root=0, salt="d"),
                    C.case("all_gather", dtype, numel, salt="d"),
                    C.case("all_gather_into_tensor", dtype, numel, salt="d"),
                    C.case("gather", dtype, numel, root=world - 1, salt="d"),
                    C.case("scatter", dtype, numel, root=0, salt="d"),
                    C.case("reduce_scatter", dtype, numel, red=red, salt="d"),
                    C.case("reduce_scatter_tensor", dtype, numel, red=red, salt="d"),
                    C.case("all_to_all", dtype, numel, salt="d"),
                    C.case("all_to_all_single", dtype, numel, salt="d")]
        out.append(C.case("barrier", dtype, 0, salt="d"))
    return out


def dist_expected(case: dict, world: int):
    mask = [1] * world
    inputs = [J.dist_inputs(case, r, world) for r in range(world)]
    op = case["op"]
    red = ReduceOp[case["red"]] if case.get("red") else None
    if op == "all_reduce":
        return M.all_reduce(inputs, red, mask)
    if op == "broadcast":
        return M.broadcast(inputs, case["root"], mask)
    if op == "reduce":
        return M.reduce(inputs, red, case["root"], mask)
    if op == "all_gather":
        return M.all_gather(inputs, mask)
    if op == "all_gather_into_tensor":
        return M.all_gather_into_tensor(inputs, mask)
    if op == "gather":
        return M.gather(inputs, case["root"], mask)
    if op == "scatter":
        return M.scatter(inputs[case["root"]], case["root"], mask)
    if op == "reduce_scatter":
        return M.reduce_scatter(inputs, red, mask)
    if op == "reduce_scatter_tensor":
        return M.reduce_scatter_tensor(inputs, red, mask)
    if op == "all_to_all":
        return M.all_to_all(inputs, mask)
    if op == "all_to_all_single":
        return M.all_to_all_single(inputs, mask, [[J.a2a_splits(s, r) for r in range(world)] for s in range(world)],
                                   [[J.a2a_splits(s, r) for s in range(world)] for r in range(world)])
    return [None] * world


def dist_cluster(world: int, impl: str, timeout_s: float = 60.0) -> Cluster:
    emulate = EMULATE["on"]
    options = ("pg_integration.options", (), {}) if impl == "fast" and emulate else None
    env = {"MOONCAKE_IMPL": impl, **(EMU_ENV if emulate else {})}
    return Cluster(world, "mooncake-cpu" if emulate else "mooncake", device="cpu" if emulate else "cuda",
                   env=env, timeout_s=timeout_s, options=options)


def plane_cluster(world: int) -> Cluster:
    if EMULATE["on"]:
        return Cluster(world, "gloo", init=False, device="cpu", env=EMU_ENV, timeout_s=90)
    return Cluster(world, "gloo", init=False, device="cuda", timeout_s=90)


DIST_RESULTS: dict = {}


def pg_run(world: int, impl: str, c: Cluster):
    """The dist cases on an open cluster of ``impl``; results kept for pg_compare."""
    which = c.run(J.implementation)
    log(f"  {impl}: {which[0]}")
    if any(w[0] != impl or (impl == "fast" and w[2] != "FastCudaGroup") for w in which):
        return False, f"MOONCAKE_IMPL={impl} but the group runs {which}"
    cases = dist_cases(world)
    got = c.run(J.run_dist_cases, cases)
    DIST_RESULTS[(world, impl)] = got
    bad = []
    for i, case in enumerate(cases):
        want = dist_expected(case, world)
        for r in range(world):
            if case["op"] == "gather" and r != case["root"]:
                continue
            if not C.same(got[r][i], want[r]):
                bad.append(f"{case['id']} rank {r}")
    return not bad, (f"{len(cases)} dist calls x {world} ranks, {impl} vs model" +
                     (f"; {len(bad)} differ, e.g. {bad[:6]}" if bad else ""))


def pg_compare(world: int):
    fast, ref = DIST_RESULTS.get((world, "fast")), DIST_RESULTS.get((world, "ref"))
    if fast is None or ref is None:
        return False, "missing results"
    cases = dist_cases(world)
    bad = [f"{c['id']} rank {r}" for i, c in enumerate(cases) for r in range(world)
           if not (c["op"] == "gather" and r != c["root"]) and not C.same(fast[r][i], ref[r][i])]
    return not bad, f"{len(cases)} dist calls x {world} ranks, fast vs ref" + (f"; {len(bad)} differ {bad[:6]}" if bad else "")


def pg_bench(c: Cluster, world: int, sizes, iters: int, floors):
    for size in sizes:
        times = c.run(J.bench_dist_all_reduce, size // 4, iters)
        _bench_row("dist (Work.wait)", world, size, times, floors.get(size))
    return True, "see BENCH lines"


# ================================================================================== failure

def pg_fail(c: Cluster, world: int, victim: int, point: str, alive: list[int]):
    """Kill ``victim`` at ``point`` inside an all_reduce of the ranks ``alive``; the others must return
    the model's result over the survivors, the mask must show it, and the next all_reduce must work."""
    members = list(alive)
    survivors = [r for r in alive if r != victim]
    seed = 11 if point == "after_data" else 12
    try:
        res = c.run(J.allreduce_under_fault, seed, victim, point, FAIL_NUMEL, ranks=alive, timeout_s=60)
    except ClusterError as exc:
        kinds = {r: e.kind for r, e in exc.errors.items()}
        if set(kinds) != {victim} or kinds[victim] != "died":
            return False, f"unexpected outcome {exc}"[:3000]
        res = exc.results
    mask = [1 if r in survivors else 0 for r in range(world)]
    inputs = [H.values("float32", FAIL_NUMEL, seed, r, specials=False) for r in range(world)]
    want = M.all_reduce(inputs, ReduceOp.SUM, mask)
    problems, secs = [], []
    for r in survivors:
        got, got_mask, seconds = res[r]
        secs.append(seconds)
        if got_mask.tolist() != mask:
            problems.append(f"rank {r} mask {got_mask.tolist()}")
        if not C.same(got, want[r]):
            problems.append(f"rank {r} result differs from the model over {survivors}")
    again = c.run(J.allreduce_after, seed + 100, FAIL_NUMEL, ranks=survivors)
    want2 = M.all_reduce([H.values("float32", FAIL_NUMEL, seed + 100, r, specials=False) for r in range(world)],
                         ReduceOp.SUM, mask)
    for r in survivors:
        if not C.same(again[r][0], want2[r]) or again[r][1].tolist() != mask:
            problems.append(f"rank {r}: the next all_reduce differs")
    alive[:] = survivors
    return not problems, (f"rank {victim} killed at {point} in an all_reduce of {FAIL_NUMEL} float32 over {members}; "
                          f"survivors {survivors} returned in {max(secs):.2f} s max with mask {mask}, bitwise = "
                          "model over the survivors; the next all_reduce too" if not problems else "; ".join(problems))


# ================================================================================== main

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--steps", default="plane,pg,fail,bench")
    ap.add_argument("--sizes-mib", default="64,128,256")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--fail-ranks", type=int, default=4)
    ap.add_argument("--out", default=".")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds: skip steps that would start later")
    ap.add_argument("--emulate", action="store_true",
                    help="no GPU: CPU tensors through the plane's CPU emulation (backend mooncake-cpu); no bench")
    args = ap.parse_args()
    if args.emulate:
        EMULATE["on"] = True
        os.environ.update(EMU_ENV)
    steps = set(args.steps.split(","))
    ranks = [int(r) for r in args.ranks.split(",") if r]
    sizes = [int(s) * MIB for s in args.sizes_mib.split(",") if s]
    os.makedirs(args.out, exist_ok=True)
    OUT["dir"] = args.out
    RESULTS["machine"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                          "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}
    log(f"machine: {RESULTS['machine']}")
    from mooncake.fast.cuda import pg_unavailable_reason
    reason = pg_unavailable_reason()
    log(f"CUDA PG plane: {'available' if reason is None else reason}")
    if reason is not None:
        record("plane available", False, reason)
        return 1
    t_start = time.monotonic()
    OUT["deadline"] = t_start + args.deadline
    for world in ranks:
        floors: dict = {}
        if steps & {"plane", "bench"}:
            c = plane_cluster(world)
            try:
                if "plane" in steps:
                    guarded(f"plane grid R={world}", plane_grid, c, world, need_s=20)
                    guarded(f"plane inactive rank R={world}", plane_inactive, c, world, need_s=10)
                    guarded(f"plane async + large R={world}", plane_async_large, c, world, need_s=10)
                if "bench" in steps and not EMULATE["on"]:
                    def _pb(c=c, world=world):
                        floors.update(plane_bench(c, world, sizes, args.iters))
                        return True, "see BENCH lines"
                    guarded(f"bench plane R={world}", _pb, need_s=15)
            finally:
                c.close()
        if steps & {"pg", "bench"}:
            c = dist_cluster(world, "fast")
            try:
                if "pg" in steps:
                    guarded(f"dist grid fast R={world}", pg_run, world, "fast", c, need_s=15)
                if "bench" in steps:
                    guarded(f"bench dist R={world}", pg_bench, c, world, sizes, args.iters, floors, need_s=15)
            finally:
                c.close()
        if "pg" in steps and time.monotonic() + 40 < OUT["deadline"]:
            c = dist_cluster(world, "ref")
            try:
                guarded(f"dist grid ref R={world}", pg_run, world, "ref", c, need_s=20)
            finally:
                c.close()
            guarded(f"dist fast == ref R={world}", pg_compare, world)
        log(f"--- R={world} done at {time.monotonic() - t_start:.0f} s")
    if "fail" in steps and time.monotonic() + 40 < OUT["deadline"]:
        world = args.fail_ranks
        c = dist_cluster(world, "fast", timeout_s=30.0)
        try:
            alive = list(range(world))
            guarded(f"failure R={world} (after_data)", pg_fail, c, world, 1, "after_data", alive, need_s=15)
            if len(alive) == world - 1:
                guarded(f"failure R={world - 1} of {world} (mid_transfer)", pg_fail, c, world, 2, "mid_transfer",
                        alive, need_s=15)
        finally:
            c.close()
    RESULTS["seconds"] = round(time.monotonic() - t_start, 1)
    save()
    log(f"pg_check: {len(RESULTS['checks']) - len(FAILED)} passed, {len(FAILED)} failed "
        f"in {RESULTS['seconds']} s" + (f": {FAILED}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
