"""Groups that span hosts: shared memory between this host's ranks, UCX to the others.

A collective whose view has a rank on another host runs the ref plane's definition of it (the same
messages, the same math in ``mooncake.ref.collectives``) over a *hybrid* transport: messages to and
from ranks on this host go through this group's shared-memory lanes (a ``_Share``, one more operation
in the ``ShmGroup`` queue), the others over UCX (an ``Exchange``).  Every rank gets every payload it
needs exactly as from ref, so results are ref's bits.

The two halves keep one commit protocol:

* this rank's DONEs go out (UCX DONE messages, the lane's DONE word) only once *both* halves' payloads
  are in: the UCX half's DONEs wait for the shared-memory payloads (``gate``), the lane's DONE word for
  the UCX half's DONEs (``may_say_done``), so a commit on any rank still proves that every rank holds
  every payload it needs;
* the verdict compares every active rank's fingerprint -- this host's from the lane words, the others'
  from their DONEs -- with one ``mismatch``, so every rank raises the same ``MismatchError``;
* the operation is committed once both halves are (every DONE in), and fails or is abandoned as one.

An operation whose whole view is on this host uses the plain shared-memory operations (``group.py``).
P2P follows the pair: shared memory between two ranks of this host, UCX otherwise; a receive from any
source whose candidates span hosts is ``MixedRecvAny``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ...control.errors import MooncakeError
from ...control.fingerprint import Fingerprint
from ...control.wire import HEADER_BYTES
from ...ref import p2p as ref_p2p
from ...ref.collectives import OpContext, ucx_exchange
from ...ref.exchange import Exchange
from . import group as G
from .p2p import WAITING


class _Share(G.ShmOp):
    """The same-host half of a hybrid operation: publishes this rank's messages to its same-host peers
    (slot = destination rank) and copies theirs into the receive buffers.  Its fingerprint verdict is
    the whole operation's (``Hybrid``), not taken here."""

    fault_points = False  # the UCX half hits them, once per operation

    def __init__(self, g: G.ShmGroup, ctx: OpContext, local: tuple[int, ...], sends: dict[int, torch.Tensor],
                 recvs: dict[int, np.ndarray], opcode):
        self.opcode = opcode
        super().__init__(g, ctx)
        self.active = tuple(sorted((self.me, *local)))
        self.others = local
        self.needs = tuple(r for r in local if r in recvs)
        self._sends = sorted(sends.items())
        self._recvs = recvs
        self.outputs = [torch.from_numpy(recvs[r][HEADER_BYTES:]) for r in self.needs]
        self.prints: dict[int, Fingerprint] = {}
        self.exchange: Exchange | None = None  # the UCX half, set right after this one is queued

    def sends(self):
        return [(r, t) for r, t in self._sends if t.numel()]

    def verdict(self) -> str | None:
        self.prints = {r: self.g.fp_words.read(self.g.peer(r).ctl, self.base)[0] for r in self.others}
        return None

    def may_say_done(self) -> bool:
        return self.exchange is not None and self.exchange.payloads_ok()

    def write(self, outs):
        for r, out in zip(self.needs, outs):
            if out.numel():
                G._copy_out(out, self.src(r, self.me, out.numel()))

    @property
    def local_in(self) -> bool:
        """Every same-host payload this rank needs is published and checked (read without the lock: it
        only ever turns True for this operation)."""
        return self.verified and self.state != G.ABANDONED and self.gathered()


