#!/usr/bin/env python
"""trainbench: real training steps on several torch.distributed backends, side by side.

Each (backend, ranks) pair runs in its own freshly spawned processes (the parent hosts the TCPStore);
every pair trains the same model from the same initial weights on the same per-rank batches, in
each mode in turn:

* ``ddp``         DistributedDataParallel, default buckets, SGD;
* ``ddp_nosync``  the same with gradient accumulation: ``--accum - 1`` micro-batches under
                  ``no_sync()``, then one that synchronises;
* ``ddp_bf16``    DDP with ``default_hooks.bf16_compress_hook`` (buckets reduced in bfloat16);
* ``fsdp2``       ``torch.distributed.fsdp.fully_shard`` on every Linear and on the root.

Reported per (mode, backend, ranks): median step time (rank 0, one optimizer step, after
``--warmup`` steps; with ``--rounds N`` the backends run N times in turn and the fastest median counts),
samples/s (global batch / median step), its ratio to the baseline (the first backend: gloo by default), and
whether the final parameters equal the baseline's: bitwise (``equal``), or the largest absolute difference
otherwise.  With
two ranks every reduction here is exact whatever its order (a + b), so anything but bitwise equality
is a bug; with more ranks the float sums may round differently (the fold order differs).

    python benchmarks/trainbench.py                       # 2 and 4 ranks, every mode and backend
    python benchmarks/trainbench.py --ranks 2 --steps 3 --width 64 --check   # CI size: exit 1 unless bitwise

``--device cuda`` trains on CUDA tensors (rank r on GPU ``r % device_count``; ranks may share a GPU under
CUDA MPS) with the backends ``mooncake:ref,mooncake:fast`` by default (``nccl`` where each rank has a GPU
of its own). The first backend is the baseline; two mooncake planes run the same fold order, so fast
must equal ref bitwise at any rank count, and ``--check`` demands it.

``--out DIR`` writes ``trainbench.txt`` (the table), ``trainbench.json`` and ``trainbench.png``.
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
import traceback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # this checkout's mooncake, also in the spawned ranks
    sys.path.insert(0, _REPO)
os.environ["PYTHONPATH"] = os.pathsep.join([_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

MODES = ("ddp", "ddp_nosync", "ddp_bf16", "fsdp2")
BACKENDS = ("gloo", "mooncake-cpu:fast", "mooncake-cpu:ref")
CUDA_BACKENDS = ("mooncake:ref", "mooncake:fast")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="2,4", help="comma-separated world sizes (default 2,4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model and the batches live (cuda: rank r on GPU r %% device_count)")
    p.add_argument("--backends", default=None,
                   help="comma-separated; mooncake-cpu:fast / :ref pin MOONCAKE_IMPL, mooncake-cpu:fast-hosts2 runs "
                        "fast with the ranks on two emulated hosts (first = baseline; default: "
                        f"{','.join(BACKENDS)} on cpu, {','.join(CUDA_BACKENDS)} on cuda)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--width", type=int, default=1024, help="Linear width (default 1024: 4 MiB of weights each)")
    p.add_argument("--layers", type=int, default=4, help="Linear(width, width) + ReLU blocks")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step in ddp_nosync")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every backend this many times, alternating, and keep each one's fastest median "
                        "(a shared machine's load then hits every backend alike)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for one (backend, ranks) run")
    p.add_argument("--out", default=None, help="directory for trainbench.txt / .json / .png")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless every 2-rank result (every result of two mooncake planes) equals the "
                        "baseline's bitwise (CI)")
    args = p.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    args.backends = [b for b in (args.backends or ",".join(CUDA_BACKENDS if args.device == "cuda" else BACKENDS))
                     .split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} (choose from {', '.join(MODES)})")
    cpu_only = [b for b in args.backends if b.startswith("mooncake-cpu")]
    cuda_only = [b for b in args.backends if b.split(":")[0] in ("mooncake", "nccl")]
    if args.device == "cuda" and cpu_only:
        p.error(f"--backends {','.join(cpu_only)} cannot carry CUDA tensors: use mooncake, nccl or gloo with "
                "--device cuda")
    if args.device == "cpu" and cuda_only:
        p.error(f"--backends {','.join(cuda_only)} need --device cuda")
    return args


# ------------------------------------------------------------------------------------------ worker

def _model(args):
    import torch
    torch.manual_seed(1234)
    layers = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _batch(args, rank: int, step: int, micro: int = 0, device="cpu"):
    import torch
    g = torch.Generator().manual_seed(1_000_003 * step + 101 * rank + 7 * micro + 1)
    x = torch.randn(args.batch, args.width, generator=g)
    y = torch.randn(args.batch, args.width, generator=g)
    return x.to(device), y.to(device)


def _device(args, rank: int):
    """This rank's device: the CPU, or GPU ``rank % device_count`` (made current)."""
    import torch
    if args.device == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _train(mode: str, args, rank: int, world: int) -> tuple[list[float], dict]:
    """Run one mode; returns rank-local step times (s) and, on rank 0, the final parameters."""
    import torch
    import torch.distributed as dist

    device = _device(args, rank)
    model = _model(args).to(device)
    if mode.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if mode == "ddp_bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            def bf16_hook(state, bucket):  # the stock hook; DDP refuses it by name without NCCL
                return default_hooks.bf16_compress_hook(state, bucket)
            model.register_comm_hook(None, bf16_hook)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.MSELoss()
    micro = args.accum if mode == "ddp_nosync" else 1
    times = []
    dist.barrier()
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for m in range(micro):
            x, y = _batch(args, rank, step, m, device)
            if m < micro - 1:
                with model.no_sync():
                    loss_fn(model(x), y).backward()
            else:
                loss_fn(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name.replace("module.", "")] = full.detach().cpu().clone().numpy()  # numpy: pickled by value
    dist.barrier()
    return times[args.warmup:], params if rank == 0 else {}


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def worker(rank: int, world: int, spec: str, port: int, args, queue, parent: int) -> None:
    import threading
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()  # no rank outlives us
    if ":" in spec:
        from mooncake.testing.impls import impl_env
        os.environ.update(impl_env(spec.split(":", 1)[1]), RANK=str(rank))  # RANK as torchrun sets it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(1)
        backend = spec.split(":", 1)[0]
        if backend.startswith("mooncake"):
            import mooncake.pg  # noqa: F401 - registers the backends
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=args.timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=min(args.timeout, 120)))
        impl = None
        if backend.startswith("mooncake"):
            impl = mooncake.pg.get_implementation(dist.group.WORLD)[0]
        out = {}
        for mode in args.modes:
            try:
                times, params = _train(mode, args, rank, world)
                out[mode] = {"times": times, "params": params}
            except Exception:  # noqa: BLE001 - reported per mode; the next mode may still run
                out[mode] = {"error": traceback.format_exc()}
                break  # the group may be unusable now
        dist.destroy_process_group()
        queue.put((rank, impl, out))
    except BaseException:  # noqa: BLE001
        queue.put((rank, None, {"error": traceback.format_exc()}))


