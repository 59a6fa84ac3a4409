"""The CUDA PG plane (mooncake/fast/cuda/pg.py) driven directly, bitwise against the global-view model.

Two halves:

* ``emulated``: the same protocol on CPU tensors (``MOONCAKE_FAST_CUDA_EMULATE=cpu``: lanes in shared
  memory, "GPU events" that complete a few queries late), so the state machine, slot tables, zero-fill,
  inactive ranks, re-posting, wire errors, liveness and the host fold run on every machine.
* ``cuda``: real CUDA tensors and CUDA IPC; skipped (with the reason) where the plane cannot run.
  ``MOONCAKE_FAST_CUDA_RANKS`` (default ``2``) picks the rank counts; all ranks share the current GPU.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pg_cases as C  # noqa: E402
import pg_harness as H  # noqa: E402
from mooncake.fast.cuda.pg import POSTED, unavailable_reason  # noqa: E402

TIMEOUT_S = 120
EMU = {"MOONCAKE_FAST_CUDA_EMULATE": "cpu", "MOONCAKE_FAST_CUDA_EMULATE_LAG": "2", "MOONCAKE_FAST_CUDA_PARTS_MIN": "100"}
REASON = unavailable_reason()
CUDA_RANKS = [int(r) for r in os.environ.get("MOONCAKE_FAST_CUDA_RANKS", "2").split(",") if r]


def _emu(cluster_factory, n, **env):
    return cluster_factory(n, "gloo", init=False, env={**EMU, **env}, timeout_s=TIMEOUT_S)


def _run_grid(c, name, world, capacity, active, dtypes, numels, mode="sync"):
    prefix = C.prefix(name)
    c.run(H.open_plane, prefix, capacity, active, ranks=active)
    try:
        cases = C.grid(active, capacity, dtypes, numels)
        results = c.run(H.run_cases, prefix, cases, mode, ranks=active)
        bad = C.mismatches(cases, results, active, capacity)
        assert not bad, f"{name}: {len(bad)} mismatches, e.g. {bad[:5]}"
    finally:
        c.run(H.close_plane, prefix, ranks=active)


# ================================================================================== emulated (CPU)

EMU_GRID = [
    (2, 2, [0, 1]),
    (3, 3, [0, 1, 2]),
    (3, 4, [0, 2]),  # an inactive middle rank (never opens the plane) and a reserved slot
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world,capacity,active", EMU_GRID, ids=lambda v: str(v).replace(" ", ""))
def test_emulated_grid_matches_model(cluster_factory, world, capacity, active):
    c = _emu(cluster_factory, world)
    _run_grid(c, f"emu{world}{capacity}{active}", world, capacity, active,
              ["bool", "int32", "bfloat16", "float32", "float64"], [1, 37, 600])


DEVICE_ON = {"MOONCAKE_FAST_CUDA_DEVICE": "on", "MOONCAKE_FAST_CUDA_DEVICE_WAIT_MS": "200"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world,capacity,active", [(2, 2, [0, 1]), (3, 4, [0, 2])],
                         ids=lambda v: str(v).replace(" ", ""))
def test_emulated_device_path_matches_model(cluster_factory, world, capacity, active):
    """The device path's steps (run on the host when emulated), mixed with host-protocol operations of
    other kinds, give the model's bits."""
    c = _emu(cluster_factory, world, **DEVICE_ON)
    name = f"emudev{world}{capacity}{active}"
    prefix = C.prefix(name)
    c.run(H.open_plane, prefix, capacity, active, ranks=active)
    try:
        cases = C.grid(active, capacity, ["bool", "bfloat16", "float16", "float32", "float64"], [1, 37, 600])
        results = c.run(H.run_cases, prefix, cases, ranks=active)
        bad = C.mismatches(cases, results, active, capacity)
        assert not bad, f"{name}: {len(bad)} mismatches, e.g. {bad[:5]}"
        for outcomes in c.run(H.device_outcomes, prefix, ranks=active):
            if outcomes is not None:
                assert outcomes["done"] >= 20, outcomes  # the floating all_reduce cases took the device path
    finally:
        c.run(H.close_plane, prefix, ranks=active)


