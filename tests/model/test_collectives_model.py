"""The global-view collective model against independent, obvious implementations.

The reference fold below never calls torch math: bool works on Python bools, integers on numpy arrays
of the same dtype (which wrap like torch), floats element by element on numpy float32 / Python float
scalars, rounded once at the end (numpy for float16, a bit-level round-to-nearest-even for bfloat16).
Every comparison is bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mooncake.model import collectives as mc
from mooncake.model.reduce import ReduceOp

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]
INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}
BITWISE = (ReduceOp.BAND, ReduceOp.BOR, ReduceOp.BXOR)

SETTINGS = settings(deadline=None, max_examples=300, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def valid_ops(dtype: torch.dtype) -> list[ReduceOp]:
    if dtype is torch.bool:
        return [op for op in ReduceOp if op is not ReduceOp.AVG]
    if dtype in FLOATS:
        return [op for op in ReduceOp if op not in BITWISE]
    return list(ReduceOp)


# --- the independent reference fold ------------------------------------------------------------------

BOOL_OPS = {
    ReduceOp.SUM: lambda a, b: a or b,
    ReduceOp.PRODUCT: lambda a, b: a and b,
    ReduceOp.MIN: lambda a, b: a and b,
    ReduceOp.MAX: lambda a, b: a or b,
    ReduceOp.BAND: lambda a, b: a and b,
    ReduceOp.BOR: lambda a, b: a or b,
    ReduceOp.BXOR: lambda a, b: a != b,
}
INT_OPS = {
    ReduceOp.SUM: lambda a, b: a + b,
    ReduceOp.AVG: lambda a, b: a + b,
    ReduceOp.PRODUCT: lambda a, b: a * b,
    ReduceOp.MIN: np.minimum,
    ReduceOp.MAX: np.maximum,
    ReduceOp.BAND: lambda a, b: a & b,
    ReduceOp.BOR: lambda a, b: a | b,
    ReduceOp.BXOR: lambda a, b: a ^ b,
}
FLOAT_OPS = {
    ReduceOp.SUM: lambda a, b: a + b,
    ReduceOp.AVG: lambda a, b: a + b,
    ReduceOp.PRODUCT: lambda a, b: a * b,
    ReduceOp.MIN: min,
    ReduceOp.MAX: max,
}


def trunc_div(a: int, n: int) -> int:
    q = abs(a) // n
    return q if a >= 0 else -q


def bf16_round(values: np.ndarray) -> torch.Tensor:
    """float32 values -> bfloat16 by round-to-nearest-even on the bits (no NaNs here)."""
    b = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)


def ref_fold(op: ReduceOp, xs: list[torch.Tensor]) -> torch.Tensor:
    dtype, shape, n = xs[0].dtype, xs[0].shape, len(xs)
    if dtype is torch.bool:
        cols = zip(*[x.reshape(-1).tolist() for x in xs])
        out = []
        for col in cols:
            acc = col[0]
            for v in col[1:]:
                acc = BOOL_OPS[op](acc, v)
            out.append(bool(acc))
        return torch.tensor(out, dtype=torch.bool).reshape(shape)
    if dtype in INTS:
        arrays = [x.contiguous().numpy().reshape(-1) for x in xs]
        acc = arrays[0].copy()
        for a in arrays[1:]:
            acc = INT_OPS[op](acc, a).astype(acc.dtype)
        if op is ReduceOp.AVG:
            acc = np.array([trunc_div(int(v), n) for v in acc], dtype=acc.dtype)
        return torch.from_numpy(acc.copy()).reshape(shape)
    acc_type = float if dtype is torch.float64 else np.float32
    out = []
    with np.errstate(all="ignore"):
        for col in zip(*[x.reshape(-1).tolist() for x in xs]):
            acc = acc_type(col[0])
            for v in col[1:]:
                acc = FLOAT_OPS[op](acc, acc_type(v))
            if op is ReduceOp.AVG:
                acc = acc / acc_type(n)
            out.append(acc)
    if dtype is torch.bfloat16:
        return bf16_round(np.array(out, dtype=np.float32)).reshape(shape)
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype]
    return torch.from_numpy(np.array(out, dtype=np.float32 if dtype is torch.float16 else np_dtype)
                            .astype(np_dtype)).reshape(shape)


# --- helpers -----------------------------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in BITS:
        return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))
    return torch.equal(a, b)


def assert_bits(got, want, what: str) -> None:
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {got!r}"
    assert same_bits(got, want), f"{what}: got {got!r} ({got.dtype}, {tuple(got.shape)}), want {want!r}"


def zeros(shape, dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def flat_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from flat_tensors(item)


def assert_fresh(outputs, inputs) -> None:
    """Outputs are new tensors: no storage shared with any input or with another output."""
    seen = {t.untyped_storage().data_ptr() for t in flat_tensors(inputs) if t.numel()}
    for t in flat_tensors(outputs):
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            assert ptr not in seen, "an output aliases an input or another output"
            seen.add(ptr)


def rand_tensor(gen: torch.Generator, dtype: torch.dtype, shape, noncontig: bool = False) -> torch.Tensor:
    if noncontig and len(shape) >= 2:
        return rand_tensor(gen, dtype, tuple(reversed(shape))).permute(*reversed(range(len(shape))))
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype in INTS:
        lo, hi = (-(2**62), 2**62) if dtype is torch.int64 else (torch.iinfo(dtype).min, torch.iinfo(dtype).max + 1)
        return torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(dtype)
    # Mixed magnitudes, so that the fold order shows in float32/float64 rounding.
    top = 6 if dtype is torch.float16 else 12
    scale = torch.exp2(torch.randint(-8, top + 1, shape, generator=gen).double())
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


GARBAGE = torch.full((5,), 7.0)  # what an inactive rank might hold: wrong shape and dtype, must be ignored


@st.composite
def cases(draw):
    """A random view, dtype, shape and input generator."""
    capacity = draw(st.integers(1, 4))
    mask = draw(st.lists(st.booleans(), min_size=capacity, max_size=capacity).filter(any))
    active = [int(m) for m in mask]
    ranks = [r for r in range(capacity) if active[r]]
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    noncontig = draw(st.booleans())
    filler = draw(st.sampled_from([None, GARBAGE]))
    k = draw(st.none() | st.integers(ranks[-1] + 1, capacity))
    return dict(capacity=capacity, active=active, ranks=ranks, dtype=dtype, shape=shape,
                make=lambda shp=shape: rand_tensor(gen, dtype, shp, noncontig), filler=filler,
                k=capacity if k is None else k, num_slots=k)


def per_rank(c, make=None):
    make = make or c["make"]
    return [make() if c["active"][r] else c["filler"] for r in range(c["capacity"])]


def assert_inactive_none(out, c) -> None:
    assert len(out) == c["capacity"]
    for r in range(c["capacity"]):
        if not c["active"][r]:
            assert out[r] is None, f"inactive rank {r} got {out[r]!r}"


# --- reductions --------------------------------------------------------------------------------------


@SETTINGS
@given(cases(), st.data())
def test_all_reduce(c, data):
    op = data.draw(st.sampled_from(valid_ops(c["dtype"])))
    inputs = per_rank(c)
    out = mc.all_reduce(inputs, op, c["active"])
    want = ref_fold(op, [inputs[r] for r in c["ranks"]])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        assert_bits(out[r], want, f"all_reduce {op.name} rank {r}")
    assert_fresh(out, inputs)


@SETTINGS
@given(cases(), st.data())
def test_reduce(c, data):
    op = data.draw(st.sampled_from(valid_ops(c["dtype"])))
    dst = data.draw(st.sampled_from(c["ranks"]))
    inputs = per_rank(c)
    out = mc.reduce(inputs, op, dst, c["active"])
    assert_inactive_none(out, c)
    assert_bits(out[dst], ref_fold(op, [inputs[r] for r in c["ranks"]]), f"reduce {op.name} root")
    for r in c["ranks"]:
        if r != dst:
            assert_bits(out[r], inputs[r].contiguous(), f"reduce non-root {r}")
    assert_fresh(out, inputs)


@SETTINGS
@given(cases(), st.data())
def test_reduce_scatter(c, data):
    op = data.draw(st.sampled_from(valid_ops(c["dtype"])))
    k, active = c["k"], c["active"]
    inputs = [[c["make"]() if active[r] else c["filler"] for r in range(k)] if active[s] else c["filler"]
              for s in range(c["capacity"])]
    out = mc.reduce_scatter(inputs, op, active, num_slots=c["num_slots"])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        assert_bits(out[r], ref_fold(op, [inputs[s][r] for s in c["ranks"]]), f"reduce_scatter rank {r}")
    assert_fresh(out, inputs)


@SETTINGS
@given(cases(), st.data())
def test_reduce_scatter_tensor(c, data):
    op = data.draw(st.sampled_from(valid_ops(c["dtype"])))
    k = c["k"]
    rows = data.draw(st.integers(0, 2))
    shape = (k * rows, *c["shape"][:2])
    inputs = per_rank(c, lambda: c["make"](shape))
    out = mc.reduce_scatter_tensor(inputs, op, c["active"], num_slots=c["num_slots"])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        chunks = [inputs[s][r * rows:(r + 1) * rows] for s in c["ranks"]]
        assert_bits(out[r], ref_fold(op, chunks), f"reduce_scatter_tensor rank {r}")
    assert_fresh(out, inputs)


def test_bf16_and_fp16_accumulate_in_fp32_and_round_once():
    # 1 + 3 * 2**-9 in bf16: each step-wise add of 2**-9 (a quarter ulp at 1.0) rounds back to 1.0,
    # while the fp32 sum rounds once to 1 + 2**-7.  The same shape for fp16 with 2**-12.
    for dtype, tiny, want in ((torch.bfloat16, 2.0**-9, 1 + 2.0**-7), (torch.float16, 2.0**-12, 1 + 2.0**-10)):
        xs = [torch.tensor([v], dtype=dtype) for v in (1.0, tiny, tiny, tiny)]
        naive = xs[0].clone()
        for x in xs[1:]:
            naive = naive + x
        assert naive.item() == 1.0
        out = mc.all_reduce(xs, ReduceOp.SUM, [1, 1, 1, 1])
        assert out[0].item() == want
        assert same_bits(out[0], ref_fold(ReduceOp.SUM, xs))
        assert not same_bits(naive, ref_fold(ReduceOp.SUM, xs)), "the reference must reject a step-wise fold"
        # AVG divides the fp32 accumulator, then rounds once.
        avg = mc.all_reduce(xs, ReduceOp.AVG, [1, 1, 1, 1])[0]
        assert avg.item() == torch.tensor((1 + 3 * tiny) / 4, dtype=torch.float32).to(dtype).item()
        # An inactive rank's input does not count, not even in AVG's divisor.
        fp32_sum = torch.tensor(1 + 2 * tiny, dtype=torch.float32)
        assert mc.all_reduce(xs, ReduceOp.AVG, [1, 0, 1, 1])[0].item() == (fp32_sum / 3).to(dtype).item()


def test_fold_order_is_ascending_rank_over_active_ranks():
    # (1 + 1e8) - 1e8 == 0 in float32, while (-1e8 + 1e8) + 1 == 1: only the ascending left fold gives 0.
    xs = [torch.tensor([1.0]), None, torch.tensor([1e8]), torch.tensor([-1e8])]
    assert mc.all_reduce(xs, ReduceOp.SUM, [1, 0, 1, 1])[3].item() == 0.0
    assert mc.reduce_scatter_tensor([x.repeat(4) if x is not None else None for x in xs], ReduceOp.SUM,
                                    [1, 0, 1, 1])[2].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", [ReduceOp.SUM, ReduceOp.PRODUCT, ReduceOp.AVG], ids=lambda op: op.name)
def test_every_reduction_folds_like_the_reference_on_many_elements(dtype, op):
    # Many mixed-magnitude elements over 3 active ranks of 4: a wrong order or accumulator shows up.
    gen = torch.Generator().manual_seed(int(op) * 100 + DTYPES.index(dtype))
    active, ranks, n = [1, 0, 1, 1], [0, 2, 3], 512
    flat = [rand_tensor(gen, dtype, (4 * n,)) for _ in range(4)]
    lists = [list(x.chunk(4)) for x in flat]
    results = {
        "all_reduce": mc.all_reduce(flat, op, active),
        "reduce": [None, None, mc.reduce(flat, op, 2, active)[2], None],
        "reduce_scatter_tensor": mc.reduce_scatter_tensor(flat, op, active),
        "reduce_scatter": mc.reduce_scatter(lists, op, active),
    }
    for name, out in results.items():
        for r in ranks if name != "reduce" else [2]:
            xs = [flat[s] for s in ranks] if name in ("all_reduce", "reduce") else [lists[s][r] for s in ranks]
            assert_bits(out[r], ref_fold(op, xs), f"{name} {op.name} {dtype} rank {r}")


def test_integer_avg_truncates_toward_zero_and_bool_ops():
    ints = [torch.tensor([-7, 7, -3], dtype=torch.int32), torch.tensor([0, 0, 1], dtype=torch.int32),
            torch.tensor([0, 0, 0], dtype=torch.int32)]
    assert mc.all_reduce(ints, ReduceOp.AVG, [1, 1, 1])[0].tolist() == [-2, 2, 0]
    a, b = torch.tensor([False, False, True, True]), torch.tensor([False, True, False, True])
    table = {ReduceOp.SUM: [0, 1, 1, 1], ReduceOp.MAX: [0, 1, 1, 1], ReduceOp.BOR: [0, 1, 1, 1],
             ReduceOp.PRODUCT: [0, 0, 0, 1], ReduceOp.MIN: [0, 0, 0, 1], ReduceOp.BAND: [0, 0, 0, 1],
             ReduceOp.BXOR: [0, 1, 1, 0]}
    for op, want in table.items():
        out = mc.all_reduce([a, b], op, [1, 1])[1]
        assert out.dtype is torch.bool and out.tolist() == [bool(w) for w in want], op.name
    # uint8 SUM wraps in its own dtype.
    u = [torch.tensor([200], dtype=torch.uint8), torch.tensor([100], dtype=torch.uint8)]
    assert mc.all_reduce(u, ReduceOp.SUM, [1, 1])[0].item() == 44


# --- data movement -----------------------------------------------------------------------------------


@SETTINGS
@given(cases(), st.data())
def test_broadcast(c, data):
    src = data.draw(st.sampled_from(c["ranks"]))
    inputs = per_rank(c)
    out = mc.broadcast(inputs, src, c["active"])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        assert_bits(out[r], inputs[src].contiguous(), f"broadcast rank {r}")
    assert_fresh(out, inputs)


def expected_slots(c, values):
    return [values[s] if c["active"][s] else zeros(c["shape"], c["dtype"])
            for s in range(c["k"])]


@SETTINGS
@given(cases())
def test_all_gather_and_gather(c):
    inputs = per_rank(c)
    want = expected_slots(c, inputs)
    out = mc.all_gather(inputs, c["active"], num_slots=c["num_slots"])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        assert len(out[r]) == c["k"]
        for s in range(c["k"]):
            assert_bits(out[r][s], want[s].contiguous(), f"all_gather rank {r} slot {s}")
    assert_fresh(out, inputs)
    for dst in c["ranks"]:
        got = mc.gather(inputs, dst, c["active"], num_slots=c["num_slots"])
        assert all(got[r] is None for r in range(c["capacity"]) if r != dst)
        assert len(got[dst]) == c["k"]
        for s in range(c["k"]):
            assert_bits(got[dst][s], want[s].contiguous(), f"gather root {dst} slot {s}")
        assert_fresh(got, inputs)


@SETTINGS
@given(cases())
def test_all_gather_into_tensor(c):
    inputs = per_rank(c)
    want = expected_slots(c, inputs)
    out = mc.all_gather_into_tensor(inputs, c["active"], num_slots=c["num_slots"])
    assert_inactive_none(out, c)
    shape = c["shape"] or (1,)
    m = int(np.prod(shape))
    for r in c["ranks"]:
        assert out[r].shape == (c["k"] * shape[0], *shape[1:])
        flat = out[r].reshape(-1)
        for s in range(c["k"]):
            assert_bits(flat[s * m:(s + 1) * m], want[s].reshape(-1), f"all_gather_into_tensor rank {r} slot {s}")
    assert_fresh(out, inputs)


@SETTINGS
@given(cases(), st.data())
def test_scatter(c, data):
    src = data.draw(st.sampled_from(c["ranks"]))
    scatter_list = [c["make"]() if c["active"][r] else c["filler"] for r in range(c["k"])]
    out = mc.scatter(scatter_list, src, c["active"], num_slots=c["num_slots"])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        assert_bits(out[r], scatter_list[r].contiguous(), f"scatter rank {r}")
    assert_fresh(out, scatter_list)


@SETTINGS
@given(cases())
def test_all_to_all(c):
    k, active = c["k"], c["active"]
    inputs = [[c["make"]() if active[r] else c["filler"] for r in range(k)] if active[s] else c["filler"]
              for s in range(c["capacity"])]
    out = mc.all_to_all(inputs, active, num_slots=c["num_slots"])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        assert len(out[r]) == k
        for s in range(k):
            want = inputs[s][r] if active[s] else zeros(c["shape"], c["dtype"])
            assert_bits(out[r][s], want.contiguous(), f"all_to_all rank {r} slot {s}")
    assert_fresh(out, inputs)


@SETTINGS
@given(cases(), st.data())
def test_all_to_all_single(c, data):
    k, active, capacity = c["k"], c["active"], c["capacity"]
    trailing = c["shape"][:2]
    if data.draw(st.booleans(), label="ragged"):
        sizes = {s: data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k)) for s in c["ranks"]}
        input_splits = [sizes.get(s) for s in range(capacity)]
        output_splits = [[sizes[s][r] if active[s] else data.draw(st.integers(0, 3)) for s in range(k)]
                         if active[r] else None for r in range(capacity)]
        inputs = [c["make"]((sum(sizes[s]), *trailing)) if active[s] else c["filler"] for s in range(capacity)]
    else:
        b = data.draw(st.integers(0, 2))
        sizes = {s: [b] * k for s in c["ranks"]}
        input_splits = output_splits = None
        inputs = per_rank(c, lambda: c["make"]((k * b, *trailing)))
    out = mc.all_to_all_single(inputs, active, input_splits, output_splits, num_slots=c["num_slots"])
    assert_inactive_none(out, c)
    for r in c["ranks"]:
        pos = 0
        for s in range(k):
            n = sizes[s][r] if active[s] else (output_splits[r][s] if output_splits else sizes[r][r])
            if active[s]:
                start = sum(sizes[s][:r])
                want = inputs[s][start:start + n]
            else:
                want = zeros((n, *trailing), c["dtype"])
            assert_bits(out[r][pos:pos + n], want.contiguous(), f"all_to_all_single rank {r} block {s}")
            pos += n
        assert out[r].shape[0] == pos
    assert_fresh(out, inputs)


def test_barrier():
    assert mc.barrier([1, 0, 1]) is None
    assert mc.barrier(torch.tensor([0, 1], dtype=torch.int32)) is None


# --- errors ------------------------------------------------------------------------------------------

T = torch.tensor
SUM = ReduceOp.SUM

ROOTED = {
    "broadcast": lambda root, active: mc.broadcast([T([1]), T([2]), T([3])], root, active),
    "reduce": lambda root, active: mc.reduce([T([1]), T([2]), T([3])], SUM, root, active),
    "gather": lambda root, active: mc.gather([T([1]), T([2]), T([3])], root, active),
    "scatter": lambda root, active: mc.scatter([T([1]), T([2]), T([3])], root, active),
}


@pytest.mark.parametrize("name", sorted(ROOTED))
def test_root_inactive_raises(name):
    with pytest.raises(mc.RootInactiveError, match=r"=1 is inactive \(active ranks: \[0, 2\]\)"):
        ROOTED[name](1, [1, 0, 1])
    assert issubclass(mc.RootInactiveError, ValueError)
    for bad in (-1, 3, 1.0, "0", True):
        with pytest.raises(ValueError, match=r"must be a group rank in \[0, 3\)") as info:
            ROOTED[name](bad, [1, 1, 1])
        assert not isinstance(info.value, mc.RootInactiveError)


a3 = [T([1]), T([2]), T([3])]
BAD = [
    # the active mask
    (lambda: mc.all_reduce(a3, SUM, [0, 0, 0]), r"active must mark at least one rank"),
    (lambda: mc.all_reduce(a3, SUM, []), r"active must be a non-empty sequence"),
    (lambda: mc.all_reduce(a3, SUM, [1, 2, 1]), r"active\[1\] must be 0 or 1, got 2"),
    (lambda: mc.all_reduce(a3, SUM, torch.ones(1, 3)), r"active must be a 1-D mask"),
    (lambda: mc.barrier([0, 0]), r"active must mark at least one rank"),
    # per-rank lengths and entries
    (lambda: mc.all_reduce(a3, SUM, [1, 1]), r"inputs must have length 2 \(one entry per rank\), got 3"),
    (lambda: mc.all_reduce([T([1]), None], SUM, [1, 1]), r"inputs\[1\] must be a tensor"),
    (lambda: mc.all_reduce([T([1]), T([1, 2])], SUM, [1, 1]), r"inputs\[1\] has shape \(2,\), expected shape \(1,\)"),
    (lambda: mc.all_reduce([T([1]), T([1.0])], SUM, [1, 1]),
     r"inputs\[1\] has dtype torch.float32, expected torch.int64"),
    (lambda: mc.all_reduce([T([1 + 1j])], SUM, [1]), r"inputs\[0\] has dtype torch.complex64; expected one of"),
    (lambda: mc.broadcast([T([1]), T([[1]])], 0, [1, 1]), r"inputs\[1\] has shape \(1, 1\)"),
    # ops
    (lambda: mc.all_reduce([T([True])], ReduceOp.AVG, [1]), r"op AVG cannot reduce torch.bool inputs"),
    (lambda: mc.all_reduce([T([1.0])], ReduceOp.BXOR, [1]), r"op BXOR cannot reduce torch.float32 inputs"),
    (lambda: mc.all_reduce([T([1])], 42, [1]), r"op must be a ReduceOp \(SUM, .*\), got 42"),
    (lambda: mc.reduce_scatter([[T([1.0])]], ReduceOp.BAND, [1]), r"op BAND cannot reduce"),
    # slots
    (lambda: mc.all_gather(a3, [1, 1, 0], num_slots=1), r"num_slots must be an int in \[2, 3\]"),
    (lambda: mc.all_gather(a3, [1, 1, 0], num_slots=4), r"num_slots must be an int in \[2, 3\]"),
    (lambda: mc.scatter([T([1])], 0, [1, 1]), r"scatter_list must have length 2"),
    (lambda: mc.reduce_scatter([[T([1])], [T([1]), T([2])]], SUM, [1, 1]), r"inputs\[0\] must have length 2"),
    (lambda: mc.all_to_all([T([1]), T([2])], [1, 1]), r"inputs\[0\] must be a sequence of length 2"),
    (lambda: mc.all_to_all([[T([1]), T([2])], [T([1]), None]], [1, 1]), r"inputs\[1\]\[1\] must be a tensor"),
    (lambda: mc.reduce_scatter_tensor([T([1, 2, 3])] * 2, SUM, [1, 1]),
     r"inputs\[0\] must split into num_slots=2 equal chunks.*multiple of 2; got shape \(3,\)"),
    (lambda: mc.reduce_scatter_tensor([T(1)], SUM, [1]), r"multiple of 1; got shape \(\)"),
    # all_to_all_single splits
    (lambda: mc.all_to_all_single([T(1), T(2)], [1, 1]), r"inputs\[0\] must have at least one dimension"),
    (lambda: mc.all_to_all_single([T([1, 2, 3])] * 2, [1, 1]),
     r"inputs\[0\] has dim 0 = 3, which does not split into num_slots=2 equal blocks; pass input_splits\[0\]"),
    (lambda: mc.all_to_all_single([T([1, 2, 3])] * 2, [1, 1], input_splits=[[1, 1], [1, 2]]),
     r"input_splits\[0\] must add up to 3 \(dim 0 of the input\), got sum 2"),
    (lambda: mc.all_to_all_single([T([1, 2, 3])] * 2, [1, 1], input_splits=[[3], [1, 2]]),
     r"input_splits\[0\] must have length 2"),
    (lambda: mc.all_to_all_single([T([1, 2, 3])] * 2, [1, 1], input_splits=[[4, -1], [1, 2]]),
     r"input_splits\[0\]\[1\] must be a non-negative int, got -1"),
    (lambda: mc.all_to_all_single([T([1, 2, 3])] * 2, [1, 1], input_splits=[[1, 2]]),
     r"input_splits must have length 2"),
    (lambda: mc.all_to_all_single([T([1, 2, 3])] * 2, [1, 1], input_splits=[[1, 2], [2, 1]]),
     r"output_splits\[0\] is None \(equal blocks\) but the active ranks send rank 0 different row counts"),
    (lambda: mc.all_to_all_single([T([1, 2, 3])] * 2, [1, 1], input_splits=[[1, 2], [1, 2]],
                                  output_splits=[[1, 2], [2, 2]]),
     r"output_splits\[0\]\[1\] must be 1 \(the rows rank 1 sends to rank 0\), got 2"),
    (lambda: mc.all_to_all_single([T([1, 2]), T([[1], [2]])], [1, 1]),
     r"inputs\[1\] has shape \(2, 1\), expected shape after dim 0 \(\)"),
]


@pytest.mark.parametrize("call,match", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert not isinstance(info.value, mc.RootInactiveError)


def test_public_api():
    assert sorted(mc.__all__) == sorted([
        "RootInactiveError", "all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all",
        "all_to_all_single", "barrier", "broadcast", "gather", "reduce", "reduce_scatter",
        "reduce_scatter_tensor", "scatter"])
