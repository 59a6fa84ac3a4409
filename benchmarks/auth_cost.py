#!/usr/bin/env python
"""auth_cost: what the job secret costs -- all_reduce latency and bandwidth with and without one, side by side.

    python benchmarks/auth_cost.py                    # 2 ranks, CPU, ref and fast, 8 B .. 16 MiB
    python benchmarks/auth_cost.py -g 2 --sizes 8,1M --repeats 9 -J out.json

Every rank creates, in the same processes, one ``mooncake-cpu`` group per (implementation, secret
off/on) -- the secret is bound to a group when it is created (``mooncake.pg.set_job_secret``) -- and
times them interleaved size by size, round by round, so machine noise hits both alike.  Per size:
warm-up, then ``--repeats`` rounds each timing every group once (a barrier, then ``n`` calls; every
other round in the reverse order);
the median over rounds, the MAX over ranks (``best``: the fastest round, less sensitive to other load on
the machine).  ``overhead`` = on / off - 1; ``paired``: the median over rounds of each round's on / off
(timed back to back, so slow drifts of the machine's load cancel) - 1; ``cpu``: CPU time per call of the process (all threads).  The values are checked
after timing (every rank's all_reduce result must be exact).

Also printed: the cost of one wire MAC (sign + verify of a 64-byte header) in this interpreter.
Writes JSON (``-J``, default ``benchmarks/results/security/auth_cost.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
import timeit

import torch
import torch.distributed as dist

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.append(_REPO)

DEFAULT_OUT = os.path.join(_REPO, "benchmarks", "results", "security", "auth_cost.json")


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * mult[text[-1]]) if text[-1] in mult else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-g", "--ranks", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--impls", default="ref,fast", help="implementations (default ref,fast)")
    p.add_argument("--sizes", default="8,1K,64K,1M,16M", help="message sizes in bytes (default 8,1K,64K,1M,16M)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per size and group (median; default 7)")
    p.add_argument("--min-time", type=float, default=0.1, help="seconds per timed loop, at least (default 0.1)")
    p.add_argument("-J", "--output-file", default=DEFAULT_OUT, help="JSON output path ('' for none)")
    args = p.parse_args(argv)
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s]
    args.impl_list = [s for s in args.impls.split(",") if s]
    if args.ranks < 2:
        p.error("-g/--ranks must be at least 2")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    for s in args.size_list:
        if s < 4 or s % 4:
            p.error(f"--sizes: {s} is not a positive multiple of 4 bytes (float32 elements)")
    return args


def _make_group(impl: str, secret: str | None):
    import mooncake.impl
    import mooncake.pg as pg
    saved = os.environ.get("MOONCAKE_IMPL")
    os.environ["MOONCAKE_IMPL"] = impl
    mooncake.impl.select.cache_clear()
    pg.set_job_secret(secret)
    try:
        return dist.new_group(backend="mooncake-cpu")
    finally:
        pg.set_job_secret(None)
        if saved is None:
            os.environ.pop("MOONCAKE_IMPL", None)
        else:
            os.environ["MOONCAKE_IMPL"] = saved
        mooncake.impl.select.cache_clear()


def _loop(group, t, n: int) -> tuple[float, float]:
    """Seconds per call: wall clock, and CPU time of this process (all its threads)."""
    dist.barrier(group=group)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        dist.all_reduce(t, group=group)
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def _max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def worker(rank: int, args, port: int, secret: str) -> None:
    torch.set_num_threads(1)
    os.environ.pop("MOONCAKE_JOB_SECRET", None)
    import mooncake.pg  # noqa: F401 - registers the backends
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=120))
    groups = {}
    for impl in args.impl_list:
        for mode in ("off", "on"):
            groups[(impl, mode)] = _make_group(impl, secret if mode == "on" else None)
    records = []
    for size in args.size_list:
        numel = size // 4
        tensors = {k: torch.ones(numel, dtype=torch.float32) for k in groups}
        iters = {}
        for key, g in groups.items():
            for _ in range(3):
                dist.all_reduce(tensors[key], group=g)
            per = _loop(g, tensors[key], 3)[0]
            iters[key] = int(_max(min(20000, max(5, args.min_time / max(per, 1e-7)))))
        samples = {k: [] for k in groups}
        cpu = {k: [] for k in groups}
        for i in range(args.repeats):
            order = list(groups.items())  # ABBA: alternate the order, so neither mode always goes first
            for key, g in (order if i % 2 == 0 else order[::-1]):
                wall, used = _loop(g, tensors[key], iters[key])
                samples[key].append(wall)
                cpu[key].append(used)
        for key, g in groups.items():
            t = torch.full((numel,), float(rank + 1), dtype=torch.float32)
            dist.all_reduce(t, group=g)
            want = args.ranks * (args.ranks + 1) / 2
            wrong = int(_max(float((t != want).sum().item())))
            med = _max(statistics.median(samples[key]))
            cpu_med = _max(statistics.median(cpu[key]))
            best = _max(min(samples[key]))
            records.append({"impl": key[0], "secret": key[1], "bytes": size, "iters": iters[key],
                            "time_us": med * 1e6, "samples_us": [s * 1e6 for s in samples[key]],
                            "cpu_us": cpu_med * 1e6, "best_us": best * 1e6,
                            "algbw_GBps": size / med / 1e9, "wrong": wrong})
    for impl in args.impl_list:  # paired: each round's on / off (timed one after the other), median over rounds
        for size in args.size_list:
            off = next(r for r in records if (r["impl"], r["secret"], r["bytes"]) == (impl, "off", size))
            on = next(r for r in records if (r["impl"], r["secret"], r["bytes"]) == (impl, "on", size))
            ratio = statistics.median(b / a for a, b in zip(off["samples_us"], on["samples_us"]))
            on["paired_overhead"] = _max(ratio) - 1
    if rank == 0:
        report(args, records)
    for g in groups.values():
        dist.destroy_process_group(g)
    dist.destroy_process_group()


def mac_cost_us() -> float:
    import numpy as np
    from mooncake.control import auth
    w = auth.Keyring(os.urandom(32)).wire(1)
    buf = np.zeros(64 + 8, np.uint8)

    def one():
        w.sign(buf)
        w.verify(buf)
    n = 20000
    return timeit.timeit(one, number=n) / n * 1e6


def auth_work_us() -> float:
    """The work a secret adds to one ref collective per peer, timed alone: sign the payload's header
    and the DONE, verify both on the way in, check both messages' binding fields."""
    import numpy as np
    from mooncake.control import auth
    from mooncake.control.wire import Header, Kind, OpCode
    from mooncake.ref.exchange import _replayed
    w = auth.Keyring(os.urandom(32)).wire(1)
    data_h = Header(Kind.COLLECTIVE, OpCode.ALL_REDUCE, 1, 1, 0, 0, 5, 8, 5, 0)
    done_h = Header(Kind.DONE, OpCode.ALL_REDUCE, 1, 1, 0, 0, 5, 40, 0, 0)
    data, done = np.zeros(64 + 8, np.uint8), np.zeros(64 + 40, np.uint8)
    data_h.pack_into(memoryview(data))
    done_h.pack_into(memoryview(done))

    def one():
        w.sign(data)
        w.sign(done, control=True)
        w.verify(data)
        w.verify(done, control=True)
        _replayed(data, data_h, Kind.COLLECTIVE)
        _replayed(done, done_h, Kind.DONE)
    n = 20000
    return timeit.timeit(one, number=n) / n * 1e6


