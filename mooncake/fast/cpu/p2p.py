"""Point-to-point messages (send / recv / recv from any source) through shared memory, between the
ranks of one host: the P2P half of the fast CPU plane (``group.py`` has the collectives).

Used by ``mooncake.pg`` for ``mooncake-cpu`` with ``MOONCAKE_IMPL=fast`` between two ranks of this host;
a message to or from a rank on another host goes through the ref plane (UCX), and so does every message
where ``process_vm_readv`` is not permitted or ``MOONCAKE_FAST_CPU_P2P=0`` (set it alike on every rank):
``FastCpuGroup.p2p_delegate`` says why.

Segment.  Each rank creates one *P2P segment* per group (a memfd, like the collectives' segments; its
descriptor sits in the rank's control segment, words ``W_P2P_*``) and every peer maps it when the
peer is attached (group start, ``add_ranks``), so messages already handed over survive their sender's
exit.  Only the owner writes its segment.  For every peer rank ``r`` it holds:

* an *outbox* to ``r``: ``SLOTS`` records (serial, tag, seq, nbytes, address, dtype | eager flag,
  revoked serial, destination incarnation) and a ring of ``RING_BYTES`` for eager payloads, with
  ``OUT_INC[r]`` / ``OUT_BASE[r]``: the incarnation of ``r`` the outbox addresses and its first serial;
* the *acknowledgements* of ``r``'s messages to this rank: ``ACK[r][slot]`` = the serial consumed,
  ``ACK_COUNT[r]``, and ``ACK_INC[r]``: the incarnation of ``r`` they belong to.

An *incarnation* is a hash of the process's UCX address, so a replacement at the same rank (after
``recover_ranks`` / ``join_group``) is a different one.

Protocol.  The PG face numbers messages per (peer, tag) (``seq``); the sender gives each message to
``r`` the next *serial* (monotonic per destination rank, continued across its incarnations) and the
record slot ``serial % SLOTS``, reusable once the previous occupant is acknowledged.

1. **send**: a payload of at most ``EAGER_MAX`` bytes that fits the ring is copied into it and the
   send completes at once (handed to the transport, as gloo and UCX do); a larger one stays in the
   sender's (staged) tensor, whose address the record carries, and the send completes when the
   receiver acknowledges it.  Fields are written first, the serial word last.  A send that finds
   its slot busy waits in a local queue (posting never blocks).
2. **recv**: the receiver reads the sender's outbox from ``OUT_BASE`` on (once ``OUT_INC`` names its
   own incarnation) in serial order, files each record addressed to it under (tag, seq), and takes
   the one its receive waits for: a memcpy out of the mapped ring (eager) or ``process_vm_readv``
   straight out of the sender's memory (one copy, any size).  After the copy it checks that the
   record is still published and not revoked, and (for a cross-process read) that the sender is
   still alive — the pid cannot have been reused — then acknowledges.  Wrong sizes or dtypes raise
   ``WireError`` on the receiver (the message is consumed, the sender's send succeeds, as with ref).
3. **recv from any source** takes, among the active peers in rank order, the first whose *next*
   message with that tag (the receiver's next seq for that peer) has arrived: each peer's FIFO is kept.
4. **abandon** (deadline or peer failure): a queued send is dropped; a published one is revoked
   (``REVOKE = serial``) and its buffer released (a receiver may still be copying it: reading
   another process's freed memory harms nothing, and the re-check below discards what it read).  A
   receiver that reads a revoked record, or sees the revocation after its copy, discards the data
   and its receive fails ("withdrew"); so nothing of an abandoned send is ever delivered, and an
   abandoned receive is never written to (copies run under the P2P lock, which ``abandon`` takes).
5. **replacement**: when a peer's incarnation changes, the old link is retired (its pending ops fail
   with ``PeerFailureError``, its published records are revoked) and the new one starts from a fresh
   ``OUT_BASE``; records also carry the destination's incarnation, so a replacement never receives its
   predecessor's messages (nor a removed process its successor's).

Waiting: ``wait`` pumps every P2P operation of the group (a send's wait also drives this rank's
pending receives, so paired isend / irecv never wait on each other), spins the group's ``spin_s``
after the last progress (none when the host has more ranks than cores), then sets the group's
SLEEPING word and sleeps on its doorbell plus the pidfds of the peers involved; peers ring the
doorbell after publishing or acknowledging.  A dead peer (pidfd readable,
CLOSED word) makes ``failed_peers()`` non-empty; the Work's deadline bounds everything else.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import os
import select
import threading
import time

import torch

from ...control.errors import MooncakeError, WireError
from ...control.wire import MAX_RANKS
from ...model.reduce import DTYPE_CODES
from . import native
from .group import W_CLOSED, W_P2P_FD, W_P2P_GEN, W_P2P_SIZE, W_SLEEPING, ShmGroup, _Peer
from .segment import Segment, SegmentError

SLOTS = 1024  # records per (sender, destination): messages published and not yet acknowledged
RING_BYTES = 256 * 1024  # eager payload ring per (sender, destination)
EAGER_MAX = int(os.environ.get("MOONCAKE_FAST_CPU_P2P_EAGER", 32 * 1024))  # larger: read in place
WAIT_SLICE_S = 0.05  # longest sleep before re-checking (peers' deaths and rings wake it earlier)
PUMP_GAP_S = 20e-6  # progress() pumps at most this often (wait() always pumps)

# ---- segment layout (int64 words; the eager rings follow, at RING0 bytes) ------------------------
_MAGIC = 0x4D43503250303031  # "MCP2P001"
H_MAGIC = 0
OUT_INC = 8
OUT_BASE = OUT_INC + MAX_RANKS
ACK_INC = OUT_BASE + MAX_RANKS
ACK_COUNT = ACK_INC + MAX_RANKS
ACKS = ACK_COUNT + MAX_RANKS
RECORDS = ACKS + MAX_RANKS * SLOTS
RW = 8  # words per record
R_PUB, R_TAG, R_SEQ, R_NBYTES, R_ADDR, R_META, R_REVOKE, R_DST = range(RW)
WORDS = RECORDS + MAX_RANKS * SLOTS * RW
RING0 = (WORDS * 8 + 4095) // 4096 * 4096
SEGMENT_BYTES = RING0 + MAX_RANKS * RING_BYTES  # sparse: only pages in use take memory
EAGER = 1 << 8  # R_META flag: the payload is in the sender's ring at R_ADDR (a segment offset)

# operation states
QUEUED, POSTED, WAITING, DONE, ABANDONED = range(5)

_reason_cache: list[str | None] = []


def unavailable_reason() -> str | None:
    """Why P2P cannot go through shared memory in this process (None when it can); computed once."""
    if not _reason_cache:
        _reason_cache.append(_probe())
    return _reason_cache[0]


def _probe() -> str | None:
    if os.environ.get("MOONCAKE_FAST_CPU_P2P", "1").strip() == "0":
        return "MOONCAKE_FAST_CPU_P2P=0"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = f.read().strip()
    except OSError:
        scope = "0"  # no Yama: same-uid processes may read each other's memory
    if scope != "0":
        return (f"kernel.yama.ptrace_scope is {scope}, which denies process_vm_readv between sibling "
                "processes (set it to 0 for shared-memory P2P)")
    native.load()
    src, dst = ctypes.c_int64(0x5EED), ctypes.c_int64(0)
    err = native.vm_read(os.getpid(), ctypes.addressof(dst), ctypes.addressof(src), 8)
    if err or dst.value != src.value:
        return f"process_vm_readv is not permitted here ({os.strerror(err) if err else 'wrong bytes'})"
    return None


def incarnation(address: bytes) -> int:
    """A process's identity in records: 63 bits of a hash of its UCX address (never 0)."""
    return int.from_bytes(hashlib.blake2b(address, digest_size=8).digest(), "little") >> 1 | 1


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _alive(peer: _Peer) -> bool:
    """The peer's process has not exited (its pid cannot have been reused)."""
    fd = peer.pidfd
    if fd is None:
        return False
    try:
        return not select.select([fd], [], [], 0)[0]
    except (OSError, ValueError):
        return False


