"""One rank of a CUDA fast-path EP run (started by fcuda_grid.py; all ranks share cuda:0, ideally under MPS).

    python fcuda_worker.py --rank r --world R --store FILE --cases cases.json --out DIR

IPC handles are exchanged over a gloo group on a FileStore (no mooncake PG, no UCX).  Each case's
normative outputs are saved to ``DIR/<case>_r<rank>.pt``; timings are printed as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fcuda_cases import BIG_TIMEOUT_US, expert_output, make_inputs, valid_dispatch  # noqa: E402

from mooncake.control.errors import ArgumentError  # noqa: E402
from mooncake.fast.cuda.ep import FastEPBuffer  # noqa: E402
from mooncake.model import ep as model  # noqa: E402


def _finish(mode: str, event, hook) -> bool:
    ok = callable(hook)
    if mode == "hook":
        ok = ok and event is None
        hook()
    elif mode == "async":
        ok = ok and event is not None
        event.current_stream_wait()
    else:
        ok = ok and event is None
    return ok


def run_graph_case(buf: FastEPBuffer, case: dict, rank: int, timeout_us: int = BIG_TIMEOUT_US) -> dict:
    """Capture one dispatch + combine in a CUDA graph and replay it twice (sequence numbers live on the device)."""
    dev = buf.device
    R, T, E = case["R"], case["T"], case["E"]
    L, fp8 = E // R, case["fp8"]
    x, topk, weights = (t.to(dev) for t in make_inputs(case, rank))
    active = torch.ones(R, dtype=torch.int32, device=dev)
    recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=fp8, check=False)
    q, scales = recv if fp8 else (recv, None)
    y = expert_output(q, scales, count, rank, L, fp8)  # dispatch is deterministic: the replays see the same rows
    buf.combine(y, topk, weights, active, timeout_us, handle)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=fp8, check=False)
        combined, _, _ = buf.combine(y, topk, weights, active, timeout_us, handle)
    t0 = time.monotonic()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    elapsed = time.monotonic() - t0
    q, scales = recv if fp8 else (recv, None)
    res = valid_dispatch(q, scales, count, handle[0], handle[1], fp8)
    res["active_dispatch"] = active.cpu().clone()
    res["combined"] = combined.cpu().clone()
    res["active_combine"] = active.cpu().clone()
    res["types_ok"] = True
    res["t_dispatch"], res["t_combine"] = elapsed, 0.0
    return res


def run_reject_case(buf: FastEPBuffer, case: dict, rank: int) -> dict | None:
    """One rank's dispatch is rejected (bad timeout_us); it still counts as a call there, the others time
    that rank out.  The cases after this one check that every rank's calls are still in step."""
    dev = buf.device
    R, T, E, fp8 = case["R"], case["T"], case["E"], case["fp8"]
    x, topk, _ = (t.to(dev) for t in make_inputs(case, rank))
    active = torch.ones(R, dtype=torch.int32, device=dev)
    if rank == case["reject"]:
        try:
            buf.dispatch(x, topk, active, T, E, -5, use_fp8=fp8)
        except ArgumentError:
            return None
        raise RuntimeError("dispatch with timeout_us=-5 was not rejected")
    t0 = time.monotonic()
    recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, case["timeout_us"], use_fp8=fp8)
    torch.cuda.synchronize()
    q, scales = recv if fp8 else (recv, None)
    res = valid_dispatch(q, scales, count, handle[0], handle[1], fp8)
    res["active_dispatch"] = active.cpu().clone()
    res["combined"] = None
    res["t_dispatch"], res["t_combine"] = time.monotonic() - t0, 0.0
    return res


