"""Point-to-point messages.  Each (peer, tag) pair is its own FIFO: the n-th send to a peer with a
tag matches the n-th receive from that peer with that tag, whatever other traffic is in flight."""

from __future__ import annotations

import torch

from ..control.wire import Header, Kind, OpCode
from ..model.reduce import DTYPE_CODES
from .collectives import Op, OpContext
from .exchange import Exchange, payload_tensor


def _header(ctx: OpContext, src: int, dst: int, t: torch.Tensor, tag: int, seq: int) -> Header:
    return Header(Kind.P2P, OpCode.SEND, ctx.group_key, src, dst, ctx.view.epoch, seq,
                  t.numel() * t.element_size(), DTYPE_CODES[t.dtype], 0, tag)


def send(ctx: OpContext, tensor: torch.Tensor, dst: int, tag: int, seq: int) -> Op:
    exchange = Exchange(ctx.engine, ctx.peers([dst]), f"send to rank {dst}",
                        {dst: (_header(ctx, ctx.rank, dst, tensor, tag, seq), tensor)}, {})
    return Op(ctx, exchange, lambda bufs: None)


def recv(ctx: OpContext, tensor: torch.Tensor, src: int, tag: int, seq: int) -> Op:
    exchange = Exchange(ctx.engine, ctx.peers([src]), f"recv from rank {src}", {},
                        {src: _header(ctx, src, ctx.rank, tensor, tag, seq)})
    return Op(ctx, exchange, lambda bufs: tensor.copy_(payload_tensor(bufs[src], tensor.dtype,
                                                                       tuple(tensor.shape))))


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

    @property
    def exchange(self):
        return self._op.exchange if self._op else _Unmatched(self)

    def _match(self) -> None:
        for src in self._sources:
            header = _header(self.ctx, src, self.ctx.rank, self._tensor, self._tag, self._peek_seq(src))
            if self.ctx.engine.probe(header.tag()):
                self.src = src
                self._op = recv(self.ctx, self._tensor, src, self._tag, self._take_seq(src))
                return

    def done(self) -> bool:
        if self._op is None:
            self._match()
        return self._op is not None and self._op.done()

    def finish(self) -> None:
        self._op.finish()

    def source_rank(self) -> int:
        return self.src


class _Unmatched:
    """The exchange view of a RecvAny that has not matched a source yet (for deadlines)."""

    def __init__(self, op: RecvAny):
        self._op = op

    def abandon(self) -> None:
        pass

    def timeout_error(self, timeout_s: float):
        from ..control.errors import OpTimeoutError
        return OpTimeoutError(f"recv from any source (tag {self._op._tag}) got no message within "
                              f"{timeout_s:.3g} s from rank(s) {self._op._sources}", ())


def recv_any(ctx: OpContext, tensor: torch.Tensor, sources: list[int], tag: int, take_seq,
             peek_seq) -> RecvAny:
    return RecvAny(ctx, tensor, sources, tag, take_seq, peek_seq)