class Hybrid:
    """An ``Exchange``-like pair of halves (see the module docstring); built by ``transport``."""

    def __init__(self, g: G.ShmGroup, ctx: OpContext, sends: dict, recvs: dict, commit: dict):
        me = ctx.rank
        local = tuple(r for r in ctx.view.active if r != me and r not in g.remote)
        self.g = g
        self.op_name = ctx.name
        self._bufs = {r: np.empty(HEADER_BYTES + h.num_bytes, np.uint8) for r, h in recvs.items() if r in local}
        opcode = next(iter(commit.values())).op
        self.share = _Share(g, ctx, local, {r: t for r, (h, t) in sends.items() if r in local},
                            self._bufs, opcode)
        g.enqueue(self.share)
        self.exchange = ucx_exchange(ctx, {r: m for r, m in sends.items() if r not in local},
                                     {r: h for r, h in recvs.items() if r not in local},
                                     {r: h for r, h in commit.items() if r not in local}, {}, None,
                                     gate=lambda: self.share.local_in, more_prints=lambda: self.share.prints)
        self.share.exchange = self.exchange
        self.progress()

    # -- the Exchange interface the ref Op drives ---------------------------------------------------
    @property
    def data_complete(self) -> bool:
        return self.share.data_complete and self.exchange.data_complete

    @property
    def committed(self) -> bool:
        return self.share.committed and self.exchange.committed and self.exchange.error is None

    @property
    def error(self) -> BaseException | None:
        return self.exchange.error or self.share.error

    def progress(self) -> None:
        self.g.pump()
        self.exchange.progress()
        self.g.pump()  # the lane's DONE follows the UCX half's DONEs

    def failed_peers(self) -> frozenset[int]:
        return self.share.failed_peers() | self.exchange.failed_peers()

    def pending_ranks(self) -> tuple[int, ...]:
        return tuple(sorted({*self.share.pending_ranks(), *self.exchange.pending_ranks()}))

    def abandon(self) -> None:
        self.share.abandon()
        self.exchange.abandon()

    def result(self) -> dict:
        self.share.finish()  # first: it leaves the lane queue whatever the UCX half says
        return {**self.exchange.result(), **self._bufs}


def transport(g: G.ShmGroup):
    """The ``OpContext.transport`` of a hybrid collective on ``g``."""
    def make(ctx: OpContext, sends: dict, recvs: dict, commit: dict, recv_devices: dict, stream) -> Hybrid:
        return Hybrid(g, ctx, sends, recvs, commit)
    return make


class MixedRecvAny:
    """A receive from any source whose candidates span hosts: a shared-memory receive-any over this
    host's sources, and UCX probes of the others' next message; the first message seen is taken (each
    source's FIFO kept), and the other side is withdrawn under the P2P lock, so exactly one message is
    consumed.  Waits by polling both (``WAIT_SLICE_S``)."""

    WAIT_SLICE_S = 0.0005

    def __init__(self, p2p, ctx: OpContext, tensor: torch.Tensor, local: list[int], remote: list[int], tag: int,
                 take_seq, peek_seq):
        self.p2p = p2p
        self.local = p2p.recv_any(tensor, local, tag, take_seq, peek_seq)
        self._probe = ref_p2p.RecvAny(ctx, tensor, remote, tag, take_seq, peek_seq)
        self.remote: ref_p2p.RecvAny | None = None  # the UCX side, once it saw a message first
        self.name = f"recv from any source (tag {tag})"

    def _match_remote(self) -> None:
        with self.p2p.lock:  # the shared-memory side matches under this lock too
            if self.remote is not None or self.local.link is not None or self.local.state != WAITING:
                return
            self._probe.progress()
            if self._probe.src >= 0:
                self.local.abandon()
                self.remote = self._probe

    def _matched(self):
        if self.remote is not None:
            return self.remote
        return self.local if self.local.link is not None else None

    def progress(self) -> None:
        self.local.progress()
        self._match_remote()
        if self.remote is not None:
            self.remote.progress()

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            self.progress()
            if self.committed:
                return True
            if self.failed_peers() or time.monotonic() >= deadline:
                return False
            time.sleep(self.WAIT_SLICE_S)

    @property
    def committed(self) -> bool:
        op = self._matched()
        return op is not None and op.committed

    @property
    def data_complete(self) -> bool:
        return self.committed

    def failed_peers(self) -> frozenset[int]:
        op = self._matched()
        return op.failed_peers() if op is not None else frozenset()

    def pending_ranks(self) -> tuple[int, ...]:
        op = self._matched()
        return op.pending_ranks() if op is not None else tuple(sorted([*self.local.links, *self._probe.pending_ranks()]))

    def abandon(self) -> None:
        with self.p2p.lock:
            self.local.abandon()
            if self.remote is not None:
                self.remote.abandon()

    def finish(self) -> None:
        op = self._matched()
        if op is None:
            raise MooncakeError(f"{self.name}: finish() before a message was received")
        op.finish()

    def source_rank(self) -> int:
        op = self._matched()
        return -1 if op is None else op.src
