#!/usr/bin/env python3
"""Markdown tables for README.md from the pgbench JSON files that run.sh writes.

Usage: python benchmarks/results/cpu/summarize.py [dir]   (default: this file's directory)
       python benchmarks/results/cpu/summarize.py --goals RUN.json...   (the goals table of each run)

* ``goals``: all_reduce float32 with 2 ranks, mooncake-cpu fast against gloo, per size: time (best and
  median round) and the goal's ratio: latency (fast / gloo) up to 4 KiB, bus bandwidth (fast / gloo)
  from 1 MiB.
* ``collectives``: per collective, the size where fast is worst against gloo (busbw ratio, best
  round), in-place and out-of-place.
* ``scaling``: all_reduce time of fast and gloo with 2, 3 and 4 ranks at a few sizes.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

FAST, GLOO = "mooncake-cpu:fast", "gloo"
KIB, MIB = 1024, 1024 * 1024


def load(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["results"]


def rows(results: list[dict], collective: str, backend: str) -> dict[int, dict]:
    return {r["size_bytes"]: r for r in results if r["collective"] == collective and r["backend"] == backend}


def size_name(n: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def median_us(case: dict) -> float:
    return statistics.median(case["samples_us"])


def goals(results: list[dict]) -> str:
    fast, gloo = rows(results, "all_reduce", FAST), rows(results, "all_reduce", GLOO)
    out = ["| size | mode | fast µs (best / median) | gloo µs (best / median) | goal | best-round ratio | median ratio | met |",
           "|---:|---|---:|---:|---|---:|---:|---|"]
    for size in sorted(fast):
        if KIB * 4 < size < MIB:
            continue
        for mode in ("in_place", "out_of_place"):
            f, g = fast[size][mode], gloo[size][mode]
            if size <= 4 * KIB:
                goal, best, med = "latency ≤ 0.3x", f["time_us"] / g["time_us"], median_us(f) / median_us(g)
                met = best <= 0.3
            else:
                goal, best, med = "busbw ≥ 3x", g["time_us"] / f["time_us"], median_us(g) / median_us(f)
                met = best >= 3.0
            out.append(f"| {size_name(size)} | {mode.replace('_', '-')} | {f['time_us']:.0f} / {median_us(f):.0f} | "
                       f"{g['time_us']:.0f} / {median_us(g):.0f} | {goal} | {best:.2f} | {med:.2f} | "
                       f"{'yes' if met else '**no**'} |")
    return "\n".join(out)


def collectives(results: list[dict]) -> str:
    names = sorted({r["collective"] for r in results}, key=lambda c: [r["collective"] for r in results].index(c))
    out = ["| collective | worst in-place (size: busbw fast / gloo) | worst out-of-place | slower than gloo anywhere |",
           "|---|---|---|---|"]
    for c in names:
        fast, gloo = rows(results, c, FAST), rows(results, c, GLOO)
        cells, slower = [], []
        for mode in ("in_place", "out_of_place"):
            ratios = {s: gloo[s][mode]["time_us"] / fast[s][mode]["time_us"] for s in fast
                      if s in gloo and fast[s][mode] and gloo[s][mode] and fast[s][mode]["wrong"] != -1}
            if not ratios:
                cells.append("n/a")
                continue
            worst = min(ratios, key=ratios.get)
            cells.append(f"{size_name(worst)}: {ratios[worst]:.2f}x")
            slower += [f"{size_name(s)} ({mode.replace('_', '-')})" for s, x in sorted(ratios.items()) if x < 1.0]
        out.append(f"| {c} | {cells[0]} | {cells[1]} | {', '.join(slower) if slower else 'no'} |")
    return "\n".join(out)


def scaling(paths: dict[int, str]) -> str:
    data = {g: load(p) for g, p in paths.items()}
    sizes = [8, 4 * KIB, 256 * KIB, 2 * MIB, 16 * MIB, 64 * MIB]
    head = " | ".join(f"{g} ranks" for g in data)
    out = [f"| size | backend | {head} | fast: {max(data)} ranks / 2 ranks |", "|---:|---|" + "---:|" * (len(data) + 1)]
    for size in sizes:
        for backend in (FAST, GLOO):
            t = {g: rows(res, "all_reduce", backend).get(size) for g, res in data.items()}
            if any(v is None for v in t.values()):
                continue
            times = {g: v["in_place"]["time_us"] for g, v in t.items()}
            growth = f"{times[max(times)] / times[min(times)]:.1f}x" if backend == FAST else ""
            out.append(f"| {size_name(size)} | {backend} | " + " | ".join(f"{times[g]:.0f} µs" for g in data)
                       + f" | {growth} |")
    return "\n".join(out)


def main() -> None:
    if sys.argv[1:2] == ["--goals"]:
        for path in sys.argv[2:]:
            print(f"#### {os.path.basename(path)}\n\n{goals(load(path))}\n")
        return
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    print("### all_reduce float32, 2 ranks: the goals\n")
    print(goals(load(os.path.join(d, "all_reduce_2ranks.json"))))
    print("\n### every collective, 2 ranks: fast against gloo\n")
    print(collectives(load(os.path.join(d, "all_collectives_2ranks.json"))))
    print("\n### scaling: all_reduce in-place, best round\n")
    print(scaling({g: os.path.join(d, f"scaling_{g}ranks.json") for g in (2, 3, 4)}))


if __name__ == "__main__":
    main()
