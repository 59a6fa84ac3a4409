"""Drive the CUDA PG plane directly (no torch.distributed): cluster workers started with ``init=False``
open the plane with a GroupInfo over the test process's TCPStore and post ops with OpContext objects.

Works on CUDA tensors (the workers' current device) and, with ``MOONCAKE_FAST_CUDA_EMULATE=cpu`` in the
workers' environment, on CPU tensors (the same protocol, lanes in shared memory: runs on any machine).
Inputs are generated here from seeds on the CPU and moved to the device, so the test process builds every
rank's inputs for the model without receiving them.  Importable as ``pg_harness`` (tests/fast_cuda is put
on sys.path by the tests and by scripts/gpu_pg_check.sh).
"""

from __future__ import annotations

import os
import time

import torch

from mooncake.control.plane import GroupInfo
from mooncake.control.view import View
from mooncake.model.reduce import ReduceOp
from mooncake.ref.collectives import OpContext
from mooncake.testing import fingerprints

_state: dict = {}

DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64)}


def device() -> torch.device:
    if os.environ.get("MOONCAKE_FAST_CUDA_EMULATE", "").lower() == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------------------------- plane control

def open_plane(prefix: str, capacity: int, ranks: list[int], timeout_s: float = 30.0):
    """Open the plane on this worker, knowing ``ranks``; returns (pid, delegate reason)."""
    from mooncake.fast.cuda import open_group
    from mooncake.testing.cluster import worker_context
    from mooncake.control import auth
    wc = worker_context()
    addresses = {r: f"addr-{r}".encode() for r in ranks}
    store = auth.wrap_store(wc.store)  # sealed records with a job secret, as the PG face hands it over
    info = GroupInfo(store, prefix, wc.rank, capacity, 7, timeout_s, None, dict(addresses), "cuda")
    plane = open_group(info)
    _state[prefix] = {"plane": plane, "seq": 0, "epoch": 0, "active": tuple(sorted(ranks)),
                      "capacity": capacity}
    return os.getpid(), plane.delegate


def open_plane_on_gpus(prefix: str, capacity: int, ranks: list[int], gpus: int, peer_access: bool,
                       own_numbering: bool = False):
    """``open_plane`` with this worker's emulated lanes on GPU ``rank % gpus`` of a host whose GPUs can
    (``peer_access``) or cannot map each other's memory; ``own_numbering``: each rank sees only its own GPU,
    as its ordinal 0 (a CUDA_VISIBLE_DEVICES of its own).  Returns (pid, delegate reason)."""
    from mooncake.fast.cuda import pg
    from mooncake.testing.cluster import worker_context
    rank = worker_context().rank
    init = pg._EmulatedMemory.__init__

    def on_gpu(mem):
        init(mem)
        mem.index = 0 if own_numbering else rank % gpus
        mem.uuid = f"emulated-gpu-{rank % gpus}".encode().ljust(16, b"\0")
    pg._EmulatedMemory.__init__ = on_gpu
    pg._EmulatedMemory.peer_access = staticmethod(lambda device, peer: peer_access)
    try:
        return open_plane(prefix, capacity, ranks)
    finally:
        pg._EmulatedMemory.__init__ = init
        del pg._EmulatedMemory.peer_access  # the class's own again


def device_blocks(prefix: str, nbytes: int) -> tuple[int, int]:
    """The ranks this worker's plane counts on its GPU, and the blocks it gives one device-path launch that
    moves ``nbytes``."""
    from mooncake.fast.cuda import pg
    g = _state[prefix]["plane"].g
    return pg._RANKS_ON_GPU.get(g.mem.uuid, 1), g.launch_blocks(nbytes)


def close_plane(prefix: str):
    st = _state.pop(prefix, None)
    if st is not None:
        st["plane"].close()
    return True


def set_view(prefix: str, epoch: int, active, seq: int | None = None):
    st = _state[prefix]
    st["epoch"], st["active"] = epoch, tuple(active)
    if seq is not None:
        st["seq"] = seq
    return True


