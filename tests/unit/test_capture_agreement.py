"""Ranks compare the calls they capture into CUDA graphs when they capture them (control/capture.py): the
same call passes, different calls raise the same MismatchError naming each side on every rank, a rank
that captures nothing is named by an OpTimeoutError, and old records are deleted."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from mooncake.control.capture import agree_on_capture
from mooncake.control.errors import MismatchError, OpTimeoutError
from mooncake.control.fingerprint import Fingerprint
from mooncake.control.wire import OpCode
from mooncake.model.reduce import DTYPE_CODES


def _fp(numel: int, op: OpCode = OpCode.ALL_REDUCE) -> Fingerprint:
    return Fingerprint(op, DTYPE_CODES[torch.float32], 0, -1, numel)  # SUM


def _capture_on_ranks(store, calls: dict[int, Fingerprint], index: int = 0, active=None, timeout_s: float = 5.0):
    """Every rank of ``calls`` checks its call in a thread of its own; returns rank -> None or the exception."""
    active = sorted(calls) if active is None else active
    out: dict[int, BaseException | None] = {}

    def one(rank):
        try:
            agree_on_capture(store, "g", 3, index, rank, active, calls[rank], timeout_s, "all_reduce")
            out[rank] = None
        except BaseException as exc:  # noqa: BLE001 - the outcome is the result
            out[rank] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_the_same_call_passes_and_old_records_go():
    store = dist.HashStore()
    for index in range(4):
        assert _capture_on_ranks(store, {r: _fp(16) for r in range(3)}, index) == {0: None, 1: None, 2: None}
    assert not store.check(["g/capture/3/0/0"]) and not store.check(["g/capture/3/1/2"])
    assert store.check(["g/capture/3/3/1"])


def test_different_calls_raise_the_same_mismatch_on_every_rank():
    store = dist.HashStore()
    out = _capture_on_ranks(store, {0: _fp(16), 1: _fp(32), 2: _fp(16, OpCode.ALL_GATHER)})
    assert all(isinstance(e, MismatchError) for e in out.values()), out
    texts = {str(e) for e in out.values()}
    assert len(texts) == 1, texts
    text = texts.pop()
    assert text.startswith("all_reduce captured in a CUDA graph: captured call 0 of view epoch 3:"), text
    assert "rank 0 called all_reduce(float32, 16 elements" in text and "rank 1 called all_reduce(float32, 32" in text
    assert "rank 2 called all_gather" in text


def test_a_rank_that_captures_nothing_is_named():
    store = dist.HashStore()
    out = _capture_on_ranks(store, {0: _fp(16), 1: _fp(16)}, active=[0, 1, 2], timeout_s=0.5)
    for r in (0, 1):
        assert isinstance(out[r], OpTimeoutError) and out[r].pending_ranks == (2,), out[r]
        assert "rank(s) [2] did not capture a call number 0 of view epoch 3" in str(out[r])


@pytest.mark.parametrize("bad", [b"", b"\x01\x02"])
def test_a_garbage_record_is_a_clear_error(bad):
    store = dist.HashStore()
    store.set("g/capture/3/0/1", bad)
    out = _capture_on_ranks(store, {0: _fp(16)}, active=[0, 1])
    assert "rank 1's captured call" in str(out[0]), out[0]


def test_every_rank_gets_every_ranks_offer():
    store = dist.HashStore()
    out: dict[int, object] = {}

    def one(rank):
        out[rank] = agree_on_capture(store, "g", 3, 0, rank, [0, 1, 2], _fp(16), 5.0, "all_reduce",
                                     offer=b"" if rank == 1 else bytes([rank]) * 40)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    want = {0: bytes(40), 1: b"", 2: b"\x02" * 40}
    assert out == {0: want, 1: want, 2: want}
