"""fold_into (the plane's in-place fold, torch and compiled paths) is bitwise equal to the model's
fold for every (op, dtype), 1-4 inputs, special values, odd lengths, slices and chunking."""

from __future__ import annotations

import itertools

import pytest
import torch

from mooncake.fast.cpu import fold as F
from mooncake.fast.cpu import native
from mooncake.model.reduce import DTYPE_CODES, ReduceOp, check_reducible, fold
from mooncake.testing.compare import bitwise_equal

DTYPES = list(DTYPE_CODES)


def _inputs(dtype: torch.dtype, k: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        if dtype is torch.bool:
            x = torch.randint(0, 2, (n,), generator=g).bool()
        elif dtype.is_floating_point:
            x = (torch.randn(n, generator=g, dtype=torch.float64) * 1e3).to(dtype)
            specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45, -1e-310,
                                     65504.0, 3.4e38], dtype=torch.float64).to(dtype)
            idx = torch.randint(0, n, (min(n, 3 * len(specials)),), generator=g)
            x[idx] = specials.repeat(3)[: len(idx)]
        else:
            info = torch.iinfo(dtype)
            x = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
        out.append(x)
    return out


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "native":
        if native.load() is None:
            pytest.skip(f"no compiled helpers: {native.reason}")
    else:
        monkeypatch.setattr(native, "lib", None)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(ReduceOp), ids=lambda o: o.name)
def test_fold_into_matches_model(backend, op, dtype):
    if check_reducible(op, dtype):
        pytest.skip("not reducible")
    for k, n in itertools.product([1, 2, 3, 4], [1, 17, 1000, 4099]):
        xs = _inputs(dtype, k, n, seed=k * 7919 + n)
        want = fold(op, xs)
        out = torch.empty_like(xs[0])
        F.fold_into(op, xs, out)
        assert bitwise_equal(out, want), (op, dtype, k, n)
        # chunked, with a scratch buffer and non-temporal stores, into slices of a bigger buffer
        big = torch.empty(n + 64, dtype=dtype)
        dst = big[3:3 + n]
        scratch = torch.empty(n, dtype=torch.float32)
        for a in range(0, n, F.ALIGN * 5):  # chunk starts on multiples of ALIGN elements
            b = min(n, a + F.ALIGN * 5)
            F.fold_into(op, [x[a:b] for x in xs], dst[a:b], scratch, nt=True)
        assert bitwise_equal(dst, want), (op, dtype, k, n, "chunked")


def test_native_copy_nt(backend):
    for n in [0, 1, 4095, 4096, 70001, 1 << 20]:
        src = torch.randint(0, 255, (n,), dtype=torch.uint8)
        for off in (0, 1, 7):
            dst = torch.zeros(n + off + 8, dtype=torch.uint8)
            native.copy(dst[off:off + n], src, nt=True)
            assert torch.equal(dst[off:off + n], src)
            assert not dst[:off].any() and not dst[off + n:].any()