def context(prefix: str, name: str = "op", seq: int | None = None, fingerprint=None):
    from mooncake.testing.cluster import worker_context
    st = _state[prefix]
    if seq is None:
        seq = st["seq"]
        st["seq"] += 1
    view = View(st["epoch"], st["capacity"], tuple(st["active"]))
    return OpContext(None, None, 7, worker_context().rank, view, seq, name, fingerprint)


def drive(op, timeout_s: float = 60.0) -> None:
    """Wait for commit (raising on a dead peer or timeout), then finish."""
    deadline = time.monotonic() + timeout_s
    while not op.committed:
        if op.error is not None:
            op.abandon()
            raise op.error
        if op.failed_peers():
            raise RuntimeError(f"peers failed: {sorted(op.failed_peers())}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{op.name} seq {op.seq} state {op.state}: pending {op.pending_ranks()}")
        op.wait(min(0.05, max(0.0, deadline - time.monotonic())))
    op.finish()


# ---------------------------------------------------------------------------------- cases

def values(dtype_name: str, numel: int, seed: int, rank: int, specials: bool = True) -> torch.Tensor:
    """Seeded CPU values of one rank: integers over the full range, floats with specials mixed in."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919)
    if dtype is torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool()
    if dtype.is_floating_point:
        x = (torch.randn(numel, generator=g, dtype=torch.float64) * 100).to(dtype)
        if specials and numel >= 16:
            idx = torch.randint(0, numel, (8,), generator=g)
            x[idx] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -0.0, 0.0]).to(dtype)
        return x
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (numel,), generator=g, dtype=torch.int64).to(dtype)


def case_inputs(case: dict, rank: int):
    """This rank's input(s) for a case on the CPU: a tensor, or a list of k slots (slot ops)."""
    op, k, numel = case["op"], case.get("k"), case["numel"]
    sp = case.get("specials", True)
    if op in ("reduce_scatter", "all_to_all") or (op == "scatter" and rank == case["root"]):
        return [values(case["dtype"], numel, case["seed"] + 1000 * s, rank, sp) for s in range(k)]
    return values(case["dtype"], numel, case["seed"], rank, sp)


def post_case(prefix: str, case: dict):
    """Post one case on this rank; returns (op, outputs to report)."""
    from mooncake.testing.cluster import worker_context
    rank = worker_context().rank
    plane = _state[prefix]["plane"]
    ctx = context(prefix, case["op"], fingerprint=fingerprints.of_case(case))
    op, numel, k = case["op"], case["numel"], case.get("k")
    dtype = DTYPES[case["dtype"]]
    dev = device()
    red = ReduceOp[case["red"]] if case.get("red") else None
    root = case.get("root")
    x = case_inputs(case, rank)
    x = [t.to(dev) for t in x] if isinstance(x, list) else x.to(dev)

    def fresh():
        return torch.full((numel,), 7, dtype=dtype, device=dev)

    if op == "all_reduce":
        return plane.all_reduce(ctx, x, red), x
    if op == "reduce":
        return plane.reduce(ctx, x, red, root), x
    if op == "broadcast":
        return plane.broadcast(ctx, x, root), x
    if op == "all_gather":
        outs = [fresh() for _ in range(k)]
        return plane.all_gather(ctx, outs, x), outs
    if op == "gather":
        outs = [fresh() for _ in range(k)] if rank == root else None
        return plane.gather(ctx, outs, x, root), outs
    if op == "scatter":
        out = fresh()
        return plane.scatter(ctx, out, x if rank == root else None, root), out
    if op == "reduce_scatter":
        out = fresh()
        return plane.reduce_scatter(ctx, out, x, red), out
    if op == "all_to_all":
        outs = [fresh() for _ in range(k)]
        return plane.all_to_all(ctx, outs, x), outs
    if op == "barrier":
        return plane.barrier(ctx), None
    raise ValueError(op)


def _sync():
    if device().type == "cuda":
        torch.cuda.synchronize()


