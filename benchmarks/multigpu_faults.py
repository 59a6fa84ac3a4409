#!/usr/bin/env python
"""The multi-GPU run on a host of several GPUs (one rank per GPU): faults on GPUs, and the helpers of
``scripts/multigpu_run.sh``.

Subcommands::

    faults   --device cuda|cpu --backend mooncake|mooncake-cpu|gloo --ranks N --out DIR
    ep-bench --ranks R --out DIR [--iters --warmup --timeout]
    ep-compare DIR                  (epbench JSONs of DIR next to DeepEP's and NCCL EP's published EP8 figures)
    pg-compare JSON... [--md FILE]  (pgbench JSONs: mooncake against nccl, size by size; LABEL=JSON
                                     names that file's columns, e.g. "R=8 graph=g8.json")
    machine  --out DIR              (GPUs, peer access and peer-to-peer copy bandwidth, NCCL version)

``faults`` drives one ``mooncake.testing.cluster.Cluster`` (the Store lives in this process, so any rank,
rank 0 included, may die). On ``cuda`` each rank is pinned to GPU ``rank % device_count`` (one rank per
GPU on a host of N >= ranks GPUs; all on GPU 0 under MPS for the one-GPU dry run), the process group is
``mooncake`` with CUDA tensors and EP is the CUDA fast path (``FastEPBuffer`` over that group). On
``cpu`` the group is ``mooncake-cpu`` (or gloo) and EP is the reference ``mooncake.ep.Buffer``.
Phases, in order (each checked against ``mooncake.model``; the run stops at the first phase that fails):

1. ``ep-healthy``: one dispatch + combine on every rank, bitwise against the model.
2. ``ep-kill-before-send``: the victim's dispatch is queued (behind a GPU sleep on cuda) and its process
   is SIGKILLed before it sends; the survivors' dispatch + combine end within the bound with
   ``active_ranks[victim] = 0`` on every survivor and outputs equal to the model without the victim.
3. ``pg-detect``: the survivors' next all_reduce finds the victim dead, agrees, and returns the fold over
   the survivors (mask identical everywhere).
4. ``rejoin``: a replacement starts with ``is_extension=True``; the survivors poll ``get_peer_state`` and
   ``recover_ranks``; it calls ``join_group``; a full-group all_reduce equals the model.
5. ``ep-kill-after-send``: a new EP buffer over the recovered group; the victim's dispatch sends (the
   receive hook is never called) and then it is SIGKILLed: survivors receive its rows (dispatch as the
   model with everyone), then combine masks it (the model with the victim failed during combine).
6. ``pg-detect`` and ``rejoin`` again.
7. ``pg-kill-mid-all_reduce``: rank 0 SIGKILLs itself at the ``mid_transfer`` fault point of an
   all_reduce (``mooncake.control.faults``); survivors return identical bits equal to the fold over the
   survivors (or over everyone if the op stood), the same mask, within the bound; the group is usable.
8. ``rejoin`` of rank 0 and ``ep-final``: EP over the fully recovered group, bitwise.

gloo has no failure agreement and no join protocol: with ``--backend gloo`` only phases 1-2 run.

Writes ``DIR/faults.json`` (every phase: ok, seconds, details) and prints one line per phase; exit
status 0 iff every phase that ran passed.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FCUDA = os.path.join(REPO, "tests", "fast_cuda")
for _p in (FCUDA, HERE, REPO):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# Published peer figures: DeepEP's low-latency table (H800, LL kernels over NVLink where possible, FP8
# dispatch, 288 experts) and NCCL EP's README (NCCL EP 0.1.0; H100, LL, BF16 dispatch and combine).
PEERS = {
    "DeepEP EP8 (H800, FP8 dispatch)": dict(dispatch_us=77.0, dispatch_GBps=98.0, combine_us=114.0,
                                            combine_GBps=127.0),
    "NCCL EP EP8 (H100, BF16 dispatch)": dict(dispatch_us=None, dispatch_GBps=224.3, combine_us=None,
                                              combine_GBps=185.2),
}
# NCCL all_reduce of 1 GiB (bus bandwidth), one process per GPU, NVLS off, seen on the H100 hosts of our
# multi-GPU machines (2, 4 and 8 GPUs)
NCCL_SEEN_1GIB_BUSBW = {2: 329.0, 4: 355.0, 8: 361.0}

PG_ELEMENTS = 1 << 18  # 1 MiB of float32 per rank: several UCX messages, so mid_transfer is mid-way
KILL_BOUND_S = 5.0  # a killed peer is seen through its closed connection / the EP watchdog


# ============================================================================ cluster jobs (workers)

_STATE: dict = {}


def _device():
    """This worker's device: the cluster's (``Cluster(device=...)``), pinned to GPU ``rank % count``."""
    import torch

    from mooncake.testing.cluster import worker_context

    if worker_context().device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_options(rank, world_size, capacity=None, extension_ranks=(), device="cpu"):
    """pg_options of a worker: capacity slots, ``is_extension`` for a replacement."""
    import torch

    import mooncake.pg as pg

    capacity = capacity or world_size
    mask = torch.zeros(capacity, dtype=torch.int32, device="cuda" if device == "cuda" else "cpu")
    return pg.MooncakeBackendOptions(mask, is_extension=rank in tuple(extension_ranks), max_world_size=capacity)


def setup(device: str, group_timeout_s: float | None):
    """First job on every founding worker (and on a replacement once it joined): the group's deadline."""
    import torch.distributed as dist

    if group_timeout_s and dist.get_backend() != "gloo":
        from datetime import timedelta

        import mooncake.pg as pg

        pg.set_timeout(dist.group.WORLD, timedelta(seconds=group_timeout_s))
    dev = _device()
    return {"pid": os.getpid(), "device": str(dev), "name": _device_name(dev)}