@pytest.mark.timeout(300)
def test_emulated_device_path_meets_host_protocol(cluster_factory):
    """One rank on the device path, its peer on the host protocol: the same words, the same bits."""
    c = _emu(cluster_factory, 2, **DEVICE_ON)
    c.run(H.set_env, "MOONCAKE_FAST_CUDA_DEVICE", "off", ranks=[1])
    prefix = C.prefix("emudev-mixed")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        assert c.run(H.device_path_state, prefix) == [(True, None), (False, "MOONCAKE_FAST_CUDA_DEVICE=off")]
        cases = [C.case("all_reduce", d, n, red=r, salt="mixed") for d in ("bfloat16", "float32", "float64")
                 for n in (3, 300) for r in ("SUM", "MAX", "AVG")]
        results = c.run(H.run_cases, prefix, cases)
        bad = C.mismatches(cases, results, [0, 1], 2)
        assert not bad, bad[:5]
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_device_path_late_peer_falls_back(cluster_factory):
    """A peer later than the device path's wait: the kernel gives up (published, or not even that) and the
    host protocol finishes the operation with the model's bits."""
    c = _emu(cluster_factory, 2, MOONCAKE_FAST_CUDA_DEVICE="on", MOONCAKE_FAST_CUDA_DEVICE_WAIT_MS="20")
    prefix = C.prefix("emudev-late")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        warm = [C.case("all_reduce", "float32", 3, red="SUM", salt=f"warm{i}") for i in range(2)]
        c.run(H.run_cases, prefix, warm)  # both lanes allocated: the late ops are eligible from the first
        cases = [C.case("all_reduce", d, n, red="SUM", salt=f"late{n}") for d in ("float32", "bfloat16")
                 for n in (5, 20)]  # under the emulation's two-phase threshold (100 bytes)
        results = c.run_each({0: (H.run_cases, (prefix, cases), {}), 1: (H.run_cases_late, (prefix, cases, 0.15), {})})
        bad = C.mismatches(cases, results, [0, 1], 2)
        assert not bad, bad[:5]
        early = c.run(H.device_outcomes, prefix, ranks=[0])[0]
        assert early["published"] == len(cases), early  # gave up waiting, the host protocol finished each
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_stalled_publisher_falls_back(cluster_factory):
    """A peer whose launches publish late (the stall word, as the kernel reads it on a GPU): its own launches
    get through, its peer's give up after publishing, and the host protocol finishes them with the model's
    bits; cleared, both take the device path again."""
    c = _emu(cluster_factory, 2, MOONCAKE_FAST_CUDA_DEVICE="on", MOONCAKE_FAST_CUDA_DEVICE_WAIT_MS="20",
             MOONCAKE_FAST_CUDA_STALL_WORD="1")
    prefix = C.prefix("emudev-stall")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        warm = [C.case("all_reduce", "float32", 3, red="SUM", salt=f"warm{i}") for i in range(2)]
        c.run(H.run_cases, prefix, warm)  # both lanes allocated: the next ops are eligible

        def since(before):
            return [{k: now[k] - was.get(k, 0) for k in now} for now, was in zip(c.run(H.device_outcomes, prefix), before)]

        before = c.run(H.device_outcomes, prefix)
        c.run(H.set_stall, prefix, 150_000_000, ranks=[1])
        cases = [C.case("all_reduce", "float32", n, red="SUM", salt=f"stall{n}") for n in (5, 20)]
        bad = C.mismatches(cases, c.run(H.run_cases, prefix, cases), [0, 1], 2)
        assert not bad, bad[:5]
        early, stalled = since(before)
        assert early["published"] == len(cases) and stalled["done"] == len(cases), (early, stalled)
        c.run(H.set_stall, prefix, 0, ranks=[1])
        before = c.run(H.device_outcomes, prefix)
        again = [C.case("all_reduce", "float32", 7, red="SUM", salt=f"after{i}") for i in range(2)]
        bad = C.mismatches(again, c.run(H.run_cases, prefix, again), [0, 1], 2)
        assert not bad, bad[:5]
        assert [o["done"] for o in since(before)] == [len(again)] * 2
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_device_launch_that_gave_up_mid_fold_is_undone(cluster_factory):
    """A launch that published, held its peers' lanes and wrote part of the output before giving up (one
    block of several past its deadline), then the op abandoned: the caller's tensor is its input again and
    the hold is freed, so peers can reuse the lane."""
    c = _emu(cluster_factory, 2, **DEVICE_ON)
    prefix = C.prefix("emudev-midfold")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        warm = [C.case("all_reduce", "float32", 3, red="SUM", salt=f"warm{i}") for i in range(2)]
        c.run(H.run_cases, prefix, warm)  # both lanes allocated: the next op is eligible for the device path
        case = C.case("all_reduce", "float32", 8, red="SUM", salt="midfold")
        state, after, want, freed = c.run(H.device_gave_up_mid_fold, prefix, case, ranks=[0])[0]
        assert state == POSTED, state  # the host protocol took over from the published launch
        assert torch.equal(after, want), (after, want)
        assert freed
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_device_path_mismatch_is_named(cluster_factory):
    """Ranks disagreeing on a call that the device path would take: the kernel gives up at once and
    every rank raises the same MismatchError; the next call works."""
    c = _emu(cluster_factory, 2, **DEVICE_ON)
    prefix = C.prefix("emudev-mismatch")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        per_rank = {0: [C.case("all_reduce", "float32", 10, red="SUM"), C.case("all_reduce", "float32", 4, red="SUM")],
                    1: [C.case("all_reduce", "float32", 12, red="SUM"), C.case("all_reduce", "float32", 4, red="SUM")]}
        msgs = c.run_each({r: (H.mismatch, (prefix, per_rank[r]), {}) for r in (0, 1)})
        assert msgs[0] == msgs[1] and msgs[0][0].startswith("MismatchError"), msgs
        assert msgs[0][1] == "ok", msgs
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_forged_record_is_waited_past(cluster_factory):
    """With a job secret, an unsigned record under a peer's key is dropped and the peer's authentic one,
    published later, is used: the plane opens and computes the model's bits."""
    c = _emu(cluster_factory, 2, MOONCAKE_JOB_SECRET=os.urandom(32).hex())
    prefix = C.prefix("emu-forged")
    c.run(H.forge_record, prefix, 1, ranks=[0])
    c.run_each({0: (H.open_plane, (prefix, 2, [0, 1]), {}), 1: (H.open_plane_after, (1.0, prefix, 2, [0, 1]), {})})
    try:
        cases = [C.case("all_reduce", "float32", 7, red="SUM", salt="forged")]
        bad = C.mismatches(cases, c.run(H.run_cases, prefix, cases), [0, 1], 2)
        assert not bad, bad
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["always", "never"])
def test_emulated_host_fold_modes(cluster_factory, mode):
    """The host fold (taken for NaN / MIN-MAX zero results) and its absence give the model's bits."""
    c = _emu(cluster_factory, 2, MOONCAKE_FAST_CUDA_EXACT_HOST=mode)
    prefix = C.prefix(f"exact-{mode}")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        cases = [C.case("all_reduce", d, n, red=r) for d in ("float16", "float32", "float64")
                 for n in (5, 300) for r in ("SUM", "MIN", "MAX", "AVG", "PRODUCT")]
        cases += [C.case("reduce_scatter", "bfloat16", 64, red="SUM", k=2), C.case("reduce", "float32", 64,
                                                                                   red="MAX", root=1)]
        results = c.run(H.run_cases, prefix, cases)
        bad = C.mismatches(cases, results, [0, 1], 2)
        assert not bad, bad[:5]
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_async_posting_out_of_order_finish(cluster_factory):
    """Ops posted before any is waited for and finished last-first: committed ops hold their results
    privately, so later ones proceed, and every output is still the model's."""
    c = _emu(cluster_factory, 3)
    prefix = C.prefix("emu-async")
    c.run(H.open_plane, prefix, 3, [0, 1, 2])
    try:
        cases = [C.case("all_reduce", "float32", n, red="SUM", salt=str(i)) for i, n in enumerate([5, 3000, 17, 9000])]
        cases += [C.case("all_gather", "int64", 33, k=3), C.case("all_to_all", "bfloat16", 70, k=3),
                  C.case("reduce_scatter", "float32", 5000, red="SUM", k=3),
                  C.case("broadcast", "int8", 100, root=2), C.case("all_reduce", "float64", 2_000_000, red="SUM")]
        results = c.run(H.run_cases, prefix, cases, "async")
        bad = C.mismatches(cases, results, [0, 1, 2], 3)
        assert not bad, bad[:5]
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_repost_under_new_epoch(cluster_factory):
    """An op abandoned by everyone (a peer never came) is re-posted with the same seq under a new view:
    the result is the model's over the new active set."""
    c = _emu(cluster_factory, 3)
    prefix = C.prefix("emu-repost")
    c.run(H.open_plane, prefix, 3, [0, 1, 2])
    try:
        c.run(H.run_cases, prefix, [C.case("all_reduce", "float32", 3000, red="SUM", salt="w")])
        out = c.run(H.post_and_abandon, prefix, C.case("all_reduce", "float32", 3000, red="SUM", salt="a"),
                    ranks=[0, 1])
        assert out[0] == out[1] == "abandoned"
        c.run(H.set_view, prefix, 1, [0, 1], 1, ranks=[0, 1])
        cases = [C.case("all_reduce", "float32", n, red="SUM", salt="r") for n in (7, 3000)]
        cases += [C.case("all_gather", "int16", 50, k=3)]
        results = c.run(H.run_cases, prefix, cases, ranks=[0, 1])
        bad = C.mismatches(cases, results, [0, 1], 3)
        assert not bad, bad[:5]
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_abandoned_all_reduce_gives_the_input_back(cluster_factory):
    """all_reduce writes the caller's tensor before its commit round; abandoning the op (committed
    here, then not agreed on) restores the input bit for bit, one-phase and two-phase alike, and the
    same tensors re-posted give the model's result."""
    c = _emu(cluster_factory, 2)
    prefix = C.prefix("emu-restore")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        for numel in (7, 3000):  # below / above MOONCAKE_FAST_CUDA_PARTS_MIN (100 bytes here)
            case = C.case("all_reduce", "float32", numel, red="SUM", salt=f"restore{numel}")
            out = c.run(H.commit_and_abandon, prefix, case)
            for rank in (0, 1):
                committed, tensor = out[rank]
                assert committed
                want = H.case_inputs(case, rank)
                assert torch.equal(tensor.view(torch.int32), want.view(torch.int32)), (numel, rank)
            results = c.run(H.run_cases, prefix, [case])
            bad = C.mismatches([case], results, [0, 1], 2)
            assert not bad, bad[:5]
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("numel", [7, 3000], ids=["one-phase", "two-phase"])
def test_emulated_lane_reuse_saves_the_input_first(cluster_factory, numel):
    """The op two later reuses the lane of an all_reduce that wrote its tensor, is committed but not
    finished: the all_reduce saves its input first, so abandoning it afterwards still restores it."""
    c = _emu(cluster_factory, 2)
    prefix = C.prefix(f"emu-reuse{numel}")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        cases = [C.case("all_reduce", "float32", numel, red="SUM", salt=f"reuse{i}") for i in range(3)]
        out = c.run(H.reuse_lane_then_abandon_first, prefix, cases)
        for rank in (0, 1):
            want = H.case_inputs(cases[0], rank)
            assert torch.equal(out[rank][0].view(torch.int32), want.view(torch.int32)), rank
        bad = C.mismatches(cases[1:], {r: out[r][1:] for r in (0, 1)}, [0, 1], 2)
        assert not bad, bad[:5]
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_wire_errors_then_group_works(cluster_factory):
    c = _emu(cluster_factory, 2)
    prefix = C.prefix("emu-wire")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        def cases(rank):
            return [C.case("all_reduce", "float32", 10 + rank, red="SUM"),
                    C.case("all_reduce", "float32", 10, red="SUM") if rank == 0 else C.case("all_gather", "float32", 10, k=2),
                    C.case("all_reduce", "float32" if rank == 0 else "int32", 10, red="SUM")]
        outcomes = c.run_each({r: (H.mismatch, (prefix, cases(r)), {}) for r in (0, 1)})
        assert outcomes[0] == outcomes[1], outcomes  # one verdict: the same message on both ranks
        msgs = outcomes[0]
        assert "10 elements" in msgs[0] and "11 elements" in msgs[0], msgs
        assert "called all_reduce" in msgs[1] and "called all_gather" in msgs[1], msgs
        assert "float32" in msgs[2] and "int32" in msgs[2], msgs
        after = [C.case("all_reduce", "float32", 100, red="SUM", salt="after")]
        bad = C.mismatches(after, c.run(H.run_cases, prefix, after), [0, 1], 2)
        assert not bad, bad
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "proc"])
def test_emulated_killed_peer_is_reported(cluster_factory, pidfd):
    c = _emu(cluster_factory, 3)
    prefix = C.prefix(f"emu-kill-{pidfd}")
    if not pidfd:
        c.run(H.disable_pidfd)
    c.run(H.open_plane, prefix, 3, [0, 1, 2])
    c.kill(2, signal.SIGKILL)
    res = c.run(H.wait_for_failure, prefix, 10.0, ranks=[0, 1])
    for r in (0, 1):
        failed, seconds = res[r]
        assert failed == [2] and seconds < 2.0, res
    c.run(H.close_plane, prefix, ranks=[0, 1])


