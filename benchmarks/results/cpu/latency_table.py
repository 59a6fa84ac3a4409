"""Best-round and median ratios (fast / gloo) of 8 B .. 4 KiB all_reduce latency over the runs given."""
import json, statistics, sys
rows = {}
for path in sys.argv[1:]:
    for r in json.load(open(path))["results"]:
        for mode in ("in_place", "out_of_place"):
            rows.setdefault((r["size_bytes"], mode, r["backend"]), []).append(r[mode]["samples_us"])
sizes = sorted({k[0] for k in rows})
print("| size | mode | run | fast µs best / median | gloo µs best / median | ratio best | ratio median |")
print("|---:|---|---:|---:|---:|---:|---:|")
for s in sizes:
    for mode in ("in_place", "out_of_place"):
        f, g = rows[(s, mode, "mooncake-cpu:fast")], rows[(s, mode, "gloo")]
        for i, (fs, gs) in enumerate(zip(f, g), 1):
            fb, fm, gb, gm = min(fs), statistics.median(fs), min(gs), statistics.median(gs)
            print(f"| {s} B | {mode.replace('_', '-')} | {i} | {fb:.0f} / {fm:.0f} | {gb:.0f} / {gm:.0f} | "
                  f"{fb / gb:.2f} | {fm / gm:.2f} |")
