"""The inter-node EP protocol of docs/design/internode.md, emulated on CPU (tests/multihost/internode_emu.py),
checked against mooncake.model.ep: placement and bits with no fault; a source that dies before sending,
half-way through its blocks, or that is slow past the deadline; stale signals of an earlier call in the
same buffer half (keys, not flags); late data landing in a later call; re-admission after
update_ep_member; and strict mode's mask and done rounds giving one mask on every survivor.

This checks the protocol's logic, not any transport: no GPU, no NVSHMEM, one process."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from internode_emu import Emulator, Faults  # noqa: E402

from mooncake.model import ep as model  # noqa: E402

R, E, T, H, K = 4, 8, 6, 16, 2
L = E // R


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    xs, topks, ws = [], [], []
    for r in range(R):
        n = [6, 4, 0, 5][r]
        xs.append(torch.randn(n, H, generator=g).to(torch.bfloat16))
        topk = torch.rand(n, E, generator=g).argsort(dim=1)[:, :K].contiguous()
        topk[torch.rand(n, K, generator=g) < 0.2] = -1
        topks.append(topk)
        ws.append(torch.randn(n, K, generator=g, dtype=torch.float32))
    return xs, topks, ws


def expert_fn(res, owner):
    """A deterministic expert: row * (1 + 0.25 * e), in bf16; padding rows NaN (must never be read)."""
    y = torch.full(res.recv_x.shape, float("nan"), dtype=torch.bfloat16)
    for l in range(L):
        c = int(res.recv_count[l])
        y[l, :c] = (res.recv_x[l, :c].float() * (1 + 0.25 * (owner * L + l))).to(torch.bfloat16)
    return y


def masks(m=None):
    return [torch.tensor(m or [1] * R, dtype=torch.int32) for _ in range(R)]


def same_dispatch(got, want):
    assert torch.equal(got.recv_count, want.recv_count)
    assert torch.equal(got.layout_range, want.layout_range)
    for l in range(L):
        c = int(want.recv_count[l])
        assert torch.equal(got.src_info[l, :c], want.src_info[l, :c])
        assert torch.equal(got.recv_x[l, :c].view(torch.int16), want.recv_x[l, :c].view(torch.int16))


def check(out, seed, mask, ranks):
    """Every rank in ``ranks``: dispatch and combine bitwise equal to the model under ``mask``."""
    xs, topks, ws = inputs(seed)
    m = torch.tensor(mask, dtype=torch.int32)
    results, m_out = model.dispatch(xs, topks, E, T, m, use_fp8=False)
    ys = [expert_fn(res, r) for r, res in enumerate(results)]
    combined = model.combine(ys, results, topks, ws, m_out)
    for r in ranks:
        res, comb, _, _ = out[r]
        same_dispatch(res, results[r])
        assert torch.equal(comb.view(torch.int16), combined[r].view(torch.int16)), r


def run(emu, seed, active, faults=None):
    xs, topks, ws = inputs(seed)
    return emu.call(xs, topks, ws, active, expert_fn, faults)


def test_no_fault_matches_model_over_several_calls():
    emu, active = Emulator(R, E, T, H, K), masks()
    for seed in (1, 2, 3):  # halves 1, 0, 1: the keys tell the calls apart, nothing is cleaned
        check(run(emu, seed, active), seed, [1] * R, range(R))
    assert all(a.tolist() == [1] * R for a in active)


def test_source_dead_before_sending():
    emu, active = Emulator(R, E, T, H, K), masks()
    check(run(emu, 1, active), 1, [1] * R, range(R))
    out = run(emu, 2, active, Faults(dead={2: "dispatch"}))
    assert sorted(out) == [0, 1, 3]
    check(out, 2, [1, 1, 0, 1], [0, 1, 3])
    assert all(active[r].tolist() == [1, 1, 0, 1] for r in (0, 1, 3))


def test_stale_signals_of_the_same_half_are_not_taken():
    """Rank 1 delivers call 1 (half 1), then dies silently: in call 3 (half 1 again) its call-1 signals
    and rows are still in the buffers, with call 1's key; the survivors must not count them."""
    emu, active = Emulator(R, E, T, H, K), masks()
    check(run(emu, 1, active), 1, [1] * R, range(R))
    check(run(emu, 2, active), 2, [1] * R, range(R))
    out = run(emu, 3, active, Faults(dead={1: "dispatch"}))
    check(out, 3, [1, 0, 1, 1], [0, 2, 3])


def test_source_dead_half_way_gives_per_receiver_verdicts():
    """Rank 3 posts the blocks for ranks 0 and 1 only, then dies: they count it, ranks 2 and 3 cannot
    (all-or-nothing per source and receiver); each receiver equals the model under its own mask."""
    emu, active = Emulator(R, E, T, H, K), masks()
    out = run(emu, 4, active, Faults(dead={3: "dispatch_half"}))
    xs, topks, _ = inputs(4)
    for q in (0, 1, 2):
        mine = out[q][2]
        assert mine.tolist() == ([1, 1, 1, 1] if q < 2 else [1, 1, 1, 0]), (q, mine)
        want, _ = model.dispatch(xs, topks, E, T, mine, use_fp8=False)
        same_dispatch(out[q][0], want[q])


