"""Randomized correctness soak: random collectives on ref and fast, every rank-result checked bitwise.

Each *round* starts a ``mooncake.testing.cluster.Cluster`` (2-4 ranks, ``init=False``) with one
implementation (``MOONCAKE_IMPL=ref`` or ``fast``, or ``fast-hosts2``: fast with the ranks on two emulated
hosts, rank r on host r % 2, so operations spanning both run the hybrid plane) and a random setting of the fast CPU plane's
thresholds (lowered through their environment overrides so that small tensors cross them: pipelined
ring all_reduce, non-temporal copies, chunking, lane segments outgrowing 64 KiB), compiled helpers
on or off (``MOONCAKE_FAST_CPU_NATIVE=0`` runs the torch fallbacks), and runs *segments* on it until
its time is up.  A segment (``mooncake.testing.soak.segment``) creates the default group with random
options (all-zero mask, all-ones, none, reserved capacity slots), maybe a partition into subgroups,
runs a random program of collectives (sync and bursts of async ops waited in a different order on
every rank, small random delays, every dtype and reduce op) and destroys the groups again.  Every
rank checks its own results bitwise against ``mooncake.model`` (inputs derive from the seed, the
segment, the op index and the rank).

    python benchmarks/correctness_soak.py --seed 1 --duration 60 --world-sizes 2,3,4 --impls ref,fast
    python benchmarks/correctness_soak.py --seed 7 --duration 540 --parallel 6 --impls fast --tag device

Prints a table and writes JSON under ``benchmarks/results/soak-correctness/``.  Exit status 1 if
any result was wrong or any segment failed (error or hang).  A wrong result's JSON entry names
(seed, segment, op index, rank, group) and the op; ``mooncake.testing.soak.segment`` with that seed and
segment on a cluster of the round's settings replays it.

``--in-order-impls ref`` makes those implementations wait for async ops in issue order: ref can
deadlock when two ranks wait for the ops of an async burst in different orders (found by this soak;
see benchmarks/results/soak-correctness/README.md), which would otherwise stop every ref round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

OUT_DIR = os.path.join(REPO, "benchmarks", "results", "soak-correctness")


def round_config(rng: random.Random, impls: list[str], worlds: list[int], native: str) -> dict:
    """One cluster's settings."""
    from mooncake.testing.impls import impl_env
    impl = rng.choice(impls)
    world = rng.choice(worlds)
    chunk = rng.choice((1024, 2048, 4096))
    env = {
        **impl_env(impl),
        "MOONCAKE_FAST_CPU_PIPELINE_MIN": str(rng.choice((2048, 4096, 8192))),
        "MOONCAKE_FAST_CPU_NT_MIN": str(rng.choice((8192, 16384, 32768))),
        "MOONCAKE_FAST_CPU_CHUNK": str(chunk),
        "MOONCAKE_FAST_CPU_RING_MIN_RANKS": str(rng.choice((2, 3))),
    }
    if native == "both":
        env["MOONCAKE_FAST_CPU_NATIVE"] = rng.choice(("1", "1", "1", "0"))
    else:
        env["MOONCAKE_FAST_CPU_NATIVE"] = "0" if native == "off" else "1"
    return {"impl": impl, "world": world, "env": env}


def run(args) -> dict:
    from mooncake.testing.cluster import Cluster, ClusterError
    from mooncake.testing import soak

    rng = random.Random(f"rounds/{args.seed}")
    impls = args.impls.split(",")
    in_order = [i for i in args.in_order_impls.split(",") if i]
    worlds = [int(w) for w in args.world_sizes.split(",")]
    deadline = time.monotonic() + args.duration
    rounds = []
    totals = {"segments": 0, "ops": 0, "rank_results": 0, "wrong": 0, "errors": 0}
    details, errors = [], []
    segment_index = 0
    # impls alternate so that each gets its share even in a short run
    impl_cycle = 0
    while time.monotonic() < deadline - 5:
        cfg = round_config(rng, [impls[impl_cycle % len(impls)]], worlds, args.native)
        impl_cycle += 1
        round_end = min(deadline, time.monotonic() + args.round_s)
        rec = {**cfg, "segments": 0, "ops": 0, "rank_results": 0, "wrong": 0, "errors": 0,
               "seconds": 0.0, "by_op": {}, "masks": {}}
        t0 = time.monotonic()
        try:
            cluster = Cluster(cfg["world"], backend="mooncake-cpu", init=False, env=cfg["env"],
                              timeout_s=args.timeout)
        except ClusterError as exc:
            rec["errors"] += 1
            errors.append({"round": len(rounds), "error": str(exc)[-4000:]})
            rounds.append(rec)
            continue
        try:
            while time.monotonic() < round_end - 1 or rec["segments"] == 0:
                spec = {"seed": args.seed, "segment": segment_index, "ops": args.segment_ops,
                        "env": cfg["env"], "timeout_s": args.timeout,
                        "shuffle_waits": cfg["impl"] not in in_order}
                segment_index += 1
                try:
                    res = cluster.run(soak.segment, spec, timeout_s=args.timeout * 2)
                except ClusterError as exc:
                    rec["errors"] += 1
                    errors.append({"round": len(rounds), "segment": spec["segment"], "error": str(exc)[-4000:]})
                    cluster.restart()
                    continue
                rec["segments"] += 1
                for r in res:
                    rec["ops"] += r["ops"]
                    rec["rank_results"] += r["rank_results"]
                    rec["wrong"] += r["wrong"]
                    for name, (n, bad) in r["by_op"].items():
                        cur = rec["by_op"].setdefault(name, [0, 0])
                        cur[0] += n
                        cur[1] += bad
                    details.extend(r["details"])
                    if r["error"]:
                        rec["errors"] += 1
                        errors.append({"round": len(rounds), "segment": spec["segment"], "error": r["error"]})
                rec["masks"][res[0]["mask"]] = rec["masks"].get(res[0]["mask"], 0) + 1
                if args.max_segments and segment_index >= args.max_segments:
                    break
        finally:
            cluster.close()
        rec["seconds"] = round(time.monotonic() - t0, 2)
        rounds.append(rec)
        if not args.quiet:
            print(f"round {len(rounds) - 1}: {cfg['impl']} world {cfg['world']} native "
                  f"{cfg['env']['MOONCAKE_FAST_CPU_NATIVE']}: {rec['segments']} segments, {rec['ops']} ops, "
                  f"{rec['rank_results']} rank-results, {rec['wrong']} wrong, {rec['errors']} errors "
                  f"({rec['seconds']:.0f} s)", flush=True)
        if args.max_segments and segment_index >= args.max_segments:
            break
    for rec in rounds:
        totals["segments"] += rec["segments"]
        for key in ("ops", "rank_results", "wrong", "errors"):
            totals[key] += rec[key]
    return {"seed": args.seed, "rounds": rounds, "totals": totals, "details": details[:50], "errors": errors[:20]}


