#!/usr/bin/env python3
"""Where the time of a small all_reduce on the CUDA PG plane goes (a probe for the GPU machine).

For R ranks on the visible GPU(s): the median per-call time (slowest rank of each call) of all_reduce SUM
float32 of a few sizes through the plane alone (``op.wait``) and through ``dist.all_reduce``
(``Work.wait``); with ``--profile``, rank 0's cProfile of each loop.  ``--label`` names the run in the
output (run it once per tree or setting to compare).  Appends to ``<out>/latency.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import pg_cases as C  # noqa: E402
import pg_harness as H  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mooncake.model.reduce import ReduceOp  # noqa: E402
from mooncake.testing.cluster import Cluster  # noqa: E402

WARMUP = 20


def _timed(call, iters: int, profile: bool):
    from mooncake.testing.cluster import worker_context
    prof = cProfile.Profile() if profile and worker_context().rank == 0 else None
    times = []
    for i in range(iters + WARMUP):
        torch.cuda.synchronize()
        if prof is not None and i == WARMUP:
            prof.enable()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    text = ""
    if prof is not None:
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        text = buf.getvalue()
    return times, text


def plane_loop(prefix: str, numel: int, iters: int, profile: bool):
    plane = H._state[prefix]["plane"]
    x = torch.ones(numel, dtype=torch.float32, device="cuda")

    def one():
        H.drive(plane.all_reduce(H.context(prefix, "all_reduce"), x, ReduceOp.SUM))
    return _timed(one, iters, profile)


def dist_loop(numel: int, iters: int, profile: bool):
    x = torch.ones(numel, dtype=torch.float32, device="cuda")
    dist.barrier()
    return _timed(lambda: dist.all_reduce(x), iters, profile)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--sizes", default="8,65536,1048576", help="bytes, comma-separated")
    ap.add_argument("--label", default="")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import mooncake
    import pg_latency as P  # the workers import the probes by module name, not as __main__
    report = [f"# {args.label or 'run'}: mooncake from {os.path.dirname(mooncake.__file__)}"]

    def show(label, results):
        per_iter = sorted(max(ts) for ts in zip(*[r[0] for r in results]))
        line = (f"{args.label:12s} {label:24s} R={args.ranks}: median {statistics.median(per_iter) * 1e6:8.1f} us, "
                f"p10 {per_iter[len(per_iter) // 10] * 1e6:8.1f} us, p90 {per_iter[len(per_iter) * 9 // 10] * 1e6:8.1f} us")
        print(line, flush=True)
        report.append(line)
        if results[0][1]:
            report.append(results[0][1])

    sizes = [int(s) for s in args.sizes.split(",") if s]
    c = Cluster(args.ranks, "gloo", init=False, device="cuda", timeout_s=90)
    try:
        prefix = C.prefix("latency")
        c.run(H.open_plane, prefix, args.ranks, list(range(args.ranks)))
        for size in sizes:
            show(f"plane {size} B", c.run(P.plane_loop, prefix, max(size // 4, 1), args.iters, args.profile))
        c.run(H.close_plane, prefix)
    finally:
        c.close()
    c = Cluster(args.ranks, "mooncake", device="cuda", env={"MOONCAKE_IMPL": "fast"}, timeout_s=90)
    try:
        for size in sizes:
            show(f"dist {size} B", c.run(P.dist_loop, max(size // 4, 1), args.iters, args.profile))
    finally:
        c.close()
    with open(os.path.join(args.out, "latency.txt"), "a") as f:
        f.write("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
