"""The host side of CUDA-graph capture on the fast CUDA plane, on the CPU (the kernels themselves run in
tests/fast_cuda/pg_graph.py and test_cuda_pg_face.py on a GPU):

* what one launch of the device path moves for each captured collective (``_shape``), checked by running
  the kernel's copy-in and reads (csrc/mooncake_pg_cuda.cu, "device protocol") on CPU tensors against
  ``mooncake.model``, bit for bit, with inactive ranks;
* that the compiled kernel's argument checks accept every launch ``_shape`` makes (where nvcc is present
  and no GPU: the launches then fail for want of a driver, not for their arguments);
* the words a replay leaves (trouble, stale) and how they are reported and forgotten (``_DevicePath``);
* the PG face's argument checks and the planes' refusals for a call issued while capturing: clear errors
  naming the argument, before any communication; the group still pairs its next op.
"""

from __future__ import annotations

import os
import sys
import threading
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graph_jobs as GJ  # noqa: E402
from mooncake.control.fingerprint import Fingerprint, LaneWords  # noqa: E402
from mooncake.control.plane import GraphCall  # noqa: E402
from mooncake.control.wire import OpCode  # noqa: E402
from mooncake.fast.cuda import pg as P  # noqa: E402
from mooncake.model import collectives as M  # noqa: E402
from mooncake.model.reduce import ReduceOp, fold  # noqa: E402


def _run_launches(calls: dict[int, GraphCall], active: list[int], direct: bool = False) -> None:
    """The device path's launches of ``calls`` (rank -> its call) as the kernel runs them: every rank copies
    ``in_bytes`` of its input into its lane, then reads the lanes (fold kinds: ``fold`` over the active
    ranks' parts, ascending; copy kinds: slot s from the lane of rank s, or the root's, zeros for an
    inactive rank).  ``direct``: the all_reduce on the ranks' own tensors (every rank offered a pool tensor):
    rank i folds part i of every tensor into every tensor."""
    shapes = {r: P._shape(c, active, r, direct=direct) for r, c in calls.items()}
    if direct:
        for r, c in calls.items():
            s, i = shapes[r], active.index(r)
            assert s.kind == P.KIND_ALL_REDUCE_DIRECT and s.in_bytes == 0 and s.lane_bytes == 0
            lo, hi = min(s.count, i * s.part), min(s.count, (i + 1) * s.part)
            parts = [calls[q].input.reshape(-1)[lo:hi] for q in active]
            result = fold(ReduceOp(s.op), parts)
            for q in active:
                calls[q].output.reshape(-1)[lo:hi] = result
        return
    lanes = {}
    for r, c in calls.items():
        lane = torch.zeros(shapes[r].lane_bytes, dtype=torch.uint8)
        n = shapes[r].in_bytes
        lane[:n] = c.input.reshape(-1).view(torch.uint8)[:n]
        lanes[r] = lane
    for r, c in calls.items():  # in parts, step 2: rank i folds part i of every lane into its result region
        s = shapes[r]
        if s.kind == P.KIND_ALL_REDUCE_PARTS:
            i, es = active.index(r), c.input.element_size()
            lo, hi = min(s.count, i * s.part), min(s.count, (i + 1) * s.part)
            parts = [lanes[q][lo * es:hi * es].view(c.input.dtype) for q in active]
            lanes[r][s.rd_off + lo * es:s.rd_off + hi * es] = fold(ReduceOp(s.op), parts).view(torch.uint8)
    for r, c in calls.items():
        s = shapes[r]
        out = c.output.reshape(-1)
        if s.kind == P.KIND_ALL_REDUCE_PARTS:  # step 3: every rank's part from its result region
            raw, es = out.view(torch.uint8), c.input.element_size()
            for i, q in enumerate(active):
                lo, hi = min(s.count, i * s.part), min(s.count, (i + 1) * s.part)
                raw[lo * es:hi * es] = lanes[q][s.rd_off + lo * es:s.rd_off + hi * es]
            continue
        if s.kind in (P.KIND_ALL_REDUCE, P.KIND_REDUCE_SCATTER):
            if s.count:
                parts = [lanes[q][s.rd_off:].view(c.input.dtype)[:s.count] for q in active]
                out[:s.count].copy_(fold(ReduceOp(s.op), parts))
            continue
        raw = out.view(torch.uint8)
        for slot in range(s.slots):
            src = active[s.root] if s.kind == P.KIND_BROADCAST else slot
            dst = raw[slot * s.count:(slot + 1) * s.count]
            if src not in active:
                dst.zero_()
            elif not (src == r and c.input.data_ptr() == c.output.data_ptr()):
                dst.copy_(lanes[src][s.rd_off:s.rd_off + s.count])