def test_slow_source_late_data_never_read_then_readmitted():
    """Rank 1 is slow in call 1 (its data lands during call 3, in the same half): masked by the others;
    calls 2 and 3 equal the model without it; after update_ep_member every rank is back."""
    emu, active = Emulator(R, E, T, H, K), masks()
    out = run(emu, 1, active, Faults(slow={1: 20.5 * emu.D}))
    check(out, 1, [1, 0, 1, 1], [0, 2, 3])
    for seed in (2, 3):
        out = run(emu, seed, active)
        check(out, seed, [1, 0, 1, 1], [0, 2, 3])
    emu.update_ep_member(active)
    for seed in (5, 6):
        check(run(emu, seed, active), seed, [1] * R, range(R))


@pytest.mark.parametrize("case", ["dead_in_mask_round", "dead_half_way", "slow_to_one"])
def test_strict_mode_one_mask_on_every_survivor(case):
    emu, active = Emulator(R, E, T, H, K, strict=True), masks()
    check(run(emu, 1, active), 1, [1] * R, range(R))
    if case == "dead_in_mask_round":  # rank 2 delivered its dispatch to all, sent its mask to rank 0 only
        faults, gone, want = Faults(dead={2: "mask_round"}, mask_to={2: [0]}), [2], [1, 1, 0, 1]
    elif case == "dead_half_way":  # receivers 0, 1 got rank 3's blocks, 2 did not: rank 3 leaves everyone's M
        faults, gone, want = Faults(dead={3: "dispatch_half"}), [3], [1, 1, 1, 0]
    else:  # rank 0's blocks reach rank 3 late only: a live source that one receiver missed leaves M
        faults, gone, want = Faults(slow_to={(0, 3): 1.5 * emu.D}), [], [0, 1, 1, 1]
    out = run(emu, 2, active, faults)
    survivors = [r for r in range(R) if r not in gone]
    assert sorted(out) == survivors
    verdicts = [out[r][3].tolist() for r in survivors]
    assert all(v == want for v in verdicts), verdicts
    check(out, 2, want, [r for r in survivors if want[r]])


def test_owner_dead_in_combine():
    """Rank 1 receives its dispatch and dies before returning rows: every token owner skips its experts,
    the combine model with rank 1 masked after a full dispatch."""
    emu, active = Emulator(R, E, T, H, K), masks()
    out = run(emu, 7, active, Faults(dead={1: "combine"}))
    assert sorted(out) == [0, 2, 3]
    xs, topks, ws = inputs(7)
    results, m_out = model.dispatch(xs, topks, E, T, torch.ones(R, dtype=torch.int32), use_fp8=False)
    ys = [expert_fn(res, r) for r, res in enumerate(results)]
    m_out[1] = 0
    combined = model.combine(ys, results, topks, ws, m_out)
    for r in (0, 2, 3):
        same_dispatch(out[r][0], results[r])
        assert out[r][2].tolist() == [1] * R
        assert active[r].tolist() == [1, 0, 1, 1]
        assert torch.equal(out[r][1].view(torch.int16), combined[r].view(torch.int16)), r


@pytest.mark.parametrize("seed", range(12))
def test_random_faults(seed):
    """A random victim and fault in the second of three calls: each survivor's dispatch equals the model
    under that survivor's own mask (default mode), or every survivor holds the same mask and equals the
    model under it, dispatch and combine (strict mode)."""
    import random
    rng = random.Random(seed)
    strict = bool(seed % 2)
    emu, active = Emulator(R, E, T, H, K, strict=strict), masks()
    victim = rng.randrange(R)
    point = rng.choice(["dispatch", "dispatch_half", "combine", "slow"] + (["mask_round"] if strict else []))
    if point == "slow":
        faults = Faults(slow={victim: rng.choice([1.5, 12.5]) * emu.D})
    else:
        faults = Faults(dead={victim: point}, mask_to={victim: rng.sample(range(R), rng.randrange(R))})
    for call, seed_in in enumerate((10 * seed + 1, 10 * seed + 2, 10 * seed + 3)):
        out = run(emu, seed_in, active, faults if call == 1 else None)
        xs, topks, ws = inputs(seed_in)
        if strict:
            verdicts = {r: o[3] for r, o in out.items()}
            first = next(iter(verdicts.values()))
            assert all(torch.equal(v, first) for v in verdicts.values()), (point, verdicts)
            if point != "combine" or call != 1:
                check(out, seed_in, first.tolist(), [r for r in out if first[r]])
        else:
            for q, (res, _, got, _) in out.items():
                want, _ = model.dispatch(xs, topks, E, T, got, use_fp8=False)
                same_dispatch(res, want[q])