def _device_name(dev) -> str:
    import torch

    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def pg_input(seed: int, rank: int):
    import torch

    return torch.randn(PG_ELEMENTS, generator=torch.Generator().manual_seed(seed * 7919 + rank))


def _mask():
    import torch.distributed as dist

    import mooncake.pg as pg

    return pg.get_active_ranks(dist.group.WORLD).clone()


def pg_all_reduce(seed: int, victim: int = -1, point: str = "mid_transfer"):
    """One all_reduce of this rank's input on its device; the victim kills itself at ``point``.
    Returns (result, mask before, mask after, seconds)."""
    import torch.distributed as dist

    from mooncake.control import faults

    before = _mask()
    x = pg_input(seed, dist.get_rank()).to(_device())
    if dist.get_rank() == victim:
        faults.arm(point, "kill")
    start = time.monotonic()
    try:
        dist.all_reduce(x)
        _sync()
    finally:
        faults.disarm()
    return x, before, _mask(), time.monotonic() - start


def _sync():
    import torch

    if _device().type == "cuda":
        torch.cuda.synchronize()


def admit(ranks, seed: int, limit_s: float = 60.0):
    """Healthy side: poll get_peer_state until ``ranks`` asked to join, recover them, then all_reduce."""
    import torch.distributed as dist

    import mooncake.pg as pg

    group = dist.group.WORLD
    deadline = time.monotonic() + limit_s
    start = time.monotonic()
    while not all(pg.get_peer_state(group, list(ranks))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {ranks} did not ask to join within {limit_s} s")
        time.sleep(0.05)
    pg.recover_ranks(group, list(ranks))
    return pg_all_reduce(seed) + (dist.get_world_size(), time.monotonic() - start)


def join(seed: int):
    """Joining side: a local-only all_reduce (must leave the input as is), join_group, all_reduce."""
    import torch
    import torch.distributed as dist

    import mooncake.pg as pg

    local = pg_input(seed + 1, dist.get_rank()).to(_device())
    mine = local.clone()
    dist.all_reduce(local)
    if not torch.equal(local, mine):
        raise AssertionError("a joining rank's collectives must be local-only before join_group returns")
    start = time.monotonic()
    pg.join_group(dist.group.WORLD)
    joined = time.monotonic() - start
    return pg_all_reduce(seed) + (dist.get_world_size(), joined)


def ep_open(impl: str, hint: int):
    import torch.distributed as dist

    if impl == "fast":
        from mooncake.fast.cuda.ep import FastEPBuffer

        _STATE["buf"] = FastEPBuffer(dist.group.WORLD, hint)
    else:
        from mooncake.ep import Buffer

        _STATE["buf"] = Buffer(dist.group.WORLD, hint)
    _STATE["impl"] = impl
    # after a replacement joined, the ranks' EP call ids differ (the ref Buffer numbers calls per process
    # group): update_ep_member() is the documented collective that brings them back in step
    _STATE["buf"].update_ep_member()
    return True


def ep_close():
    buf = _STATE.pop("buf", None)
    if buf is not None and hasattr(buf, "destroy"):
        buf.destroy()  # a barrier over the group, then the device buffer is freed
    return True


def ep_call(case: dict, victim: int = -1, variant: str = "", timeout_us: int = 2_000_000):
    """One dispatch + combine of ``case``; the victim dies as ``variant`` says, the others return what
    they got (the normative outputs on the CPU and the times)."""
    import torch
    import torch.distributed as dist

    from fcuda_cases import expert_output, make_inputs, valid_dispatch

    buf, impl, dev = _STATE["buf"], _STATE["impl"], _device()
    rank, R = dist.get_rank(), case["R"]
    T, E, fp8 = case["T"], case["E"], case["fp8"]
    L = E // R
    x, topk, weights = (t.to(dev) for t in make_inputs(case, rank))
    active = torch.ones(R, dtype=torch.int32, device=dev)
    if rank == victim:
        if variant == "before_send":
            if impl == "fast":  # the dispatch is enqueued behind ~0.5 s of GPU sleep: it never sends
                torch.cuda._sleep(1_000_000_000)
                buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=fp8, check=False)
            time.sleep(0.1)
        elif variant == "after_send":
            buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=fp8, return_recv_hook=True)
            if impl == "fast":
                torch.cuda.synchronize()  # the send kernel finished: every peer has this rank's rows
            else:
                from mooncake.ep import buffer as ref_buffer

                ref_buffer._OUTBOX.flush(10.0)
        else:
            raise ValueError(variant)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    kw = {"check": False} if impl == "fast" else {}
    recv, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, timeout_us, use_fp8=fp8, **kw)
    _sync()
    t_dispatch = time.monotonic() - t0
    q, scales = recv if fp8 else (recv, None)
    res = valid_dispatch(q, scales, count, handle[0], handle[1], fp8)
    res["active_dispatch"] = active.cpu().clone()
    y = expert_output(q, scales, count, rank, L, fp8)
    t1 = time.monotonic()
    combined, _, _ = buf.combine(y, topk, weights, active, timeout_us, handle)
    _sync()
    res["t_combine"] = time.monotonic() - t1
    res["t_dispatch"] = t_dispatch
    res["combined"] = combined.cpu().clone()
    res["active_combine"] = active.cpu().clone()
    return res


