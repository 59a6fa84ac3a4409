"""The EP model (mooncake.model.ep / fp8) against slow, obvious re-implementations written here.

The slow side uses plain Python loops, numpy float32 scalars/arrays (IEEE single, one rounding per op) and
integer bit manipulation; it shares no code with the model.  FP8 codes are found by searching the table of
all e4m3fn values, bf16 rounding by inspecting the dropped 16 bits.
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mooncake.model import ep, fp8

F32 = np.float32
AMAX_FLOOR = F32(1e-4)
INV_448 = F32(1.0) / F32(448.0)  # correctly rounded single-precision division
NAN_BF16 = 0x7FC0

# ----------------------------------------------------------------------------------------------------
# slow reference helpers


def bf16_to_f32(bits) -> np.ndarray:
    """bf16 bit patterns (any int array) -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def f32_bits(value) -> int:
    return int(np.asarray(value, dtype=np.float32).view(np.uint32))


def slow_bf16_rne(values: np.ndarray) -> np.ndarray:
    """float32 array -> bf16 bits, round to nearest, ties to even (finite inputs)."""
    out = []
    for u in np.asarray(values, dtype=np.float32).view(np.uint32).tolist():
        upper, dropped = u >> 16, u & 0xFFFF
        if dropped > 0x8000 or (dropped == 0x8000 and upper & 1):
            upper += 1
        out.append(upper)
    return np.array(out, dtype=np.uint16)


def _e4m3_value(code: int) -> float:
    exponent, mantissa = code >> 3, code & 7
    if exponent == 0:
        return mantissa / 8 * 2.0**-6
    return (1 + mantissa / 8) * 2.0 ** (exponent - 7)


E4M3_VALUES = [_e4m3_value(code) for code in range(0x7F)]  # every non-negative finite value, increasing with code
assert E4M3_VALUES[-1] == 448.0 and E4M3_VALUES == sorted(E4M3_VALUES)


def slow_e4m3(value) -> int:
    """float32 -> e4m3fn code: nearest table value, ties to the even code, saturating at 448."""
    x = float(value)
    sign = 0x80 if math.copysign(1.0, x) < 0 else 0
    a = abs(x)
    if a >= 448.0:
        return sign | 0x7E
    i = bisect.bisect_left(E4M3_VALUES, a)
    if E4M3_VALUES[i] == a:
        return sign | i
    below, above = a - E4M3_VALUES[i - 1], E4M3_VALUES[i] - a  # exact: neighbours are within a factor 2
    if below != above:
        return sign | (i - 1 if below < above else i)
    return sign | (i - 1 if (i - 1) % 2 == 0 else i)


def slow_quantize_row(bits) -> tuple[list[int], list[int]]:
    """One token's bf16 bits -> (e4m3 codes, scale_inv float32 bits per 128 channels)."""
    codes, scales = [], []
    for start in range(0, len(bits), 128):
        values = bf16_to_f32(bits[start : start + 128])
        amax = AMAX_FLOOR
        for v in values:
            if abs(v) > amax:
                amax = abs(v)
        scale = F32(448.0) / amax
        scales.append(f32_bits(amax * INV_448))
        codes.extend(slow_e4m3(v * scale) for v in values)
    return codes, scales


def to_torch_bf16(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)