def _inputs(capacity, numel, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(numel, generator=g) * 100).to(dtype) for _ in range(capacity)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity,active", [(2, [0, 1]), (4, [0, 2, 3]), (3, [1])])
def test_launch_shapes_give_the_models_bits(capacity, active, dtype):
    mask = [int(r in active) for r in range(capacity)]
    n = 7  # odd: slot offsets that are not 16-byte aligned
    for red in (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MAX):
        xs = _inputs(capacity, n, dtype, 1)
        mine = {r: xs[r].clone() for r in active}
        calls = {r: GraphCall("all_reduce", mine[r], mine[r], op=red) for r in active}
        _run_launches(calls, active)
        want = M.all_reduce(xs, red, mask)
        assert all(torch.equal(calls[r].output.view(torch.uint8), want[r].view(torch.uint8)) for r in active)

        xs = _inputs(capacity, n * capacity, dtype, 2)
        calls = {r: GraphCall("reduce_scatter", xs[r], torch.full((n,), -1.0, dtype=dtype), capacity, red)
                 for r in active}
        _run_launches(calls, active)
        want = M.reduce_scatter_tensor(xs, red, mask)
        assert all(torch.equal(calls[r].output.view(torch.uint8), want[r].view(torch.uint8)) for r in active)

    xs = _inputs(capacity, n, dtype, 3)
    calls = {r: GraphCall("all_gather", xs[r], torch.full((n * capacity,), -1.0, dtype=dtype), capacity)
             for r in active}
    _run_launches(calls, active)
    want = M.all_gather_into_tensor(xs, mask)
    assert all(torch.equal(calls[r].output.view(torch.uint8), want[r].view(torch.uint8)) for r in active)

    xs = _inputs(capacity, n * capacity, dtype, 4)
    calls = {r: GraphCall("all_to_all", xs[r], torch.full((n * capacity,), -1.0, dtype=dtype), capacity)
             for r in active}
    _run_launches(calls, active)
    want = M.all_to_all_single(xs, mask)
    assert all(torch.equal(calls[r].output.view(torch.uint8), want[r].view(torch.uint8)) for r in active)

    root = active[-1]
    xs = _inputs(capacity, n, dtype, 5)
    mine = {r: xs[r].clone() for r in active}
    calls = {r: GraphCall("broadcast", mine[r], mine[r], root=root) for r in active}
    _run_launches(calls, active)
    want = M.broadcast(xs, root, mask)
    assert all(torch.equal(mine[r].view(torch.uint8), want[r].view(torch.uint8)) for r in active)
    assert P._shape(calls[active[0]], active, active[0]).in_bytes == (0 if active[0] != root else n * xs[0].element_size())

    # reduce, gather, scatter: the launches of all_reduce, all_gather and broadcast that only some ranks read out
    size = active[-1] + 1
    xs = _inputs(capacity, n, dtype, 6)
    mine = {r: xs[r].clone() for r in active}
    calls = {r: GraphCall("reduce", mine[r], mine[r], op=ReduceOp.SUM, root=root) for r in active}
    _run_launches(calls, active)
    want = M.reduce(xs, ReduceOp.SUM, root, mask)
    assert torch.equal(mine[root].view(torch.uint8), want[root].view(torch.uint8))
    assert all(torch.equal(mine[r], xs[r]) for r in active if r != root)  # non-roots' tensors untouched

    xs = _inputs(capacity, n, dtype, 7)
    outs = {r: torch.full((n * capacity,), -1.0, dtype=dtype) for r in active}
    calls = {r: GraphCall("gather", xs[r], outs[r], slots=capacity if r == root else 0, root=root) for r in active}
    _run_launches(calls, active)
    want = M.gather(xs, root, mask)
    assert torch.equal(outs[root].view(torch.uint8), torch.cat(want[root]).view(torch.uint8))
    assert all(torch.equal(outs[r], torch.full((n * capacity,), -1.0, dtype=dtype)) for r in active if r != root)

    slots = _inputs(capacity, n, dtype, 8)  # the root's scatter_list, one slot per rank of the capacity
    outs = {r: torch.full((n,), -1.0, dtype=dtype) for r in active}
    calls = {r: GraphCall("scatter", torch.cat(slots) if r == root else outs[r], outs[r],
                          slots=capacity if r == root else 0, root=root) for r in active}
    _run_launches(calls, active)
    want = M.scatter(slots, root, mask)
    assert all(torch.equal(outs[r].view(torch.uint8), want[r].view(torch.uint8)) for r in active)
    assert P._shape(calls[root], active, root).in_bytes == size * n * xs[0].element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity,active", [(2, [0, 1]), (4, [0, 2, 3]), (8, list(range(8)))])