# ============================================================================ model side (parent)


def ep_case(R: int, seed: int) -> dict:
    return dict(R=R, T=32, H=2048, E=8 * R, K=8, name=f"faults-{seed}", seed=seed, fp8=True, mask_p=0.1)


def ep_expected(case: dict, dispatch_failed=(), combine_failed=()):
    """The model's (valid dispatch per rank, combined per rank, mask after dispatch, mask after combine)."""
    import torch

    from fcuda_cases import expert_output, make_inputs, valid_dispatch
    from mooncake.model import ep as model

    R, T, E, fp8 = case["R"], case["T"], case["E"], case["fp8"]
    L = E // R
    xs, topks, weights = zip(*[make_inputs(case, r) for r in range(R)])
    results, active_d = model.dispatch(list(xs), list(topks), E, T, torch.ones(R, dtype=torch.int32),
                                       failed=frozenset(dispatch_failed), use_fp8=fp8)
    valid = [valid_dispatch(r.recv_x, r.recv_scales, r.recv_count, r.src_info, r.layout_range, fp8) for r in results]
    ys = [expert_output(r.recv_x, r.recv_scales, r.recv_count, k, L, fp8) for k, r in enumerate(results)]
    active_c = active_d.clone()
    for f in combine_failed:
        active_c[f] = 0
    combined = model.combine(ys, results, list(topks), list(weights), active_c)
    return valid, combined, active_d, active_c


def check_ep(case, results, survivors, want, bound_s) -> list[str]:
    from fcuda_cases import _bits, compare

    valid, combined, active_d, active_c = want
    errs = []
    for r in survivors:
        got = results[r]
        if got is None:
            errs.append(f"rank {r}: no result")
            continue
        part = dict(got, combined=None)
        errs += [f"rank {r}: {e}" for e in compare(case, r, part, valid[r], None, active_d)]
        a, b = _bits(got["combined"]), _bits(combined[r])
        if a.shape != b.shape or not bool((a == b).all()):
            errs.append(f"rank {r}: combined_x differs from the model")
        if not bool((got["active_combine"] == active_c).all()):
            errs.append(f"rank {r}: active_ranks after combine {got['active_combine'].tolist()} != "
                        f"{active_c.tolist()}")
        took = got["t_dispatch"] + got["t_combine"]
        if took > bound_s:
            errs.append(f"rank {r}: dispatch + combine took {took:.2f} s > {bound_s:.1f} s")
    return errs


def fold(seed: int, mask: list[int]):
    from mooncake.model.collectives import all_reduce
    from mooncake.model.reduce import ReduceOp

    inputs = [pg_input(seed, r) for r in range(len(mask))]
    return next(t for t in all_reduce(inputs, ReduceOp.SUM, mask) if t is not None)


