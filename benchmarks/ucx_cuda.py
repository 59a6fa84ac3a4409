#!/usr/bin/env python3
"""CUDA tensors on the ref plane: device memory handed to UCX (``MOONCAKE_UCX_CUDA=on``) vs staged through
host memory (``off``), on the GPU machine, over UCX's inter-host path.

Two ranks, each its own process, both on GPU 0, backend ``mooncake`` with ``MOONCAKE_IMPL=ref``.  Per mode
(a fresh pair of processes each, the mode set in their environment before torch loads): all_reduce SUM,
all_gather and a send/recv ping-pong of float32 tensors from 8 B to 64 MiB; per case the median over
iterations of the slowest rank's time (CUDA synchronised around each call; for send/recv, half a round
trip).  Every result is checked bitwise against ``mooncake.model`` (the fold in ascending rank order; the
peer's exact bytes), and between the modes.  The count of messages that UCX got in device memory per
operation is recorded too (``Engine.device_messages``): it shows where payloads really lived.

The inter-host path: the ref plane's endpoints keep error handling on (TCP between hosts); ``--tls``
(default ``tcp,cuda_copy``) keeps UCX from taking the same-host shortcuts (shared memory, ``cuda_ipc``)
that two ranks on one machine would otherwise get.  A mode ``on:host`` also sets
``UCX_RNDV_FRAG_MEM_TYPE=host`` (ucxx sets ``cuda`` on import) for UCX's rendezvous pipeline.

Writes ``<out>/ucx_cuda.json`` and prints a table headed by the machine description.  Every run has a
deadline; worker processes are killed on exit (``mooncake.testing.cluster``).

    python benchmarks/ucx_cuda.py --out /tmp/out [--modes off,on,on:host] [--max-bytes 64M] [--deadline-s 170]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for path in (_HERE, _REPO):  # the workers import this module by name, and mooncake from the checkout
    if path not in sys.path:
        sys.path.append(path)

OPS = ("all_reduce", "all_gather", "send_recv")
RUN_TIMEOUT_S = 60.0  # one case on both ranks
SEED = 1234


def _sizes(max_bytes: int) -> list[int]:
    sizes, n = [], 8
    while n <= max_bytes:
        sizes.append(n)
        n *= 8
    if sizes[-1] != max_bytes:
        sizes.append(max_bytes)
    return sizes


def _iters(num_bytes: int) -> int:
    return 50 if num_bytes <= 64 << 10 else 20 if num_bytes <= 4 << 20 else 5


def _parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    value = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    if value < 8 or value % 4:
        raise argparse.ArgumentTypeError(f"--max-bytes must be a multiple of 4 bytes, at least 8, got {text}")
    return value


def _input(rank: int, numel: int):
    """Rank ``rank``'s input: normal floats (the fold order shows in the bits), made on the CPU."""
    import torch
    g = torch.Generator().manual_seed(SEED + 7919 * rank + numel)
    return torch.randn(numel, generator=g, dtype=torch.float32)


def _digest(t) -> str:
    import torch
    return hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


# ------------------------------------------------------------------------------------------ worker side

def describe() -> dict:
    """This worker's view: torch, CUDA, the GPU, UCX and the ref plane's CUDA choice."""
    import torch
    import ucxx
    from mooncake.ref import ucx
    engine = ucx.engine()
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(), "ucxx": ucxx.__version__, "ucx": ucxx.__ucx_version__,
            "cuda_choice": engine.cuda._asdict(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "MOONCAKE_"))}}


def bench(op: str, num_bytes: int, iters: int) -> dict:
    """Time ``op`` on ``num_bytes`` per rank; check the result against the model."""
    import torch
    import torch.distributed as dist
    from mooncake.model.reduce import ReduceOp, fold
    from mooncake.ref import ucx
    from mooncake.testing.cluster import worker_context

    rank, world = worker_context().rank, worker_context().world_size
    numel = num_bytes // 4
    inputs = [_input(r, numel) for r in range(world)]
    x = inputs[rank].cuda()
    engine = ucx.engine()
    if op == "all_reduce":
        y = torch.empty_like(x)
        expected = fold(ReduceOp.SUM, inputs)

        def call():
            dist.all_reduce(y)

        def reset():
            y.copy_(x)
    elif op == "all_gather":
        y = torch.empty(world * numel, dtype=torch.float32, device="cuda")
        expected = torch.cat(inputs)

        warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 renames it all_gather_single

        def call():
            dist.all_gather_into_tensor(y, x)

        def reset():
            pass
    else:
        y = torch.empty_like(x)
        peer = 1 - rank
        expected = inputs[peer]

        def call():  # a ping-pong: rank 0 sends first; each rank receives its peer's tensor
            if rank == 0:
                dist.send(x, peer)
                dist.recv(y, peer)
            else:
                dist.recv(y, peer)
                dist.send(x, peer)

        def reset():
            pass
    times = []
    dist.barrier()
    before = engine.device_messages
    for i in range(iters + 2):  # two warm-up calls
        reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    device_messages = (engine.device_messages - before) / (iters + 2)
    got = y.cpu()
    if op == "send_recv":
        times = [t / 2 for t in times]
    return {"times_s": times, "digest": _digest(got), "matches_model": bool(torch.equal(
        got.view(torch.int32), expected.view(torch.int32))), "device_messages_per_op": device_messages}


# ------------------------------------------------------------------------------------------ parent side

def _machine() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "nvidia_smi": run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,pci.bus_id",
                               "--format=csv,noheader"]),
            "nvidia_smi_topo": run(["nvidia-smi", "topo", "-m"])}


