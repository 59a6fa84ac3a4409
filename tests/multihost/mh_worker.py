"""One rank of the two-host tests (tests/multihost): started inside a network namespace by test_two_hosts.py.

argv: rank world port outdir impl role.  role "founder": one of the four ranks started together (0, 1 on
host A, 2, 3 on host B); rank 0 hosts the TCPStore (MASTER_ADDR=10.77.0.1) and is never killed.  role
"joiner": a replacement for rank 2 or 3, started by the test after host B's ranks died (rank 2 on host A:
the other host; rank 3 on host B, "rebooted").

The founders' script, in order:
  1. collectives, a send/recv ring and EP dispatch/combine (CPU), every result bitwise equal to the model;
  2. host B's ranks (2 and 3) both die inside an all_reduce: ranks 0, 1 complete it over themselves, one verdict;
  3. ranks 0, 1 admit the two replacements (get_peer_state, recover_ranks); all four run collectives and
     the ring again, checked against the model over all four;
  4. rank 1 (host A) dies inside an all_reduce: ranks 0, 2, 3 (on both hosts) complete it, one verdict.
Writes ``outdir/rank<r>.json`` (a joiner: ``rank<r>j.json``): failures (empty = every result bitwise equal
to mooncake.model), the implementation, the fast plane's hybrid note, the UCX address and each fault's outcome.
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

rank, world, port, outdir, impl, role = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                         sys.argv[5], sys.argv[6])
torch.set_num_threads(1)
name = f"rank{rank}" + ("j" if role == "joiner" else "")
out = {"rank": rank, "role": role, "failures": []}
bad = out["failures"]
ALL = [1] * world


def put():
    tmp = os.path.join(outdir, name + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, os.path.join(outdir, name + ".json"))


def data(r, n=1000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed * 100 + r))


def collectives(seed, active, tag):
    """all_reduce, all_gather, broadcast, reduce_scatter and a send/recv ring over ``active``."""
    members = [r for r in range(world) if active[r]]
    t = data(rank, seed=seed).clone()
    dist.all_reduce(t)
    if not torch.equal(t, mc.all_reduce([data(r, seed=seed) for r in range(world)], ReduceOp.SUM, active)[rank]):
        bad.append(f"{tag} all_reduce")
    parts = [torch.empty(1000) for _ in range(world)]
    dist.all_gather(parts, data(rank, seed=seed + 1))
    want = mc.all_gather([data(r, seed=seed + 1) for r in range(world)], active)[rank]
    if not all(torch.equal(a, b) for a, b in zip(parts, want)):
        bad.append(f"{tag} all_gather")
    root = members[-1]
    t = data(rank, seed=seed + 2).clone()
    dist.broadcast(t, src=root)
    if not torch.equal(t, data(root, seed=seed + 2)):
        bad.append(f"{tag} broadcast")
    slots = [[data(s * world + d, seed=seed + 3) for d in range(world)] for s in range(world)]
    t = torch.empty(1000)
    dist.reduce_scatter(t, [x.clone() for x in slots[rank]])
    if not torch.equal(t, mc.reduce_scatter(slots, ReduceOp.SUM, active)[rank]):
        bad.append(f"{tag} reduce_scatter")
    i = members.index(rank)
    nxt, prev = members[(i + 1) % len(members)], members[(i - 1) % len(members)]
    t = torch.empty(1000)
    send = dist.isend(data(rank, seed=seed + 4), nxt)
    dist.recv(t, prev)
    send.wait()
    if not torch.equal(t, data(prev, seed=seed + 4)):
        bad.append(f"{tag} send/recv ring")


def ep_round(group):
    """EP dispatch/combine on CPU tensors (the ref EP path: there is no CPU fast EP), across the hosts."""
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
    out["ep_impl"] = buf.implementation


def fault(seed, victims, before):
    """``victims`` die (SIGKILL, at a fault point inside an all_reduce over ``before``: the first victim
    after posting its first send, the others before sending); the survivors complete the op over
    themselves.  Returns what every survivor must agree on."""
    from mooncake.control import faults
    t = data(rank, seed=seed).clone()
    if rank in victims:
        faults.arm("mid_transfer" if rank == victims[0] else "before_send", "kill")
    dist.all_reduce(t)
    assert rank not in victims, "a victim outlived its fault point"
    mask = pg.get_active_ranks(group).tolist()
    after = [0 if r in victims else a for r, a in enumerate(before)]
    want = mc.all_reduce([data(r, seed=seed) for r in range(world)], ReduceOp.SUM, after)[rank]
    return {"mask": mask, "bits": t.view(torch.int32).tolist(), "model": torch.equal(t, want),
            "expected_mask": mask == after, "world_size": dist.get_world_size()}


def admit(ranks, limit_s=60.0):
    deadline = time.monotonic() + limit_s
    while not all(pg.get_peer_state(group, ranks)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {ranks} did not ask to join within {limit_s} s")
        time.sleep(0.05)
    pg.recover_ranks(group, ranks)


timeout = timedelta(seconds=30)
if role == "joiner":
    dist.init_process_group("mooncake-cpu", rank=rank, world_size=world, timeout=timeout,
                            pg_options=pg.MooncakeBackendOptions(world, is_extension=True))
else:
    dist.init_process_group("mooncake-cpu", rank=rank, world_size=world, timeout=timeout)
group = dist.group.WORLD
out["host_ip"] = list(host_ip_choice())
out["impl"] = list(pg.get_implementation(group))

if role == "founder":
    out["hybrid"] = getattr(group._plane, "hybrid", None)
    collectives(0, ALL, "start")
    ep_round(group)
    put()
    dist.barrier()
    # 2. host B's ranks die together
    out["host_fault"] = fault(10, [2, 3], ALL)
    put()
    # 3. their replacements join: rank 2 from host A, rank 3 from host B
    admit([2, 3])
else:
    pg.join_group(group, timedelta(seconds=60))
out["hybrid_after_join"] = getattr(group._plane, "hybrid", None)
out["remote_after_join"] = getattr(group._plane, "remote_ranks", None)
out["mask_after_join"] = pg.get_active_ranks(group).tolist()
collectives(20, ALL, "joined")
put()
# 4. rank 1 (host A) dies; ranks 0 (A), 2 (A, the replacement) and 3 (B) remain
out["rank_fault"] = fault(30, [1], ALL)
put()
dist.destroy_process_group()
