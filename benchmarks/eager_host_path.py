"""Where the host's time goes in one eager ``dist.all_reduce`` of the fast CUDA plane's device path, on any
machine (no GPU): the PG face with the CUDA plane's CPU emulation (``MOONCAKE_FAST_CUDA_EMULATE=cpu``, the
device path's kernel steps run on the host), one rank by default, so nothing waits for a peer.

    python benchmarks/eager_host_path.py [--ranks 1] [--iters 5000] [--quick on,off] [--json out.json]

Each layer of the call is timed on rank 0 by a wrapper (``time.perf_counter_ns``, about 0.3 µs each) and
reported as the mean µs per call, nested layers indented under the ones that call them: the quick lane's
layers (``--quick on``, the default path of a repeated call) and the usual path's (``off``), each in a group
of its own.  ``emulated kernel`` is the part a GPU runs instead; the host's own time per call is the median
call minus it.  On a GPU machine
add the CUDA calls (the launch, an event, stream queries) and, with several ranks, the wait for the slowest
(tests/fast_cuda/pg_profile.py ``etrace8`` measures that on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
HELPERS = os.path.join(REPO, "tests", "fast_cuda")  # pg_integration: the face with the emulated CUDA plane

def measure(iters: int) -> dict:
    """On every rank: time ``iters`` 8 B all_reduces (after 200 untimed), each layer of the path they take (the
    quick lane's, or the usual one's where it is off) wrapped."""
    import torch
    import torch.distributed as dist
    from mooncake.testing.layers import LayerTimer, eager_layers
    timer = LayerTimer(eager_layers(dist.group.WORLD))
    timer.install()
    x = torch.ones(2)
    dist.barrier()
    calls = []
    for i in range(iters + 200):
        if i == 200:
            timer.clear()
        t0 = time.perf_counter_ns()
        dist.all_reduce(x)
        calls.append(time.perf_counter_ns() - t0)
    calls = calls[200:]
    return {"median_us": statistics.median(calls) / 1e3, "layers_us": timer.report(iters)["layers_us"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--quick", default="on,off", help="the quick lane on, off, or both (in that order)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HELPERS, REPO, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, HELPERS)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import eager_host_path as me  # the workers import the job by module name
    from mooncake.testing.cluster import Cluster
    record = {"ranks": args.ranks, "iters": args.iters, "runs": {}}
    for quick in [q for q in args.quick.split(",") if q]:
        env = {"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CUDA_DEVICE": "on", "MOONCAKE_FAST_CUDA_EMULATE_LAG": "0",
               "MOONCAKE_FAST_CUDA_QUICK": quick}
        c = Cluster(args.ranks, "mooncake-cpu", env=env, timeout_s=300, options=("pg_integration.options", (), {}))
        try:
            res = c.run(me.measure, args.iters, timeout_s=600)[0]
        finally:
            c.close()
        layers = res["layers_us"]
        kernel = sum(v for k, v in layers.items() if k.strip() == "emulated kernel")
        print(f"eager dist.all_reduce, 8 B, {args.ranks} rank(s), emulated device, quick lane {quick}: median "
              f"{res['median_us']:.1f} us per call, host {res['median_us'] - kernel:.1f} us without the emulated kernel")
        for label in layers:  # the GPU's layers (launch, event, the spin) take no time here
            print(f"  {layers.get(label, 0.0):8.1f} us  {label}")
        record["runs"][quick] = {**res, "host_us": res["median_us"] - kernel}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