def _same_bits(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def check_pg(results, members, seed, capacity, want_mask, bound_s, allow_stood=False) -> tuple[list[str], str]:
    """Survivors' all_reduce: identical bits, identical masks == want_mask, equal to the model fold."""
    errs, outcome = [], ""
    outs = [results[r] for r in members]
    if any(o is None for o in outs):
        return [f"ranks {[r for r in members if results[r] is None]} returned nothing"], outcome
    first = outs[0][0]
    for r, o in zip(members, outs):
        if not _same_bits(o[0], first):
            errs.append(f"rank {r}: result differs from rank {members[0]}'s (divergent)")
        if o[2].tolist() != want_mask:
            errs.append(f"rank {r}: mask after {o[2].tolist()} != {want_mask}")
        if o[3] > bound_s:
            errs.append(f"rank {r}: all_reduce took {o[3]:.2f} s > {bound_s:.1f} s")
    if _same_bits(first, fold(seed, want_mask)):
        outcome = f"fold over {want_mask}"
    elif allow_stood and _same_bits(first, fold(seed, outs[0][1].tolist())):
        outcome = f"op stood: fold over {outs[0][1].tolist()}"
    else:
        errs.append("result equals neither the model's fold over the survivors nor over the mask before")
    return errs, outcome


# ============================================================================ driver


class Phases:
    def __init__(self, out: str | None):
        self.out, self.items, self.t0 = out, [], time.monotonic()

    def add(self, name: str, ok: bool, seconds: float, **detail):
        item = dict(name=name, ok=bool(ok), seconds=round(seconds, 3), **detail)
        self.items.append(item)
        extra = "; ".join(f"{k}={v}" for k, v in detail.items() if k != "errors")
        print(f"[{'PASS' if ok else 'FAIL'}] {name:<28} {seconds:7.2f} s  {extra}", flush=True)
        for e in detail.get("errors", [])[:20]:
            print(f"         {e}", flush=True)
        self.save()
        return ok

    def skip(self, name: str, why: str):
        self.items.append(dict(name=name, ok=None, skipped=why))
        print(f"[SKIP] {name:<28} {why}", flush=True)
        self.save()

    def save(self, **meta):
        if self.out:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "faults.json"), "w") as f:
                json.dump(dict(meta, phases=self.items, wall_s=round(time.monotonic() - self.t0, 2)), f, indent=1)


def _run_fault(cluster, victim, fn, *args, timeout_s=None):
    """Run a job during which ``victim`` dies: the survivors' results, or raise with the others' errors."""
    from mooncake.testing.cluster import ClusterError

    try:
        results = cluster.run(fn, *args, timeout_s=timeout_s)
        raise AssertionError(f"rank {victim} was meant to die and returned {results[victim]!r:.200}")
    except ClusterError as exc:
        others = {r: e for r, e in exc.errors.items() if not (r == victim and e.kind == "died")}
        if others:
            raise
        return exc.results