def _mode_env(mode: str, tls: str) -> dict:
    name, _, frag = mode.partition(":")
    if name not in ("on", "off") or frag not in ("", "host"):
        raise SystemExit(f"--modes: unknown mode {mode!r} (off, on, on:host)")
    env = {"MOONCAKE_IMPL": "ref", "MOONCAKE_UCX_CUDA": name, "OMP_NUM_THREADS": "1"}
    if tls:
        env["UCX_TLS"] = tls
    if frag:
        env["UCX_RNDV_FRAG_MEM_TYPE"] = frag
    return env


def run_mode(mode: str, tls: str, sizes: list[int], deadline: float) -> dict:
    import ucx_cuda as B  # the workers resolve jobs by module name, not as __main__
    from mooncake.testing.cluster import Cluster

    result = {"mode": mode, "env": _mode_env(mode, tls), "cases": [], "complete": False}
    cluster = Cluster(2, "mooncake", device="cuda", env=result["env"], timeout_s=RUN_TIMEOUT_S)
    try:
        result["workers"] = cluster.run(B.describe)
        for op in OPS:
            for size in sizes:
                if time.monotonic() > deadline:
                    result["stopped"] = "deadline reached"
                    return result
                per_rank = cluster.run(B.bench, op, size, _iters(size))
                per_iter = [max(ts) for ts in zip(*(r["times_s"] for r in per_rank))]
                result["cases"].append({
                    "op": op, "bytes": size, "median_us": statistics.median(per_iter) * 1e6,
                    "min_us": min(per_iter) * 1e6, "iters": len(per_iter),
                    "digests": [r["digest"] for r in per_rank],
                    "matches_model": all(r["matches_model"] for r in per_rank),
                    "device_messages_per_op": [r["device_messages_per_op"] for r in per_rank]})
        result["complete"] = True
        return result
    finally:
        cluster.close()


def _table(machine: dict, modes: list[dict]) -> str:
    lines = ["machine: " + machine["nvidia_smi"].replace("\n", "; ") + f"; {machine['cpus']} CPUs"]
    for m in modes:
        w = (m.get("workers") or [{}])[0]
        lines.append(f"mode {m['mode']}: torch {w.get('torch')} (CUDA {w.get('torch_cuda')}), UCX {w.get('ucx')} "
                     f"(ucxx {w.get('ucxx')}), choice: {w.get('cuda_choice')}, env {m['env']}"
                     + ("" if m["complete"] else f" -- INCOMPLETE: {m.get('stopped') or m.get('error')}"))
    base = {(c["op"], c["bytes"]): c for c in modes[0]["cases"]} if modes else {}
    header = f"{'op':11s} {'bytes':>10s}" + "".join(f" {m['mode'] + ' us':>14s} {'dev msg':>7s}" for m in modes) \
        + "  model  same bits"
    lines.append(header)
    for key, first in base.items():
        row = f"{key[0]:11s} {key[1]:>10d}"
        cases = [next((c for c in m["cases"] if (c["op"], c["bytes"]) == key), None) for m in modes]
        for c in cases:
            row += " " * 23 if c is None else f" {c['median_us']:14.1f} {max(c['device_messages_per_op']):7.1f}"
        present = [c for c in cases if c is not None]
        row += f"  {'ok' if all(c['matches_model'] for c in present) else 'WRONG':5s}"
        row += f"  {'yes' if len({tuple(c['digests']) for c in present}) == 1 else 'NO'}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for ucx_cuda.json")
    ap.add_argument("--modes", default="off,on,on:host", help="comma-separated: off, on, on:host")
    ap.add_argument("--tls", default="tcp,cuda_copy", help="UCX_TLS for the ranks ('' leaves UCX's default)")
    ap.add_argument("--max-bytes", type=_parse_bytes, default=64 << 20, help="largest size (default 64M)")
    ap.add_argument("--deadline-s", type=float, default=170.0, help="stop starting cases after this long")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("ucx_cuda: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.deadline_s
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        _mode_env(m, args.tls)  # reject a bad mode before starting anything
    sizes = _sizes(args.max_bytes)
    machine = _machine()
    results = []
    for mode in modes:
        if time.monotonic() > deadline:
            results.append({"mode": mode, "env": _mode_env(mode, args.tls), "cases": [], "complete": False,
                            "stopped": "deadline reached before start"})
            continue
        try:
            results.append(run_mode(mode, args.tls, sizes, deadline))
        except Exception as exc:  # noqa: BLE001 - recorded, and the other modes still run
            results.append({"mode": mode, "env": _mode_env(mode, args.tls), "cases": [], "complete": False,
                            "error": f"{type(exc).__name__}: {exc}"})
    keyed = [{(c["op"], c["bytes"]): c for c in r["cases"]} for r in results]
    common = set.intersection(*(set(k) for k in keyed)) if keyed else set()
    same_bits = all(len({tuple(k[key]["digests"]) for k in keyed}) == 1 for key in common)
    report = {"machine": machine, "tls": args.tls, "sizes": sizes, "modes": results,
              "all_match_model": all(c["matches_model"] for r in results for c in r["cases"]),
              "modes_bitwise_equal": same_bits, "complete": all(r["complete"] for r in results)}
    with open(os.path.join(args.out, "ucx_cuda.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(_table(machine, results))
    print(f"all results match the model: {report['all_match_model']}; modes bitwise equal: {same_bits}; "
          f"complete: {report['complete']}")
    return 0 if report["all_match_model"] and same_bits and report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