@pytest.mark.parametrize("direct", [False, True], ids=["lanes", "pool-tensors"])
def test_a_large_all_reduce_in_parts_gives_the_models_bits(monkeypatch, capacity, active, dtype, direct):
    """A captured all_reduce of ``PARTS_MIN_BYTES`` or more runs in parts: each rank folds one part (the
    model's fold of those elements) and gathers the others' parts, or, on pool tensors, writes its part into
    every rank's tensor.  Sizes that leave the last part short or empty included."""
    monkeypatch.setattr(P, "PARTS_MIN_BYTES", 64)
    if direct and len(active) < 2:
        pytest.skip("one rank offers nothing")
    mask = [int(r in active) for r in range(capacity)]
    for numel in (40, 700, 2 * P.PART_ALIGN + 1, 3000):
        xs = _inputs(capacity, numel, dtype, numel)
        for red in (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MIN):
            mine = {r: xs[r].clone() for r in active}
            calls = {r: GraphCall("all_reduce", mine[r], mine[r], op=red) for r in active}
            shape = P._shape(calls[active[0]], active, active[0], direct=direct)
            in_parts = len(active) > 1 and numel * xs[0].element_size() >= 64
            assert (shape.kind in (P.KIND_ALL_REDUCE_PARTS, P.KIND_ALL_REDUCE_DIRECT)) == (in_parts or direct)
            if in_parts:
                assert shape.part % P.PART_ALIGN == 0 and shape.part * len(active) >= numel
                assert shape.rd_off >= shape.in_bytes and shape.lane_bytes >= shape.rd_off + shape.in_bytes
            _run_launches(calls, active, direct)
            want = M.all_reduce(xs, red, mask)
            assert all(torch.equal(mine[r].view(torch.uint8), want[r].view(torch.uint8)) for r in active), \
                (numel, red)