def faults(args) -> int:
    import torch

    import multigpu_faults as jobs  # jobs must be importable by name in the workers (not __main__)
    from mooncake.testing.cluster import Cluster, ClusterError

    R, dev, backend = args.ranks, args.device, args.backend
    if dev == "cuda":
        if not torch.cuda.is_available():
            print("faults: --device cuda but CUDA is not available here", file=sys.stderr)
            return 2
        if backend != "mooncake":
            print("faults: on cuda the backend is 'mooncake' (CUDA tensors)", file=sys.stderr)
            return 2
    elif backend == "mooncake":
        backend = "mooncake-cpu"
    impl = args.ep or ("fast" if dev == "cuda" else "ref")
    elastic = backend != "gloo"
    phases = Phases(args.out)
    ngpu = torch.cuda.device_count() if dev == "cuda" else 0
    placement = ("one rank per GPU" if ngpu >= R else f"{R} ranks on {ngpu} GPU(s) (MPS dry run)") if dev == "cuda" \
        else f"{R} CPU processes"
    meta = dict(device=dev, backend=backend, ranks=R, ep_impl=impl, placement=placement, gpus=ngpu,
                torch=torch.__version__, mps=bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
                nvls_off=os.environ.get("NCCL_NVLS_ENABLE") == "0", impl=os.environ.get("MOONCAKE_IMPL", "auto"))
    print(f"# faults: {json.dumps(meta)}", flush=True)
    phases.save(**meta)
    if impl == "fast":
        from mooncake.fast.cuda import unavailable_reason

        why = unavailable_reason()
        if why:
            phases.skip("ep (all phases)", f"CUDA fast path unavailable: {why}")
            impl = None
    env = {"MOONCAKE_IMPL": os.environ.get("MOONCAKE_IMPL", "auto")}
    options = ("multigpu_faults.make_options", (), {"capacity": R, "device": dev}) if elastic else None

    def joiner_options(rank):
        return ("multigpu_faults.make_options", (), {"capacity": R, "extension_ranks": (rank,), "device": dev})

    t = time.monotonic()
    try:
        cluster = Cluster(R, backend, options=options, timeout_s=args.timeout, env=env, device=dev)
    except ClusterError as exc:
        phases.add("start", False, time.monotonic() - t, errors=str(exc).splitlines()[-30:])
        return 1
    ok = True
    try:
        info = cluster.run(jobs.setup, dev, args.group_timeout)
        phases.add("start", True, time.monotonic() - t, devices=sorted({i["device"] for i in info}),
                   card=info[0]["name"])
        hint = None
        seed = 100

        def ep_phase(name, victim=-1, variant="", timeout_us=2_000_000, d_failed=(), c_failed=()):
            nonlocal seed
            seed += 1
            case = ep_case(R, seed)
            want = ep_expected(case, d_failed, c_failed)
            t = time.monotonic()
            if victim < 0:
                results = cluster.run(jobs.ep_call, case, timeout_s=args.timeout)
            else:
                results = _run_fault(cluster, victim, jobs.ep_call, case, victim, variant, timeout_us,
                                     timeout_s=args.timeout)
            survivors = [r for r in range(R) if r != victim]
            bound = (timeout_us * 1e-6 if timeout_us > 0 else 0) + KILL_BOUND_S
            errs = check_ep(case, results, survivors, want, bound)
            took = max(results[r]["t_dispatch"] + results[r]["t_combine"] for r in survivors)
            return phases.add(name, not errs, time.monotonic() - t, victim=victim, timeout_us=timeout_us,
                              survivors_max_s=round(took, 3), mask=want[3].tolist(), errors=errs)

        def detect(victim, name="pg-detect"):
            nonlocal seed
            seed += 1
            members = [r for r in range(R) if r != victim]
            t = time.monotonic()
            results = cluster.run(jobs.pg_all_reduce, seed, ranks=members, timeout_s=args.timeout)
            want_mask = [0 if r == victim else 1 for r in range(R)]
            errs, outcome = check_pg(results, members, seed, R, want_mask, KILL_BOUND_S + args.group_timeout)
            return phases.add(name, not errs, time.monotonic() - t, victim=victim, outcome=outcome,
                              max_s=round(max(results[r][3] for r in members), 3), errors=errs)

        def rejoin(victim):
            nonlocal seed
            seed += 1
            survivors = [r for r in range(R) if r != victim]
            t = time.monotonic()
            cluster.spawn(victim, options=joiner_options(victim))
            calls = {r: (jobs.admit, ([victim], seed), {}) for r in survivors}
            calls[victim] = (jobs.join, (seed,), {})
            results = cluster.run_each(calls, timeout_s=args.timeout + 60)
            cluster.run(jobs.setup, dev, args.group_timeout, ranks=[victim])
            errs, outcome = check_pg(results, list(range(R)), seed, R, [1] * R, args.group_timeout)
            sizes = sorted({results[r][4] for r in range(R)})
            if sizes != [R]:
                errs.append(f"world sizes after the join {sizes} != [{R}]")
            return phases.add(f"rejoin-rank{victim}", not errs, time.monotonic() - t, outcome=outcome,
                              join_group_s=round(results[victim][5], 3), errors=errs)

        if impl:
            hint = _ep_hint(R)
            cluster.run(jobs.ep_open, impl, hint)
            ok = ep_phase("ep-healthy")
            v1 = R - 1
            before_timeout = -1 if impl == "fast" else 2_000_000  # fast: the host watchdog ends the waits
            ok = ok and ep_phase("ep-kill-before-send", v1, "before_send", before_timeout, d_failed=(v1,),
                                 c_failed=(v1,))
        else:  # no EP here: the victim is killed while idle, the next all_reduce must find out
            v1 = R - 1
            cluster.kill(v1)
        if not elastic:
            phases.skip("pg-detect / rejoin / pg-kill", "gloo has no failure agreement and no join protocol")
            return _finish(phases, meta, ok)
        ok = ok and detect(v1)
        if ok and impl:
            cluster.run(jobs.ep_close, ranks=[r for r in range(R) if r != v1], timeout_s=args.timeout)
        ok = ok and rejoin(v1)
        if impl and ok:
            v2 = 1 if R > 2 else R - 1
            cluster.run(jobs.ep_open, impl, hint)
            ok = ep_phase("ep-kill-after-send", v2, "after_send", 2_000_000, d_failed=(), c_failed=(v2,))
            ok = ok and detect(v2)
            if ok:
                cluster.run(jobs.ep_close, ranks=[r for r in range(R) if r != v2], timeout_s=args.timeout)
            ok = ok and rejoin(v2)
        if ok:  # rank 0 dies in the middle of an all_reduce on its device
            seed += 1
            survivors = list(range(1, R))
            t = time.monotonic()
            results = _run_fault(cluster, 0, jobs.pg_all_reduce, seed, 0, "mid_transfer", timeout_s=args.timeout)
            errs, outcome = check_pg(results, survivors, seed, R, [0] + [1] * (R - 1),
                                     KILL_BOUND_S + args.group_timeout, allow_stood=True)
            ok = phases.add("pg-kill-mid-all_reduce", not errs, time.monotonic() - t, victim=0, outcome=outcome,
                            max_s=round(max(results[r][3] for r in survivors), 3), errors=errs)
            ok = ok and detect(0, "pg-usable-after")
            ok = ok and rejoin(0)
        if ok and impl:
            cluster.run(jobs.ep_open, impl, hint)
            ok = ep_phase("ep-final (recovered group)")
            cluster.run(jobs.ep_close, timeout_s=args.timeout)
    except Exception as exc:  # noqa: BLE001 - recorded; the phases after it did not run
        import traceback

        text = str(exc) if isinstance(exc, (ClusterError, AssertionError)) else traceback.format_exc()
        phases.add("error", False, 0.0, errors=text.splitlines()[-40:])
        ok = False
    finally:
        cluster.close()
    return _finish(phases, meta, ok)


