"""A small multi-rank CPU job showing the ``mooncake-cpu`` backend at work.

    python -m mooncake.demo [--ranks 4] [--timeout-s 60] [--device cpu|cuda]

``--device cuda`` runs the same job on backend ``mooncake`` with CUDA tensors (all ranks may share one GPU).

Starts the ranks as local processes around a TCPStore hosted by this (launcher) process, runs
every kind of collective on seeded inputs, checks each result bit for bit against the global-view
model (``mooncake.model.collectives``), shows capacity vs visible size, async work and a bad
argument being refused without harming the group, and prints one report.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
import sys
import time
from datetime import timedelta

CASES = [  # (label, collective, dtype name, elements per rank)
    ("all_reduce SUM", "all_reduce", "float32", 1 << 18),
    ("all_reduce AVG", "all_reduce_avg", "bfloat16", 4096),
    ("all_reduce MAX", "all_reduce_max", "int64", 4096),
    ("broadcast src=1", "broadcast", "float16", 4096),
    ("all_gather_into_tensor", "all_gather", "float32", 1 << 16),
    ("reduce_scatter_tensor SUM", "reduce_scatter", "float32", 1 << 16),
    ("all_to_all_single (uneven)", "all_to_all", "int32", 0),
    ("barrier", "barrier", "float32", 0),
]


def _inputs(rank: int, dtype, numel: int):
    import torch
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=g, dtype=dtype)


def _run_case(kind: str, dtype_name: str, numel: int, rank: int, world: int, device: str):
    """Run one case on this rank; returns (seconds, bitwise equal to the model)."""
    import torch
    import torch.distributed as dist
    from mooncake.model import collectives as model
    from mooncake.model.reduce import ReduceOp
    from mooncake.testing.compare import bitwise_equal

    dtype = getattr(torch, dtype_name)
    active = [1] * world
    everyone = [_inputs(r, dtype, max(numel, 1)) for r in range(world)]
    x = everyone[rank].to(device, copy=True)
    t0 = time.perf_counter()
    if kind.startswith("all_reduce"):
        op = {"all_reduce": (dist.ReduceOp.SUM, ReduceOp.SUM), "all_reduce_avg": (dist.ReduceOp.AVG, ReduceOp.AVG),
              "all_reduce_max": (dist.ReduceOp.MAX, ReduceOp.MAX)}[kind]
        dist.all_reduce(x, op=op[0])
        got, want = x, model.all_reduce(everyone, op[1], active)[rank]
    elif kind == "broadcast":
        dist.broadcast(x, src=1 % world)
        got, want = x, model.broadcast(everyone, 1 % world, active)[rank]
    elif kind == "all_gather":
        got = torch.empty(world * numel, dtype=dtype, device=device)
        dist.all_gather_into_tensor(got, x)
        want = model.all_gather_into_tensor(everyone, active)[rank]
    elif kind == "reduce_scatter":
        full = [_inputs(r, dtype, numel * world) for r in range(world)]
        got = torch.empty(numel, dtype=dtype, device=device)
        dist.reduce_scatter_tensor(got, full[rank].to(device, copy=True))
        want = model.reduce_scatter_tensor(full, ReduceOp.SUM, active)[rank]
    elif kind == "all_to_all":
        splits = [[(s + d) % 3 + 1 for d in range(world)] for s in range(world)]  # splits[src][dst]
        full = [_inputs(r, dtype, sum(splits[r])) for r in range(world)]
        out_splits = [splits[s][rank] for s in range(world)]
        got = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(got, full[rank].to(device, copy=True), out_splits, splits[rank])
        want = model.all_to_all_single(full, active, input_splits=splits,
                                       output_splits=[[splits[s][d] for s in range(world)]
                                                      for d in range(world)])[rank]
    else:
        dist.barrier()
        return time.perf_counter() - t0, True
    seconds = time.perf_counter() - t0
    return seconds, bitwise_equal(got, want)


def _rank_main(rank: int, world: int, port: int, timeout_s: float, device: str, results) -> None:
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    import torch.distributed as dist
    import mooncake.pg as pg

    torch.set_num_threads(1)
    report: dict = {"rank": rank}
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))
        capacity = world + 2  # two reserved slots for replacements
        backend = "mooncake" if device == "cuda" else "mooncake-cpu"
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        mask = torch.ones(capacity, dtype=torch.int32, device=device)
        opts = pg.MooncakeBackendOptions(mask, False, capacity)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), pg_options=opts)
        group = dist.group.WORLD
        report["sizes"] = (dist.get_world_size(), pg.get_capacity(group),
                           pg.get_active_ranks(group).tolist())
        report["impl"] = pg.get_implementation(group)
        report["cases"] = []
        for label, kind, dtype_name, numel in CASES:
            _run_case(kind, dtype_name, numel, rank, world, device)  # warm-up (connections)
            times, ok = [], True
            for _ in range(5):
                seconds, same = _run_case(kind, dtype_name, numel, rank, world, device)
                times.append(seconds)
                ok &= same
            report["cases"].append((label, dtype_name, numel, sorted(times)[2], ok))
        work = dist.all_reduce(x := torch.ones(1 << 16, device=device), async_op=True)
        work.wait()
        report["async"] = (type(work).__name__, bool(work.is_completed()), float(x[0]))
        try:
            dist.broadcast(torch.zeros(1, device=device), src=world + 1)  # a reserved, inactive slot
        except pg.ArgumentError as exc:
            report["refused"] = str(exc)
        after = torch.tensor([float(rank)], device=device)
        dist.all_reduce(after)
        report["after_error"] = float(after[0])
        report["backend"] = backend
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported by the launcher
        report["error"] = f"{type(exc).__name__}: {exc}"
    results.put(report)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.distributed as dist

    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=args.timeout_s),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args.ranks, port, args.timeout_s, args.device, results),
                         daemon=True) for r in range(args.ranks)]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + 3 * args.timeout_s
    try:
        while len(reports) < args.ranks and time.monotonic() < deadline:
            try:
                rep = results.get(timeout=1.0)
                reports[rep["rank"]] = rep
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        del store
    return _print_report(args.ranks, reports)


def _print_report(world: int, reports: dict) -> int:
    failed = [r for r in range(world) if r not in reports or "error" in reports[r]]
    if failed:
        for r in failed:
            print(f"rank {r}: {reports.get(r, {}).get('error', 'no report (timed out)')}", file=sys.stderr)
        return 1
    r0 = reports[0]
    size, capacity, mask = r0["sizes"]
    print(f"mooncake demo: {world} ranks on backend {r0['backend']}, implementation {r0['impl'][0]} "
          f"({r0['impl'][1]})")
    print(f"  capacity {capacity} slots, dist.get_world_size() = {size}, active mask {mask}")
    print(f"\n  {'collective':<28}{'dtype':<10}{'bytes/rank':>12}{'median us':>12}  bitwise = model")
    all_ok = True
    for i, (label, dtype_name, numel, _, _) in enumerate(r0["cases"]):
        import torch
        nbytes = numel * getattr(torch, dtype_name).itemsize
        worst = max(reports[r]["cases"][i][3] for r in range(world))
        ok = all(reports[r]["cases"][i][4] for r in range(world))
        all_ok &= ok
        print(f"  {label:<28}{dtype_name:<10}{nbytes:>12}{worst * 1e6:>12.0f}  "
              f"{'yes, on every rank' if ok else 'NO'}")
    kind, completed, value = r0["async"]
    print(f"\n  async all_reduce returned a {kind}; after wait(): completed={completed}, value={value:g}")
    print(f"  refused before communicating: {r0.get('refused', 'NOT REFUSED')}")
    print(f"  next all_reduce on the same group: {r0['after_error']:g} "
          f"(expected {sum(range(world)):g})")
    all_ok &= "refused" in r0 and r0["after_error"] == sum(range(world))
    print("\nresult:", "all checks passed" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
