"""The reference collectives: each is one exchange of whole tensors, then local math.

Every function gets contiguous tensors that the backend has already validated and returns an
``Op``.  Sends carry copies (taken at post time), so callers may reuse inputs right away.  The
math is the model's: ``fold`` over active ranks in ascending order, zero-filled inactive slots.

CUDA tensors reach this plane when UCX takes CUDA memory (``RefGroup.takes_device_tensors``; else the
PG face stages them through host memory).  Their device work -- copies taken at post, the writes of
the results -- is ordered on the caller's current stream when the operation is first posted, and on
that same stream when it is posted again under a new view.  Data moves device to device (through
UCX); a reduction's fold always runs on the host, on host copies of this rank's input and of the
received payloads, exactly as with staged tensors (the GPU's NaN encodings and signed zeros may
differ from the CPU's), and its result is copied to the device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..control.streams import on_stream
from ..control.view import View
from ..control.wire import Header, Kind, OpCode
from ..model.reduce import DTYPE_CODES, ReduceOp, fold
from .exchange import Exchange, payload_tensor
from .ucx import Buffer, Engine, Peer


@dataclasses.dataclass
class OpContext:
    """Where and when an operation runs: the group's identity, this rank, the view, its number."""

    engine: Engine
    peers: Callable[[Sequence[int]], dict[int, Peer]]
    group_key: int
    rank: int
    view: View
    seq: int
    name: str
    fingerprint: object = None   # control.fingerprint.Fingerprint of this rank's call (collectives)
    # what carries the messages: ``transport(ctx, sends, recvs, commit, recv_devices, stream)`` returns an
    # ``Exchange``-like object; None: UCX to every peer (``ucx_exchange``)
    transport: Callable | None = None


class Op:
    """A posted operation (a ``PlaneOp``): its exchange plus the local math that ``finish`` runs (on
    ``stream`` for CUDA tensors)."""

    def __init__(self, ctx: OpContext, exchange: Exchange, finish: Callable[[dict[int, Buffer]], None],
                 stream: "torch.cuda.Stream | None" = None):
        self.ctx, self.exchange, self._finish, self._stream = ctx, exchange, finish, stream

    @property
    def data_complete(self) -> bool:
        return self.exchange.data_complete

    @property
    def committed(self) -> bool:
        return self.exchange.committed

    @property
    def error(self) -> BaseException | None:
        return self.exchange.error

    def progress(self) -> None:
        self.exchange.progress()

    def failed_peers(self) -> frozenset[int]:
        return self.exchange.failed_peers()

    def pending_ranks(self) -> tuple[int, ...]:
        return self.exchange.pending_ranks()

    def abandon(self) -> None:
        self.exchange.abandon()

    def finish(self) -> None:
        with on_stream(self._stream):
            self._finish(self.exchange.result())


_op_streams = WeakIdKeyDictionary()  # tensor -> (group key, seq, stream) of the last op posted on it


def op_stream(ctx: OpContext, tensor: torch.Tensor) -> "torch.cuda.Stream | None":
    """The stream of an operation on ``tensor`` (None for a CPU tensor): the current stream when op
    ``ctx.seq`` is first posted, the same one when it is posted again (perhaps from another thread)."""
    if not tensor.is_cuda:
        return None
    known = _op_streams.get(tensor)
    if known is not None and known[:2] == (ctx.group_key, ctx.seq):
        return known[2]
    stream = torch.cuda.current_stream(tensor.device)
    _op_streams[tensor] = (ctx.group_key, ctx.seq, stream)
    return stream


def _copy(tensor: torch.Tensor, stream, host: bool = False) -> torch.Tensor:
    """A copy of ``tensor`` taken on the op's stream; on the host when ``host`` (a fold's input)."""
    with on_stream(stream):
        return tensor.to("cpu", copy=True) if host else tensor.clone()


def _header(ctx: OpContext, op: OpCode, src: int, dst: int, t: torch.Tensor | None,
            reduce_op: int = 0, kind: Kind = Kind.COLLECTIVE) -> Header:
    num_bytes = 0 if t is None else t.numel() * t.element_size()
    dtype_code = 0 if t is None else DTYPE_CODES[t.dtype]
    return Header(kind, op, ctx.group_key, src, dst, ctx.view.epoch, ctx.seq, num_bytes,
                  dtype_code, int(reduce_op))