def _ep_hint(R: int) -> int:
    from mooncake.model import ep as model

    c = ep_case(R, 0)
    return model.get_ep_buffer_size_hint(c["T"], c["H"], R, c["E"])


def _finish(phases: Phases, meta: dict, ok: bool) -> int:
    failed = [p["name"] for p in phases.items if p.get("ok") is False]
    ok = ok and not failed
    if not ok:
        print("# the phases after the first failure did not run (each builds on the group the one before left)",
              flush=True)
    phases.save(**meta, result="PASS" if ok else "FAIL")
    print(f"# faults: {'PASS' if ok else 'FAIL'}" + (f" (failed: {', '.join(failed)})" if failed else ""),
          flush=True)
    return 0 if ok else 1


# ============================================================================ epbench, one rank per GPU


def _visible_gpus() -> list[str]:
    import torch

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def ep_bench(args) -> int:
    """benchmarks/epbench.py's workers, one per GPU: each worker's CUDA_VISIBLE_DEVICES lists every GPU,
    rotated so that its device 0 (epbench pins cuda:0) is GPU ``rank``; CUDA IPC and peer access keep
    working because every process still sees every GPU.  With fewer GPUs than ranks, all ranks share
    GPU 0 (run under MPS), as epbench does by itself."""
    import torch

    import epbench

    R = args.ranks
    gpus = _visible_gpus()
    per_gpu = len(gpus) >= R
    tmp = os.path.join(args.out, f".epbench-R{R}-tmp")
    os.makedirs(tmp, exist_ok=True)
    store = os.path.join(tmp, "store")
    if os.path.exists(store):
        os.remove(store)
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    base["PYTHONPATH"] = REPO + os.pathsep + base.get("PYTHONPATH", "")
    procs = []
    for r in range(R):
        env = dict(base)
        if per_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[r:] + gpus[:r])
        cmd = [sys.executable, os.path.join(HERE, "epbench.py"), "--worker", "--rank", str(r), "--world", str(R),
               "--store", store, "--outdir-tmp", tmp, "--iters", str(args.iters), "--warmup", str(args.warmup)]
        procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + args.timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    if any(c != 0 for c in codes):
        print(f"ep-bench R={R}: worker exit codes {codes} (None = killed at {args.timeout:.0f} s)", file=sys.stderr)
        return 1
    ranks = []
    for r in range(R):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
    card = torch.cuda.get_device_name(0)
    rc = epbench.write_report(ranks, R, args.iters, args.out, card, torch.__version__, torch.version.cuda)
    slug = f"epbench-{epbench.card_slug(card)}-R{R}"
    placement = f"one rank per GPU ({len(gpus)} GPUs visible)" if per_gpu else \
        f"{R} ranks on one GPU{' (MPS)' if os.environ.get('CUDA_MPS_PIPE_DIRECTORY') else ''}"
    path = os.path.join(args.out, slug + ".json")
    with open(path) as f:
        report = json.load(f)
    report["placement"] = placement
    report["gpus"] = len(gpus) if per_gpu else 1
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    md = os.path.join(args.out, slug + ".md")
    with open(md) as f:
        text = f.read()
    if per_gpu:  # epbench's header and floor are written for ranks sharing one GPU
        text = text.replace(f"R = {R} ranks on one GPU", f"R = {R} ranks, one per GPU", 1)
        text += ("\nOne rank per GPU: the 'HBM floor' and 'x floor' columns are epbench's one-GPU floor (all ranks' "
                 "bytes through one GPU's memory) and do not bound this placement; see the peer-to-peer bandwidth "
                 "in machine.txt for the NVLink floor.\n")
    with open(md, "w") as f:
        f.write(text)
    return rc


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def ep_compare(args) -> int:
    """Our epbench numbers (uniform routing, DeepEP byte accounting) next to the peers' EP8 figures."""
    files = sorted(glob.glob(os.path.join(args.dir, "epbench-*-R*.json")),
                   key=lambda p: int(p.rsplit("-R", 1)[1].split(".")[0]))
    if not files:
        print(f"ep-compare: no epbench-*-R*.json in {args.dir}")
        return 1
    lines = ["# EP (low-latency config: T=128, H=7168, top-8, 256 experts, FP8 dispatch, BF16 combine) vs peers",
             "",
             "Ours: uniform routing, p50 over ranks and iterations, DeepEP byte accounting (dispatch "
             "H + H/128*4 + 16 = 7408 B, combine 2H = 14336 B per selected (token, expert)), GB/s per rank.",
             "Peers: published EP8 figures (DeepEP's low-latency table, NCCL EP's README), not measured here. "
             "DeepEP: H800, 288 experts. "
             "NCCL EP dispatches BF16 (14336 B per pair), so its dispatch GB/s is not the same workload as our FP8 "
             "dispatch; combine is BF16 in all three.",
             "",
             "| R | placement | mode | dispatch us | combine us | d+c us | dispatch GB/s | combine GB/s "
             "| x DeepEP EP8 latency (d / c) | x NCCL EP EP8 combine GB/s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|---:|"]
    deep = PEERS["DeepEP EP8 (H800, FP8 dispatch)"]
    nccl = PEERS["NCCL EP EP8 (H100, BF16 dispatch)"]
    for path in files:
        with open(path) as f:
            rep = json.load(f)
        for mode in ("graph", "eager"):
            m = rep["routings"]["uniform"][mode]
            d, c = m["dispatch"], m["combine"]
            where = rep.get("placement") or ("one GPU (MPS)" if rep.get("mps") else "one GPU")
            lines.append(
                f"| {rep['ranks']} | {where} | {mode} | {d['p50_us']:.1f} | {c['p50_us']:.1f} "
                f"| {m['dispatch_plus_combine']['p50_us']:.1f} | {d['deepep_GBps_per_rank']:.1f} "
                f"| {c['deepep_GBps_per_rank']:.1f} | {d['p50_us'] / deep['dispatch_us']:.2f} / "
                f"{c['p50_us'] / deep['combine_us']:.2f} | {c['deepep_GBps_per_rank'] / nccl['combine_GBps']:.2f} |")
    lines += ["", "| peer (EP8, published) | dispatch us | dispatch GB/s | combine us | combine GB/s |",
              "|---|---:|---:|---:|---:|"]
    for name, p in PEERS.items():
        lines.append(f"| {name} | {_fmt(p['dispatch_us'], '.0f')} | {_fmt(p['dispatch_GBps'])} "
                     f"| {_fmt(p['combine_us'], '.0f')} | {_fmt(p['combine_GBps'])} |")
    lines.append("")
    lines.append("x latency > 1: slower than DeepEP; x GB/s < 1: less bandwidth than NCCL EP. Only R = 8 is the "
                 "peers' configuration; R = 2, 4 are shown against the same EP8 figures for scale only.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


# ============================================================================ pgbench: mooncake vs nccl


def pg_compare(args) -> int:
    records, metas = [], []
    for spec in args.json:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        records += [{**r, "backend": label} if label else r for r in data["results"]]
        metas.append(data["meta"])
    if not records:
        print("pg-compare: no pgbench results")
        return 1
    worlds = "/".join(str(w) for w in dict.fromkeys(m["world_size"] for m in metas))
    world = metas[0]["world_size"]
    backends = list(dict.fromkeys(r["backend"] for r in records))
    base = next((b for b in backends if b == "nccl"), None)
    ours = [b for b in backends if b != base]
    lines = [f"# pgbench side by side, {worlds} ranks ({', '.join(backends)}); in-place, float sum; "
             f"x = time / {base or 'n/a'}'s (> 1: slower)", ""]
    for coll in dict.fromkeys(r["collective"] for r in records):
        lines += [f"## {coll}", "",
                  "| size | " + " | ".join(f"{b} us | {b} busbw GB/s" for b in backends)
                  + "".join(f" | x {b}" for b in ours if base) + " |",
                  "|---:|" + "---:|" * (2 * len(backends) + (len(ours) if base else 0))]
        by: dict = {}
        for r in records:
            if r["collective"] == coll:
                by.setdefault(r["size_bytes"], {})[r["backend"]] = r.get("in_place") or r.get("out_of_place")
        for size in sorted(by):
            cells, row = [], by[size]
            for b in backends:
                m = row.get(b)
                cells += [_fmt(m["time_us"]) if m else "-", _fmt(m["busbw"], ".2f") if m else "-"]
            if base:
                for b in ours:
                    m, n = row.get(b), row.get(base)
                    cells.append(_fmt(m["time_us"] / n["time_us"], ".2f") if m and n and n["time_us"] else "-")
            lines.append(f"| {_human(size)} | " + " | ".join(cells) + " |")
        lines.append("")
    ar = [r for r in records
          if r["collective"] == "all_reduce" and r["backend"] == "nccl" and r["size_bytes"] == 1 << 30]
    if ar and world in NCCL_SEEN_1GIB_BUSBW:
        m = ar[0].get("in_place") or ar[0]["out_of_place"]
        lines.append(f"Sanity: nccl all_reduce 1 GiB busbw {m['busbw']:.0f} GB/s here; our H100 multi-GPU hosts "
                     f"showed {NCCL_SEEN_1GIB_BUSBW[world]:.0f} GB/s with {world} GPUs (NVLS off).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


def _human(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n}"


# ============================================================================ machine


def machine(args) -> int:
    """GPUs, peer access matrix and GPU0 <-> GPUj copy bandwidth (256 MiB, CUDA events), NCCL version."""
    import torch

    info = dict(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                     "NVSHMEM_DISABLE_NVLS", "CUDA_VISIBLE_DEVICES",
                                                     "CUDA_MPS_PIPE_DIRECTORY", "MOONCAKE_IMPL")})
    try:
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # noqa: BLE001
        info["nccl"] = f"unavailable: {exc}"
    n = info["gpus"]
    info["names"] = [torch.cuda.get_device_name(i) for i in range(n)]
    info["peer_access"] = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]
    bw = {}
    nbytes = args.mib << 20
    for j in range(1, n):
        for src, dst in ((0, j), (j, 0)):
            a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src}")
            b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst}")
            b.copy_(a)
            torch.cuda.synchronize(src)
            torch.cuda.synchronize(dst)
            times = []
            with torch.cuda.device(src):
                for _ in range(5):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    b.copy_(a)
                    e1.record()
                    e1.synchronize()
                    times.append(e0.elapsed_time(e1) * 1e-3)
            bw[f"{src}->{dst}"] = round(nbytes / sorted(times)[len(times) // 2] / 1e9, 1)
            del a, b
    info["p2p_copy_GBps"] = bw
    text = json.dumps(info, indent=1)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "machine.json"), "w") as f:
            f.write(text)
    return 0