def run_cases(prefix: str, cases: list[dict], mode: str = "sync"):
    """Run ``cases`` in order: one at a time ("sync"), or all posted first then finished in reverse
    order ("async").  Returns each case's outputs (moved to the CPU by the cluster)."""
    if mode == "sync":
        results = []
        for case in cases:
            op, outs = post_case(prefix, case)
            drive(op)
            results.append(outs)
        _sync()
        return results
    posted = [post_case(prefix, case) for case in cases]
    for op, _ in reversed(posted):
        drive(op)
    _sync()
    return [outs for _, outs in posted]


def post_and_abandon(prefix: str, case: dict, wait_s: float = 0.3):
    op, _ = post_case(prefix, case)
    op.wait(wait_s)
    committed = op.committed
    op.abandon()
    return "committed" if committed else "abandoned"


def commit_and_abandon(prefix: str, case: dict, timeout_s: float = 60.0):
    """Post ``case``, wait until it is committed here, abandon it instead of finishing it; returns
    (committed, this rank's tensor afterwards)."""
    op, out = post_case(prefix, case)
    deadline = time.monotonic() + timeout_s
    while not op.committed and time.monotonic() < deadline:
        op.wait(0.05)
    committed = op.committed
    op.abandon()
    _sync()
    return committed, out


def reuse_lane_then_abandon_first(prefix: str, cases: list[dict], timeout_s: float = 60.0):
    """Post ``cases`` (3+), finish all but the first (so the third reuses the first one's lane while the
    first is committed but unfinished), then abandon the first; returns every case's outputs."""
    posted = [post_case(prefix, case) for case in cases]
    for op, _ in reversed(posted[1:]):
        drive(op, timeout_s)
    first = posted[0][0]
    deadline = time.monotonic() + timeout_s
    while not first.committed and time.monotonic() < deadline:
        first.wait(0.05)
    first.abandon()
    _sync()
    return [out for _, out in posted]


def mismatch(prefix: str, cases: list[dict]):
    """Run ``cases`` (which disagree across ranks); returns each outcome as text."""
    msgs = []
    for case in cases:
        op, _ = post_case(prefix, case)
        try:
            drive(op)
            msgs.append("ok")
        except Exception as exc:  # noqa: BLE001
            msgs.append(f"{type(exc).__name__}: {exc}")
    return msgs


def idle_cpu(prefix: str, seconds: float):
    """Post a barrier nobody else joins and wait ``seconds``: returns (CPU s used, committed)."""
    op = _state[prefix]["plane"].barrier(context(prefix, "barrier"))
    t0 = time.process_time()
    end = time.monotonic() + seconds
    while time.monotonic() < end and not op.committed:
        op.wait(end - time.monotonic())
    used = time.process_time() - t0
    op.abandon()
    return used, op.committed


def wait_for_failure(prefix: str, timeout_s: float):
    """Post a barrier and wait until a peer is reported dead: (failed ranks, seconds it took)."""
    op = _state[prefix]["plane"].barrier(context(prefix, "barrier"))
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if op.failed_peers():
            failed = sorted(op.failed_peers())
            op.abandon()
            return failed, time.monotonic() - t0
        op.wait(0.05)
    op.abandon()
    return [], time.monotonic() - t0


def sleep(seconds: float):
    time.sleep(seconds)
    return os.getpid()


# ---------------------------------------------------------------------------------- benchmark

def bench_all_reduce(prefix: str, numel: int, iters: int, warmup: int = 3, dtype_name: str = "float32"):
    """Time ``iters`` all_reduce SUM of ``numel`` elements driven through ``op.wait`` (the plane alone);
    returns per-iteration seconds (this rank's wall clock, the GPU synchronised around each call)."""
    dev = device()
    dtype = DTYPES[dtype_name]
    plane = _state[prefix]["plane"]
    x = torch.ones(numel, dtype=dtype, device=dev)
    times = []
    for i in range(warmup + iters):
        _sync()
        t0 = time.perf_counter()
        op = plane.all_reduce(context(prefix, "all_reduce"), x, ReduceOp.SUM)
        drive(op)
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        x.fill_(1)
    return times


def set_parts_min(nbytes: int):
    """Set the two-phase all_reduce threshold of this worker (bench: parts vs every rank folding all)."""
    from mooncake.fast.cuda import pg
    pg.PARTS_MIN_BYTES = int(nbytes)
    return True


