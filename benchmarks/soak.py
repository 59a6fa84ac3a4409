"""Soak: random kill / replace cycles under a steady all_reduce load, with a summary.

Each cycle: every rank runs ``--ops`` all_reduces; a random victim SIGKILLs itself at a random op
and fault point; survivors must return results identical to each other and equal to the model
fold (over the survivors, or over everyone for an op that stood), with the victim masked out.  A
replacement is then started with ``is_extension=True``; the survivors poll ``get_peer_state`` and
``recover_ranks`` it; one all_reduce over the full group is checked.  The Store lives in this
process, so any rank (rank 0 included) may be the victim.

    python benchmarks/soak.py --cycles 100 --ranks 4 --out benchmarks/results/soak

Prints a summary (cycles, detection and rejoin p50/p99, hangs, wrong results) and writes it as
JSON.  Detection = the latency of the op during which the victim died; rejoin = from spawning the
replacement until the first full-group all_reduce returned (process start included) and, separately,
``join_group``'s own time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "benchmarks"), REPO]

import torch  # noqa: E402

import soak_jobs as jobs  # noqa: E402
from mooncake.model.collectives import all_reduce  # noqa: E402
from mooncake.model.reduce import ReduceOp  # noqa: E402
from mooncake.testing.cluster import Cluster, ClusterError  # noqa: E402

POINTS = ("before_send", "mid_transfer", "after_data")


def fold(seed: int, op: int, mask: list[int]) -> torch.Tensor:
    inputs = [jobs.input_of(seed, op, r) for r in range(len(mask))]
    return next(t for t in all_reduce(inputs, ReduceOp.SUM, mask) if t is not None)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def check_load(results, survivors, seed, ranks) -> tuple[int, float | None]:
    """Wrong / divergent results of one load run; the failing op's latency."""
    wrong, detection = 0, None
    num_ops = len(results[survivors[0]])
    for op in range(num_ops):
        outs = [results[r][op] for r in survivors]
        first = outs[0][0]
        if any(not torch.equal(o[0].view(torch.int32), first.view(torch.int32)) for o in outs):
            wrong += 1
            continue
        before, after = outs[0][1].tolist(), outs[0][2].tolist()
        if any(o[2].tolist() != after for o in outs):
            wrong += 1
            continue
        candidates = [fold(seed, op, after)] + ([fold(seed, op, before)] if before != after else [])
        if not any(torch.equal(first.view(torch.int32), c.view(torch.int32)) for c in candidates):
            wrong += 1
        if before != after:
            detection = max(o[3] for o in outs)
    return wrong, detection


def tally(exc: ClusterError, hangs: int, wrong: int, where: str, cluster: Cluster) -> tuple[int, int]:
    """Count an unexpected run failure (a timeout is a hang, an exception a wrong result), report
    it and restart the cluster."""
    print(f"{where}: {exc}", file=sys.stderr)
    cluster.restart()
    return (hangs + sum(e.kind == "timeout" for e in exc.errors.values()),
            wrong + sum(e.kind == "raised" for e in exc.errors.values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--ops", type=int, default=20, help="all_reduces per cycle")
    parser.add_argument("--timeout", type=float, default=20.0, help="group timeout, seconds")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="stop starting cycles after this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--impl", default="ref", help="MOONCAKE_IMPL of the workers")
    parser.add_argument("--out", default=None, help="directory for summary.json")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    env = {"MOONCAKE_IMPL": args.impl}
    options = ("soak_jobs.make_options", (), {})
    detections, rejoins, joins = [], [], []
    hangs = wrong = cycles = 0
    started = time.monotonic()
    cluster = Cluster(args.ranks, "mooncake-cpu", options=options, timeout_s=args.timeout, env=env)
    try:
        while cycles < args.cycles and time.monotonic() - started < 60 * args.max_minutes:
            seed = args.seed * 1_000 + cycles
            victim = rng.randrange(args.ranks)
            point = rng.choice(POINTS)
            kill_at = rng.randrange(args.ops)
            survivors = [r for r in range(args.ranks) if r != victim]
            try:
                results = cluster.run(jobs.load, seed, args.ops, victim, point, kill_at)
                wrong += 1  # the victim did not die: the fault point was never reached
            except ClusterError as exc:
                if any(e.kind != "died" or r != victim for r, e in exc.errors.items()):
                    hangs, wrong = tally(exc, hangs, wrong, f"cycle {cycles}", cluster)
                    cycles += 1
                    continue
                results = exc.results
            bad, detection = check_load(results, survivors, seed, args.ranks)
            wrong += bad
            if detection is not None:
                detections.append(detection)
            spawned = time.monotonic()
            cluster.spawn(victim, options=("soak_jobs.make_options", (), {"extension_ranks": (victim,)}))
            calls = {r: (jobs.admit, (victim, seed + 500_000), {}) for r in survivors}
            calls[victim] = (jobs.join, (seed + 500_000,), {})
            try:
                joined = cluster.run_each(calls)
            except ClusterError as exc:
                hangs, wrong = tally(exc, hangs, wrong, f"cycle {cycles} (rejoin)", cluster)
                cycles += 1
                continue
            rejoins.append(time.monotonic() - spawned)
            joins.append(joined[victim][2])
            full = fold(seed + 500_000, 0, [1] * args.ranks)
            for r in range(args.ranks):
                if not torch.equal(joined[r][0].view(torch.int32), full.view(torch.int32)) \
                        or joined[r][1].tolist() != [1] * args.ranks:
                    wrong += 1
            cycles += 1
            print(f"cycle {cycles:4d}: victim {victim} at op {kill_at:2d} {point:13s} "
                  f"detect {detection if detection is None else round(detection * 1e3, 1)} ms, "
                  f"rejoin {rejoins[-1]:.2f} s (join_group {joins[-1] * 1e3:.0f} ms)", flush=True)
    finally:
        cluster.close()

    summary = {
        "cycles": cycles, "ranks": args.ranks, "ops_per_cycle": args.ops, "impl": args.impl,
        "detection_ms_p50": quantile(detections, 0.5) * 1e3, "detection_ms_p99": quantile(detections, 0.99) * 1e3,
        "rejoin_s_p50": quantile(rejoins, 0.5), "rejoin_s_p99": quantile(rejoins, 0.99),
        "join_group_ms_p50": quantile(joins, 0.5) * 1e3, "join_group_ms_p99": quantile(joins, 0.99) * 1e3,
        "hangs": hangs, "wrong_or_divergent": wrong, "minutes": (time.monotonic() - started) / 60,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    print("\nsoak summary")
    for key, value in summary.items():
        print(f"  {key:20s} {value:.2f}" if isinstance(value, float) else f"  {key:20s} {value}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if hangs == 0 and wrong == 0 and cycles > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