# ============================================================================ main


def main(argv=None) -> int:
    # NVLink multicast stays off in this process and everything it starts (the device tool's rule)
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("faults", help="kill ranks mid-dispatch and mid-all_reduce; replacements join")
    f.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    f.add_argument("--backend", choices=["mooncake", "mooncake-cpu", "gloo"], default="mooncake")
    f.add_argument("--ranks", type=int, default=None, help="default: the number of GPUs (cuda), 3 (cpu)")
    f.add_argument("--ep", choices=["fast", "ref"], default=None, help="EP implementation (default fast on cuda)")
    f.add_argument("--timeout", type=float, default=90.0, help="limit of one cluster job, seconds")
    f.add_argument("--group-timeout", type=float, default=20.0, help="process group deadline, seconds")
    f.add_argument("--out", default=None)
    e = sub.add_parser("ep-bench", help="epbench with one rank per GPU")
    e.add_argument("--ranks", type=int, required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--iters", type=int, default=50)
    e.add_argument("--warmup", type=int, default=10)
    e.add_argument("--timeout", type=float, default=240)
    c = sub.add_parser("ep-compare", help="epbench results next to DeepEP / NCCL EP")
    c.add_argument("dir")
    c.add_argument("--md", default=None)
    g = sub.add_parser("pg-compare", help="pgbench JSONs: mooncake against nccl")
    g.add_argument("json", nargs="+")
    g.add_argument("--md", default=None)
    m = sub.add_parser("machine", help="GPUs, peer access, peer-to-peer copy bandwidth")
    m.add_argument("--out", default=None)
    m.add_argument("--mib", type=int, default=256)
    args = p.parse_args(argv)
    if args.cmd == "faults":
        if args.ranks is None:
            if args.device == "cuda":
                import torch

                args.ranks = torch.cuda.device_count()
            else:
                args.ranks = 3
        if args.ranks < 2:
            p.error("faults needs at least 2 ranks")
        return faults(args)
    if args.cmd == "ep-bench":
        return ep_bench(args)
    if args.cmd == "ep-compare":
        return ep_compare(args)
    if args.cmd == "pg-compare":
        return pg_compare(args)
    return machine(args)


if __name__ == "__main__":
    sys.exit(main())