def machine() -> dict:
    return {"host": socket.gethostname(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def table(report: dict) -> str:
    rows = {}
    for rec in report["rounds"]:
        key = (rec["impl"], rec["world"])
        cur = rows.setdefault(key, {"segments": 0, "ops": 0, "rank_results": 0, "wrong": 0, "errors": 0,
                                    "seconds": 0.0})
        for f in cur:
            cur[f] += rec[f]
    lines = [f"{'impl':5} {'world':>5} {'segments':>9} {'ops':>10} {'rank-results':>13} {'wrong':>6} "
             f"{'errors':>6} {'rank-results/s':>15}"]
    for (impl, world), cur in sorted(rows.items()):
        rate = cur["rank_results"] / cur["seconds"] if cur["seconds"] else 0.0
        lines.append(f"{impl:5} {world:>5} {cur['segments']:>9} {cur['ops']:>10} {cur['rank_results']:>13} "
                     f"{cur['wrong']:>6} {cur['errors']:>6} {rate:>15.0f}")
    t = report["totals"]
    lines.append(f"{'all':5} {'':>5} {t['segments']:>9} {t['ops']:>10} {t['rank_results']:>13} {t['wrong']:>6} "
                 f"{t['errors']:>6}")
    return "\n".join(lines)


def merge(reports: list[dict]) -> dict:
    out = {"seeds": [r["seed"] for r in reports], "rounds": [], "details": [], "errors": [],
           "totals": {"segments": 0, "ops": 0, "rank_results": 0, "wrong": 0, "errors": 0}}
    for r in reports:
        out["rounds"].extend(r["rounds"])
        out["details"].extend(r["details"])
        out["errors"].extend(r["errors"])
        for k in out["totals"]:
            out["totals"][k] += r["totals"][k]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=60.0, help="seconds in all (cluster start-ups included)")
    p.add_argument("--world-sizes", default="2,3,4")
    p.add_argument("--impls", default="ref,fast", help="comma-separated: ref, fast, fast-hosts2")
    p.add_argument("--native", choices=("both", "on", "off"), default="both",
                   help="fast plane's compiled helpers: on, off (torch fallbacks), or both (per round)")
    p.add_argument("--segment-ops", type=int, default=150, help="collectives per segment (per group)")
    p.add_argument("--round-s", type=float, default=60.0, help="seconds per cluster before a fresh one starts")
    p.add_argument("--max-segments", type=int, default=0, help="stop after this many segments (0: by time)")
    p.add_argument("--in-order-impls", default="", help="impls that wait for async ops in issue order "
                   "(comma-separated; e.g. ref, see the module docstring)")
    p.add_argument("--timeout", type=float, default=60.0, help="group timeout and per-segment deadline base")
    p.add_argument("--parallel", type=int, default=1, help="independent soak processes (seeds seed, seed+1, ...)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/soak-correctness/<tag>.json)")
    p.add_argument("--tag", default="local")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    started = time.time()
    if args.parallel > 1:
        tmp = tempfile.mkdtemp(prefix="soak-")
        procs = []
        for i in range(args.parallel):
            path = os.path.join(tmp, f"part{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--seed", str(args.seed + i), "--duration",
                   str(args.duration), "--world-sizes", args.world_sizes, "--impls", args.impls, "--native",
                   args.native, "--segment-ops", str(args.segment_ops), "--round-s", str(args.round_s),
                   "--timeout", str(args.timeout), "--in-order-impls", args.in_order_impls, "--out", path, "--tag", f"{args.tag}-part{i}", "--quiet"]
            procs.append((path, subprocess.Popen(cmd)))
        parts = []
        for path, proc in procs:
            proc.wait()
            if os.path.exists(path):
                with open(path) as f:
                    parts.append(json.load(f))
        report = merge(parts)
        report["parallel"] = args.parallel
    else:
        report = run(args)
    report["machine"] = machine()
    report["args"] = vars(args)
    report["wall_s"] = round(time.time() - started, 1)
    out = args.out or os.path.join(OUT_DIR, f"{args.tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    if not args.quiet or args.parallel > 1:
        print(table(report))
        for d in report["details"][:5]:
            print("WRONG:", json.dumps(d))
        for e in report["errors"][:3]:
            print("ERROR:", json.dumps(e)[:2000])
        print(f"wrote {out}")
    t = report["totals"]
    return 0 if t["wrong"] == 0 and t["errors"] == 0 and t["rank_results"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