@pytest.fixture(scope="module")
def cuda_lib(tmp_path_factory):
    """The CUDA library built here (nvcc, no GPU): its argument checks run, its launches fail for want of a
    driver.  Not on a machine with a GPU, where a launch with these made-up addresses would run."""
    import ctypes

    from mooncake.fast.cuda import build
    from mooncake.fast.cuda.lib import _declare
    if build.nvcc_path() is None:
        pytest.skip("no nvcc")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the launches would run")
    before = os.environ.get("MOONCAKE_CUDA_CACHE")
    os.environ["MOONCAKE_CUDA_CACHE"] = str(tmp_path_factory.mktemp("cuda-cache"))
    try:
        lib = ctypes.CDLL(str(build.build()))
    finally:
        if before is None:
            del os.environ["MOONCAKE_CUDA_CACHE"]
        else:
            os.environ["MOONCAKE_CUDA_CACHE"] = before
    _declare(lib)
    return lib


def test_every_launch_shape_passes_the_kernels_argument_check(cuda_lib, monkeypatch):
    """Each rank's launch of every capturable call (roots and non-roots, an all_reduce in parts, one on pool
    tensors) is accepted by
    ``mc_pg_dev_launch``'s checks: it fails for want of a driver (cudaErrorInsufficientDriver / NoDevice),
    never with cudaErrorInvalidValue (a non-root's gather once was)."""
    import ctypes

    from mooncake.fast.cuda.lib import McPgDevArgs
    monkeypatch.setattr(P, "PARTS_MIN_BYTES", 1024)
    invalid_value = 1
    capacity, active, root, n = 4, [0, 2, 3], 2, 300
    x = torch.zeros(n)
    for r in active:
        calls = [GraphCall("all_reduce", x, x, op=ReduceOp.SUM),
                 GraphCall("all_reduce", x[:8], x[:8], op=ReduceOp.AVG),
                 GraphCall("reduce", x, x, op=ReduceOp.SUM, root=root),
                 GraphCall("reduce_scatter", torch.zeros(n * capacity), x, capacity, ReduceOp.SUM),
                 GraphCall("all_gather", x, torch.zeros(n * capacity), capacity),
                 GraphCall("gather", x, torch.zeros(n * capacity), slots=capacity if r == root else 0, root=root),
                 GraphCall("scatter", torch.zeros(n * capacity) if r == root else x, x,
                           slots=capacity if r == root else 0, root=root),
                 GraphCall("broadcast", x, x, root=root),
                 GraphCall("all_to_all", torch.zeros(n * capacity), torch.zeros(n * capacity), capacity)]
        kinds = set()
        for call, direct in [(c, False) for c in calls] + [(calls[0], True)]:
            shape = P._shape(call, active, r, direct=direct)
            kinds.add(shape.kind)
            a = McPgDevArgs()
            a.n, a.me, a.kind, a.slots, a.root, a.part = len(active), active.index(r), shape.kind, shape.slots, \
                shape.root, shape.part
            a.in_bytes, a.rd_off, a.count, a.op, a.dtype = shape.in_bytes, shape.rd_off, shape.count, shape.op, \
                shape.dtype
            rc = cuda_lib.mc_pg_dev_launch(ctypes.byref(a), 1, 0)
            assert rc != invalid_value, (r, call.kind, shape)
        assert {P.KIND_ALL_REDUCE_PARTS, P.KIND_ALL_REDUCE_DIRECT} <= kinds


def test_all_to_all_fingerprint_words_carry_the_element_count():
    words = LaneWords(P.L_META, P.L_META_NUMEL, P.L_META_SLOTS, P.L_SLOTS + 4, 2)
    a = Fingerprint(OpCode.ALL_TO_ALL, 8, slots=2, sends=(4, 4), recvs=(4, 4))
    b = Fingerprint(OpCode.ALL_TO_ALL, 8, slots=2, sends=(5, 5), recvs=(5, 5))
    assert P._fp_words(words, a) != P._fp_words(words, b)  # the kernel compares these three words only
    c = Fingerprint(OpCode.ALL_GATHER, 8, numel=4, slots=2)
    assert P._fp_words(words, c) == words.head(c, 0)