def _post(ctx: OpContext, op: OpCode, sends: dict[int, torch.Tensor | None],
          recvs: dict[int, torch.Tensor | None], finish, reduce_op: int = 0, stream=None) -> Op:
    """Post ``sends`` (peer -> payload) and ``recvs`` (peer -> a tensor shaped like the payload, on
    the device its message should land on); ``stream``: the op's CUDA stream (``op_stream``);
    every other active rank not named gets (and sends) a header-only message, so each ordered pair
    of ranks exchanges exactly one message whatever each believes the call to be (ranks that
    disagree on a root or an op still reach the commit round, where the fingerprints tell).  The
    commit round runs with every other active rank."""
    empty = torch.empty(0, dtype=torch.uint8)
    others = _others(ctx)
    sends = {**{p: None for p in others}, **sends}
    recvs = {**{p: None for p in others}, **recvs}
    send_msgs = {p: (_header(ctx, op, ctx.rank, p, t, reduce_op), empty if t is None else t)
                 for p, t in sends.items()}
    recv_msgs = {p: _header(ctx, op, p, ctx.rank, t, reduce_op) for p, t in recvs.items()}
    commit = {p: _header(ctx, op, p, ctx.rank, None, kind=Kind.DONE) for p in others}
    devices = {p: t.device for p, t in recvs.items() if t is not None and t.is_cuda}
    transport = ctx.transport or ucx_exchange
    return Op(ctx, transport(ctx, send_msgs, recv_msgs, commit, devices, stream), finish, stream)


def ucx_exchange(ctx: OpContext, sends: dict, recvs: dict, commit: dict, recv_devices: dict, stream,
                 **halves) -> Exchange:
    """The messages of one operation over UCX (``halves``: ``Exchange``'s ``gate`` and ``more_prints``)."""
    peers = ctx.peers(sorted(set(sends) | set(recvs) | set(commit)))
    return Exchange(ctx.engine, peers, ctx.name, sends, recvs, commit, ctx.fingerprint, ctx.rank, recv_devices,
                    stream, **halves)


def _others(ctx: OpContext) -> list[int]:
    return [r for r in ctx.view.active if r != ctx.rank]


def _received(bufs: dict[int, Buffer], rank: int, like: torch.Tensor) -> torch.Tensor:
    return payload_tensor(bufs[rank], like.dtype, tuple(like.shape))


def _fill_slots(outputs: list[torch.Tensor], me: int, mine: torch.Tensor,
                bufs: dict[int, Buffer]) -> None:
    """Slot ``me`` gets ``mine``, a slot with a received message gets it, every other slot zeros."""
    for r, out in enumerate(outputs):
        if r == me:
            out.copy_(mine)
        elif r in bufs:
            out.copy_(_received(bufs, r, out))
        else:
            out.zero_()


def all_reduce(ctx: OpContext, tensor: torch.Tensor, op: ReduceOp) -> Op:
    stream = op_stream(ctx, tensor)
    mine = _copy(tensor, stream, host=True)
    others = _others(ctx)

    def finish(bufs):
        inputs = [mine if r == ctx.rank else _received(bufs, r, mine) for r in ctx.view.active]
        tensor.copy_(fold(op, inputs))

    return _post(ctx, OpCode.ALL_REDUCE, {p: mine for p in others}, {p: mine for p in others},
                 finish, op, stream)


def broadcast(ctx: OpContext, tensor: torch.Tensor, root: int) -> Op:
    stream = op_stream(ctx, tensor)
    if ctx.rank == root:
        return _post(ctx, OpCode.BROADCAST, {p: tensor for p in _others(ctx)}, {}, lambda bufs: None,
                     stream=stream)
    return _post(ctx, OpCode.BROADCAST, {}, {root: tensor},
                 lambda bufs: tensor.copy_(_received(bufs, root, tensor)), stream=stream)


def reduce(ctx: OpContext, tensor: torch.Tensor, op: ReduceOp, root: int) -> Op:
    stream = op_stream(ctx, tensor)
    if ctx.rank != root:
        return _post(ctx, OpCode.REDUCE, {root: tensor}, {}, lambda bufs: None, op, stream)
    mine = _copy(tensor, stream, host=True)

    def finish(bufs):
        inputs = [mine if r == root else _received(bufs, r, mine) for r in ctx.view.active]
        tensor.copy_(fold(op, inputs))

    return _post(ctx, OpCode.REDUCE, {}, {p: mine for p in _others(ctx)}, finish, op, stream)


