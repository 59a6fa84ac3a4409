#!/usr/bin/env python3
"""Profiles of the fast CUDA plane where it misses its latency and bandwidth goals (GPU machine, ranks under
MPS, backend ``mooncake``, ``MOONCAKE_IMPL=fast``).  Each case runs on every rank under ``torch.profiler``
(CUPTI: every kernel and copy on the device, with its duration) and, on rank 0, ``cProfile`` (the host's
Python), and reports per operation: the wall time, the time the GPU spent in our kernels and copies, and the
host functions that took the rest.

    python tests/fast_cuda/pg_profile.py --out gpu-out/profile

Cases: ``graph`` (R = 8: OPS all_reduces of 8 B captured in one CUDA graph, replayed), ``eager`` (R = 8: eager
8 B all_reduce), ``large`` (R = 4: eager 256 MiB all_reduce).  Writes ``<out>/<case>.txt`` (the tables) and
``<out>/profile.json`` (the numbers).

``trace2`` / ``trace8`` (R = 2 / 8): the graph case with no profiler attached but the kernels' own step times
(``MOONCAKE_FAST_CUDA_TRACE=1``): every rank's GPU writes its global timer at each step of every op, one clock
for all ranks of the GPU, so the table shows where an op's time goes across ranks: the gap between one
captured kernel's end and the next one's start, each step's duration, and how far apart the ranks reach a step.
``etrace2`` / ``etrace8``: the same for eager 8 B ``dist.all_reduce`` (a synchronisation after each call), plus
every rank's host clock at each call's start, return and synchronisation: how long the host takes per call and
how far apart the ranks start.  ``ehost2`` / ``ehost8``: eager 8 B ``dist.all_reduce`` with each layer of the
host's path timed on every rank (``EAGER_ALL_REDUCE``, or ``QUICK_ALL_REDUCE`` while the quick lane is on)
and each call's wall, CPU (this thread's, the other threads') and context switches.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mooncake.testing.cluster import Cluster  # noqa: E402
from mooncake.testing.layers import eager_layers  # noqa: E402

OPS = 16
WARMUP = 5


def _device_table(prof) -> tuple[list[dict], str]:
    """Device activities (kernels, copies, sets) by name: count and total microseconds, and the table.  Host
    ops (``aten::*``) and runtime calls (``cuda*``) are left out: the profiler charges them the device time of
    the activities they launched, which would count those twice."""
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "self_cuda_time_total", 0)
        if dev_us > 0 and not e.key.startswith(("aten::", "cuda")):
            rows.append({"name": e.key[:90], "count": e.count, "device_us": round(dev_us, 1)})
    rows.sort(key=lambda r: -r["device_us"])
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
    except (AttributeError, KeyError):  # torch before the device_* names
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    return rows, table


def _host_table(pr: cProfile.Profile) -> str:
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
    return s.getvalue()


def _small_graph():
    """OPS all_reduces of 8 B captured in one CUDA graph (pg_graph's capture); the graph and its tensors."""
    from pg_graph import _captured
    bufs = [torch.ones(2, device="cuda") for _ in range(OPS)]

    def body():
        for b in bufs:
            dist.all_reduce(b)

    return _captured(body), bufs


def profile_case(case: str, iters: int) -> dict:
    """Run ``case`` on this rank under the profilers; returns wall seconds per op, the device table and, on
    rank 0, the host profile."""
    from torch.profiler import ProfilerActivity, profile
    rank = dist.get_rank()
    if case == "large":
        x = torch.ones((256 << 20) // 4, dtype=torch.float32, device="cuda")
    else:
        x = torch.ones(2, dtype=torch.float32, device="cuda")
    graph, _bufs = _small_graph() if case == "graph" else (None, None)

    def one():
        if graph is not None:
            graph.replay()
        else:
            dist.all_reduce(x)

    for _ in range(WARMUP):
        one()
    torch.cuda.synchronize()
    dist.barrier()
    pr = cProfile.Profile() if rank == 0 else None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        if pr is not None:
            pr.enable()
        t0 = time.perf_counter()
        for _ in range(iters):
            one()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if pr is not None:
            pr.disable()
    ops = iters * (OPS if graph is not None else 1)
    rows, table = _device_table(prof)
    dist.barrier()
    return {"wall_us_per_op": wall / ops * 1e6, "ops": ops, "device": rows, "table": table,
            "host": _host_table(pr) if pr is not None else None}


def eager_trace_case(iters: int) -> dict:
    """Eager 8 B ``dist.all_reduce`` unprofiled, the kernels' step times on (TRACE_ENV), a device
    synchronisation after each call as pg_graph's eager loop: wall seconds per op, this rank's trace records
    and, per call, the host's monotonic clock (shared by the ranks of the host) at its start, at the return of
    ``dist.all_reduce`` and after the synchronisation."""
    x = torch.ones(2, dtype=torch.float32, device="cuda")
    for _ in range(WARMUP):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.barrier()
    host = []
    t0 = time.perf_counter()
    for _ in range(iters):
        a = time.monotonic_ns()
        dist.all_reduce(x)
        b = time.monotonic_ns()
        torch.cuda.synchronize()
        host.append((a, b, time.monotonic_ns()))
    wall = time.perf_counter() - t0
    records = dist.group.WORLD._plane.g.dev.trace_records()
    dist.barrier()
    return {"wall_us_per_op": wall / iters * 1e6, "records": records, "host": host}


def eager_host_case(iters: int) -> dict:
    """Eager 8 B ``dist.all_reduce`` with every layer of the host's path timed (``eager_layers``) and each call's
    costs (wall, this thread's CPU, the other threads' CPU, context switches), a device synchronisation after
    each call as pg_graph's eager loop (timed apart)."""
    from mooncake.testing.layers import LayerTimer, thread_cpu_ns, thread_cpu_since
    timer = LayerTimer(eager_layers(dist.group.WORLD))
    timer.install()
    gpu = torch.cuda.is_available()  # else the plane's CPU emulation (tests)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    x = torch.ones(2, dtype=torch.float32, device="cuda" if gpu else "cpu")
    for _ in range(WARMUP):
        dist.all_reduce(x)
    sync()
    dist.barrier()
    timer.clear()
    syncs = []
    threads_before = thread_cpu_ns()
    t0 = time.perf_counter()
    for _ in range(iters):
        with timer.call():
            dist.all_reduce(x)
        a = time.perf_counter_ns()
        sync()
        syncs.append((time.perf_counter_ns() - a) / 1e3)
    wall = time.perf_counter() - t0
    report = timer.report(iters)
    report["threads_cpu_us"] = thread_cpu_since(threads_before, iters)
    report["calls"]["synchronize_us"] = {"median": sorted(syncs)[len(syncs) // 2], "mean": sum(syncs) / len(syncs)}
    dev = dist.group.WORLD._plane.g.dev
    report["outcomes"] = {**dev.outcomes, "quick": dev.quick_posts, "handed over": dev.quick_handovers}
    dist.barrier()
    return {"wall_us_per_op": wall / iters * 1e6, **report}


def analyse_layers(per_rank: list[dict]) -> tuple[dict, str]:
    """Per layer and per call cost: rank 0, the median and the largest over ranks (µs per call)."""
    rows, lines = {}, [f"{'layer (mean us per call)':44s} {'rank 0':>8s} {'median':>8s} {'max':>8s}"]
    for label in per_rank[0]["layers_us"]:
        xs = [r["layers_us"][label] for r in per_rank]
        rows[label] = [round(xs[0], 2), round(_pct(xs, 50), 2), round(max(xs), 2)]
        lines.append(f"{label:44s} {xs[0]:8.2f} {_pct(xs, 50):8.2f} {max(xs):8.2f}")
    lines.append(f"\n{'per call (median over calls)':44s} {'rank 0':>8s} {'median':>8s} {'max':>8s}")
    for name in per_rank[0]["calls"]:
        xs = [r["calls"][name]["median"] for r in per_rank]
        rows[name] = [round(xs[0], 2), round(_pct(xs, 50), 2), round(max(xs), 2)]
        lines.append(f"{name:44s} {xs[0]:8.2f} {_pct(xs, 50):8.2f} {max(xs):8.2f}")
    lines.append(f"\n{'CPU per call by thread (us)':44s} {'rank 0':>8s} {'median':>8s} {'max':>8s}")
    for name in sorted({n for r in per_rank for n in r["threads_cpu_us"]},
                       key=lambda n: -per_rank[0]["threads_cpu_us"].get(n, 0.0)):
        xs = [r["threads_cpu_us"].get(name, 0.0) for r in per_rank]
        rows[f"thread {name}"] = [round(xs[0], 2), round(_pct(xs, 50), 2), round(max(xs), 2)]
        lines.append(f"{'thread ' + name:44s} {xs[0]:8.2f} {_pct(xs, 50):8.2f} {max(xs):8.2f}")
    return rows, "\n".join(lines)


def analyse_host(per_rank: list[list[tuple[int, int, int]]]) -> tuple[dict, str]:
    """Per-call host spans (µs, median and p90 over calls) from every rank's (start, returned, synced)
    monotonic times, calls matched by position."""
    spans: dict[str, list[float]] = {"call: start to return (slowest rank)": [],
                                     "call: start to return (every rank)": [],
                                     "ranks apart at the call's start": [],
                                     "ranks apart at return": [],
                                     "return to synchronised (every rank)": [],
                                     "period: one call's start to the next (rank 0)": []}
    for i, calls in enumerate(zip(*per_rank)):
        starts = [c[0] for c in calls]
        rets = [c[1] for c in calls]
        spans["call: start to return (slowest rank)"].append(max(c[1] - c[0] for c in calls) / 1e3)
        spans["call: start to return (every rank)"] += [(c[1] - c[0]) / 1e3 for c in calls]
        spans["ranks apart at the call's start"].append((max(starts) - min(starts)) / 1e3)
        spans["ranks apart at return"].append((max(rets) - min(rets)) / 1e3)
        spans["return to synchronised (every rank)"] += [(c[2] - c[1]) / 1e3 for c in calls]
        if i + 1 < len(per_rank[0]):
            spans["period: one call's start to the next (rank 0)"].append((per_rank[0][i + 1][0] - calls[0][0]) / 1e3)
    return _spans_table(spans)


def trace_case(iters: int) -> dict:
    """The graph case unprofiled, with the kernels' step times on (TRACE_ENV): wall seconds per op and this
    rank's trace records."""
    graph, _bufs = _small_graph()
    for _ in range(WARMUP):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    records = dist.group.WORLD._plane.g.dev.trace_records()
    dist.barrier()
    return {"wall_us_per_op": wall / (iters * OPS) * 1e6, "records": records}


MARKS = ("start", "go", "released", "published", "peers_published", "read", "finished")
SPANS = (  # (name, from mark, to mark) within one rank's op
    ("go: own count / trouble / epoch words", "start", "go"),
    ("lane released by every peer", "go", "released"),
    ("copy in, fence, publish", "released", "published"),
    ("wait for every peer's publish", "published", "peers_published"),
    ("fingerprint, hold, read + fold", "peers_published", "read"),
    ("fence, free, done, count", "read", "finished"),
    ("whole kernel", "start", "finished"),
)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def _spans_table(spans: dict[str, list[float]]) -> tuple[dict, str]:
    """Median, p90 and count of each span (µs), and the same as text lines."""
    rows = {name: {"p50_us": round(_pct(v, 50), 3), "p90_us": round(_pct(v, 90), 3), "n": len(v)}
            for name, v in spans.items()}
    lines = [f"{name:50s} {r['p50_us']:8.2f} {r['p90_us']:8.2f} {r['n']:6d}" for name, r in rows.items()]
    return rows, "\n".join(lines) + "\n"


def analyse_trace(per_rank: list[list[dict]], ops_per_replay: int = OPS) -> tuple[dict, str]:
    """Per-op spans (µs, median and p90 over ranks and ops) from the ranks' trace records, matched by key;
    ``ops_per_replay``: captured ops per graph (the gap to the next op is counted within one replay), 0 for
    eager ops (every next key)."""
    m = {name: i for i, name in enumerate(MARKS)}
    by_key = [{r["key"]: r for r in recs} for recs in per_rank]
    common = sorted(set.intersection(*(set(k) for k in by_key)))
    done = [k for k in common if all(bk[k]["ns"][m["finished"]] for bk in by_key)]
    spans: dict[str, list[float]] = {name: [] for name, _, _ in SPANS}
    spans["gap: previous kernel's end to this one's start"] = []
    spans["period: start to the next op's start"] = []
    spans["ranks apart at start"] = []
    spans["ranks apart at publish"] = []
    spans["last publisher's wait for the others"] = []
    ghz = []
    for k in done:
        for bk in by_key:
            ns, clk = bk[k]["ns"], bk[k]["clock"]
            for name, a, b in SPANS:
                spans[name].append((ns[m[b]] - ns[m[a]]) / 1e3)
            if ns[m["finished"]] > ns[m["start"]]:
                ghz.append((clk[m["finished"]] - clk[m["start"]]) / (ns[m["finished"]] - ns[m["start"]]))
            nxt = bk.get(k + 1)
            if nxt is not None and (not ops_per_replay or (k + 1) % ops_per_replay != 0):  # same replay
                spans["gap: previous kernel's end to this one's start"].append(
                    (nxt["ns"][m["start"]] - ns[m["finished"]]) / 1e3)
                spans["period: start to the next op's start"].append((nxt["ns"][m["start"]] - ns[m["start"]]) / 1e3)
        starts = [bk[k]["ns"][m["start"]] for bk in by_key]
        pubs = [bk[k]["ns"][m["published"]] for bk in by_key]
        spans["ranks apart at start"].append((max(starts) - min(starts)) / 1e3)
        spans["ranks apart at publish"].append((max(pubs) - min(pubs)) / 1e3)
        last = max(range(len(by_key)), key=lambda i: pubs[i])
        lk = by_key[last][k]["ns"]
        spans["last publisher's wait for the others"].append((lk[m["peers_published"]] - lk[m["published"]]) / 1e3)
    rows, text = _spans_table(spans)
    summary = {"ops_matched": len(done), "sm_clock_ghz_p50": round(_pct(ghz, 50), 3), "spans": rows}
    return summary, f"{'span':50s} {'p50 us':>8s} {'p90 us':>8s} {'n':>6s}\n" + text


CASES = {"graph": (8, 20), "eager": (8, 100), "large": (4, 8), "trace2": (2, 200), "trace8": (8, 200),
         "etrace2": (2, 300), "etrace8": (8, 300), "ehost2": (2, 1000), "ehost8": (8, 1000)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="graph,eager,large")
    ap.add_argument("--out", default=".")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set in every rank's environment (repeatable), e.g. a knob to compare")
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    os.makedirs(args.out, exist_ok=True)
    import pg_profile as P  # the workers import the probes by module name
    record = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "env": extra, "cases": {}}
    for case in args.cases.split(","):
        ranks, iters = CASES[case]
        env = {"MOONCAKE_IMPL": "fast", **extra}
        traced = "trace" in case
        if case.startswith("ehost"):
            c = Cluster(ranks, "mooncake", device="cuda", timeout_s=180, env=env)
            try:
                res = c.run(P.eager_host_case, iters, timeout_s=300)
            finally:
                c.close()
            rows, table = analyse_layers(res)
            summary = {"ranks": ranks, "wall_us_per_op": round(max(r["wall_us_per_op"] for r in res), 2),
                       "outcomes": [r["outcomes"] for r in res], "rows": rows}
            record["cases"][case] = summary
            print(case, json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)
            print(table, flush=True)
            with open(os.path.join(args.out, f"{case}.txt"), "w") as f:
                f.write(f"{case}: R = {ranks}, eager all_reduces of 8 B, every layer timed, "
                        f"{summary['wall_us_per_op']} us per op (wall)\n\n{table}\n")
            continue
        if traced:
            env["MOONCAKE_FAST_CUDA_TRACE"] = "1"
        c = Cluster(ranks, "mooncake", device="cuda", timeout_s=180, env=env)
        try:
            if traced:
                res = c.run(P.eager_trace_case if case.startswith("e") else P.trace_case, iters, timeout_s=300)
            else:
                res = c.run(P.profile_case, case, iters, timeout_s=300)
        finally:
            c.close()
        if traced:
            eager = case.startswith("e")
            summary, table = analyse_trace([r["records"] for r in res], 0 if eager else OPS)
            summary.update(ranks=ranks, wall_us_per_op=round(max(r["wall_us_per_op"] for r in res), 2))
            if eager:
                summary["host"], host_table = analyse_host([r["host"] for r in res])
                table += "\nhost (monotonic clock, per call)\n" + host_table
            record["cases"][case] = summary
            print(case, json.dumps({k: v for k, v in summary.items() if k != "spans"}), flush=True)
            print(table, flush=True)
            with open(os.path.join(args.out, f"{case}.txt"), "w") as f:
                what = "eager all_reduces of 8 B" if eager else f"{OPS} all_reduces of 8 B per graph, {iters} replays"
                f.write(f"{case}: R = {ranks}, {what}, {summary['wall_us_per_op']} us per op (wall)\n\n{table}")
            continue
        wall = max(r["wall_us_per_op"] for r in res)
        ops = res[0]["ops"]
        device = {row["name"]: row for row in res[0]["device"]}
        ours = sum(row["device_us"] for row in res[0]["device"])
        summary = {"ranks": ranks, "ops": ops, "wall_us_per_op": round(wall, 2),
                   "rank0_device_us_per_op": round(ours / ops, 2),
                   "rank0_device_by_name_us_per_op": {k: round(v["device_us"] / ops, 2) for k, v in device.items()}}
        record["cases"][case] = summary
        print(case, json.dumps(summary), flush=True)
        with open(os.path.join(args.out, f"{case}.txt"), "w") as f:
            f.write(f"{case}: {json.dumps(summary, indent=1)}\n\n== rank 0 device events (torch.profiler)\n")
            f.write(res[0]["table"])
            f.write("\n\n== rank 0 host (cProfile, cumulative)\n")
            f.write(res[0]["host"] or "")
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