def test_call_problems_name_the_argument():
    cpu = torch.device("cpu")
    x = torch.ones(8)
    assert P._graph_call_problem(GraphCall("all_reduce", x, x, op=ReduceOp.SUM), cpu) is None
    bad = P._graph_call_problem(GraphCall("all_gather", x, torch.ones(16, 2)[:, 0], 2), cpu)
    assert "output tensor must be contiguous" in bad, bad
    i = torch.ones(8, dtype=torch.int32)
    bad = P._graph_call_problem(GraphCall("reduce_scatter", i, i[:4], 2, ReduceOp.SUM), cpu)
    assert "captured reduce_scatter takes" in bad and "torch.int32" in bad, bad
    assert P._graph_call_problem(GraphCall("all_gather", i, torch.ones(16, dtype=torch.int32), 2), cpu) is None


# ------------------------------------------------------------------------------ the words a replay leaves

class _FakePadMemory:
    """Device words by address (``store_word`` / ``load_word``), counting the writes."""

    emulated = True

    def __init__(self):
        self.words: dict[int, int] = {}
        self.stores = 0

    def store_word(self, addr: int, value: int) -> None:
        self.words[addr] = value
        self.stores += 1

    def load_word(self, addr: int) -> int:
        return self.words.get(addr, 0)


PAD_ADDR = 1 << 20


def _device_path(epoch: int = 0, dead=frozenset(), pad: bool = False):
    """A ``_DevicePath`` over plain host words (no device): its trouble / stale reporting; with ``pad``,
    a pad (the words captured ops read) in fake device memory."""
    g = types.SimpleNamespace(ctl=[0] * 64, peers={1: None, 2: None}, _live_checked=0.0,
                              mem=_FakePadMemory(), failed=lambda ranks: frozenset(dead))
    dev = object.__new__(P._DevicePath)
    dev.g, dev.reported, dev.handled, dev.pad_epoch, dev.pad_lock = g, 0, -1, -1, threading.Lock()
    dev.graph_lanes = {P.PAD_LANE: types.SimpleNamespace(addr=PAD_ADDR)} if pad else {}
    dev.pool_maps, dev.pool_pending = {}, frozenset()
    dev.graph_view(epoch)
    return dev, g.ctl


def _pad_word(dev, w: int) -> int:
    return dev.g.mem.load_word(PAD_ADDR + 8 * w)


def _key(epoch, n):
    return epoch << P.SEQ_BITS | P.GRAPH_BIT | n


def test_trouble_is_reported_once_and_a_late_report_of_a_handled_view_is_dropped():
    dev, ctl = _device_path(3, dead={2})
    assert dev.trouble() is None
    ctl[P.W_GRAPH_TROUBLE] = _key(3, 5)
    assert dev.trouble() == (3, False, frozenset({2}))
    assert dev.trouble() is None  # once
    dev.reset(4)  # the PG face raised it; the agreement moved the view to epoch 4
    assert ctl[P.W_GRAPH_TROUBLE] == 0 and ctl[P.W_GRAPH_EPOCH] == 4
    ctl[P.W_GRAPH_TROUBLE] = _key(3, 6)  # a peer's replay of that view gave up later
    assert dev.trouble() is None
    ctl[P.W_GRAPH_TROUBLE] = _key(4, 0)  # a new one
    assert dev.trouble() == (4, False, frozenset({2}))


def test_a_peers_report_reaches_a_rank_whose_replay_got_through():
    """The trouble word of a rank that holds no trouble of its own, written by a peer's kernel (after this
    rank adopted the view the agreement chose): reported with the epoch it happened in, so the PG face
    raises that epoch's decision."""
    dev, ctl = _device_path(5)
    dev.graph_view(6)  # the agreement on epoch 5 reached this rank first
    ctl[P.W_GRAPH_TROUBLE] = _key(5, 2)
    assert dev.trouble() == (5, False, frozenset())


