"""The inter-node EP protocol of docs/design/internode.md, emulated on CPU tensors in one process.

Nothing here is a data plane: it is the design's protocol (symmetric buffers, slots placed by the sender
from counts, one put-with-signal per (destination, local expert) block carrying ``key | count``, one signal
per combine owner after its rows, monotonic epoch+seq keys, deadlines that clear ``active``, and strict
mode's mask and done rounds) run over an emulated fabric, so that its claims can be checked against
``mooncake.model.ep`` without GPUs or NICs:

* every rank's symmetric buffer is a byte tensor with the same offsets everywhere (``Layout``);
* ``Fabric.put_signal`` queues (data, then signal) for delivery at ``now + delay``; events are applied in
  time order, so blocks to one rank arrive in any order, each block's signal after its data;
* a rank that "dies" at a point posts nothing from that point on; a "slow" one posts with a delay past the
  deadline, so its data lands later, during a later phase or call, into the buffers of that earlier call.

Phases of a call on a common clock: dispatch sends at ``t0``, receivers decide at ``t0 + D``; (strict)
mask round until ``t0 + 2D``, done round until ``t0 + 3D``; combine sends then and decides ``D`` later.
bf16 dispatch only (FP8 is a pure function of a row, the model's, and not what this checks).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from mooncake.model import ep as model

SIG_BITS = 16  # key = epoch << 48 | seq << 16 | count


def key_of(epoch: int, seq: int) -> int:
    return (epoch << 48) | (seq << SIG_BITS)


class Layout:
    """Offsets (bytes) in every rank's buffer: DSIG int64 [2][L][R], CSIG int64 [R], XSIG int64 [R][2],
    XMASK int64 [R], DSTAGE [2][R][cap] x msg, CSTAGE bf16 [2][T][K][H]."""

    def __init__(self, R, L, T, H, K):
        self.R, self.L, self.T, self.H, self.K = R, L, T, H, K
        self.msg = 16 + 2 * H  # int32 token, int32 top-k position, 8 reserved bytes, then H bf16
        self.cap = T * min(K, L)
        self.dsig = 0
        self.csig = self.dsig + 8 * 2 * L * R
        self.xsig = self.csig + 8 * R
        self.xmask = self.xsig + 8 * 2 * R
        self.dstage = self.xmask + 8 * R
        self.cstage = self.dstage + 2 * R * self.cap * self.msg
        self.total = self.cstage + 2 * T * K * 2 * H

    def dsig_off(self, h, l, s):
        return self.dsig + 8 * ((h * self.L + l) * self.R + s)

    def dstage_off(self, h, s, row):
        return self.dstage + ((h * self.R + s) * self.cap + row) * self.msg

    def cstage_off(self, h, t, k):
        return self.cstage + ((h * self.T + t) * self.K + k) * 2 * self.H


class Fabric:
    """The emulated network: puts with signals, delivered in time order."""

    def __init__(self, R, layout):
        self.heap = [torch.zeros(layout.total, dtype=torch.uint8) for _ in range(R)]
        self.events: list = []
        self.order = itertools.count()
        self.now = 0.0

    def word(self, rank, off) -> int:
        return int(self.heap[rank][off:off + 8].clone().view(torch.int64)[0])

    def put_signal(self, dst, off, data: torch.Tensor | None, sig_off, value, delay):
        """Data (bytes) to ``dst`` at ``off``, then the 64-bit signal SET, both arriving ``delay`` later."""
        at = self.now + delay
        if data is not None and data.numel():
            heapq.heappush(self.events, (at, next(self.order), dst, off, data.clone()))
        if sig_off is not None:
            sig = torch.tensor([value], dtype=torch.int64).view(torch.uint8)
            heapq.heappush(self.events, (at, next(self.order), dst, sig_off, sig))

    def advance(self, until):
        while self.events and self.events[0][0] <= until:
            _, _, dst, off, data = heapq.heappop(self.events)
            self.heap[dst][off:off + data.numel()] = data
        self.now = until


@dataclass
class Faults:
    """Per call: ``dead[r] = point`` (r stops posting at "dispatch" (sends nothing), "dispatch_half" (sends
    the first half of its dispatch blocks, no later ones), "mask_round" (dispatch done, sends its mask to
    the ranks in ``mask_to`` only), "combine"); ``slow[r] = delay`` for every post of r (``> D``: late).
    A rank that dies produces no outputs of that call."""

    dead: dict = field(default_factory=dict)
    slow: dict = field(default_factory=dict)
    slow_to: dict = field(default_factory=dict)  # (sender, receiver) -> delay of that pair's dispatch posts
    mask_to: dict = field(default_factory=dict)


class Emulator:
    def __init__(self, R, E, T, H, K, D=10.0, strict=False):
        self.R, self.E, self.T, self.H, self.K, self.L = R, E, T, H, K, E // R
        self.D, self.strict = D, strict
        self.lay = Layout(R, self.L, T, H, K)
        self.net = Fabric(R, self.lay)
        self.epoch, self.seq = 1, 0
        self.alive = [True] * R

    def _delay(self, r, faults, to=None, base=1.0):
        return faults.slow_to.get((r, to), faults.slow.get(r, base))

    def call(self, xs, topks, ws, active, expert_fn, faults: Faults | None = None):
        """One dispatch + combine on every live rank.  ``active``: per rank int32 [R] masks (modified in
        place, as the caller's ``active_ranks``).  Returns per live rank (DispatchResult, combined, mask
        after dispatch, strict verdict or None)."""
        faults = faults or Faults()
        R, L, T, H, K, lay, net, D = self.R, self.L, self.T, self.H, self.K, self.lay, self.net, self.D
        self.seq += 1
        key, h = key_of(self.epoch, self.seq), self.seq & 1
        t0 = self.seq * 10 * D
        net.advance(t0)
        entry = [m.clone() for m in active]
        # ---- dispatch, send phase: slots from counts, one put_signal per (destination, local expert)
        for s in range(R):
            if not self.alive[s] or entry[s][s] == 0 or faults.dead.get(s) == "dispatch":
                continue
            blocks = [(q, l) for q in range(R) for l in range(L)]
            if faults.dead.get(s) == "dispatch_half":
                blocks = blocks[: len(blocks) // 2]
            for q, l in blocks:
                e = q * L + l
                pre = sum(int((topks[s] == q * L + j).any(dim=1).sum()) for j in range(l))
                tokens = model.select_rows_for_expert(topks[s], e)
                msgs = torch.zeros(tokens.numel(), lay.msg, dtype=torch.uint8)
                for i, t in enumerate(tokens.tolist()):
                    kpos = int((topks[s][t] == e).nonzero()[0])
                    msgs[i, :8] = torch.tensor([t, kpos], dtype=torch.int32).view(torch.uint8)
                    msgs[i, 16:] = xs[s][t].view(torch.uint8)
                net.put_signal(q, lay.dstage_off(h, s, pre), msgs.flatten(), lay.dsig_off(h, l, s),
                               key | tokens.numel(), self._delay(s, faults, q))
        net.advance(t0 + D)
        # ---- dispatch, receive: a source counts only if all L of its signals carry this call's key
        got = {}
        for q in self._live():
            if faults.dead.get(q) in ("dispatch", "dispatch_half"):
                continue
            mask = active[q]
            for s in range(R):
                if mask[s] and any(net.word(q, lay.dsig_off(h, l, s)) >> SIG_BITS != key >> SIG_BITS
                                   for l in range(L)):
                    mask[s] = 0
            got[q] = mask.clone()
        verdict = {}
        if self.strict:
            verdict = self._strict(got, entry, faults, t0)
            for q, m in verdict.items():
                active[q].copy_(m)
        receivers = [q for q in got if faults.dead.get(q) != "mask_round"]
        results = {q: self._layout(q, h, active[q]) for q in receivers}
        # ---- combine: owners send rows to the token owners' (t, kpos) slots, then one signal
        for o in receivers:
            if active[o][o] == 0 or faults.dead.get(o) == "combine":
                continue
            res, kpos = results[o]
            y = expert_fn(res, o)
            for r in range(R):
                if active[o][r] == 0:
                    continue
                last = self._delay(o, faults)
                for l in range(L):
                    begin, count = model.unpack_layout(int(res.layout_range[l, r]))
                    for i in range(begin, begin + count):
                        t, k = int(res.src_info[l, i]), int(kpos[l, i])
                        net.put_signal(r, lay.cstage_off(h, t, k), y[l, i].view(torch.uint8), None, 0, last)
                net.put_signal(r, 0, None, lay.csig + 8 * o, key, last)  # after the rows (fence)
        net.advance(t0 + 4 * D)
        out = {}
        for r in receivers:
            if faults.dead.get(r) == "combine":
                continue
            mask = active[r]
            for o in range(R):
                if mask[o] and net.word(r, lay.csig + 8 * o) >> SIG_BITS != key >> SIG_BITS:
                    mask[o] = 0
            rows = torch.stack([torch.stack([
                net.heap[r][lay.cstage_off(h, t, k):lay.cstage_off(h, t, k) + 2 * H].clone().view(torch.bfloat16)
                for k in range(K)]) for t in range(topks[r].shape[0])]) if topks[r].shape[0] else \
                torch.zeros(0, K, H, dtype=torch.bfloat16)
            entry_active = model.combine_entry_active(topks[r], mask, L, r)
            combined = model.combine_rows(topks[r], ws[r], rows, entry_active)
            out[r] = (results[r][0], combined, got[r], verdict.get(r))
        for r, point in faults.dead.items():
            self.alive[r] = False
        return out

    def _live(self):
        return [r for r in range(self.R) if self.alive[r]]

    def _layout(self, q, h, mask):
        """Exclusive prefix over contributing sources in ascending order, rows copied from staging."""
        R, L, T, H, lay, net = self.R, self.L, self.T, self.H, self.lay, self.net
        recv_x = torch.zeros(L, R * T, H, dtype=torch.bfloat16)
        src_info = torch.full((L, R * T), -1, dtype=torch.int32)
        kpos = torch.full((L, R * T), -1, dtype=torch.int32)
        layout_range = torch.zeros(L, R, dtype=torch.int64)
        recv_count = torch.zeros(L, dtype=torch.int32)
        for l in range(L):
            begin = 0
            for s in range(R):
                count = 0
                if mask[s]:
                    counts = [net.word(q, lay.dsig_off(h, j, s)) & ((1 << SIG_BITS) - 1) for j in range(L)]
                    count, pre = counts[l], sum(counts[:l])
                    for i in range(count):
                        off = lay.dstage_off(h, s, pre + i)
                        msg = net.heap[q][off:off + lay.msg].clone()
                        src_info[l, begin + i], kpos[l, begin + i] = msg[:8].view(torch.int32).tolist()
                        recv_x[l, begin + i] = msg[16:].view(torch.bfloat16)
                layout_range[l, s] = model.pack_layout(begin, count)
                begin += count
            recv_count[l] = begin
        return model.DispatchResult(recv_x, None, recv_count, src_info, layout_range), kpos

    def _strict(self, got, entry, faults, t0):
        """Mask round, done round, and the Store decision for ranks that could not commit."""
        R, lay, net, D = self.R, self.lay, self.net, self.D
        live = self._live()
        members = [p for p in range(R) if entry[live[0]][p]] if live else []
        masks = {}  # (receiver, sender) -> mask the sender put
        for p in members:
            if p not in got or faults.dead.get(p) in ("dispatch", "dispatch_half"):
                continue
            to = faults.mask_to.get(p, members)
            for q in to:
                masks[(q, p)] = got[p].clone()
        have_all = {q: all((q, p) in masks for p in members) for q in got if q in members}
        done = {q: all(have_all.get(p, False) and faults.dead.get(p) != "mask_round" for p in members)
                for q in have_all}
        committed = {}
        for q, ok in done.items():
            if ok:
                m = torch.ones(R, dtype=torch.int32)
                for p in members:
                    m &= masks[(q, p)]
                committed[q] = m
        # the Store agreement for the others: a commit stands; else AND over what the reporters received
        reporters = [q for q in have_all if faults.dead.get(q) != "mask_round"]
        if committed:
            decision = next(iter(committed.values()))
        else:
            decision = torch.ones(R, dtype=torch.int32)
            for q in reporters:
                for p in members:
                    if (q, p) in masks:
                        decision &= masks[(q, p)]
            for p in members:
                if p not in reporters:
                    decision[p] = 0
        return {q: committed.get(q, decision).clone() for q in reporters}

    def update_ep_member(self, active):
        """Re-admission: every rank taking part is alive, so each first completes its own puts (NVSHMEM:
        ``nvshmem_quiet``; here: everything in flight is delivered), then all zero their buffers and move to
        a new epoch (keys of the old one can never match again); masks become the ranks alive."""
        self.net.advance(float("inf"))
        self.net.now = (self.seq + 1) * 10 * self.D - 1
        self.epoch += 1
        for r in self._live():
            self.net.heap[r].zero_()
            active[r].copy_(torch.tensor([1 if self.alive[s] else 0 for s in range(self.R)], dtype=torch.int32))

    def revive(self, r):
        self.alive[r] = True