def run_case(buf: FastEPBuffer, case: dict, rank: int, timeout_us: int = BIG_TIMEOUT_US) -> dict:
    if case.get("graph"):
        return run_graph_case(buf, case, rank, timeout_us)
    if case.get("reject") is not None:
        return run_reject_case(buf, case, rank)
    dev = buf.device
    R, T, E = case["R"], case["T"], case["E"]
    L, fp8, mode = E // R, case["fp8"], case.get("mode", "plain")
    x, topk, weights = make_inputs(case, rank)
    x, topk, weights = x.to(dev), topk.to(dev), weights.to(dev)
    active = torch.ones(R, dtype=torch.int32, device=dev)
    if case.get("premasked") is not None:
        active[case["premasked"]] = 0
    if case.get("cpu_mask"):
        active = active.cpu()
    kw = dict(async_finish=mode == "async", return_recv_hook=mode == "hook")
    stats = torch.zeros(L, dtype=torch.int32, device=dev)
    rounds = 2 if case.get("twice") else 1
    t0 = time.monotonic()
    for _ in range(rounds):
        recv, count, handle, event, hook = buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=fp8,
                                                        cumulative_local_expert_recv_stats=stats, **kw)
        types_ok = _finish(mode, event, hook)
    torch.cuda.synchronize()
    t_dispatch = time.monotonic() - t0
    q, scales = recv if fp8 else (recv, None)
    res = valid_dispatch(q, scales, count, handle[0], handle[1], fp8)
    res["active_dispatch"] = active.cpu().clone()
    res["stats_ok"] = bool(torch.equal(stats.cpu(), count.cpu() * rounds))
    y = expert_output(q, scales, count, rank, L, fp8)
    if case.get("zc"):
        cb = buf.get_next_combine_buffer(handle)
        cb.copy_(y)
        xin = cb
    else:
        xin = y
    out = torch.zeros(x.shape, dtype=torch.bfloat16, device=dev) if case.get("out") else None
    t1 = time.monotonic()
    combined, event, hook = buf.combine(xin, topk, weights, active, timeout_us, handle,
                                        zero_copy=bool(case.get("zc")), out=out, **kw)
    types_ok = _finish(mode, event, hook) and types_ok
    torch.cuda.synchronize()
    t_combine = time.monotonic() - t1
    if out is not None:
        types_ok = types_ok and combined is out
    res["combined"] = combined.cpu().clone()
    res["active_combine"] = active.cpu().clone()
    res["types_ok"] = bool(types_ok) and res["stats_ok"]
    res["t_dispatch"], res["t_combine"] = t_dispatch, t_combine
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--cases", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--via-buffer", action="store_true",
                   help="drive mooncake.ep.Buffer (MOONCAKE_IMPL=fast) instead of FastEPBuffer")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.cuda.set_device(0)
    rank, R = args.rank, args.world
    with open(args.cases) as f:
        cases = json.load(f)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=R,
                            timeout=timedelta(seconds=120))
    hint = max(model.get_ep_buffer_size_hint(c["T"], c["H"], R, c["E"]) for c in cases)
    if args.via_buffer:
        from mooncake.ep import Buffer

        buf = Buffer(dist.group.WORLD, hint)
        buf.device = torch.device("cuda", 0)
    else:
        buf = FastEPBuffer(dist.group.WORLD, hint)
    dist.barrier()
    for case in cases:
        try:
            if case.get("dead") is not None:
                if rank == case["dead"]:
                    print(json.dumps({"rank": rank, "case": case["name"], "event": "exiting before dispatch"}),
                          flush=True)
                    os._exit(0)
                time.sleep(0.5)  # let the dying rank go first
                res = run_case(buf, case, rank, timeout_us=case["timeout_us"])
            else:
                res = run_case(buf, case, rank)
        except Exception:
            traceback.print_exc()
            sys.stdout.flush()
            os._exit(1)
        if args.via_buffer and getattr(buf, "_fast", None) is None:
            print("Buffer did not take the CUDA fast path", flush=True)
            os._exit(1)
        if res is not None:
            torch.save(res, os.path.join(args.out, f"{case['name']}_r{rank}.pt"))
            print(json.dumps({"rank": rank, "case": case["name"], "t_dispatch_s": round(res["t_dispatch"], 6),
                              "t_combine_s": round(res["t_combine"], 6),
                              "active": res.get("active_combine", res["active_dispatch"]).tolist()}), flush=True)
        if case.get("dead") is None:
            dist.barrier()
    if any(c.get("dead") is not None for c in cases):
        os._exit(0)  # a peer is gone: skip the gloo teardown
    if not args.via_buffer:
        buf.destroy()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
