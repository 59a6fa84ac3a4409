"""The host-time floor under an eager collective of a torch backend written in Python, on this machine:
``dist.all_reduce`` through a backend that does nothing (its ``allreduce`` returns a finished Work: torch's
Python wrapper, its C++ dispatch, the call into Python and back), and what each building block of a real
call costs here (the interpreter itself, a ctypes call, torch's stream / event / synchronise calls).  Run it
on the machine whose latency is in question: its numbers set what a Python backend can reach there.

    python benchmarks/host_floor.py [--ranks 1,2,8] [--iters 3000] [--json out.json]

R processes run the same loops at once (as R ranks of a job do), each on the GPU when there is one (several
processes share it; start CUDA MPS first to share it as a job would); the table gives the median over
calls, rank 0 and the slowest rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class _DoneWork(dist.Work):
    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class NullGroup(dist.ProcessGroup):
    """A backend whose all_reduce returns at once, leaving the tensor as it is."""

    def __init__(self, store, rank, world_size, timeout):
        super().__init__(rank, world_size)

    def getBackendName(self) -> str:
        return "null"

    def allreduce(self, tensors, opts=None):
        return _DoneWork()


def _median_us(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def _interpreter_probe() -> None:
    """A fixed piece of pure Python (attribute reads, a dict, a small loop): its time is the interpreter's
    speed on this machine."""
    d = {}
    for i in range(50):
        d[i & 7] = d.get(i & 7, 0) + i


def measure(rank: int, world: int, path: str, iters: int, queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.Backend.register_backend("null", lambda store, r, w, timeout: NullGroup(store, r, w, timeout),
                                  devices=["cpu", "cuda"])
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    store = dist.FileStore(path, world)
    dist.init_process_group("null", store=store, rank=rank, world_size=world)
    x = torch.ones(2, device=dev)
    libc = ctypes.CDLL(None)
    out = {}
    for _ in range(2):  # the second round is the one kept (warm caches, lazy initialisation done)
        out["python probe (50-step loop + dict)"] = _median_us(_interpreter_probe, iters)
        out["ctypes call (libc getpid)"] = _median_us(libc.getpid, iters)
        out["dist.all_reduce, null backend"] = _median_us(lambda: dist.all_reduce(x), iters)
        out["dist.all_reduce(async_op=True).wait(), null"] = _median_us(
            lambda: dist.all_reduce(x, async_op=True).wait(), iters)
        if gpu:
            out["torch.cuda.current_stream()"] = _median_us(torch.cuda.current_stream, iters)
            out["torch.cuda.Event() + record()"] = _median_us(lambda: torch.cuda.Event().record(), iters)
            out["x.add_(0) (a kernel launch)"] = _median_us(lambda: x.add_(0), iters)
            out["torch.cuda.synchronize() (idle GPU)"] = _median_us(torch.cuda.synchronize, iters)
    dist.destroy_process_group()
    queue.put((rank, out))


def run(world: int, iters: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=measure, args=(r, world, os.path.join(tmp, "store"), iters, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(world):
                rank, out = queue.get(timeout=300)
                results[rank] = out
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="1,2,8")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    record = {"machine": machine, "cpus": os.cpu_count(), "python": sys.version.split()[0],
              "torch": torch.__version__, "by_ranks": {}}
    print(f"host floor: {machine}, {os.cpu_count()} CPUs, Python {record['python']}, torch {torch.__version__}")
    for world in [int(r) for r in args.ranks.split(",")]:
        res = run(world, args.iters)
        record["by_ranks"][world] = res
        print(f"\nR = {world} processes at once: median us per call (rank 0 / slowest rank)")
        for name in res[0]:
            print(f"  {res[0][name]:8.2f} {max(r[name] for r in res):8.2f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
