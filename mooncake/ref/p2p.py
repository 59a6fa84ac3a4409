"""Point-to-point messages.  Each (peer, tag) pair is its own FIFO: the n-th send to a peer with a
tag matches the n-th receive from that peer with that tag, whatever other traffic is in flight.

A CUDA tensor's message lives in device memory when UCX takes CUDA memory (``takes_device_tensors``),
ordered on the caller's current stream: the send's copy is taken, and the receive's result written, on it.
"""

from __future__ import annotations

import torch

from ..control.wire import Header, Kind, OpCode
from ..model.reduce import DTYPE_CODES
from .collectives import Op, OpContext
from .exchange import Exchange, payload_tensor
from .ucx import Engine


def _header(ctx: OpContext, src: int, dst: int, t: torch.Tensor, tag: int, seq: int) -> Header:
    """P2P messages carry epoch 0: they are ordered per (peer, tag), not by views, and a replaced
    peer is a new endpoint (its predecessor's messages can never reach it)."""
    return Header(Kind.P2P, OpCode.SEND, ctx.group_key, src, dst, 0, seq,
                  t.numel() * t.element_size(), DTYPE_CODES[t.dtype], 0, tag)


#: a CUDA tensor of fewer bytes is sent and received through a host copy: below this, the stream synchronisation
#: and device copies of a device message cost more than staging (an H100 over UCX's TCP path: 8 B to 32 KiB
#: were 40-65 % slower in device memory, 256 KiB and up faster; benchmarks/results/ucx-cuda)
P2P_DEVICE_MIN_BYTES = 128 << 10


def takes_device_tensors(engine: Engine, tensor: torch.Tensor) -> bool:
    """Whether ``send`` / ``recv`` may be handed ``tensor`` on its CUDA device (else: a host copy): UCX takes
    CUDA memory and the message has at least ``P2P_DEVICE_MIN_BYTES``."""
    return (tensor.is_cuda and engine.cuda.on
            and tensor.numel() * tensor.element_size() >= P2P_DEVICE_MIN_BYTES)


def _stream(tensor: torch.Tensor) -> "torch.cuda.Stream | None":
    """The caller's current stream for a CUDA tensor (a P2P operation is never posted again)."""
    return torch.cuda.current_stream(tensor.device) if tensor.is_cuda else None


def send(ctx: OpContext, tensor: torch.Tensor, dst: int, tag: int, seq: int) -> Op:
    stream = _stream(tensor)
    exchange = Exchange(ctx.engine, ctx.peers([dst]), f"send to rank {dst}",
                        {dst: (_header(ctx, ctx.rank, dst, tensor, tag, seq), tensor)}, {}, stream=stream)
    return Op(ctx, exchange, lambda bufs: None, stream)


def recv(ctx: OpContext, tensor: torch.Tensor, src: int, tag: int, seq: int) -> Op:
    stream = _stream(tensor)
    devices = {src: tensor.device} if tensor.is_cuda else {}
    exchange = Exchange(ctx.engine, ctx.peers([src]), f"recv from rank {src}", {},
                        {src: _header(ctx, src, ctx.rank, tensor, tag, seq)}, recv_devices=devices,
                        stream=stream)
    return Op(ctx, exchange, lambda bufs: tensor.copy_(payload_tensor(bufs[src], tensor.dtype,
                                                                       tuple(tensor.shape))), stream)


class RecvAny:
    """A receive from whichever source's next message (for ``tag``) arrives first.

    Until a message is seen it probes each source's next expected tag; then it becomes a plain
    ``recv`` from that source and consumes that source's sequence number.
    """

    def __init__(self, ctx: OpContext, tensor: torch.Tensor, sources: list[int], tag: int,
                 take_seq, peek_seq):
        self.ctx, self._tensor, self._sources, self._tag = ctx, tensor, sources, tag
        self._take_seq, self._peek_seq = take_seq, peek_seq
        self._op: Op | None = None
        self.src = -1

    def _match(self) -> None:
        for src in self._sources:
            header = _header(self.ctx, src, self.ctx.rank, self._tensor, self._tag, self._peek_seq(src))
            if self.ctx.engine.probe(header.tag()):
                self.src = src
                self._op = recv(self.ctx, self._tensor, src, self._tag, self._take_seq(src))
                return

    def progress(self) -> None:
        if self._op is None:
            self._match()
        if self._op is not None:
            self._op.progress()

    @property
    def data_complete(self) -> bool:
        return self._op is not None and self._op.data_complete

    @property
    def committed(self) -> bool:
        return self._op is not None and self._op.committed

    def failed_peers(self) -> frozenset[int]:
        return self._op.failed_peers() if self._op else frozenset()

    def pending_ranks(self) -> tuple[int, ...]:
        return self._op.pending_ranks() if self._op else tuple(self._sources)

    def abandon(self) -> None:
        if self._op is not None:
            self._op.abandon()

    def finish(self) -> None:
        self._op.finish()

    def source_rank(self) -> int:
        return self.src


def recv_any(ctx: OpContext, tensor: torch.Tensor, sources: list[int], tag: int, take_seq,
             peek_seq) -> RecvAny:
    return RecvAny(ctx, tensor, sources, tag, take_seq, peek_seq)