class ShmP2P:
    """This rank's P2P state for one group (see the module docstring)."""

    def __init__(self, group: ShmGroup):
        self.g = group
        self.me = group.rank
        self.inc = incarnation(group.address)
        self.lock = threading.RLock()
        self.links: dict[int, _Link] = {}
        self.any_ops: list[_RecvAny] = []
        self.last_pump = 0.0
        self.closed = False
        self.seg = Segment.create(f"mooncake-fastcpu-{self.me}-p2p", SEGMENT_BYTES)
        self.w = self.seg.words(0, WORDS)
        self.w[H_MAGIC] = _MAGIC
        ctl = group.ctl
        ctl[W_P2P_FD], ctl[W_P2P_SIZE] = self.seg.fd, self.seg.size
        ctl[W_P2P_GEN] = 1

    # ---- peers ------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Map the P2P segment of every attached peer not mapped yet (new ranks, replacements);
        called after ``ShmGroup.add_ranks``."""
        with self.lock:
            if self.closed:
                return
            for r, peer in list(self.g.peers.items()):
                old = self.links.get(r)
                if old is not None and old.peer is peer:
                    continue
                seg = self._attach_segment(r, peer)
                if old is not None:
                    old.retire(revoke_all=True)
                self.links[r] = _Link(self, r, peer, seg, old.next if old is not None else 1)
            for r in [r for r in self.links if r not in self.g.peers]:  # replaced by a rank on another host
                self.links.pop(r).retire(revoke_all=True)

    def _attach_segment(self, r: int, peer: _Peer) -> Segment | None:
        """The peer's P2P segment, mapped; None if the peer died before publishing it."""
        deadline = time.monotonic() + max(self.g.timeout_s, 1.0)
        while not peer.ctl[W_P2P_GEN]:  # it publishes the segment right after its control segment
            if not _alive(peer) or peer.ctl[W_CLOSED]:  # exited, or closed its group
                return None
            if time.monotonic() > deadline:
                raise MooncakeError(f"fast CPU plane: rank {r} did not publish its P2P segment within "
                                    f"{self.g.timeout_s:.0f} s (does it run MOONCAKE_FAST_CPU_P2P=0? set it "
                                    "alike on every rank)")
            time.sleep(0.001)
        try:
            seg = Segment.attach(peer.pid, int(peer.ctl[W_P2P_FD]), int(peer.ctl[W_P2P_SIZE]))
        except SegmentError as exc:
            if not _alive(peer):
                return None
            raise MooncakeError(f"fast CPU plane: cannot attach rank {r}'s P2P segment: {exc}; "
                                "use MOONCAKE_IMPL=ref") from None
        if seg.words(0, 1)[0] != _MAGIC:
            seg.close()
            raise MooncakeError(f"fast CPU plane: rank {r}'s P2P segment is malformed")
        return seg

    def _link(self, rank: int) -> "_Link":
        link = self.links.get(rank)
        if link is None:
            raise MooncakeError(f"fast CPU plane: rank {rank} is active but its P2P segment was never "
                                "attached (add_ranks missing)")
        return link

    # ---- posting ------------------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, tag: int, seq: int) -> "_Send":
        """Post message ``seq`` of (this rank, ``dst``, ``tag``); ``tensor`` is contiguous and must
        stay unchanged until the op completes (the PG face hands over a private copy)."""
        with self.lock:
            self._check_open()
            link = self._link(dst)
            op = _Send(self, link, tensor, tag, seq)
            if not link.gone:
                link.queue.append(op)
                link.pump_out()
            return op

    def recv(self, tensor: torch.Tensor, src: int, tag: int, seq: int) -> "_Recv":
        """Post the receive of message ``seq`` of (``src``, this rank, ``tag``) into ``tensor``
        (contiguous; written only when the op commits)."""
        with self.lock:
            self._check_open()
            link = self._link(src)
            op = _Recv(self, tensor, tag)
            op.bind(link, seq)
            if not link.gone:
                link.discover()
                serial = link.arrived.pop((tag, seq), None)
                if serial is None:
                    link.waiting[(tag, seq)] = op
                else:
                    self._consume(link, serial, op)
            return op

    def recv_any(self, tensor: torch.Tensor, sources: list[int], tag: int, take_seq, peek_seq) -> "_RecvAny":
        """Post a receive of the next message with ``tag`` from any of ``sources``: ``peek_seq(src)``
        is the seq this rank expects next from ``src``, ``take_seq(src)`` consumes it."""
        with self.lock:
            self._check_open()
            op = _RecvAny(self, tensor, tag, {src: self._link(src) for src in sources}, take_seq, peek_seq)
            self.any_ops.append(op)
            op.try_match()
            return op

    def _check_open(self) -> None:
        if self.closed:
            raise MooncakeError("the fast CPU plane of this group is closed")

    # ---- driving ------------------------------------------------------------------------------------
    def pump(self) -> bool:
        """Move every P2P operation of the group as far as it goes without waiting; True if any moved."""
        with self.lock:
            self.last_pump = time.monotonic()
            if self.closed:
                return False
            moved = False
            for link in self.links.values():
                if not link.gone:
                    moved = link.pump_out() | moved
                    moved = link.pump_in() | moved
            for op in list(self.any_ops):
                moved = op.try_match() | moved
            return moved

    def poll(self) -> None:
        """``pump`` unless one ran within ``PUMP_GAP_S`` (a Work's progress() on many ops)."""
        if time.monotonic() - self.last_pump >= PUMP_GAP_S:
            self.pump()

    def wait(self, op: "_Op", timeout_s: float) -> bool:
        """Block until ``op`` completes (True), fails or is abandoned, a peer of it is newly found
        dead, or ``timeout_s`` passes (False).  Spins the group's ``spin_s`` after the last progress
        (none when the host has more ranks than cores), then sleeps on the group's doorbell and the
        peers' pidfds."""
        g = self.g
        now = time.monotonic()
        deadline = now + max(timeout_s, 0.0)
        spin_end = now + g.spin_s
        known_dead = op.failed_peers()
        asleep = False
        try:
            while True:
                if self.pump():
                    spin_end = time.monotonic() + g.spin_s
                    if asleep and g.ctl is not None:
                        asleep = False
                        g.ctl[W_SLEEPING] = 0
                if op.state in (DONE, ABANDONED):
                    return op.state == DONE
                if op.failed_peers() - known_dead or self.closed or g.ctl is None:
                    return False
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now < spin_end:
                    continue
                if not asleep:  # ask to be rung, then look once more before sleeping
                    asleep = True
                    native.store_fence(g.sleeping_addr, 1)
                    continue
                fds = [g.bell] + [p.pidfd for r, p in op.peers() if p.pidfd is not None and r not in known_dead]
                select.select(fds, [], [], min(deadline - now, WAIT_SLICE_S))
                g._drain()
        finally:
            if asleep and g.ctl is not None:
                g.ctl[W_SLEEPING] = 0
                g._drain()

    def _consume(self, link: "_Link", serial: int, op: "_Recv") -> None:
        """Deliver record ``serial`` of ``link``'s sender into ``op`` (under the lock): check, copy,
        re-check, acknowledge.  A sender that died before the copy ended leaves ``op`` waiting with
        ``lost`` set (its Work then fails with PeerFailureError)."""
        w, src = link.w, link.rank
        slot = serial % SLOTS
        at = link.rec_in + slot * RW
        nbytes, meta, addr = w[at + R_NBYTES], w[at + R_META], w[at + R_ADDR]
        error = None
        if w[at + R_REVOKE] == serial:
            error = _withdrawn(op, src)
        elif meta & 0xFF != op.dtype_code:
            error = WireError(f"{op.name}: rank {src} sent dtype code {meta & 0xFF}, this rank expects "
                              f"{op.dtype_code}: dtypes must agree across ranks")
        elif nbytes != op.nbytes:
            error = WireError(f"{op.name}: rank {src} sent {nbytes} bytes but this rank expects {op.nbytes}: "
                              "tensor sizes must agree across ranks")
        else:
            out = op.tensor.data_ptr()
            if meta & EAGER:
                native.copy_ptr(out, link.seg.addr + addr, nbytes)
                err = 0
            else:
                err = native.vm_read(link.peer.pid, out, addr, nbytes)
            if native.lib is not None:
                native.lib.mc_fence()
            if w[at + R_REVOKE] == serial or w[at + R_PUB] != serial:
                error = _withdrawn(op, src)
            elif not (meta & EAGER) and (err == errno.ESRCH or not _alive(link.peer)):
                op.lost = True  # the sender died: the bytes may not be its own
                return
            elif err:
                error = MooncakeError(f"{op.name}: reading rank {src}'s message with process_vm_readv failed "
                                      f"({os.strerror(err)}); use MOONCAKE_FAST_CPU_P2P=0 (every rank) or "
                                      "MOONCAKE_IMPL=ref")
        mine = self.w
        mine[ACKS + src * SLOTS + slot] = serial
        mine[ACK_COUNT + src] += 1
        op.complete(error)
        self.g.wake((src,))

    def close(self) -> None:
        """Retire every link (published eager messages stay readable: peers keep their mappings)
        and unmap this rank's segment; pending operations fail."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for link in self.links.values():
                link.retire(revoke_all=False)
            self.any_ops.clear()
            if self.g.ctl is not None:
                self.g.ctl[W_P2P_GEN] = 0
            self.seg.close()


def _withdrawn(op: "_Recv", src: int) -> MooncakeError:
    return MooncakeError(f"{op.name}: rank {src} withdrew message {op.seq} with tag {op.tag} (its send was "
                         "abandoned: it timed out or failed) before it could be received")


class _Link:
    """This rank's P2P state with one incarnation of one peer: the outbox to it and its outbox to
    this rank (read through the peer's mapped segment)."""

    def __init__(self, p2p: ShmP2P, rank: int, peer: _Peer, seg: Segment | None, first_serial: int):
        self.p2p, self.rank, self.peer, self.seg = p2p, rank, peer, seg
        self.inc = incarnation(peer.address)
        self.gone = seg is None
        self.w = seg.words(0, WORDS) if seg is not None else None
        me = p2p.me
        # receiving: the peer's outbox to this rank
        self.rec_in = RECORDS + me * SLOTS * RW
        self.cursor: int | None = None  # next serial to look at (None: the peer addresses an older me)
        self.arrived: dict[tuple[int, int], int] = {}  # (tag, seq) -> serial, not consumed yet
        self.waiting: dict[tuple[int, int], _Recv] = {}
        # sending: this rank's outbox to the peer
        self.rec_out = RECORDS + rank * SLOTS * RW
        self.ring_at = RING0 + rank * RING_BYTES
        self.base = self.next = first_serial
        self.queue: collections.deque[_Send] = collections.deque()
        self.unacked: dict[int, _Send] = {}  # serial -> op, in serial order
        self.ring: collections.deque[tuple[int, int]] = collections.deque()  # (serial, end) of eager payloads
        self.head = self.tail = 0  # ring bytes: [head, tail) in use (monotonic counters)
        self.ack_seen = 0
        mw = p2p.w
        # acknowledgements of this incarnation's messages start from scratch, then are claimed for it
        a = ACKS + rank * SLOTS
        mw[a:a + SLOTS] = memoryview(bytes(8 * SLOTS)).cast("q")
        mw[ACK_COUNT + rank] = 0
        mw[ACK_INC + rank] = self.inc
        mw[OUT_BASE + rank] = self.base
        mw[OUT_INC + rank] = self.inc

    # ---- sending --------------------------------------------------------------------------------
    def pump_out(self) -> bool:
        moved = self._collect_acks() if self.unacked else False
        if self.queue and not self.p2p.g.failed((self.rank,)):  # a dead peer's sends fail instead
            while self.queue and self._slot_free(self.next):
                self._publish(self.queue.popleft())
                moved = True
        return moved

    def _slot_free(self, serial: int) -> bool:
        previous = serial - SLOTS
        return previous < self.base or previous not in self.unacked

    def _publish(self, op: "_Send") -> None:
        p2p = self.p2p
        serial = self.next
        self.next += 1
        nbytes = op.nbytes
        off = self._alloc(serial, nbytes) if nbytes <= EAGER_MAX else None
        if off is not None:
            native.copy_ptr(p2p.seg.addr + off, op.tensor.data_ptr(), nbytes)
            addr, meta = off, op.dtype_code | EAGER
        else:
            addr, meta = op.tensor.data_ptr(), op.dtype_code
        w = p2p.w
        at = self.rec_out + (serial % SLOTS) * RW
        w[at + R_TAG], w[at + R_SEQ], w[at + R_NBYTES] = op.tag, op.seq, nbytes
        w[at + R_ADDR], w[at + R_META], w[at + R_DST] = addr, meta, self.inc
        w[at + R_PUB] = serial
        self.unacked[serial] = op
        op.published(serial, off is not None)
        p2p.g.wake((self.rank,))

    def _alloc(self, serial: int, nbytes: int) -> int | None:
        """A ring offset (in this rank's segment) for an eager payload, or None if it does not fit."""
        self._reclaim()
        size = (nbytes + 63) & ~63
        start = self.tail
        if start % RING_BYTES + size > RING_BYTES:  # no wrapping inside a payload
            start += RING_BYTES - start % RING_BYTES
        if start + size - self.head > RING_BYTES:
            return None
        self.tail = start + size
        self.ring.append((serial, self.tail))
        return self.ring_at + start % RING_BYTES

    def _reclaim(self) -> None:
        while self.ring and self.ring[0][0] not in self.unacked:
            self.head = self.ring.popleft()[1]
        if not self.ring:
            self.head = self.tail

    def _collect_acks(self) -> bool:
        w, me = self.w, self.p2p.me
        if w[ACK_INC + me] != self.p2p.inc:  # the peer has not taken this rank's incarnation on yet
            return False
        count = w[ACK_COUNT + me]
        delta = count - self.ack_seen
        if delta <= 0:
            return False
        self.ack_seen = count
        a = ACKS + me * SLOTS
        done = []
        for serial in self.unacked:  # mostly in order: stop once every new acknowledgement is found
            if w[a + serial % SLOTS] == serial:
                done.append(serial)
                if len(done) == delta:
                    break
        for serial in done:
            self.unacked.pop(serial).acknowledged()
        self._reclaim()
        return bool(done)

    # ---- receiving ------------------------------------------------------------------------------
    def discover(self) -> bool:
        """Read the records the peer published for this rank since the last call: each one a
        posted receive waits for is delivered to it, the others are filed in ``arrived``.  True if
        any record was new."""
        w, p2p = self.w, self.p2p
        if self.cursor is None:
            if w[OUT_INC + p2p.me] != p2p.inc:
                return False
            self.cursor = w[OUT_BASE + p2p.me]
        serial = start = self.cursor
        while True:
            at = self.rec_in + (serial % SLOTS) * RW
            if w[at + R_PUB] != serial:
                break
            self.cursor = serial + 1
            if w[at + R_DST] == p2p.inc:
                key = (w[at + R_TAG], w[at + R_SEQ])
                op = self.waiting.pop(key, None)
                if op is None:
                    self.arrived[key] = serial
                else:
                    p2p._consume(self, serial, op)
            serial += 1
        return serial != start

    def pump_in(self) -> bool:
        if not (self.waiting or self.p2p.any_ops):
            return False
        return self.discover()

    def retire(self, revoke_all: bool) -> None:
        """This incarnation is gone (replaced; or this rank closes): revoke its published records
        (eager ones too when ``revoke_all``), unmap its segment; its pending operations fail."""
        self.gone = True
        w = self.p2p.w
        for serial, op in self.unacked.items():
            if revoke_all or not op.eager:
                w[self.rec_out + (serial % SLOTS) * RW + R_REVOKE] = serial
        self.queue.clear()
        self.unacked.clear()
        self.ring.clear()
        self.waiting.clear()
        self.arrived.clear()
        if self.seg is not None:
            self.seg.close()
            self.seg = self.w = None


# ======================================================================================== operations

class _Op:
    """The PlaneOp interface common to P2P operations (``mooncake.control.plane.PlaneOp``)."""

    state: int

    def __init__(self, p2p: ShmP2P, tensor: torch.Tensor, tag: int):
        self.p2p = p2p
        self.tensor = tensor
        self.tag = tag
        self.nbytes = _nbytes(tensor)
        self.dtype_code = DTYPE_CODES[tensor.dtype]

    @property
    def committed(self) -> bool:
        return self.state == DONE

    data_complete = committed

    def progress(self) -> None:
        if self.state not in (DONE, ABANDONED):
            self.p2p.poll()

    def wait(self, timeout_s: float) -> bool:
        """Block until committed (True), failed, or ``timeout_s`` passed (False); see ``ShmP2P.wait``."""
        return self.p2p.wait(self, timeout_s)

    def _failed(self, link: "_Link") -> bool:
        return link.gone or bool(self.p2p.g.failed((link.rank,)))


class _Send(_Op):
    """One send: QUEUED until its record slot is free, then DONE at once (eager payload, copied into
    the ring) or POSTED until the receiver acknowledges it (payload read in place)."""

    def __init__(self, p2p, link, tensor, tag, seq):
        super().__init__(p2p, tensor, tag)
        self.link, self.seq = link, seq
        self.state = QUEUED
        self.serial = -1
        self.eager = False

    def published(self, serial: int, eager: bool) -> None:
        self.serial, self.eager = serial, eager
        if eager:  # the payload is in the ring: done, the tensor is no longer needed
            self.state = DONE
            self.tensor = None
        else:
            self.state = POSTED

    def acknowledged(self) -> None:
        if self.state == POSTED:
            self.state = DONE
        self.tensor = None

    def peers(self) -> list[tuple[int, _Peer]]:
        """(rank, peer) of the processes this operation depends on."""
        return [(self.link.rank, self.link.peer)]

    def failed_peers(self) -> frozenset[int]:
        if self.state != DONE and self._failed(self.link):
            return frozenset((self.link.rank,))
        return frozenset()

    def pending_ranks(self) -> tuple[int, ...]:
        return () if self.state == DONE else (self.link.rank,)

    def finish(self) -> None:
        if self.state != DONE:
            raise MooncakeError(f"send to rank {self.link.rank}: finish() before it completed")

    def abandon(self) -> None:
        with self.p2p.lock:
            if self.state in (DONE, ABANDONED):
                return
            link = self.link
            if self.state == QUEUED:
                if self in link.queue:
                    link.queue.remove(self)
            elif not link.gone:  # POSTED: withdraw it (its slot stays taken until acknowledged)
                self.p2p.w[link.rec_out + (self.serial % SLOTS) * RW + R_REVOKE] = self.serial
            self.tensor = None
            self.state = ABANDONED


class _Recv(_Op):
    """One receive from a known source: WAITING until its message is read into ``tensor``, then DONE
    (``error`` set, raised by ``finish``, for a withdrawn or mismatched message)."""

    def __init__(self, p2p, tensor, tag):
        super().__init__(p2p, tensor, tag)
        self.state = WAITING
        self.link: _Link | None = None
        self.seq = -1
        self.error: BaseException | None = None
        self.lost = False  # the sender died while its message was read
        self.name = "recv"

    def bind(self, link: "_Link", seq: int) -> None:
        self.link, self.seq = link, seq
        self.name = f"recv from rank {link.rank}"

    def complete(self, error: BaseException | None) -> None:
        self.error = error
        self.state = DONE

    def peers(self) -> list[tuple[int, _Peer]]:
        return [(self.link.rank, self.link.peer)]

    def failed_peers(self) -> frozenset[int]:
        if self.state != DONE and (self.lost or self._failed(self.link)):
            return frozenset((self.link.rank,))
        return frozenset()

    def pending_ranks(self) -> tuple[int, ...]:
        return () if self.state == DONE else (self.link.rank,)

    def finish(self) -> None:
        if self.state != DONE:
            raise MooncakeError(f"{self.name}: finish() before a message was received")
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        with self.p2p.lock:
            if self.state in (DONE, ABANDONED):
                return
            link = self.link
            if link.waiting.get((self.tag, self.seq)) is self:
                del link.waiting[(self.tag, self.seq)]
            self.state = ABANDONED


class _RecvAny(_Recv):
    """A receive from whichever source's next message with the tag has arrived (rank order)."""

    def __init__(self, p2p, tensor, tag, links: dict[int, "_Link"], take_seq, peek_seq):
        super().__init__(p2p, tensor, tag)
        self.links = links
        self.take_seq, self.peek_seq = take_seq, peek_seq
        self.src = -1
        self.name = f"recv from any source (tag {tag})"

    def try_match(self) -> bool:
        """Take the first source's next message with this tag if it has arrived (under the lock)."""
        if self.state != WAITING or self.link is not None:
            return False
        for src, link in self.links.items():
            if link.gone:
                continue
            link.discover()
            serial = link.arrived.pop((self.tag, self.peek_seq(src)), None)
            if serial is None:
                continue
            self.src = src
            self.bind(link, self.take_seq(src))
            self.p2p.any_ops.remove(self)
            self.p2p._consume(link, serial, self)
            return True
        return False

    def source_rank(self) -> int:
        """The sender of the message received (-1 until one matched)."""
        return self.src

    def peers(self):
        if self.link is not None:
            return super().peers()
        return [(r, link.peer) for r, link in self.links.items()]

    def failed_peers(self) -> frozenset[int]:
        if self.link is not None:
            return super().failed_peers()
        if self.state == WAITING and all(self._failed(link) for link in self.links.values()):
            return frozenset(self.links)  # nobody is left to send it
        return frozenset()

    def pending_ranks(self) -> tuple[int, ...]:
        if self.link is not None:
            return super().pending_ranks()
        return tuple(self.links)

    def abandon(self) -> None:
        with self.p2p.lock:
            if self.state in (DONE, ABANDONED):
                return
            if self in self.p2p.any_ops:
                self.p2p.any_ops.remove(self)
            self.state = ABANDONED