def set_fold(prefix: str, mode: str):
    """Pick the plane's GPU fold in this worker: "kernel" (csrc's one pass) or "torch" (bench)."""
    mem = _state[prefix]["plane"].g.mem
    mem.fold_kernel = mode == "kernel"
    return True


def disable_pidfd():
    """Make os.pidfd_open fail in this worker (as on kernels without it): liveness falls back to /proc."""
    def no_pidfd(pid, flags=0):
        raise OSError(38, "Function not implemented")
    os.pidfd_open = no_pidfd
    return True


def set_env(name: str, value: str):
    """Set an environment variable in this worker (read when a plane opens)."""
    os.environ[name] = value
    return True


def device_path_state(prefix: str):
    """(device path on, why it is off) of this worker's plane."""
    g = _state[prefix]["plane"].g
    return g.dev is not None, g.dev_reason


def device_outcomes(prefix: str):
    """How this worker's device-path launches ended: {"done", "published", "not posted"} counts."""
    dev = _state[prefix]["plane"].g.dev
    return dict(dev.outcomes) if dev is not None else {}


def set_stall(prefix: str, ns: int) -> None:
    """This worker's device-path launches wait ``ns`` before publishing (``MOONCAKE_FAST_CUDA_STALL_WORD``)."""
    _state[prefix]["plane"].g.dev.set_stall(ns)


def run_cases_late(prefix: str, cases: list[dict], delay_s: float):
    """``run_cases`` after sleeping ``delay_s`` before each case (a rank that is merely late)."""
    results = []
    for case in cases:
        time.sleep(delay_s)
        op, outs = post_case(prefix, case)
        drive(op)
        results.append(outs)
    _sync()
    return results


def open_plane_after(delay_s: float, prefix: str, capacity: int, ranks: list[int]):
    """``open_plane`` after ``delay_s`` (a peer that publishes its record late)."""
    time.sleep(delay_s)
    return open_plane(prefix, capacity, ranks)


def forge_record(prefix: str, rank: int):
    """Write an unsigned record under ``rank``'s CUDA-plane key, as an attacker with Store access would."""
    from mooncake.fast.cuda.pg import _record_key
    from mooncake.testing.cluster import worker_context
    worker_context().store.set(_record_key(prefix, rank), b"forged" * 20)
    return True


def device_gave_up_mid_fold(prefix: str, case: dict):
    """Post ``case`` (an all_reduce the device path takes) with the device launch replaced by one that did
    what a multi-block kernel can do before its deadline: copied the input into the lane, published,
    held its peers' lanes and written part of the output, then gave up; abandon the op once the host
    protocol has it.  Returns (this rank's tensor afterwards, its input, whether it freed its hold)."""
    from mooncake.fast.cuda import pg as P
    plane = _state[prefix]["plane"]
    dev = plane.g.dev

    def gave_up_mid_fold(op, lanes, nb):
        lanes[op.active.index(op.me)][:nb].copy_(op.tensor.reshape(-1).view(torch.uint8))
        ctl = plane.g.ctl
        ctl[op.base + P.L_META], ctl[op.base + P.L_META_NUMEL], ctl[op.base + P.L_META_SLOTS] = \
            plane.g.fp_words.head(op.fp, 0)
        ctl[op.base + P.L_PUB] = op.key
        ctl[op.base + P.L_HOLD] = op.key
        op.tensor.reshape(-1)[: op.tensor.numel() // 2] = -1  # the part of a block past its wait

    dev._emulate = gave_up_mid_fold
    op, x = post_case(prefix, case)
    want = case_inputs(case, worker_context_rank())
    deadline = time.monotonic() + 30
    while op.state == P.DEVICE and time.monotonic() < deadline:
        op.wait(0.01)
    state = op.state
    op.abandon()
    freed = int(plane.g.ctl[op.base + P.L_FREE]) == op.key
    return state, x, want, freed


def worker_context_rank() -> int:
    from mooncake.testing.cluster import worker_context
    return worker_context().rank