def bf16_bits_of(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def random_bf16(rng: np.random.Generator, shape, exponents=(100, 150)) -> np.ndarray:
    sign = rng.integers(0, 2, shape) << 15
    exponent = rng.integers(exponents[0], exponents[1] + 1, shape) << 7
    mantissa = rng.integers(0, 128, shape)
    return (sign | exponent | mantissa).astype(np.uint16)


# ----------------------------------------------------------------------------------------------------
# FP8


def _midpoint_bits() -> list[int]:
    bits = []
    for lo, hi in zip(E4M3_VALUES, E4M3_VALUES[1:]):
        u = f32_bits((lo + hi) / 2)
        assert u & 0xFFFF == 0  # e4m3 midpoints need 4 significant bits: exact in bf16
        bits += [(u >> 16) + d for d in (-1, 0, 1)]
    return bits


MIDPOINT_BITS = _midpoint_bits()
SPECIAL_BITS = [
    0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x8080,  # zeros, subnormals, smallest normal
    0x38D0, 0x38D1, 0x38D2, 0xB8D2,  # around 1e-4 (the amax floor)
    0x3F80, 0x43E0, 0xC3E0, 0x43E1, 0x7F7F, 0xFF7F, 0x7F00,  # 1, ±448, just above 448, largest
]
BLOCK_KINDS = ["normal", "wide", "tiny", "below_floor", "zeros", "boundary", "huge", "special"]


def make_block(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return random_bf16(rng, 128, (112, 142))
    if kind == "wide":
        return random_bf16(rng, 128, (0, 254))
    if kind == "tiny":
        return random_bf16(rng, 128, (0, 113))
    if kind == "below_floor":
        return random_bf16(rng, 128, (0, 112))
    if kind == "zeros":
        return (rng.integers(0, 2, 128) << 15).astype(np.uint16)
    if kind == "huge":
        return random_bf16(rng, 128, (240, 254))
    if kind == "boundary":  # amax = 448 => scale = 1: values land exactly on / next to e4m3 ties
        block = rng.choice(MIDPOINT_BITS, 128) | (rng.integers(0, 2, 128) << 15)
        block[rng.integers(0, 128)] = 0x43E0
        return block.astype(np.uint16)
    return rng.choice(SPECIAL_BITS, 128).astype(np.uint16)


@st.composite
def token_matrices(draw) -> np.ndarray:
    num_tokens = draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = []
    for _ in range(num_tokens):
        rows.append(np.concatenate([make_block(draw(st.sampled_from(BLOCK_KINDS)), rng) for _ in range(num_blocks)]))
    bits = np.stack(rows)
    # a few hand-picked values at hypothesis-chosen places (shrinkable)
    for value in draw(st.lists(st.sampled_from(SPECIAL_BITS + MIDPOINT_BITS), max_size=4)):
        bits[draw(st.integers(0, num_tokens - 1)), draw(st.integers(0, 128 * num_blocks - 1))] = value
    return bits


def test_slow_constants_are_the_specified_bits():
    assert f32_bits(AMAX_FLOOR) == 0x38D1B717
    assert f32_bits(INV_448) == 0x3B124925


@settings(max_examples=1000, deadline=None)
@given(token_matrices())
def test_quantize_fp8_bit_exact(bits):
    q, scale_inv = fp8.quantize_fp8(to_torch_bf16(bits))
    assert q.dtype is torch.float8_e4m3fn and q.shape == bits.shape
    assert scale_inv.dtype is torch.float32 and scale_inv.shape == (bits.shape[0], bits.shape[1] // 128)
    codes = q.view(torch.uint8).numpy()
    scales = scale_inv.contiguous().numpy().view(np.uint32)
    for t in range(bits.shape[0]):
        want_codes, want_scales = slow_quantize_row(bits[t])
        assert codes[t].tolist() == want_codes, f"token {t}"
        assert scales[t].tolist() == want_scales, f"token {t}"


def test_quantize_fp8_zero_block_uses_amax_floor():
    q, scale_inv = fp8.quantize_fp8(torch.zeros(2, 256, dtype=torch.bfloat16))
    assert q.view(torch.uint8).eq(0).all()
    assert scale_inv.view(torch.int32).eq(f32_bits(AMAX_FLOOR * INV_448)).all()


def test_naive_torch_spellings_would_fail_the_property():
    """The two tempting torch spellings differ from the contract on some bf16 amax; the slow side catches it."""
    amax = torch.from_numpy(bf16_to_f32(np.arange(0x3F80, 0x4000)))  # every bf16 value in [1, 2)
    contract_scale = torch.full_like(amax, 448.0) / amax
    contract_inv = amax * torch.tensor(INV_448)
    assert not torch.equal((448.0 / amax).view(torch.int32), contract_scale.view(torch.int32))
    assert not torch.equal((amax / 448.0).view(torch.int32), contract_inv.view(torch.int32))
    slow = [f32_bits(F32(448.0) / F32(a)) for a in amax.tolist()]
    assert contract_scale.view(torch.int32).tolist() == slow


def test_dequantize_fp8_roundtrip_and_strided_scales():
    rng = np.random.default_rng(1)
    bits = random_bf16(rng, (3, 256), (120, 130))
    q, scale_inv = fp8.quantize_fp8(to_torch_bf16(bits))
    col_major = torch.empty(2, 3).t().copy_(scale_inv)
    got = fp8.dequantize_fp8(q, col_major)
    codes = q.view(torch.uint8).numpy()
    for t in range(3):
        for c in range(256):
            code = int(codes[t, c])
            value = (-1 if code & 0x80 else 1) * E4M3_VALUES[code & 0x7F]
            want = F32(value) * F32(scale_inv[t, c // 128].item())
            assert f32_bits(got[t, c].item()) == f32_bits(want)
    x = bf16_to_f32(bits)
    assert np.allclose(got.numpy(), x, rtol=2**-3, atol=0)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(128, dtype=torch.bfloat16), "2-D"),
        (torch.zeros(1, 128, dtype=torch.float32), "bfloat16"),
        (torch.zeros(1, 192, dtype=torch.bfloat16), "multiple of 128"),
        (torch.tensor([[float("inf")] + [0.0] * 127], dtype=torch.bfloat16), "finite"),
    ],
)
def test_quantize_fp8_rejects(x, match):
    with pytest.raises(ValueError, match=match):
        fp8.quantize_fp8(x)


def test_dequantize_fp8_rejects():
    q = torch.zeros(2, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.dequantize_fp8(q.float(), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        fp8.dequantize_fp8(q, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8.dequantize_fp8(torch.zeros(2, 100, dtype=torch.float8_e4m3fn), torch.zeros(2, 0))


# ----------------------------------------------------------------------------------------------------
# dispatch


@st.composite
def ep_cases(draw):
    num_ranks = draw(st.integers(1, 4))
    num_local_experts = draw(st.integers(1, 3))
    num_experts = num_ranks * num_local_experts
    max_tokens = draw(st.integers(1, 5))
    num_topk = draw(st.integers(1, min(num_experts, 4)))
    topks = []
    for _ in range(num_ranks):
        rows = []
        for _ in range(draw(st.integers(0, max_tokens))):
            experts = draw(st.permutations(range(num_experts)))[:num_topk]
            masked = draw(st.lists(st.integers(0, 3), min_size=num_topk, max_size=num_topk))
            rows.append([-1 if m == 0 else e for e, m in zip(experts, masked)])
        topks.append(rows)
    active = draw(st.lists(st.integers(0, 3), min_size=num_ranks, max_size=num_ranks))
    return {
        "num_ranks": num_ranks,
        "num_experts": num_experts,
        "max_tokens": max_tokens,
        "num_topk": num_topk,
        "topks": topks,
        "active": [int(a > 0) for a in active],
        "failed": draw(st.sets(st.integers(0, num_ranks - 1), max_size=num_ranks)),
        "hidden": draw(st.sampled_from([128, 256])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def topk_tensor(rows: list[list[int]], num_topk: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), num_topk)


def slow_dispatch(case):
    """(placement[(q, l)] = [(src, token), ...] in region order, layout[(q, l, s)] = (begin, count))."""
    num_ranks, topks = case["num_ranks"], case["topks"]
    num_local = case["num_experts"] // num_ranks
    placement, layout = {}, {}
    for q in range(num_ranks):
        for l in range(num_local):
            expert = q * num_local + l
            region = []
            for s in range(num_ranks):
                begin = len(region)
                if case["active"][s] == 1 and s not in case["failed"]:
                    for t, row in enumerate(topks[s]):
                        if expert in row:
                            region.append((s, t))
                layout[(q, l, s)] = (begin, len(region) - begin)
            placement[(q, l)] = region
    return placement, layout


def run_dispatch(case, use_fp8):
    rng = np.random.default_rng(case["seed"])
    x_bits = []
    for rows in case["topks"]:
        bits = random_bf16(rng, (len(rows), case["hidden"]), (90, 160))
        if len(rows):
            bits[rng.integers(0, len(rows))] = make_block("tiny", rng).repeat(case["hidden"] // 128)
        x_bits.append(bits)
    results, active_out = ep.dispatch(
        [to_torch_bf16(b) for b in x_bits],
        [topk_tensor(rows, case["num_topk"]) for rows in case["topks"]],
        case["num_experts"],
        case["max_tokens"],
        torch.tensor(case["active"], dtype=torch.int32),
        failed=case["failed"],
        use_fp8=use_fp8,
    )
    return x_bits, results, active_out


@settings(max_examples=400, deadline=None)
@given(ep_cases(), st.booleans())
def test_dispatch_matches_slow_reference(case, use_fp8):
    x_bits, results, active_out = run_dispatch(case, use_fp8)
    num_ranks, hidden = case["num_ranks"], case["hidden"]
    num_local, capacity = case["num_experts"] // num_ranks, num_ranks * case["max_tokens"]
    assert active_out.dtype is torch.int32
    assert active_out.tolist() == [0 if s in case["failed"] else a for s, a in enumerate(case["active"])]
    placement, layout = slow_dispatch(case)
    quantized = {}
    for q, result in enumerate(results):
        assert result.recv_x.shape == (num_local, capacity, hidden)
        assert result.recv_x.dtype is (torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
        assert result.recv_count.dtype is torch.int32 and result.src_info.dtype is torch.int32
        assert result.layout_range.dtype is torch.int64 and result.layout_range.shape == (num_local, num_ranks)
        for l in range(num_local):
            region = placement[(q, l)]
            n = len(region)
            assert int(result.recv_count[l]) == n
            for s in range(num_ranks):
                packed = int(result.layout_range[l, s])
                assert (packed >> 32, packed & 0xFFFFFFFF) == layout[(q, l, s)]
            src_info = result.src_info[l].tolist()
            assert src_info[:n] == [t for _, t in region]
            assert src_info[n:] == [-1] * (capacity - n)  # debug fill
            if use_fp8:
                codes = result.recv_x[l].view(torch.uint8).numpy()
                scales = result.recv_scales[l].contiguous().numpy().view(np.uint32)
                for i, (s, t) in enumerate(region):
                    if (s, t) not in quantized:
                        quantized[(s, t)] = slow_quantize_row(x_bits[s][t])
                    assert codes[i].tolist() == quantized[(s, t)][0]
                    assert scales[i].tolist() == quantized[(s, t)][1]
                assert not codes[n:].any() and not scales[n:].any()
            else:
                got = bf16_bits_of(result.recv_x[l])
                for i, (s, t) in enumerate(region):
                    assert got[i].tolist() == x_bits[s][t].tolist()
                assert not got[n:].any()


def test_recv_scales_have_upstream_column_major_strides():
    num_ranks, max_tokens, hidden = 2, 3, 384
    topk = torch.tensor([[0, 1], [1, -1]])
    results, _ = ep.dispatch(
        [torch.ones(2, hidden, dtype=torch.bfloat16)] * num_ranks,
        [topk] * num_ranks,
        4,
        max_tokens,
        torch.ones(num_ranks, dtype=torch.int32),
    )
    scales = results[0].recv_scales
    capacity, num_blocks = num_ranks * max_tokens, hidden // 128
    assert scales.shape == (2, capacity, num_blocks)
    assert scales.stride() == (num_blocks * capacity, 1, capacity)
    assert results[0].recv_x.is_contiguous()
    bf16_results, _ = ep.dispatch(
        [torch.ones(2, hidden, dtype=torch.bfloat16)] * num_ranks,
        [topk] * num_ranks,
        4,
        max_tokens,
        torch.ones(num_ranks, dtype=torch.int32),
        use_fp8=False,
    )
    assert bf16_results[0].recv_scales is None


def test_zero_count_begin_is_the_exclusive_prefix():
    # rank 1's tokens avoid expert 0; source 1 is inactive for expert 1 too; begin still advances correctly
    topks = [torch.tensor([[0, 1]]), torch.tensor([[1, -1]]), torch.tensor([[0, 1]])]
    xs = [torch.ones(1, 128, dtype=torch.bfloat16)] * 3
    results, _ = ep.dispatch(xs, topks, 3, 1, torch.tensor([1, 1, 1], dtype=torch.int32), failed={2})
    assert [ep.unpack_layout(int(v)) for v in results[0].layout_range[0]] == [(0, 1), (1, 0), (1, 0)]
    results, _ = ep.dispatch(xs, topks, 3, 1, torch.tensor([0, 1, 1], dtype=torch.int32))
    assert [ep.unpack_layout(int(v)) for v in results[0].layout_range[0]] == [(0, 0), (0, 0), (0, 1)]


# ----------------------------------------------------------------------------------------------------
# combine


def slow_combine(case, placement, active_out, expert_bits, weights):
    num_local = case["num_experts"] // case["num_ranks"]
    outputs = []
    for r, rows in enumerate(case["topks"]):
        out = np.zeros((len(rows), case["hidden"]), dtype=np.uint16)
        for t, row in enumerate(rows):
            acc = np.zeros(case["hidden"], dtype=np.float32)
            for k, e in enumerate(row):
                if e < 0:
                    continue
                owner, l = divmod(e, num_local)
                if active_out[owner] == 0 or active_out[r] == 0:
                    continue
                y = bf16_to_f32(expert_bits[owner][l, placement[(owner, l)].index((r, t))])
                product = (y * F32(weights[r][t, k])).astype(np.float32)
                acc = (acc + product).astype(np.float32)
            out[t] = slow_bf16_rne(acc)
        outputs.append(out)
    return outputs


@settings(max_examples=300, deadline=None)
@given(ep_cases(), st.booleans())
def test_combine_matches_slow_reference(case, cancelling):
    """``cancelling``: magnitudes 2^-27, 1, 2^25 and weights ±2^j, so the summation order shows in the bf16 bits."""
    _, results, active_out = run_dispatch(case, use_fp8=False)
    placement, _ = slow_dispatch(case)
    rng = np.random.default_rng(case["seed"] + 1)
    num_local = case["num_experts"] // case["num_ranks"]
    capacity = case["num_ranks"] * case["max_tokens"]
    expert_bits, weights = [], []
    for o in range(case["num_ranks"]):
        shape = (num_local, capacity, case["hidden"])
        if cancelling:
            exponent = rng.choice([100, 127, 152], shape) << 7
            bits = ((rng.integers(0, 2, shape) << 15) | exponent | rng.integers(0, 4, shape)).astype(np.uint16)
        else:
            bits = random_bf16(rng, shape, (107, 147))
        for l in range(num_local):
            bits[l, len(placement[(o, l)]) :] = NAN_BF16  # padding must never be read
        if int(active_out[o]) == 0:
            bits[:] = NAN_BF16  # nor anything of an inactive owner
        expert_bits.append(bits)
    for rows in case["topks"]:
        if cancelling:
            w = (rng.choice([-1.0, 1.0], (len(rows), case["num_topk"])) * 2.0 ** rng.integers(-1, 2)).astype(np.float32)
        else:
            w = (rng.standard_normal((len(rows), case["num_topk"])) * 2.0 ** rng.integers(-6, 6)).astype(np.float32)
        w[rng.random(w.shape) < 0.1] = 0.0
        w[topk_tensor(rows, case["num_topk"]).numpy() < 0] = np.nan  # weights of masked entries are ignored
        weights.append(w)
    got = ep.combine(
        [to_torch_bf16(b) for b in expert_bits],
        results,
        [topk_tensor(rows, case["num_topk"]) for rows in case["topks"]],
        [torch.from_numpy(w) for w in weights],
        active_out,
    )
    want = slow_combine(case, placement, active_out.tolist(), expert_bits, weights)
    for r in range(case["num_ranks"]):
        assert got[r].dtype is torch.bfloat16
        assert bf16_bits_of(got[r]).tolist() == want[r].tolist(), f"rank {r}"


def test_combine_rows_does_not_fuse_multiply_add():
    # acc = 1, then y*w = 2^-8 + 2^-24 + tiny: separate rounding lands on the bf16 tie 1 + 2^-8 (-> 1.0),
    # a fused multiply-add would land just above it (-> 1 + 2^-7).
    y = float(bf16_to_f32(0x3F81))
    w = float(np.uint32(998114551).view(np.float32))
    fused = F32(float(1 + Fraction(y) * Fraction(w)))
    assert slow_bf16_rne(np.array([fused])).tolist() == [0x3F81]
    rows = torch.tensor([[[1.0], [y]]], dtype=torch.bfloat16).expand(1, 2, 1)
    out = ep.combine_rows(
        torch.tensor([[0, 1]]), torch.tensor([[1.0, w]], dtype=torch.float32), rows, torch.ones(1, 2, dtype=torch.bool)
    )
    assert bf16_bits_of(out).tolist() == [[0x3F80]]


def test_combine_rows_sums_in_topk_order():
    # (2^25 - 2^25) + 1 = 1, but (1 - 2^25) + 2^25 = 0 in float32
    rows = torch.tensor([[[2.0**25], [-(2.0**25)], [1.0]]], dtype=torch.bfloat16)
    out = ep.combine_rows(torch.tensor([[0, 1, 2]]), torch.ones(1, 3), rows, torch.ones(1, 3, dtype=torch.bool))
    assert out.tolist() == [[1.0]]
    out = ep.combine_rows(torch.tensor([[2, 1, 0]]), torch.ones(1, 3), rows.flip(1), torch.ones(1, 3, dtype=torch.bool))
    assert out.tolist() == [[0.0]]


def test_combine_rejects_handle_from_another_dispatch():
    ones = torch.ones(2, dtype=torch.int32)
    xs = [torch.ones(1, 128, dtype=torch.bfloat16)] * 2
    results, active_out = ep.dispatch(xs, [torch.tensor([[0]]), torch.tensor([[-1]])], 2, 1, ones, use_fp8=False)
    outputs = [torch.zeros(1, 2, 128, dtype=torch.bfloat16)] * 2
    weights = [torch.ones(1, 1)] * 2
    with pytest.raises(ValueError, match="not routed"):
        ep.combine(outputs, results, [torch.tensor([[1]]), torch.tensor([[-1]])], weights, active_out)
    with pytest.raises(ValueError, match="did not receive"):
        ep.combine(outputs, results, [torch.tensor([[0]]), torch.tensor([[0]])], weights, active_out)
    with pytest.raises(ValueError, match="topk_weights"):
        topks = [torch.tensor([[0]]), torch.tensor([[-1]])]
        ep.combine(outputs, results, topks, [torch.ones(1, 1).double()] * 2, active_out)


# ----------------------------------------------------------------------------------------------------
# preconditions, layout encoding, size hint


@pytest.mark.parametrize(
    "topk, num_experts, max_tokens, num_ranks, match",
    [
        (torch.tensor([[0, 1]], dtype=torch.int32), 4, 4, 2, "topk_idx must be an int64 tensor"),
        (torch.tensor([0, 1]), 4, 4, 2, "topk_idx must be 2-D"),
        (torch.tensor([[0, 4]]), 4, 4, 2, r"topk_idx\[0, 1\] = 4 is not an expert"),
        (torch.tensor([[0, 1], [-2, 1]]), 4, 4, 2, r"topk_idx\[1, 0\] = -2 is not an expert"),
        (torch.tensor([[0, 1], [3, 3]]), 4, 4, 2, "duplicate expert 3 in row 1"),
        (torch.tensor([[0, 1]] * 5), 4, 4, 2, "num_max_dispatch_tokens_per_rank is 4"),
        (torch.tensor([[0, 1]]), 5, 4, 2, r"num_experts \(5\) must be a positive multiple of num_ranks \(2\)"),
        (torch.tensor([[0, 1]]), 4, 0, 2, "num_max_dispatch_tokens_per_rank must be positive"),
    ],
)
def test_validate_routing_errors(topk, num_experts, max_tokens, num_ranks, match):
    with pytest.raises(ValueError, match=match):
        ep.validate_routing(topk, num_experts, max_tokens, num_ranks)


def test_validate_routing_accepts_repeated_masks():
    ep.validate_routing(torch.tensor([[-1, -1, 2], [3, -1, -1]]), 4, 2, 2)


def test_dispatch_argument_errors():
    ones = torch.ones(2, dtype=torch.int32)
    xs = [torch.ones(1, 128, dtype=torch.bfloat16)] * 2
    topks = [torch.tensor([[0]])] * 2
    with pytest.raises(ValueError, match=r"topk_idxs\[1\]\[0, 0\] = 7"):
        ep.dispatch(xs, [topks[0], torch.tensor([[7]])], 2, 1, ones)
    with pytest.raises(ValueError, match="active_ranks must be an int32"):
        ep.dispatch(xs, topks, 2, 1, torch.ones(2))
    with pytest.raises(ValueError, match="0 or 1"):
        ep.dispatch(xs, topks, 2, 1, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="failed ranks"):
        ep.dispatch(xs, topks, 2, 1, ones, failed={2})
    with pytest.raises(ValueError, match=r"xs\[1\] must be bfloat16"):
        ep.dispatch([xs[0], xs[1].float()], topks, 2, 1, ones)
    with pytest.raises(ValueError, match=r"xs\[0\] must be finite"):
        ep.dispatch([xs[0] * float("nan"), xs[1]], topks, 2, 1, ones)
    with pytest.raises(ValueError, match="multiple of 128"):
        ep.dispatch([torch.ones(1, 64, dtype=torch.bfloat16)] * 2, topks, 2, 1, ones)


def test_place_dispatch_requires_a_block_per_contributing_source():
    block = (torch.tensor([0]), torch.ones(1, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="no block for local expert 0 from contributing source 1"):
        ep.place_dispatch({(0, 0): block}, 1, 2, 1, 128, True, [True, True])
    result = ep.place_dispatch({(0, 0): block}, 1, 2, 1, 128, True, [True, False])
    assert result.recv_count.tolist() == [1]
    with pytest.raises(ValueError, match="strictly increasing"):
        unsorted = (torch.tensor([1, 0]), torch.ones(2, 128, dtype=torch.bfloat16))
        ep.place_dispatch({(0, 0): unsorted}, 1, 1, 2, 128, False, [True])


def test_layout_encoding():
    assert ep.pack_layout(3, 5) == (3 << 32) + 5
    assert ep.unpack_layout(ep.pack_layout(2**31 - 1, 2**32 - 1)) == (2**31 - 1, 2**32 - 1)
    packed = ep.pack_layout(torch.tensor([0, 7]), torch.tensor([4, 0]))
    begin, count = ep.unpack_layout(packed)
    assert packed.dtype is torch.int64 and begin.tolist() == [0, 7] and count.tolist() == [4, 0]


def test_buffer_size_hint_matches_upstream_examples():
    assert ep.get_ep_buffer_size_hint(128, 7168, 2, 288) == 2_118_652_416
    assert ep.get_ep_buffer_size_hint(256, 2048, 8, 288) == 1_217_401_344
    assert ep.get_ep_buffer_size_hint(256, 2048, 1, 288) == ep.get_ep_buffer_size_hint(256, 2048, 64, 288)
