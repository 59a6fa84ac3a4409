"""One rank of the two-host tests (tests/multihost): started inside a network namespace by test_two_hosts.py.

argv: rank world port outdir impl.  Rank 0 (host A) hosts the TCPStore (MASTER_ADDR=10.77.0.1); the fault
kills rank 3, on host B.  Writes ``outdir/rank<r>.json``: failures (empty = every result bitwise equal to
mooncake.model), the implementation, the fast plane's delegate, the UCX address and the fault's outcome.
"""

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import mooncake.pg as pg
from mooncake.model import collectives as mc
from mooncake.model import ep as model_ep
from mooncake.model.reduce import ReduceOp
from mooncake.pg.options import host_ip_choice

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "ep"))
from ep_jobs import expert_output, make_inputs  # noqa: E402

rank, world, port, outdir, impl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
out = {"rank": rank, "failures": []}
bad = out["failures"]


def put():
    with open(os.path.join(outdir, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(out, f)
    os.replace(os.path.join(outdir, f"rank{rank}.json.tmp"), os.path.join(outdir, f"rank{rank}.json"))


def data(r, n=1000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed * 100 + r))


dist.init_process_group("mooncake-cpu", rank=rank, world_size=world, timeout=timedelta(seconds=30))
group = dist.group.WORLD
out["host_ip"] = list(host_ip_choice())
out["impl"] = list(pg.get_implementation(group))
out["delegate"] = getattr(group._plane, "delegate", None)
active = [1] * world

t = data(rank).clone()
dist.all_reduce(t)
if not torch.equal(t, mc.all_reduce([data(r) for r in range(world)], ReduceOp.SUM, active)[rank]):
    bad.append("all_reduce")
parts = [torch.empty(1000) for _ in range(world)]
dist.all_gather(parts, data(rank, seed=1))
if not all(torch.equal(a, b) for a, b in zip(parts, mc.all_gather([data(r, seed=1) for r in range(world)], active)[rank])):
    bad.append("all_gather")
t = data(rank, seed=2).clone()
dist.broadcast(t, src=3)
if not torch.equal(t, data(3, seed=2)):
    bad.append("broadcast")
slots = [[data(s * world + d, seed=3) for d in range(world)] for s in range(world)]
t = torch.empty(1000)
dist.reduce_scatter(t, [x.clone() for x in slots[rank]])
if not torch.equal(t, mc.reduce_scatter(slots, ReduceOp.SUM, active)[rank]):
    bad.append("reduce_scatter")
t = torch.empty(1000)
send = dist.isend(data(rank, seed=4), (rank + 1) % world)
dist.recv(t, (rank - 1) % world)
send.wait()
if not torch.equal(t, data((rank - 1) % world, seed=4)):
    bad.append("send/recv ring")

if impl == "ref":  # EP on CPU tensors: the ref EP path, across the two hosts
    from mooncake.ep import Buffer
    case = dict(T=8, H=128, E=8, K=2, fp8=False, seed=7, n=[8, 5, 0, 8], mask_p=0.25)
    buf = Buffer(group, Buffer.get_ep_buffer_size_hint(case["T"], case["H"], world, case["E"]))
    x, topk, w = make_inputs(case, rank)
    mask = torch.ones(world, dtype=torch.int32)
    recv, count, handle, _, _ = buf.dispatch(x, topk, mask, case["T"], case["E"], 20_000_000, use_fp8=False)
    L = case["E"] // world
    combined, _, _ = buf.combine(expert_output(recv, None, count, rank, L, False), topk, w, mask, 20_000_000, handle)
    xs, topks, ws = zip(*(make_inputs(case, r) for r in range(world)))
    results, active_out = model_ep.dispatch(list(xs), list(topks), case["E"], case["T"],
                                            torch.ones(world, dtype=torch.int32), use_fp8=False)
    ys = [expert_output(res.recv_x, None, res.recv_count, r, L, False) for r, res in enumerate(results)]
    expected = model_ep.combine(ys, results, list(topks), list(ws), active_out)
    if not torch.equal(count, results[rank].recv_count):
        bad.append("ep dispatch recv_count")
    if not torch.equal(combined.view(torch.int16), expected[rank].view(torch.int16)):
        bad.append("ep combine")
put()

# the fault: rank 3 (host B) dies while the others are in an all_reduce; they complete it over themselves
dist.barrier()
t = data(rank, seed=5).clone()
if rank == 3:
    work = dist.all_reduce(t, async_op=True)
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)
dist.all_reduce(t)
mask = pg.get_active_ranks(group).tolist()
# rank 3's data may have reached everyone before it died: the op then completed over all four
models = [mc.all_reduce([data(r, seed=5) for r in range(world)], ReduceOp.SUM, m)[rank]
          for m in ([1, 1, 1, 0], [1, 1, 1, 1])]
out["fault"] = {"mask": mask, "bits": t.view(torch.int32).tolist(), "model": any(torch.equal(t, m) for m in models)}
put()
dist.destroy_process_group()
