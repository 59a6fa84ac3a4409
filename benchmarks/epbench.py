"""EP dispatch / combine benchmark of the CUDA fast path: R ranks on one GPU (run it under CUDA MPS).

    python benchmarks/epbench.py --ranks 8 --out benchmarks/results/cuda

Configuration (DeepEP's published low-latency setting): 128 tokens per rank, hidden 7168, top-8, 256 experts,
FP8 dispatch, BF16 combine.  Routing shapes: ``uniform`` (K distinct experts uniformly at random),
``incast`` (every token's experts are rank 0's: a k-hot incast into one receiver), ``zipf`` (expert
popularity ~ 1/rank^1.2 over a random permutation, K distinct per token).

Per op and routing: latency p50 / p99 (CUDA events around each call, every rank and iteration pooled),
DeepEP-accounted bandwidth per rank (dispatch: ``hidden + hidden/128*4 + 16`` bytes per selected
(token, expert); combine: ``2*hidden``; masked entries not counted) = bytes / that rank's p50, averaged
over ranks; and the HBM floor: all R ranks share one GPU's memory, so moving every rank's bytes once
takes at least ``sum_r bytes_r / copy_bw``, with ``copy_bw`` the device-to-device copy bandwidth
(bytes copied per second, ``Tensor.copy_`` of 1 GiB) measured in the same run.

Each iteration: a gloo barrier, a ~1 ms GPU head start (``torch.cuda._sleep``) so the host enqueues the
whole iteration ahead of the GPU, a device-side barrier (a zero-token dispatch: every rank waits for every
other rank's signal, so the timed calls start together), then dispatch and combine back to back.  Two
modes: ``eager`` (the Python API call by call; its host time per call is reported too) and ``graph``
(the same calls captured once in CUDA graphs and replayed: the kernels' own latency).  Writes
``epbench-<card>-R<R>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = dict(T=128, H=7168, K=8, E=256, fp8=True)
ROUTINGS = ("uniform", "incast", "zipf")
MODES = ("eager", "graph")


def _pct(values, q):
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, int(math.ceil(q / 100 * len(s))) - 1))]


def make_routing(kind: str, rank: int, R: int, N: int, E: int, K: int):
    import torch

    g = torch.Generator().manual_seed(7919 * (ROUTINGS.index(kind) + 1) + rank)
    if kind == "uniform":
        topk = torch.rand(N, E, generator=g).argsort(dim=1)[:, :K]
    elif kind == "incast":
        L = E // R
        topk = torch.rand(N, L, generator=g).argsort(dim=1)[:, :K]  # experts 0..L-1 live on rank 0
    elif kind == "zipf":
        perm = torch.randperm(E, generator=torch.Generator().manual_seed(4242))
        p = torch.empty(E)
        p[perm] = 1.0 / torch.arange(1, E + 1, dtype=torch.float64).pow(1.2).float()
        topk = torch.multinomial(p.repeat(N, 1), K, replacement=False, generator=g)
    else:
        raise ValueError(kind)
    return topk.to(torch.int64).contiguous()


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float:
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / sorted(times)[len(times) // 2]


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from mooncake.fast.cuda.ep import FastEPBuffer
    from mooncake.model import ep as model

    torch.set_num_threads(1)
    torch.cuda.set_device(0)
    rank, R = args.rank, args.world
    T, H, K, E = CONFIG["T"], CONFIG["H"], CONFIG["K"], CONFIG["E"]
    L = E // R
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=R,
                            timeout=timedelta(seconds=120))
    result = dict(rank=rank)
    if rank == 0:
        result["copy_bw"] = copy_bandwidth()
    dist.barrier()
    buf = FastEPBuffer(dist.group.WORLD, model.get_ep_buffer_size_hint(T, H, R, E))
    g = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16).cuda()
    expert_out = torch.randn(L, R * T, H, generator=g).to(torch.bfloat16).cuda()
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    timeout_us = 10_000_000
    head_start = 2_000_000  # GPU cycles (~1 ms): the host enqueues a whole iteration before the GPU gets there
    empty_x, empty_topk = x[:0], torch.empty(0, K, dtype=torch.int64, device="cuda")

    def device_barrier():  # a dispatch of zero tokens: every rank waits for every other rank's signal
        buf.dispatch(empty_x, empty_topk, active, T, E, timeout_us, use_fp8=False, check=False)

    # the R-process floor: every rank copies its own DeepEP-accounted bytes (device to device) at the same
    # time, started by the same device barrier as the EP calls
    for op, nbytes in (("dispatch", T * K * (H + H // 128 * 4 + 16)), ("combine", T * K * 2 * H)):
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        times = []
        for it in range(args.warmup + args.iters):
            dist.barrier()
            torch.cuda._sleep(head_start)
            device_barrier()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            e1.synchronize()
            if it >= args.warmup:
                times.append(e0.elapsed_time(e1) * 1e-3)
        result[f"concurrent_copy_{op}_s"] = times
        del src, dst

    for kind in ROUTINGS:
        topk = make_routing(kind, rank, R, T, E, K).cuda()
        weights = torch.rand(T, K, generator=g).cuda()
        selected = int((topk >= 0).sum())
        res = dict(selected=selected)
        # eager: the Python API call by call
        d_times, c_times, t_times, host_d, host_c = [], [], [], [], []
        for it in range(args.warmup + args.iters):
            dist.barrier()
            torch.cuda._sleep(head_start)
            device_barrier()
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            h0 = time.perf_counter()
            recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=True, check=False)
            h1 = time.perf_counter()
            e1.record()
            buf.combine(expert_out, topk, weights, active, timeout_us, handle)
            h2 = time.perf_counter()
            e2.record()
            e2.synchronize()
            if it >= args.warmup:
                d_times.append(e0.elapsed_time(e1) * 1e-3)
                c_times.append(e1.elapsed_time(e2) * 1e-3)
                t_times.append(e0.elapsed_time(e2) * 1e-3)
                host_d.append(h1 - h0)
                host_c.append(h2 - h1)
        res["eager"] = dict(dispatch_s=d_times, combine_s=c_times, total_s=t_times, host_dispatch_s=host_d,
                            host_combine_s=host_c, recv_rows=int(count.sum()))
        # graph: the same calls captured once, replayed (no host overhead)
        torch.cuda.synchronize()
        g_bar, g_d, g_c = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_bar):
            device_barrier()
        with torch.cuda.graph(g_d):
            recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=True, check=False)
        with torch.cuda.graph(g_c):
            buf.combine(expert_out, topk, weights, active, timeout_us, handle)
        d_times, c_times, t_times = [], [], []
        for it in range(args.warmup + args.iters):
            dist.barrier()
            torch.cuda._sleep(head_start)
            g_bar.replay()
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            g_d.replay()
            e1.record()
            g_c.replay()
            e2.record()
            e2.synchronize()
            if it >= args.warmup:
                d_times.append(e0.elapsed_time(e1) * 1e-3)
                c_times.append(e1.elapsed_time(e2) * 1e-3)
                t_times.append(e0.elapsed_time(e2) * 1e-3)
        res["graph"] = dict(dispatch_s=d_times, combine_s=c_times, total_s=t_times, recv_rows=int(count.sum()))
        del g_bar, g_d, g_c
        if int(active.sum()) != R:
            raise RuntimeError(f"rank {rank}: a peer timed out during the benchmark: {active.tolist()}")
        result[kind] = res
    torch.cuda.synchronize()
    with open(os.path.join(args.outdir_tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    buf.destroy()
    dist.destroy_process_group()
    return 0


def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def launch(args) -> int:
    import torch

    R = args.ranks
    tmp = os.path.join(args.out, f".epbench-R{R}-tmp")
    os.makedirs(tmp, exist_ok=True)
    store = os.path.join(tmp, "store")
    if os.path.exists(store):
        os.remove(store)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for r in range(R):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--rank", str(r), "--world", str(R),
               "--store", store, "--outdir-tmp", tmp, "--iters", str(args.iters), "--warmup", str(args.warmup)]
        procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + args.timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    if any(c != 0 for c in codes):
        print(f"epbench R={R}: worker exit codes {codes}", file=sys.stderr)
        return 1
    ranks = []
    for r in range(R):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    shutil.rmtree(tmp, ignore_errors=True)
    return write_report(ranks, R, args.iters, args.out, torch.cuda.get_device_name(0), torch.__version__,
                        torch.version.cuda)


def write_report(ranks: list[dict], R: int, iters: int, out: str, card: str, torch_version: str,
                 cuda_version: str) -> int:
    copy_bw = ranks[0]["copy_bw"]
    H = CONFIG["H"]
    d_msg, c_msg = H + H // 128 * 4 + 16, 2 * H
    report = dict(card=card, torch=torch_version, cuda=cuda_version, ranks=R, config=CONFIG,
                  mps=bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")), iters=iters,
                  copy_bw_GBps=copy_bw / 1e9, routings={})
    conc = {op: _pct([t for rk in ranks for t in rk[f"concurrent_copy_{op}_s"]], 50) * 1e6
            for op in ("dispatch", "combine")}
    report["concurrent_copy_p50_us"] = conc  # R processes each copying their uniform-routing bytes at once
    for kind in ROUTINGS:
        rows = {}
        for mode in MODES:
            m = {}
            for op, msg in (("dispatch", d_msg), ("combine", c_msg)):
                samples = [t for rk in ranks for t in rk[kind][mode][f"{op}_s"]]
                per_rank_bw = [rk[kind]["selected"] * msg / _pct(rk[kind][mode][f"{op}_s"], 50) for rk in ranks]
                total_bytes = sum(rk[kind]["selected"] * msg for rk in ranks)
                p50 = _pct(samples, 50)
                floor = total_bytes / copy_bw
                m[op] = dict(p50_us=p50 * 1e6, p99_us=_pct(samples, 99) * 1e6,
                             bytes_per_rank=[rk[kind]["selected"] * msg for rk in ranks],
                             deepep_GBps_per_rank=sum(per_rank_bw) / len(per_rank_bw) / 1e9,
                             hbm_floor_us=floor * 1e6, x_floor=p50 / floor,
                             x_concurrent_copy=p50 * 1e6 / conc[op])
            total = [t for rk in ranks for t in rk[kind][mode]["total_s"]]
            floor_both = m["dispatch"]["hbm_floor_us"] + m["combine"]["hbm_floor_us"]
            m["dispatch_plus_combine"] = dict(p50_us=_pct(total, 50) * 1e6, p99_us=_pct(total, 99) * 1e6,
                                              hbm_floor_us=floor_both, x_floor=_pct(total, 50) * 1e6 / floor_both)
            m["recv_rows_per_rank"] = [rk[kind][mode]["recv_rows"] for rk in ranks]
            if mode == "eager":
                m["host_dispatch_call_p50_us"] = _pct([t for rk in ranks for t in rk[kind][mode]["host_dispatch_s"]],
                                                      50) * 1e6
                m["host_combine_call_p50_us"] = _pct([t for rk in ranks for t in rk[kind][mode]["host_combine_s"]],
                                                     50) * 1e6
            rows[mode] = m
        report["routings"][kind] = rows
    slug = f"epbench-{card_slug(card)}-R{R}"
    with open(os.path.join(out, slug + ".json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# epbench: {card}, R = {R} ranks on one GPU{' (MPS)' if report['mps'] else ''}",
             "",
             f"torch {torch_version}, CUDA {cuda_version}; T=128, H=7168, K=8, E=256, FP8 dispatch, BF16 "
             f"combine; {iters} iterations; device-to-device copy bandwidth {copy_bw / 1e9:.0f} GB/s.",
             f"R processes each copying their own bytes at once (uniform routing, p50): dispatch bytes "
             f"{conc['dispatch']:.1f} us, combine bytes {conc['combine']:.1f} us.",
             "",
             "| routing | mode | op | p50 us | p99 us | DeepEP GB/s per rank | bytes/rank (mean) | HBM floor us | x floor "
             "| x R-process copy |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in ROUTINGS:
        for mode in MODES:
            for op in ("dispatch", "combine", "dispatch_plus_combine"):
                r = report["routings"][kind][mode][op]
                bw = f"{r['deepep_GBps_per_rank']:.1f}" if "deepep_GBps_per_rank" in r else ""
                mb = f"{sum(r['bytes_per_rank']) / R / 1e6:.2f} MB" if "bytes_per_rank" in r else ""
                xc = f"{r['x_concurrent_copy']:.2f}" if "x_concurrent_copy" in r else ""
                lines.append(f"| {kind} | {mode} | {op.replace('_', ' ')} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {bw} "
                             f"| {mb} | {r['hbm_floor_us']:.1f} | {r['x_floor']:.2f} | {xc} |")
    lines.append("")
    for kind in ROUTINGS:
        r = report["routings"][kind]["eager"]
        lines.append(f"* {kind}: host time of one call (eager, p50): dispatch {r['host_dispatch_call_p50_us']:.0f} us, "
                     f"combine {r['host_combine_call_p50_us']:.0f} us; rows received per rank "
                     f"{r['recv_rows_per_rank']}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, slug + ".md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cuda"))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--outdir-tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    os.makedirs(args.out, exist_ok=True)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