def _size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def report(args, records: list[dict]) -> None:
    by = {(r["impl"], r["secret"], r["bytes"]): r for r in records}
    lines = [f"{'size':>8} {'impl':>5} {'off us':>10} {'on us':>10} {'overhead':>9} "
             f"{'off GB/s':>9} {'on GB/s':>9} {'off cpu':>9} {'on cpu':>9} "
             f"{'best off':>9} {'best on':>9} {'overhead':>9} {'paired':>8} {'#wrong':>6}"]
    rows = []
    for size in args.size_list:
        for impl in args.impl_list:
            off, on = by[(impl, "off", size)], by[(impl, "on", size)]
            overhead = on["time_us"] / off["time_us"] - 1
            best_overhead = on["best_us"] / off["best_us"] - 1
            rows.append({"impl": impl, "bytes": size, "off_us": off["time_us"], "on_us": on["time_us"],
                         "overhead": overhead, "off_GBps": off["algbw_GBps"], "on_GBps": on["algbw_GBps"],
                         "off_cpu_us": off["cpu_us"], "on_cpu_us": on["cpu_us"],
                         "off_best_us": off["best_us"], "on_best_us": on["best_us"], "best_overhead": best_overhead,
                         "paired_overhead": on["paired_overhead"]})
            lines.append(f"{_size(size):>8} {impl:>5} {off['time_us']:10.1f} {on['time_us']:10.1f} "
                         f"{overhead * 100:8.1f}% {off['algbw_GBps']:9.3f} {on['algbw_GBps']:9.3f} "
                         f"{off['cpu_us']:9.1f} {on['cpu_us']:9.1f} {off['best_us']:9.1f} {on['best_us']:9.1f} "
                         f"{best_overhead * 100:8.1f}% {on['paired_overhead'] * 100:7.1f}% "
                         f"{off['wrong'] + on['wrong']:6d}")
    mac = mac_cost_us()
    work = auth_work_us()
    lines.append(f"one wire MAC (sign + verify of a 64-byte header): {mac:.2f} us; a secret's work per ref "
                 f"collective and peer (2 signs, 2 verifies, 2 binding checks): {work:.2f} us")
    lines.append("cpu: CPU time per call of the busiest rank's process, all threads; best: the fastest round")
    print("\n".join(lines), flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "ranks": args.ranks,
            "repeats": args.repeats, "min_time_s": args.min_time, "collective": "all_reduce float32 SUM",
            "mac_sign_verify_us": mac, "auth_work_per_peer_us": work}
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w") as f:
            json.dump({"meta": meta, "table": rows, "records": records}, f, indent=1)
        print(f"wrote {args.output_file}")


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mooncake.control import auth
    secret = auth.generate_secret()
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=120),
                          wait_for_workers=False)
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(args, store.port, secret), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