def run_pair(spec: str, world: int, args) -> dict:
    """Spawn ``world`` ranks of ``spec``; returns {mode: {"times", "params"} | {"error"}} of rank 0."""
    import multiprocessing as mp
    import queue as _queue

    import torch.distributed as dist
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=datetime.timedelta(seconds=args.timeout),
                          wait_for_workers=False)
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, spec, store.port, args, q, os.getpid()), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + args.timeout
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, impl, out = q.get(timeout=1.0)
                results[rank] = (impl, out)
            except _queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:  # never leave a rank behind
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if 0 not in results:
        why = "timed out" if time.monotonic() >= deadline else "a rank died"
        return {"error": f"{spec} x{world}: {why} (exit codes {[p.exitcode for p in procs]})"}
    impl, out = results[0]
    errors = [o["error"] for _, o in results.values() if "error" in o]
    if errors:
        return {"error": errors[0]}
    out["impl"] = impl
    return out


# ------------------------------------------------------------------------------------------ report

def compare(params, baseline) -> tuple[bool, float]:
    """(bitwise equal, largest absolute difference) of two {name: numpy array} parameter sets."""
    import numpy as np
    equal, worst = True, 0.0
    for name, t in params.items():
        b = baseline[name]
        if t.tobytes() != b.tobytes():
            equal = False
        worst = max(worst, float(np.abs(t.astype(np.float64) - b.astype(np.float64)).max()))
    return equal, worst


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    import torch
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"host": socket.gethostname(), "cpu": model, "cpus": os.cpu_count(), "gpus": gpus,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def table(rows: list[dict], base: str) -> str:
    head = (f"{'mode':<11} {'ranks':>5} {'backend':<18} {'impl':<5} {'step ms':>9} {'samples/s':>10} "
            f"{'x base':>7}  params vs {base}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['mode']:<11} {r['ranks']:>5} {r['backend']:<18} ERROR: {r['error'].splitlines()[-1]}")
            continue
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        if r["equal"] is None:
            verdict = "(baseline)"
        else:
            verdict = "equal (bitwise)" if r["equal"] else f"max |diff| {r['max_abs_diff']:.3g}"
        lines.append(f"{r['mode']:<11} {r['ranks']:>5} {r['backend']:<18} {r['impl'] or '-':<5} "
                     f"{r['step_ms']:>9.1f} {r['samples_per_s']:>10.0f} {ratio:>7}  {verdict}")
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranks = sorted({r["ranks"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, world in zip(axes[0], ranks):
        for j, b in enumerate(backends):
            ys = []
            for m in modes:
                r = next((r for r in rows if r["ranks"] == world and r["mode"] == m and r["backend"] == b), None)
                ys.append(r["step_ms"] if r and not r.get("error") else 0.0)
            ax.bar([i + j * width for i in range(len(modes))], ys, width, label=b)
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(modes))], modes)
        ax.set_ylabel("median step time (ms)")
        ax.set_title(f"{world} ranks")
        ax.legend(fontsize=8)
    fig.suptitle(f"trainbench: {meta['layers']}x Linear({meta['width']}) MLP, batch {meta['batch']}/rank, "
                 f"{meta['machine']['cpus']} CPUs, device {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("trainbench: --device cuda but CUDA is not available here; use --device cpu", file=sys.stderr)
            return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_start = os.getloadavg()
    rows: list[dict] = []
    for world in args.ranks:
        outs: dict[str, list[dict]] = {spec: [] for spec in args.backends}
        for _ in range(max(args.rounds, 1)):
            for spec in args.backends:
                t0 = time.monotonic()
                outs[spec].append(run_pair(spec, world, args))
                print(f"# {spec} x{world}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        baseline: dict[str, tuple] = {}
        for spec in args.backends:
            for mode in args.modes:
                row = {"mode": mode, "ranks": world, "backend": spec}
                good = [o for o in outs[spec] if "error" not in (o.get(mode) or {"error": 1})]
                if not good:
                    last = outs[spec][-1]
                    row["impl"] = last.get("impl")
                    row["error"] = (last.get(mode) or {}).get("error") or last.get("error") or \
                        "not run (an earlier mode failed)"
                    rows.append(row)
                    continue
                best = min(good, key=lambda o: statistics.median(o[mode]["times"]))
                res = best[mode]
                step = statistics.median(res["times"])
                micro = args.accum if mode == "ddp_nosync" else 1
                row.update(impl=best.get("impl"), step_ms=step * 1e3,
                           samples_per_s=args.batch * world * micro / step,
                           round_medians_ms=[statistics.median(o[mode]["times"]) * 1e3 for o in good],
                           times_ms=[t * 1e3 for t in res["times"]], ratio=None, equal=None, max_abs_diff=None)
                if spec == args.backends[0]:
                    baseline[mode] = (step, res["params"])
                    row["ratio"] = 1.0
                elif mode in baseline:
                    row["ratio"] = step / baseline[mode][0]
                    equal = [compare(o[mode]["params"], baseline[mode][1]) for o in good]
                    row["equal"] = all(e for e, _ in equal)
                    row["max_abs_diff"] = max(d for _, d in equal)
                rows.append(row)
    rows.sort(key=lambda r: (r["ranks"], args.modes.index(r["mode"]), args.backends.index(r["backend"])))
    meta = {"argv": sys.argv, "device": args.device, "rounds": args.rounds, "width": args.width,
            "layers": args.layers, "batch": args.batch, "accum": args.accum, "steps": args.steps,
            "warmup": args.warmup, "machine": machine(),
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    text = table(rows, args.backends[0])
    header = (f"# trainbench {meta['machine']['date']} on {meta['machine']['host']}: {meta['machine']['cpu']} "
              f"({meta['machine']['cpus']} CPUs), device {args.device}"
              f"{' (' + ', '.join(meta['machine']['gpus']) + ')' if args.device == 'cuda' else ''}, "
              f"torch {meta['machine']['torch']}; load average "
              f"{load_start[0]:.2f} -> {meta['load_average_end'][0]:.2f}\n"
              f"# model {args.layers}x Linear({args.width},{args.width})+ReLU, batch {args.batch}/rank, "
              f"{args.steps} timed steps after {args.warmup}, accum {args.accum} (ddp_nosync)")
    print(header)
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "trainbench.txt"), "w") as f:
            f.write(header + "\n" + text + "\n")
        with open(os.path.join(args.out, "trainbench.json"), "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        try:
            plot(rows, meta, os.path.join(args.out, "trainbench.png"))
        except ImportError as exc:
            print(f"# no plot: {exc}", file=sys.stderr)
    if args.check:
        base = args.backends[0]
        bad = [r for r in rows if r["backend"] != base
               and (r.get("error") or (_must_equal(r["backend"], base, r["ranks"]) and not r["equal"]))]
        errors = [r for r in rows if r.get("error")]
        for r in bad + [r for r in errors if r not in bad]:
            print(f"CHECK FAILED: {r['mode']} {r['backend']} x{r['ranks']}: "
                  f"{r.get('error') or 'parameters differ from %s, max |diff| %g' % (base, r['max_abs_diff'])}",
                  file=sys.stderr)
        return 1 if bad or errors else 0
    return 0


def _must_equal(spec: str, base: str, world: int) -> bool:
    """Whether ``spec``'s final parameters must equal the baseline's bit for bit: with two ranks always (a + b
    is exact in any order); with more when both are mooncake planes (they fold in the same order)."""
    return world == 2 or (spec.startswith("mooncake") and base.startswith("mooncake"))


if __name__ == "__main__":
    sys.exit(main())
