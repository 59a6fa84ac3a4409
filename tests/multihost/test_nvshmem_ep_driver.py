"""The CPU side of benchmarks/internode/nvshmem_ep.py (the NVSHMEM EP prototype): argument checks, the
inputs every rank rebuilds from the seed, the expected results it takes from mooncake.model.ep (silent
ranks included), and the pass/fail summary.  The kernels themselves need the GPU machine."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "internode"))
import nvshmem_ep as drv  # noqa: E402

from mooncake.model import ep as model  # noqa: E402

SHAPE = drv.Shape(ranks=3, experts=6, tokens=8, hidden=128, topk=3)


@pytest.mark.parametrize(
    "shape, word",
    [
        (drv.Shape(1, 4, 8, 128, 2), "--ranks"),
        (drv.Shape(33, 33, 8, 128, 2), "--ranks"),
        (drv.Shape(3, 4, 8, 128, 2), "experts"),
        (drv.Shape(2, 4, 0x10000, 128, 2), "--tokens"),
        (drv.Shape(2, 4, 8, 96, 2), "--hidden"),
        (drv.Shape(2, 4, 8, 128, 5), "--topk"),
    ],
)
def test_check_shape_names_the_argument(shape, word):
    with pytest.raises(ValueError, match=word):
        drv.check_shape(shape)


def test_inputs_are_deterministic_valid_and_differ_per_set():
    drv.check_shape(SHAPE)
    a, b, c = drv.make_inputs(SHAPE, 5, 0), drv.make_inputs(SHAPE, 5, 0), drv.make_inputs(SHAPE, 5, 1)
    for r in range(SHAPE.ranks):
        assert drv.same_bits(a.xs[r], b.xs[r]) and drv.same_bits(a.topks[r], b.topks[r])
        assert a.xs[r].shape == (drv.num_tokens(SHAPE, r), SHAPE.hidden)
        model.validate_routing(a.topks[r], SHAPE.experts, SHAPE.tokens, SHAPE.ranks)
        assert a.expert_outputs[r].shape == (SHAPE.local_experts, SHAPE.ranks * SHAPE.tokens, SHAPE.hidden)
    assert not drv.same_bits(a.xs[0], c.xs[0])


def test_plan_keys_cover_every_call_in_order():
    todo = drv.cases(iters=4)
    keys = drv.plan_keys(todo)
    assert len(keys) == len(set(keys))
    seq = 0
    for case in todo:
        for _ in range(case.calls):
            seq += 1
            assert (seq % drv.NUM_INPUT_SETS, case.use_fp8, case.silent_phase) in keys


def test_expected_silent_dispatch_masks_the_last_rank_everywhere():
    inputs = drv.make_inputs(SHAPE, 1, 0)
    want = drv.expected(SHAPE, inputs, use_fp8=True, silent_phase="dispatch")
    last = SHAPE.ranks - 1
    assert want.mask_after_dispatch.tolist() == [1] * last + [0]
    assert want.mask_after_combine.tolist() == [1] * last + [0]
    for r in range(SHAPE.ranks):
        _, count = model.unpack_layout(want.dispatch[r].layout_range[:, last])
        assert int(count.sum()) == 0
    assert not bool(want.combined[last].float().abs().sum())
    assert drv.silent_bits(SHAPE, drv.Case("x", False, 1, "dispatch"), "dispatch") == 1 << last
    assert drv.silent_bits(SHAPE, drv.Case("x", False, 1, "dispatch"), "combine") == 0


def test_expected_silent_combine_keeps_dispatch_and_drops_the_owner():
    inputs = drv.make_inputs(SHAPE, 1, 0)
    full = drv.expected(SHAPE, inputs, use_fp8=False, silent_phase=None)
    want = drv.expected(SHAPE, inputs, use_fp8=False, silent_phase="combine")
    last = SHAPE.ranks - 1
    assert want.mask_after_dispatch.tolist() == [1] * SHAPE.ranks
    assert want.mask_after_combine.tolist() == [1] * last + [0]
    for r in range(SHAPE.ranks):
        assert drv.same_bits(want.dispatch[r].recv_x, full.dispatch[r].recv_x)
    assert not bool(want.combined[last].float().abs().sum())
    owners = inputs.topks[0].clamp(min=0) // SHAPE.local_experts
    if bool(((owners == last) & (inputs.topks[0] >= 0)).any()):
        assert not drv.same_bits(want.combined[0], full.combined[0])


def test_same_bits_tells_signed_zeros_apart():
    assert not drv.same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert drv.same_bits(torch.tensor([1.5], dtype=torch.bfloat16), torch.tensor([1.5], dtype=torch.bfloat16))
    assert not drv.same_bits(torch.tensor([1.5]), torch.tensor([1.5], dtype=torch.float64))


def _args(**kw):
    base = dict(ranks=2, experts_per_rank=2, tokens=8, hidden=128, topk=2, iters=2, force_put=False,
                cases=",".join(c.name for c in drv.cases(1)))
    base.update(kw)
    return SimpleNamespace(**base)


def _rank(passed=True):
    case = {"pass": passed, "dispatch_us_median": 10.0, "combine_us_median": 20.0, "direct_mask": 3,
            "failures": [] if passed else [{"call": 0, "failed": ["combined"]}]}
    return {"init_status": 0, "create_ok": True, "cases": {c.name: case for c in drv.cases(1)}}


def test_summary_passes_only_with_every_rank_and_clean_exits():
    args = _args()
    assert drv.summarize(args, [0, 0], {0: _rank(), 1: _rank()})[1]
    assert not drv.summarize(args, [0, None], {0: _rank(), 1: _rank()})[1]  # a killed child
    assert not drv.summarize(args, [0, 0], {0: _rank(), 1: None})[1]  # a rank that wrote nothing
    summary, ok = drv.summarize(args, [0, 0], {0: _rank(), 1: _rank(passed=False)})
    assert not ok and summary["cases"]["bf16"]["ranks_passed"] == 1
    assert summary["cases"]["bf16"]["first_failure"]["failed"] == ["combined"]
