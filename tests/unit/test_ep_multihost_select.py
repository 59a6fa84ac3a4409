"""EP Buffer under MOONCAKE_IMPL=auto falls back to the ref path when the CUDA fast path declines (a rank
on another host); MOONCAKE_IMPL=fast still raises.  No GPU: the fast buffer and the "CUDA tensor" are mocked."""

import logging

import pytest

from mooncake import impl
from mooncake.ep import buffer as ep_buffer
from mooncake.fast.cuda import ep as fast_ep


class _Group:
    def rank(self):
        return 0

    def size(self):
        return 4


class _CudaLike:  # passes the isinstance(x, torch.Tensor) and device checks of _fast_plane
    class device:
        type = "cuda"


@pytest.fixture
def buffer(monkeypatch):
    monkeypatch.setattr(ep_buffer, "_group_calls", lambda group: None)
    monkeypatch.setattr(ep_buffer.torch, "Tensor", _CudaLike)
    monkeypatch.setattr(impl, "select", lambda device, what="pg": ("fast", "mocked"))
    calls = []

    def declined(*args, **kwargs):
        calls.append(1)
        raise fast_ep.FastUnavailable("rank 2 runs on another host: the CUDA IPC fast path needs every rank of "
                                      "the group on this host")

    monkeypatch.setattr(fast_ep, "FastEPBuffer", declined)
    buf = ep_buffer.Buffer(_Group(), 1 << 20)
    buf.calls = calls
    return buf


def test_auto_falls_back_to_ref_and_logs(buffer, monkeypatch, caplog):
    monkeypatch.setenv("MOONCAKE_IMPL", "auto")
    with caplog.at_level(logging.WARNING, logger="mooncake"):
        assert buffer._fast_plane(_CudaLike()) is None
    assert buffer.implementation == "ref" and "another host" in buffer._fast_declined
    assert any("fast path declined" in r.getMessage() and "another host" in r.getMessage() for r in caplog.records)
    assert buffer._fast_plane(_CudaLike()) is None and buffer.calls == [1]  # decided once, not retried


def test_fast_requested_still_raises(buffer, monkeypatch):
    monkeypatch.setenv("MOONCAKE_IMPL", "fast")
    with pytest.raises(fast_ep.FastUnavailable, match="runs on another host"):
        buffer._fast_plane(_CudaLike())