@pytest.mark.timeout(300)
def test_emulated_idle_waiter_sleeps(cluster_factory):
    """A rank waiting for a peer that never posts sleeps on its futex (little CPU)."""
    c = _emu(cluster_factory, 2)
    prefix = C.prefix("emu-idle")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        used, committed = c.run(H.idle_cpu, prefix, 1.0, ranks=[0])[0]
        assert not committed and used < 0.3, used
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_emulated_other_host_delegates_to_ref(cluster_factory):
    c = _emu(cluster_factory, 2, MOONCAKE_FAST_CPU_HOST_ID="per-process")
    prefix = C.prefix("emu-remote")
    out = c.run(H.open_plane, prefix, 2, [0, 1])
    c.run(H.close_plane, prefix)
    for _, reason in out:
        assert reason and "another host" in reason, out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("peer_access", [True, False])
def test_emulated_gpus_without_peer_access_delegate_to_ref(cluster_factory, peer_access):
    """Ranks on two GPUs of one host stay on the plane where the GPUs map each other's memory; where they
    cannot, every rank sends the group's collectives to the ref plane alike, naming the two GPUs."""
    c = _emu(cluster_factory, 3)
    prefix = C.prefix(f"emu-p2p-{peer_access}")
    out = c.run(H.open_plane_on_gpus, prefix, 3, [0, 1, 2], 2, peer_access)
    blocks = c.run(H.device_blocks, prefix, 256 << 20)
    c.run(H.close_plane, prefix)
    assert blocks == [(2, 64), (1, 64), (2, 64)], blocks  # ranks 0 and 2 share GPU 0, rank 1 has GPU 1
    for _, reason in out:
        if peer_access:
            assert reason is None, out
        else:
            assert reason and "GPUs 0 and 1 of this host cannot map each other's memory" in reason, out