def all_gather(ctx: OpContext, outputs: list[torch.Tensor], tensor: torch.Tensor) -> Op:
    """``outputs`` holds k slots (size() <= k <= capacity); slot r gets rank r's tensor."""
    stream = op_stream(ctx, tensor)
    mine = _copy(tensor, stream)
    others = _others(ctx)

    def finish(bufs):
        _fill_slots(outputs, ctx.rank, mine, bufs)

    return _post(ctx, OpCode.ALL_GATHER, {p: mine for p in others}, {p: mine for p in others}, finish,
                 stream=stream)


def gather(ctx: OpContext, outputs: list[torch.Tensor] | None, tensor: torch.Tensor, root: int) -> Op:
    stream = op_stream(ctx, tensor)
    if ctx.rank != root:
        return _post(ctx, OpCode.GATHER, {root: tensor}, {}, lambda bufs: None, stream=stream)
    mine = _copy(tensor, stream)

    def finish(bufs):
        _fill_slots(outputs, root, mine, bufs)

    return _post(ctx, OpCode.GATHER, {}, {p: mine for p in _others(ctx)}, finish, stream=stream)


def scatter(ctx: OpContext, tensor: torch.Tensor, inputs: list[torch.Tensor] | None, root: int) -> Op:
    stream = op_stream(ctx, tensor)
    if ctx.rank != root:
        return _post(ctx, OpCode.SCATTER, {}, {root: tensor},
                     lambda bufs: tensor.copy_(_received(bufs, root, tensor)), stream=stream)
    mine = _copy(inputs[root], stream)
    return _post(ctx, OpCode.SCATTER, {p: inputs[p] for p in _others(ctx)}, {},
                 lambda bufs: tensor.copy_(mine), stream=stream)


def reduce_scatter(ctx: OpContext, output: torch.Tensor, inputs: list[torch.Tensor], op: ReduceOp) -> Op:
    """``inputs`` holds k slices; active rank r receives the fold of every active rank's slice r."""
    stream = op_stream(ctx, output)
    mine = _copy(inputs[ctx.rank], stream, host=True)
    others = _others(ctx)

    def finish(bufs):
        folded = [mine if r == ctx.rank else _received(bufs, r, mine) for r in ctx.view.active]
        output.copy_(fold(op, folded))

    return _post(ctx, OpCode.REDUCE_SCATTER, {p: inputs[p] for p in others},
                 {p: mine for p in others}, finish, op, stream)


def all_to_all(ctx: OpContext, outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> Op:
    """Slot r of ``outputs`` gets slot ``self`` of rank r's ``inputs``; inactive slots are zero."""
    stream = op_stream(ctx, outputs[ctx.rank])
    mine = _copy(inputs[ctx.rank], stream)
    others = _others(ctx)

    def finish(bufs):
        _fill_slots(outputs, ctx.rank, mine, bufs)

    return _post(ctx, OpCode.ALL_TO_ALL, {p: inputs[p] for p in others},
                 {p: outputs[p] for p in others}, finish, stream=stream)


def barrier(ctx: OpContext) -> Op:
    others = _others(ctx)
    return _post(ctx, OpCode.BARRIER, {p: None for p in others}, {p: None for p in others},
                 lambda bufs: None)


class RefGroup:
    """The ref plane's per-group state (a ``PlaneGroup``): nothing beyond the process-wide engine,
    so every collective is the module function of the same name.  ``takes_device_tensors``: the PG
    face hands a CUDA group's tensors over as they are, when UCX takes CUDA memory (``Engine.cuda``)."""

    all_reduce = staticmethod(all_reduce)
    broadcast = staticmethod(broadcast)
    reduce = staticmethod(reduce)
    all_gather = staticmethod(all_gather)
    gather = staticmethod(gather)
    scatter = staticmethod(scatter)
    reduce_scatter = staticmethod(reduce_scatter)
    all_to_all = staticmethod(all_to_all)
    barrier = staticmethod(barrier)

    def __init__(self, info):
        self.info = info
        if info.device == "cuda":
            info.engine.check_cuda()
        self.takes_device_tensors = info.device == "cuda" and info.engine.cuda.on

    def add_ranks(self, addresses: dict[int, bytes]) -> None:
        pass  # endpoints are made on first use from the backend's address book

    def close(self) -> None:
        pass


def open_group(info) -> RefGroup:
    return RefGroup(info)