def test_the_pad_follows_the_view_and_forgets_only_older_trouble():
    """Captured ops read the view epoch and trouble in the rank's pad (device memory): the host writes the
    epoch there when the view moves (once per change), and a reset clears the pad's trouble of earlier
    views only, as it does the host word."""
    dev, ctl = _device_path(3, pad=True)
    assert _pad_word(dev, P.W_GRAPH_EPOCH) == 3
    stores = dev.g.mem.stores
    dev.graph_view(3)
    dev.graph_view(2)  # never backwards
    assert dev.g.mem.stores == stores and _pad_word(dev, P.W_GRAPH_EPOCH) == 3
    dev.g.mem.store_word(PAD_ADDR + 8 * P.W_GRAPH_TROUBLE, _key(3, 1))  # a captured op gave up
    ctl[P.W_GRAPH_TROUBLE] = _key(3, 1)
    dev.reset(4)
    assert _pad_word(dev, P.W_GRAPH_TROUBLE) == 0 and _pad_word(dev, P.W_GRAPH_EPOCH) == 4
    dev.g.mem.store_word(PAD_ADDR + 8 * P.W_GRAPH_TROUBLE, _key(4, 2))
    dev.reset(4)  # trouble of the current view stays until raised and the view moves on
    assert _pad_word(dev, P.W_GRAPH_TROUBLE) == _key(4, 2)


def test_stale_replays_are_reported_after_trouble_and_the_view_only_moves_forward():
    dev, ctl = _device_path(2)
    dev.graph_view(1)
    assert ctl[P.W_GRAPH_EPOCH] == 2
    ctl[P.W_GRAPH_STALE] = _key(1, 0)
    ctl[P.W_GRAPH_TROUBLE] = _key(2, 1)
    assert dev.trouble() == (2, False, frozenset())
    assert dev.trouble() == (1, True, frozenset())
    dev.reset(3)
    assert ctl[P.W_GRAPH_STALE] == 0 and dev.trouble() is None


# ------------------------------------------------------------------------------ the PG face while capturing

EMU = {"MOONCAKE_FAST_CUDA_EMULATE": "cpu", "MOONCAKE_FAST_CUDA_EMULATE_LAG": "2", "MOONCAKE_FAST_CUDA_DEVICE": "on"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["ref", "fast-cuda-emulated"])
def test_refusals_name_the_argument_and_take_no_sequence_number(cluster_factory, impl):
    if impl == "ref":
        c = cluster_factory(2, "mooncake-cpu", env={"MOONCAKE_IMPL": "ref"}, timeout_s=60)
    else:
        c = cluster_factory(2, "mooncake-cpu", env={"MOONCAKE_IMPL": "fast", **EMU}, timeout_s=60,
                            options=("pg_integration.options", (), {}))
    for out, after in c.run(GJ.capture_refusals, timeout_s=120):
        assert after == [3.0] * 4
        assert all(v is not None and v[0] == "ArgumentError" for v in out.values()), out
        msg = {k: v[1] for k, v in out.items()}
        assert "PREMUL_SUM" in msg["premul"] and "PREMUL_SUM" in msg["reduce_scatter premul"], msg
        assert "input_split_sizes is [7, 1]" in msg["uneven"], msg
        assert "input has 8 elements, output 16" in msg["unequal sides"], msg
        assert "output dtype torch.float64 != input dtype torch.float32" in msg["dtype"], msg
        assert ("CUDA graph capture of this mooncake process-group operation is not supported"
                in msg["reduce_scatter list"]), msg
        if impl == "ref":
            for k in ("all_reduce", "broadcast", "reduce", "non-contiguous", "all_reduce BAND"):
                assert "cannot be captured in a CUDA graph here: the ref plane" in msg[k], msg
        else:
            assert "the CUDA plane is emulated on the CPU" in msg["all_reduce"], msg
            assert "the CUDA plane is emulated on the CPU" in msg["reduce"], msg
            assert "the output tensor must be contiguous" in msg["non-contiguous"], msg
            assert "captured all_reduce takes SUM / AVG" in msg["all_reduce BAND"], msg