@pytest.mark.timeout(300)
def test_emulated_ranks_numbering_gpus_apart_delegate_to_ref(cluster_factory):
    """Ranks of one host that each see only their own GPU (as ordinal 0) cannot tell each other's lanes by
    ordinal: every rank sends the group to the ref plane alike, naming the cause and the fix."""
    c = _emu(cluster_factory, 3)
    prefix = C.prefix("emu-numbering")
    out = c.run(H.open_plane_on_gpus, prefix, 3, [0, 1, 2], 2, True, True)
    c.run(H.close_plane, prefix)
    for _, reason in out:
        assert reason and "number their GPUs differently" in reason and "CUDA_VISIBLE_DEVICES" in reason, out
    assert len({reason for _, reason in out}) == 1, out


@pytest.mark.timeout(300)
def test_emulated_bad_max_blocks_fails_the_groups_creation(cluster_factory):
    c = _emu(cluster_factory, 2, MOONCAKE_FAST_CUDA_MAX_BLOCKS="0")
    with pytest.raises(Exception) as got:
        c.run(H.open_plane, C.prefix("emu-max-blocks"), 2, [0, 1])
    assert "MOONCAKE_FAST_CUDA_MAX_BLOCKS='0': expected a whole number of blocks from 1 to 1024" in str(got.value)


