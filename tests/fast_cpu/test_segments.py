"""Segments and liveness of the shared-memory plane: nameless memfd segments attached through
/proc, nothing left in /dev/shm, a SIGKILLed rank detected while peers wait and its memory
released once they close, idle waiting without CPU, no threads of its own."""

from __future__ import annotations

import os
import threading
import time
import zlib

import pytest
import torch

from fast_cpu import planeharness as H
from mooncake.fast.cpu.segment import Segment, SegmentError

TIMEOUT_S = 60


def _prefix(name: str) -> str:
    return f"seg/{name}/{zlib.crc32(name.encode())}/{time.monotonic_ns()}"


def _shm_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if "mooncake" in n}


def test_segment_create_attach_close():
    seg = Segment.create("mooncake-fastcpu-test", 1 << 16)
    seg.bytes[:5] = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    other = Segment.attach(os.getpid(), seg.fd, seg.size)
    assert other.bytes[:5].tolist() == [1, 2, 3, 4, 5]
    other.bytes[5] = 9
    assert int(seg.bytes[5]) == 9
    words = seg.words(64, 2)
    words[0] = -7
    assert int(other.words(64, 2)[0]) == -7
    other.close()
    fd = seg.fd
    seg.close()
    with pytest.raises(SegmentError, match="cannot open the shared segment"):
        Segment.attach(os.getpid(), fd, 1 << 16)
    assert not _shm_entries()


def test_no_threads_and_no_dev_shm(cluster_factory):
    c = cluster_factory(2, "gloo", init=False, timeout_s=TIMEOUT_S)
    prefix = _prefix("threads")
    before = c.run(threading.active_count)
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        cases = [{"id": "x", "op": "all_reduce", "dtype": "float32", "numel": 300000, "red": "SUM",
                  "root": None, "k": None, "seed": 1}]
        c.run(H.run_cases, prefix, cases)
        assert c.run(threading.active_count) == before, "the plane must not start threads"
        assert not _shm_entries()
    finally:
        c.run(H.close_plane, prefix)


@pytest.mark.timeout(300)
def test_sigkilled_rank_detected_and_released(cluster_factory):
    c = cluster_factory(3, "gloo", init=False, timeout_s=TIMEOUT_S)
    prefix = _prefix("kill")
    c.run(H.open_plane, prefix, 3, [0, 1, 2])
    cases = [{"id": f"w{i}", "op": op, "dtype": "float32", "numel": n, "red": "SUM", "root": None,
              "k": 3, "seed": i} for i, (op, n) in enumerate([("all_reduce", 10), ("all_reduce", 300000),
                                                             ("all_gather", 100)])]
    c.run(H.run_cases, prefix, cases)
    maps = c.run(H.mapped_segments, ranks=[0, 1])
    for r in (0, 1):
        assert any(name.startswith("mooncake-fastcpu-2-") for name in maps[r]), maps[r]
    killer = threading.Timer(0.5, c.kill, (2,))
    killer.start()
    try:
        results = c.run(H.wait_for_failure, prefix, 20.0, ranks=[0, 1])
    finally:
        killer.join()
    for r in (0, 1):
        failed, seconds = results[r]
        assert failed == [2], results
        assert seconds < 0.5 + 2.0, f"rank {r} took {seconds:.2f} s to see rank 2 die"
    c.run(H.close_plane, prefix, ranks=[0, 1])
    assert c.run(H.mapped_segments, ranks=[0, 1])[:2] == [[], []]
    assert not _shm_entries()


@pytest.mark.timeout(300)
def test_closed_peer_counts_as_failed(cluster_factory):
    c = cluster_factory(2, "gloo", init=False, timeout_s=TIMEOUT_S)
    prefix = _prefix("closed")
    c.run(H.open_plane, prefix, 2, [0, 1])
    c.run(H.close_plane, prefix, ranks=[1])
    failed, seconds = c.run(H.wait_for_failure, prefix, 10.0, ranks=[0])[0]
    assert failed == [1] and seconds < 1.0
    c.run(H.close_plane, prefix, ranks=[0])


@pytest.mark.timeout(300)
def test_idle_waiter_sleeps(cluster_factory):
    """A rank waiting for a peer that does not come uses (almost) no CPU: it spins for ~100 us,
    then sleeps on its futex with a short timeout (liveness checks)."""
    c = cluster_factory(2, "gloo", init=False, timeout_s=TIMEOUT_S)
    prefix = _prefix("idle")
    c.run(H.open_plane, prefix, 2, [0, 1])
    try:
        results = c.run_each({0: (H.idle_cpu, (prefix, 1.5), {}), 1: (H.sleep, (1.6,), {})})
        used, committed = results[0]
        assert not committed
        assert used < 0.15, f"waiting 1.5 s used {used:.3f} s of CPU"
    finally:
        c.run(H.close_plane, prefix)