def test_numbering_clash_names_two_ranks():
    from mooncake.fast.cuda.pg import numbering_clash
    x, y = b"x" * 16, b"y" * 16
    assert numbering_clash({0: (0, x), 1: (1, y), 2: (0, x)}) is None  # two ranks on one GPU, one numbering
    assert "ranks 0 and 1" in numbering_clash({0: (0, x), 1: (0, y)})  # one ordinal, two GPUs
    assert "ranks 0 and 2" in numbering_clash({0: (0, x), 1: (1, y), 2: (2, x)})  # one GPU, two ordinals
    assert "ranks 1 and 2" in numbering_clash({0: (0, x), 1: (1, y), 2: (1, x)})  # both: the ordinal named first


def test_device_blocks_share_the_sms_among_the_gpus_ranks():
    from mooncake.fast.cuda.pg import DEVICE_BLOCK_BYTES, device_blocks
    assert device_blocks(0, 132, 8) == 1
    assert device_blocks(8, 132, 8) == 1
    assert device_blocks(DEVICE_BLOCK_BYTES + 1, 132, 8) == 2
    assert device_blocks(256 << 20, 132, 8) == 16  # 8 ranks' 128 blocks resident together
    assert device_blocks(256 << 20, 132, 4) == 33
    assert device_blocks(256 << 20, 132, 2) == 64  # the default most per launch
    assert device_blocks(256 << 20, 132, 2, most=1024) == 66
    assert device_blocks(256 << 20, 132, 1, most=1024) == 132
    assert device_blocks(256 << 20, 132, 1, most=8) == 8
    assert device_blocks(1 << 20, 132, 2) == 16  # one block per 64 KiB below the cap
    assert device_blocks(256 << 20, 132, 200) == 1  # more ranks than SMs: one block each


@pytest.mark.parametrize("raw", ["0", "1025", "many", "-3"])
def test_max_blocks_names_a_bad_value(monkeypatch, raw):
    from mooncake.control.errors import MooncakeError
    from mooncake.fast.cuda.pg import MAX_BLOCKS_ENV, max_blocks
    monkeypatch.setenv(MAX_BLOCKS_ENV, raw)
    with pytest.raises(MooncakeError, match=f"MOONCAKE_FAST_CUDA_MAX_BLOCKS={raw!r}: expected a whole number"):
        max_blocks()
    monkeypatch.setenv(MAX_BLOCKS_ENV, "128")
    assert max_blocks() == 128
    monkeypatch.delenv(MAX_BLOCKS_ENV)
    assert max_blocks() == 64


def test_unreachable_pair_is_the_lowest_pair_without_access():
    from mooncake.fast.cuda.pg import unreachable_pair
    assert unreachable_pair({3}, lambda a, b: False) is None  # one GPU reaches its own memory
    assert unreachable_pair({0, 1, 2}, lambda a, b: True) is None
    assert unreachable_pair({2, 0, 1}, lambda a, b: {a, b} != {1, 2}) == (1, 2)
    assert unreachable_pair({0, 1}, lambda a, b: None) == (0, 1)  # the driver could not say: not assumed


def test_reason_without_cuda():
    import torch
    if torch.version.cuda is not None and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert REASON and isinstance(REASON, str)


# ================================================================================== CUDA

cuda = pytest.mark.skipif(REASON is not None, reason=f"CUDA PG plane unavailable: {REASON}")


def _cuda(cluster_factory, n, **env):
    return cluster_factory(n, "gloo", init=False, device="cuda", env=env, timeout_s=TIMEOUT_S)


@cuda
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", CUDA_RANKS)
def test_cuda_grid_matches_model(cluster_factory, world):
    c = _cuda(cluster_factory, world)
    active = list(range(world))
    _run_grid(c, f"cuda{world}", world, world + 1, active, C.ALL_DTYPES, [1, 37, 5000])


@cuda
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", CUDA_RANKS)
def test_cuda_async_and_large(cluster_factory, world):
    c = _cuda(cluster_factory, world)
    prefix = C.prefix(f"cuda-async{world}")
    active = list(range(world))
    c.run(H.open_plane, prefix, world, active)
    try:
        cases = [C.case("all_reduce", d, n, red=r, salt="big") for d in ("float32", "bfloat16")
                 for n in (3_000_001,) for r in ("SUM", "AVG", "MAX")]
        cases += [C.case("all_gather", "int64", 33, k=world), C.case("reduce_scatter", "float16", 7001, red="SUM", k=world)]
        results = c.run(H.run_cases, prefix, cases, "async")
        bad = C.mismatches(cases, results, active, world)
        assert not bad, bad[:5]
    finally:
        c.run(H.close_plane, prefix)
