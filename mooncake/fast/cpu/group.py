"""The shared-memory data plane: one ``ShmGroup`` per process group, one ``ShmOp`` per collective.

Protocol (benchmarks/results/cpu/README.md has an overview).  Each rank owns, per group, a small *control* segment
(words only it writes, except the doorbell's RUNG word) and *lane* segments it fills; peers map them
read-only in practice.  An operation numbered ``seq`` under view epoch ``e`` has the key
``(e << 40) | seq`` and uses lane ``seq % 2``, so two consecutive operations never share buffers.

1. **post**: once every active peer has released (FREE) this lane of the previous operation that
   used it (or already holds this operation), a rank copies its payload into its lane segment,
   writes the slot table and the operation's description, then the lane's PUB word = key.
2. **data complete**: every peer whose payload this rank needs has PUB = key (large reductions:
   every owner of a part has folded it, RED = key, see below).  The rank records that it now
   reads this lane of its peers (HOLD) and writes DONE = key.
3. **committed**: every other active rank has DONE = key.  ``finish()`` then reads the peers'
   segments into the user's tensors and writes FREE; ``abandon()`` writes FREE without touching
   them.  An operation starts posting only once the previous one is committed here, so a rank is
   never more than one operation ahead of the slowest active peer.
4. If a committed operation is not finished yet when a later one is queued behind it (async
   ops), its outputs are computed into private memory ("stash") and its lanes freed at once, so
   peers never wait on this rank's control plane.

Large all_reduce (``PIPELINE_MIN_BYTES`` and up, with ``RING_MIN_RANKS`` ranks or more) is a
pipelined reduce-scatter: the tensor is cut into one part per active rank; every rank streams its
slices of the other ranks' parts through a small ring per (writer, reader) pair (``RING_DEPTH``
chunks of ``CHUNK_BYTES``, which stay in cache), and each owner folds its part, in ascending rank
order, into its lane's result region (RED = key when done).  ``finish`` copies every part from its
owner's result region.

Waiting: ``PlaneOp.wait`` (which the control plane's ``Work.wait`` calls) spins for ``spin_seconds``
after the last progress, then sets this rank's SLEEPING word and sleeps on its *doorbell*, a
Unix datagram socket whose path is in the control segment; a peer that changes a word while
SLEEPING is set rings it.  An idle or long-blocked rank uses no CPU, and a woken sleeper is
scheduled at once.  The doorbell is bound in a directory only this user can enter (``bell_dir``), so
another user cannot ring (or flood) it: the kernel refuses the datagram without waking this rank.  Its
shared memory is reachable through ``/proc/<pid>/fd`` only, which the kernel opens to processes of the
same user (the ptrace access check); same-user processes are inside the job's trust boundary anyway.  Liveness: a pidfd per peer (a dead process makes it readable) and the peer's
CLOSED word.
"""

from __future__ import annotations

import dataclasses
import math
import os
import select
import socket
import struct
import threading
import time
from datetime import timedelta
from typing import Sequence

import torch

from ...control import faults
from ...control.auth import AuthError
from ...control.errors import MismatchError, MooncakeError, WireError
from ...control.fingerprint import Fingerprint, LaneWords
from ...control.wire import MAX_RANKS, OpCode
from ...model.reduce import DTYPE_CODES, ReduceOp, accumulator_dtype
from . import native
from .fold import ALIGN, fold_into
from .segment import Segment, SegmentError, host_identity

# ---- tunables -------------------------------------------------------------------------------------
CHUNK_BYTES = int(os.environ.get("MOONCAKE_FAST_CPU_CHUNK", 256 * 1024))
RING_DEPTH = 4
PIPELINE_MIN_BYTES = int(os.environ.get("MOONCAKE_FAST_CPU_PIPELINE_MIN", 1 << 20))
# With 2 ranks the eager all_reduce moves about as many bytes per core as the ring (5N against
# 4.5N) and needs one synchronisation instead of one per chunk: measured equal or faster at
# 256 KiB - 64 MiB.  From 3 ranks on, the eager fold reads every rank's full input, the ring
# only 1/n of it.
RING_MIN_RANKS = 3
# Copies and folds at least this big write with non-temporal stores (past the cache anyway).
# Measured on the 2-core machine (2 ranks, eager all_reduce): regular stores win up to 16 MiB
# (4.3 against 3.0 GB/s), non-temporal ones from 32 MiB on (3.5 against 2.8-3.0 GB/s).
NT_MIN_BYTES = int(os.environ.get("MOONCAKE_FAST_CPU_NT_MIN", 32 << 20))
_SPIN_US = os.environ.get("MOONCAKE_FAST_CPU_SPIN_US")
SPIN_S = float(_SPIN_US or 50) * 1e-6  # then sleep on the doorbell (see spin_seconds)
SLEEP_SLICE_S = 0.002  # longest sleep of wait() before re-checking liveness
SLEEP_AFTER_S = float(os.environ.get("MOONCAKE_FAST_CPU_SLEEP_AFTER_US", 20)) * 1e-6  # blocked this long: ring me
LIVENESS_PERIOD_S = 0.002
MIN_SEGMENT = 64 * 1024
# sched_yield while spinning: off by default.  On a loaded machine a yield can hand the core away
# for a whole time slice (measured: ~150 us per yield at load 4 on 2 cores), while a short spin
# followed by a blocking sleep gets the woken rank scheduled at once.
YIELD = os.environ.get("MOONCAKE_FAST_CPU_YIELD", "0") == "1"

SEQ_BITS = 40

# ---- control segment layout (int64 words) -------------------------------------------------------
_MAGIC = 0x4D43534D30303031  # "MCSM0001"
W_MAGIC, W_VERSION, W_PID, W_CAPACITY, W_CLOSED = 0, 1, 2, 3, 4
W_RUNG = 8  # set by a peer that rang this rank's doorbell (cleared by this rank when it drains)
W_SLEEPING = 9  # this rank is blocked on its peers and may be asleep: ring its doorbell
W_BELL = 10  # 6 words: the doorbell's socket path (48 bytes, padded with 0x01)
BELL_BYTES = 48
W_RING_GEN, W_RING_FD, W_RING_SIZE = 16, 17, 18
W_P2P_GEN, W_P2P_FD, W_P2P_SIZE = 19, 20, 21  # this rank's P2P segment (p2p.py); GEN 0: none
LANE0 = 24
(L_PUB, L_META, L_NSLOTS, L_NBYTES, L_SEG_GEN, L_SEG_FD, L_SEG_SIZE, L_RED, L_DONE, L_HOLD, L_FREE,
 L_RESULT_OFF, L_NUMEL, L_FP_SLOTS) = range(14)
# L_META: opcode | dtype code << 8 | reduce op << 16 | (root + 1) << 24 | variant << 40, then
# L_NUMEL and L_FP_SLOTS: with the per-slot element counts below, the call's fingerprint
L_SLOTS = 16  # (offset, nbytes) per slot, then fingerprint sends[capacity], recvs[capacity]
VARIANT_RING = 1  # the pipelined all_reduce (ranks must agree on the algorithm, not only the call)


def bell_dir() -> str:
    """``/tmp/mooncake-<uid>``: where this user's doorbells live, created 0700 and refused unless it
    is a real directory owned by this user that nobody else may enter (another user could have made
    it first).  Doorbells of dead processes left in it are removed."""
    uid = os.getuid()
    path = f"/tmp/mooncake-{uid}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise MooncakeError(f"fast CPU plane: {path} must be a directory owned by uid {uid} with mode 0700 "
                            f"(it is owned by uid {st.st_uid}, mode {_stat.S_IMODE(st.st_mode):04o}): remove it, "
                            "or use MOONCAKE_IMPL=ref")
    for entry in os.listdir(path):
        pid = entry[1:].split("-", 1)[0]
        if entry.startswith("b") and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join(path, entry))
            except OSError:
                pass
    return path


def _lane_words(capacity: int) -> int:
    return (L_SLOTS + 4 * capacity + 7) // 8 * 8


def spin_seconds(num_ranks: int) -> float:
    """How long ``wait`` spins before sleeping: ``SPIN_S`` while each of the host's ``num_ranks`` ranks
    can have a core of its own, else 0 (oversubscribed, a spinning rank holds the core its peer needs:
    measured with 3 ranks on 2 cores, a small all_reduce took ~450 µs without spinning against
    500-770 µs with 50 µs).  ``MOONCAKE_FAST_CPU_SPIN_US`` overrides."""
    if _SPIN_US is not None or num_ranks <= len(os.sched_getaffinity(0)):
        return SPIN_S
    return 0.0


class Layout:
    def __init__(self, capacity: int):
        self.capacity = capacity
        lw = _lane_words(capacity)
        self.lane = (LANE0, LANE0 + lw)
        ring = LANE0 + 2 * lw
        self.rw_key, self.rw_cnt, self.rc_key, self.rc_cnt = (ring + i * capacity for i in range(4))
        self.words = ring + 4 * capacity
        self.nbytes = (self.words * 8 + 4095) // 4096 * 4096


# ---- Store record ----------------------------------------------------------------------------
_RECORD = struct.Struct("<QHHiiQ16s")  # magic, version, capacity, pid, ctrl fd, ctrl size, host


def _record_key(prefix: str, rank: int) -> str:
    return f"{prefix}/fast-cpu/{rank}"


QUEUED, POSTED, DATA, COMMITTED, FINISHED, ABANDONED = range(6)


def _key(epoch: int, seq: int) -> int:
    if seq >= 1 << SEQ_BITS or epoch >= 1 << (63 - SEQ_BITS):
        raise MooncakeError(f"operation number {seq} / epoch {epoch} out of the shared-memory plane's range")
    return (epoch << SEQ_BITS) | seq


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


class _Peer:
    """A mapped peer: its control words, its lane and ring segments (attached on demand)."""

    def __init__(self, rank: int, pid: int, address: bytes, ctrl: Segment, layout: Layout):
        self.rank, self.pid, self.address = rank, pid, address
        self.ctrl = ctrl
        self.ctl = ctrl.words(0, layout.words)
        self.bell = ctrl.bytes[W_BELL * 8:W_BELL * 8 + BELL_BYTES].numpy().tobytes().rstrip(b"\x01")
        self.bell_ok = True
        self.lanes: dict[int, tuple[int, Segment]] = {}
        self.ring: tuple[int, Segment] | None = None
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self.pidfd = None  # already gone
        self.dead = self.pidfd is None

    def lane_segment(self, lane: int, base: int) -> Segment:
        gen = int(self.ctl[base + L_SEG_GEN])
        have = self.lanes.get(lane)
        if have is None or have[0] != gen:
            if have is not None:
                have[1].close()
                del self.lanes[lane]
            seg = Segment.attach(self.pid, int(self.ctl[base + L_SEG_FD]), int(self.ctl[base + L_SEG_SIZE]))
            self.lanes[lane] = (gen, seg)
            return seg
        return have[1]

    def ring_segment(self) -> Segment:
        gen = int(self.ctl[W_RING_GEN])
        if self.ring is None or self.ring[0] != gen:
            if self.ring is not None:
                self.ring[1].close()
                self.ring = None
            seg = Segment.attach(self.pid, int(self.ctl[W_RING_FD]), int(self.ctl[W_RING_SIZE]))
            self.ring = (gen, seg)
        return self.ring[1]

    def close(self) -> None:
        for _, seg in self.lanes.values():
            seg.close()
        self.lanes.clear()
        if self.ring is not None:
            self.ring[1].close()
            self.ring = None
        self.ctrl.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class ShmGroup:
    """A group's shared-memory plane on one rank (a ``PlaneGroup``)."""

    def __init__(self, info):
        self.info = info
        self.rank = info.rank
        self.capacity = info.capacity
        self.spin_s = spin_seconds(len(info.addresses))
        self.prefix = info.key_prefix
        self.timeout_s = info.timeout_s
        self.layout = Layout(MAX_RANKS)  # every possible rank: capacity can grow (extend_group_size_to)
        self.fp_words = LaneWords(L_META, L_NUMEL, L_FP_SLOTS, L_SLOTS + 2 * MAX_RANKS, MAX_RANKS)
        self.lock = threading.RLock()
        self.queue: list[ShmOp] = []
        self.peers: dict[int, _Peer] = {}
        self.remote: dict[int, bytes] = {}  # ranks on other hosts (their addresses): UCX (hybrid.py), not attached
        self.closed = False
        native.load()
        tag = f"mooncake-fastcpu-{self.rank}"
        self.ctrl = Segment.create(tag + "-ctrl", self.layout.nbytes)
        self.ctl = self.ctrl.words(0, self.layout.words)  # a fresh memfd reads as zeros
        lay = self.layout
        for base in lay.lane:  # no key is negative: nothing published, done or held yet
            for field in (L_PUB, L_RED, L_DONE, L_HOLD, L_FREE):
                self.ctl[base + field] = -1
        for r in range(MAX_RANKS):
            self.ctl[lay.rw_key + r] = self.ctl[lay.rc_key + r] = -1
        self.ctl[W_VERSION], self.ctl[W_PID], self.ctl[W_CAPACITY] = 1, os.getpid(), self.capacity
        self.ctl[W_MAGIC] = _MAGIC
        self.sleeping_addr = self.ctrl.addr + W_SLEEPING * 8
        self.blocked_since: float | None = None
        self.moves = 0  # bumped whenever an operation moves (wait() keeps spinning while they do)
        self._open_bell(info.engine)
        self.lanes: dict[int, tuple[int, Segment]] = {}
        self.ring: Segment | None = None
        self.gen = 0
        self.scratch = torch.empty(0, dtype=torch.float32)
        self._dead: set[int] = set()
        self.broken: dict[int, str] = {}  # peers found writing malformed words: why
        self._live_checked = 0.0
        self.host = host_identity()
        record = _RECORD.pack(_MAGIC, 1, self.capacity, os.getpid(), self.ctrl.fd, self.ctrl.size, self.host)
        self.address = info.addresses.get(self.rank, b"")
        info.store.set(_record_key(self.prefix, self.rank), record + self.address)

    # ---- membership ---------------------------------------------------------------------------
    def add_ranks(self, addresses: dict[int, bytes]) -> None:
        """Attach the segments of same-host ranks not known yet (or replaced: a new address); note the
        ranks on other hosts (``remote``)."""
        todo = {r: a for r, a in addresses.items() if r != self.rank and self.remote.get(r) != a
                and (r not in self.peers or self.peers[r].address != a)}
        if not todo:
            return
        records = self._records(todo)
        remote = sorted(r for r, rec in records.items() if rec[6] != self.host)
        from ...pg.options import check_not_loopback_for
        check_not_loopback_for(remote)  # never advertise loopback to another host
        with self.lock:
            if remote and not self.remote:
                from ... import log as _log
                _log.logger.warning("mooncake fast cpu: rank(s) %s run on another host; collectives between "
                                    "hosts go over UCX, within this host over shared memory", remote)
            for r, rec in records.items():
                old = self.peers.pop(r, None)
                if old is not None:
                    old.close()
                self._dead.discard(r)
                if r in remote:
                    self.remote[r] = todo[r]
                    continue
                self.remote.pop(r, None)
                _, _, _, pid, fd, size, _ = rec
                try:
                    ctrl = Segment.attach(pid, fd, size)
                except SegmentError as exc:
                    raise MooncakeError(f"fast CPU plane: cannot attach rank {r}'s shared memory: {exc}; "
                                        "use MOONCAKE_IMPL=ref") from None
                self.peers[r] = _Peer(r, pid, todo[r], ctrl, self.layout)

    def _records(self, addresses: dict[int, bytes]) -> dict[int, tuple]:
        """The Store records of ``addresses``' ranks, waiting for ones not written yet (or still
        holding a previous incarnation's record: its address differs)."""
        store = self.info.store
        deadline = time.monotonic() + self.timeout_s
        out = {}
        keys = {r: _record_key(self.prefix, r) for r in addresses}
        try:
            store.wait(list(keys.values()), timedelta(seconds=max(self.timeout_s, 1.0)))
        except Exception as exc:  # DistStoreError / DistNetworkError
            raise MooncakeError(f"fast CPU plane: ranks {sorted(addresses)} did not publish their shared "
                                f"memory within {self.timeout_s:.0f} s ({exc})") from None
        pending = dict(addresses)
        while pending:
            for r in list(pending):
                try:
                    raw = store.get(keys[r])
                except AuthError:
                    continue  # not signed with the job's secret: dropped, wait for the authentic one
                rec = _RECORD.unpack_from(raw) if len(raw) >= _RECORD.size else None
                if rec is None or rec[0] != _MAGIC or rec[3] <= 0 or rec[4] < 0 or rec[5] <= 0:
                    raise MooncakeError(f"fast CPU plane: rank {r}'s shared-memory record in the Store "
                                        f"({keys[r]!r}) is malformed ({len(raw)} bytes); was the Store "
                                        "written by another job?")
                address = bytes(raw[_RECORD.size:])
                if not pending[r] or address == pending[r]:
                    out[r] = rec
                    del pending[r]
            if pending:
                if time.monotonic() > deadline:
                    raise MooncakeError(f"fast CPU plane: rank(s) {sorted(pending)} did not publish a record "
                                        "for their current incarnation in time")
                time.sleep(0.005)
        return out

    # ---- my segments ----------------------------------------------------------------------------
    def lane_segment(self, lane: int, nbytes: int) -> Segment:
        """My segment of ``lane`` with at least ``nbytes`` (replaced by a bigger one when needed;
        only called while every peer has released this lane)."""
        have = self.lanes.get(lane)
        if have is not None and have[1].size >= nbytes:
            return have[1]
        if have is not None:
            have[1].close()
        size = max(MIN_SEGMENT, 1 << max(0, math.ceil(math.log2(max(nbytes, 1)))))
        seg = Segment.create(f"mooncake-fastcpu-{self.rank}-lane{lane}", size)
        self.gen += 1
        self.lanes[lane] = (self.gen, seg)
        base = self.layout.lane[lane]
        self.ctl[base + L_SEG_FD], self.ctl[base + L_SEG_SIZE] = seg.fd, seg.size
        self.ctl[base + L_SEG_GEN] = self.gen
        return seg

    def ring_segment(self, nbytes: int) -> Segment:
        if self.ring is not None and self.ring.size >= nbytes:
            return self.ring
        if self.ring is not None:
            self.ring.close()
        self.ring = Segment.create(f"mooncake-fastcpu-{self.rank}-ring", _align(nbytes, 4096))
        self.gen += 1
        self.ctl[W_RING_FD], self.ctl[W_RING_SIZE] = self.ring.fd, self.ring.size
        self.ctl[W_RING_GEN] = self.gen
        return self.ring

    def scratch_for(self, numel: int) -> torch.Tensor:
        if self.scratch.numel() < numel:
            self.scratch = torch.empty(numel, dtype=torch.float32)
        return self.scratch

    # ---- signals --------------------------------------------------------------------------------
    # ---- doorbells ---------------------------------------------------------------------------
    def _open_bell(self, engine) -> None:
        """This rank's doorbell: a datagram socket in this user's private directory (``bell_dir``)
        that peers ring when this rank is blocked on them; ``wait`` sleeps on it.  (It used to be an
        abstract-namespace socket, which any user of the host could flood.)

        With ``MOONCAKE_FAST_CPU_BELL_IN_EPOLL=1`` its fd also joins the UCX engine's epoll set, for
        control planes that sleep on UCX events instead of calling ``PlaneOp.wait`` (off by
        default: it would also wake the engine's background thread on every ring)."""
        self.bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        name = os.path.join(bell_dir(), f"b{os.getpid()}-{os.urandom(3).hex()}").encode()
        if len(name) > BELL_BYTES:
            raise MooncakeError(f"fast CPU plane: doorbell path {name!r} is longer than {BELL_BYTES} bytes")
        self.bell.bind(name)
        self.bell_path = name
        self.bell.setblocking(False)
        self.ctrl.bytes[W_BELL * 8:W_BELL * 8 + len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
        self.ctrl.bytes[W_BELL * 8 + len(name):W_BELL * 8 + BELL_BYTES] = 1
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sender.setblocking(False)
        self.engine = engine
        self._epoll_fd = None
        self._watching = False
        worker = getattr(engine, "worker", None)
        if os.environ.get("MOONCAKE_FAST_CPU_BELL_IN_EPOLL", "0") == "1" and worker is not None:
            try:
                dup = os.dup(worker.epoll_file_descriptor)
                ep = select.epoll.fromfd(dup)  # owns (and closes) the dup, not UCX's fd
                ep.register(self.bell.fileno(), select.EPOLLIN)
                ep.close()
                self._epoll_fd = worker.epoll_file_descriptor
            except OSError:
                self._epoll_fd = None
            if hasattr(engine, "add_watch"):
                engine.add_watch(self._drain)  # the engine's thread drains a bell rung while idle
                self._watching = True
        elif hasattr(engine, "add_sleeper"):  # the engine's thread sleeps on it while Works are pending
            engine.add_sleeper(self.bell.fileno(), self.arm_bell, self.disarm_bell)

    def _close_bell(self) -> None:
        engine = self.engine
        if hasattr(engine, "remove_sleeper"):
            engine.remove_sleeper(self.bell.fileno())
        if self._watching:
            engine.remove_watch(self._drain)
        if self._epoll_fd is not None:
            try:
                dup = os.dup(self._epoll_fd)
                ep = select.epoll.fromfd(dup)
                ep.unregister(self.bell.fileno())
                ep.close()
            except OSError:
                pass
        self.bell.close()
        self.sender.close()
        try:
            os.unlink(self.bell_path)
        except OSError:
            pass

    def _drain(self) -> None:
        """Empty the doorbell (a rung bell keeps epoll readable), then clear RUNG so peers ring again.
        In that order no ring is lost: one whose datagram was read here was sent before RUNG was
        cleared (clearing it first let a ring land in between: RUNG stayed set with the doorbell
        empty, and no peer rang again, which a sleep without a timeout never got over)."""
        bell = self.bell
        if bell is None or bell.fileno() < 0:
            return
        try:
            while True:
                bell.recv(64)
        except (BlockingIOError, OSError):
            pass
        if self.ctl is not None:
            native.store_fence(self.ctrl.addr + W_RUNG * 8, 0)

    def arm_bell(self) -> bool:
        """For the UCX engine's thread, before it sleeps on this doorbell: while an operation is queued,
        ask peers to ring (SLEEPING), then look once more; False if an operation moved meanwhile (the
        thread then advances its Works instead of sleeping).  SLEEPING stays set until a ``wait``
        here clears it or the queue empties (``disarm_bell``)."""
        with self.lock:
            if self.ctl is None or not self.queue:
                return True
            if not self.ctl[W_SLEEPING]:
                native.store_fence(self.sleeping_addr, 1)
            self._drain()  # RUNG may be left set from a ring this thread did not sleep on
            moves = self.moves
            self._advance_queue()
            return self.moves == moves

    def disarm_bell(self) -> None:
        """After the engine's thread woke: empty the doorbell; stop asking once nothing is queued."""
        with self.lock:
            if self.ctl is None:
                return
            if not self.queue:
                self.ctl[W_SLEEPING] = 0
            self._drain()

    def wake(self, ranks: Sequence[int]) -> None:
        """Ring the doorbells of the peers among ``ranks`` that are blocked (call after changing a
        word they may wait on)."""
        peers = self.peers
        if native.lib is not None:
            native.lib.mc_fence()
        for r in ranks:
            p = peers.get(r)
            if p is not None and p.ctl[W_SLEEPING] and not p.ctl[W_RUNG] and p.bell_ok:
                p.ctl[W_RUNG] = 1
                try:
                    self.sender.sendto(b"!", p.bell)
                except BlockingIOError:
                    pass  # its queue is full: it has plenty to wake on
                except OSError:
                    p.bell_ok = False  # unreachable (another network namespace): it wakes on timeouts

    def _set_blocked(self, blocked: bool) -> bool:
        """Track whether the head operation is blocked on peers; returns True when this call just
        asked to be rung (the caller then re-checks once, closing the race with a waker).  While
        asking (SLEEPING), every call drains the doorbell, so a rung bell never stays readable
        (which would keep epoll-based waits from sleeping)."""
        ctl = self.ctl
        if ctl[W_SLEEPING]:
            self._drain()
            if not blocked:
                ctl[W_SLEEPING] = 0
                self._drain()  # a ring sent before the peer saw SLEEPING = 0
        if not blocked:
            self.blocked_since = None
            return False
        now = time.monotonic()
        if self.blocked_since is None:
            self.blocked_since = now
            return False
        if not ctl[W_SLEEPING] and now - self.blocked_since >= SLEEP_AFTER_S:
            native.store_fence(self.sleeping_addr, 1)
            return True
        return False

    def mark_broken(self, rank: int, reason: str) -> None:
        """A peer whose shared memory holds what no mooncake rank writes counts as failed (the
        agreement then removes it); nothing of it is read."""
        if rank not in self._dead:
            self._dead.add(rank)
            self.broken[rank] = reason

    def peer(self, rank: int) -> _Peer:
        p = self.peers.get(rank)
        if p is None:
            raise MooncakeError(f"fast CPU plane: rank {rank} is in the view but its shared memory was "
                                "never attached (add_ranks missing)")
        return p

    def failed(self, ranks: Sequence[int]) -> frozenset[int]:
        now = time.monotonic()
        if now - self._live_checked >= LIVENESS_PERIOD_S:
            self._live_checked = now
            fds = {p.pidfd: r for r, p in self.peers.items() if p.pidfd is not None and r not in self._dead}
            if fds:
                readable, _, _ = select.select(list(fds), [], [], 0)
                self._dead.update(fds[fd] for fd in readable)
            for r, p in self.peers.items():
                if p.pidfd is None or p.ctl[W_CLOSED]:
                    self._dead.add(r)
        return frozenset(r for r in ranks if r in self._dead)

    # ---- driving --------------------------------------------------------------------------------
    def enqueue(self, op: "ShmOp") -> "ShmOp":
        with self.lock:
            if self.closed:
                raise MooncakeError("the fast CPU plane of this group is closed")
            i = len(self.queue)
            while i > 0 and self.queue[i - 1].seq > op.seq:
                i -= 1
            self.queue.insert(i, op)
            self.pump()
        return op

    def pump(self) -> None:
        """Advance queued operations in order, as far as they can go without waiting."""
        with self.lock:
            if self.ctl is None:
                return
            blocked = self._advance_queue()
            if self._epoll_fd is not None:  # epoll mode: ask to be rung once blocked a while
                for _ in range(2):
                    if not self._set_blocked(blocked):
                        return
                    blocked = self._advance_queue()

    def _advance_queue(self) -> bool:
        """One pass over the queue; True if an operation is left waiting on peers."""
        for op in list(self.queue):  # an op that fails on a mismatch leaves the queue
            if op.state == QUEUED and not op.try_post():
                return True
            if op.state == POSTED and not op.try_data():
                return True
            if op.state == DATA and not op.try_commit():
                return True
            if op.state == COMMITTED and op.stash is None and op is not self.queue[-1]:
                op.stash_outputs()
        return False

    def wait(self, op: "ShmOp", timeout_s: float) -> bool:
        """Block until ``op`` is committed (True), a peer of it is found dead that was not known
        dead when the call began, or ``timeout_s`` passed (False).  Spins for ``spin_s`` after
        the last progress, then sets SLEEPING and sleeps on this rank's doorbell, which peers
        ring when they change a word while SLEEPING is set."""
        now = time.monotonic()
        deadline = now + max(timeout_s, 0.0)
        spin_end = now + self.spin_s
        known_dead = self.failed(op.others)
        bell = [self.bell]
        asleep = False
        moves = self.moves
        try:
            while True:
                self.pump()
                if self.moves != moves:  # progress: keep spinning (a pipelined op hands chunks over)
                    moves = self.moves
                    spin_end = time.monotonic() + self.spin_s
                    if asleep:
                        asleep = False
                        self.ctl[W_SLEEPING] = 0
                if op.state >= COMMITTED:
                    return op.state != ABANDONED
                if self.failed(op.others) - known_dead:
                    return False
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now < spin_end:
                    if YIELD:
                        os.sched_yield()
                    continue
                if not asleep:  # ask to be rung, then look once more before sleeping
                    asleep = True
                    native.store_fence(self.sleeping_addr, 1)
                    continue
                select.select(bell, [], [], min(deadline - now, SLEEP_SLICE_S))
                self._drain()
        finally:
            if asleep and self.ctl is not None:
                self.ctl[W_SLEEPING] = 0
                self._drain()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for op in list(self.queue):
                op.abandon()
            self.ctl[W_CLOSED] = 1
            self.wake(list(self.peers))
            for p in self.peers.values():
                p.close()
            self.peers.clear()
            for _, seg in self.lanes.values():
                seg.close()
            self.lanes.clear()
            if self.ring is not None:
                self.ring.close()
                self.ring = None
            self._close_bell()
            self.ctl = None
            self.ctrl.close()


# ======================================================================================== operations

class ShmOp:
    """One collective on this rank (a ``PlaneOp``).  Subclasses say what is published, whose
    publications are needed, and how outputs are written."""

    opcode: OpCode
    engine_sleeps = True  # the engine's thread sleeps on this plane's doorbell (ShmGroup.arm_bell)
    fault_points = True  # fault injection (tests) hits its points here (not in one half of a hybrid op)

    def __init__(self, group: ShmGroup, ctx, dtype: torch.dtype | None = None, redop: int = 0,
                 root: int = -1):
        self.g = group
        self.ctx = ctx
        self.name = ctx.name
        self.seq = seq = ctx.seq
        self.key = _key(ctx.view.epoch, seq)
        self.lane = seq & 1
        self.base = group.layout.lane[self.lane]
        self.me = me = ctx.rank
        self.active = active = ctx.view.active
        self.others = tuple(r for r in active if r != me)
        self.dtype = dtype
        self.dtype_code = 255 if dtype is None else DTYPE_CODES[dtype]
        self.redop = int(redop)
        self.root = root
        # the call as the control plane describes it (planes driven directly get the bare minimum)
        self.fp: Fingerprint = ctx.fingerprint or Fingerprint(self.opcode, self.dtype_code, self.redop, root)
        self.variant = 0
        self.error: BaseException | None = None  # a verdict every rank reaches alike (mismatch)
        self.verified = False
        self.state = QUEUED
        self.needs: tuple[int, ...] = ()
        self.outputs: list[torch.Tensor] = []
        self.stash: list[torch.Tensor] | None = None
        self.stash_error: BaseException | None = None
        self.held = False
        self.checked: set[int] = set()

    # -- the PlaneOp interface -------------------------------------------------------------------
    @property
    def data_complete(self) -> bool:
        return DATA <= self.state <= FINISHED

    @property
    def committed(self) -> bool:
        return COMMITTED <= self.state <= FINISHED

    def progress(self) -> None:
        if self.state < COMMITTED:
            self.g.pump()
            if YIELD and self.state < COMMITTED:
                os.sched_yield()  # still waiting on peers: let a runnable peer have the core

    def wait(self, timeout_s: float) -> bool:
        """Block until committed (True), a peer of this op is newly found dead, or ``timeout_s``
        passed (False).  The control plane's waiting loop should sleep here rather than on UCX's
        event fd, which shared-memory traffic never wakes."""
        return self.g.wait(self, timeout_s)

    def failed_peers(self) -> frozenset[int]:
        return self.g.failed(self.others)

    def pending_ranks(self) -> tuple[int, ...]:
        with self.g.lock:
            if self.state == QUEUED:
                return tuple(r for r in self.others if not self._released(r))
            if self.state == POSTED and not self.verified:
                return tuple(r for r in self.others if self.g.peer(r).ctl[self.base + L_PUB] != self.key)
            if self.state == POSTED:
                return self._missing()
            if self.state == DATA:
                return tuple(r for r in self.others if self.g.peer(r).ctl[self.base + L_DONE] != self.key)
            return ()

    def finish(self) -> None:
        g = self.g
        with g.lock:
            if self.state == FINISHED:
                return
            if not DATA <= self.state <= COMMITTED:
                raise MooncakeError(f"{self.name}: finish() on an operation that is not complete "
                                    f"(state {self.state})")
            try:
                if self.stash_error is not None:
                    raise self.stash_error
                if self.stash is not None:
                    for out, kept in zip(self.outputs, self.stash):
                        nb = _nbytes(out)
                        native.copy_ptr(out.data_ptr(), kept.data_ptr(), nb, nb >= NT_MIN_BYTES)
                else:
                    self.write(self.outputs)
            finally:
                self.state = FINISHED
                self._release()

    def abandon(self) -> None:
        with self.g.lock:
            if self.state in (FINISHED, ABANDONED):
                return
            self.state = ABANDONED
            self._release()

    # -- state machine (called under the group lock) ------------------------------------------------
    def _released(self, r: int) -> bool:
        """Rank ``r`` no longer reads this lane of an earlier operation: it freed what it held, or
        holds this operation (or a later one) already."""
        ctl = self.g.peer(r).ctl
        held = ctl[self.base + L_HOLD]
        return ctl[self.base + L_FREE] >= held or held >= self.key

    def try_post(self) -> bool:
        if self.g.closed:
            return False
        for r in self.others:
            if not self._released(r):
                return False
        self.publish()
        self.state = POSTED
        self.g.moves += 1
        self.g.wake(self.others)
        return True

    def try_data(self) -> bool:
        """Every rank's fingerprint agrees and every payload this rank needs is in: hold the
        peers' lanes and say DONE.  Returns False while waiting; a mismatch ends the op (not
        waiting)."""
        if not self.verified and not self.verify():
            return self.error is not None
        if not self.gathered() or not self.may_say_done():
            return False
        g, base = self.g, self.base
        # map what finish() will read now, while the peers must keep it (they may exit once
        # committed); a failure surfaces from finish()
        for r in self.needs:
            p = g.peer(r)
            if p.ctl[base + L_SEG_GEN] > 0:
                try:
                    p.lane_segment(self.lane, base)
                except SegmentError as exc:
                    self.stash_error = MooncakeError(f"{self.name}: cannot map rank {r}'s shared memory: {exc}")
        if self.others and self.fault_points:
            faults.hit("after_data")  # fault injection (tests): every payload here, no DONE yet
        ctl = g.ctl
        ctl[base + L_HOLD] = self.key
        self.held = True
        ctl[base + L_DONE] = self.key
        self.state = DATA
        g.moves += 1
        g.wake(self.others)
        return True

    def verify(self) -> bool:
        """Once every other active rank has published this op: compare every rank's fingerprint
        (all ranks read the same words, so all reach the same verdict) and check that what this
        rank will read lies inside the peers' segments (a peer whose words do not is broken: it
        counts as failed).  Nothing of a peer is read before this returns True."""
        g, key, at = self.g, self.key, self.base + L_PUB
        for r in self.others:
            if g.peer(r).ctl[at] != key:
                return False
        problem = self.verdict()
        if problem is not None:
            self.error = MismatchError(problem)
            self.state = ABANDONED
            g.moves += 1
            self._release()
            return False
        for r in self.needs:
            broken = self._bounds_problem(r)
            if broken:
                g.mark_broken(r, f"{self.name}: rank {r}'s shared-memory record is malformed ({broken})")
                return False
        self.verified = True
        return True

    def verdict(self) -> str | None:
        """The mismatch every rank computes alike from the published fingerprints, or None."""
        g = self.g
        return g.fp_words.verdict(self.seq, self.base, self.me, self.fp, self.variant,
                                  {r: g.peer(r).ctl for r in self.others})

    def may_say_done(self) -> bool:
        """Whether DONE may go out once every payload this rank needs is in (a hybrid op's half waits
        for the other half)."""
        return True

    def _bounds_problem(self, r: int) -> str | None:
        """Why rank ``r``'s published slot table points outside its lane segment, or None."""
        p, base = self.g.peer(r), self.base
        ctl = p.ctl
        nslots = int(ctl[base + L_NSLOTS])
        if not 0 <= nslots <= self.g.layout.capacity:
            return f"{nslots} slots"
        if nslots == 0:
            return None
        try:
            size = p.lane_segment(self.lane, base).size
        except SegmentError as exc:
            return f"its lane cannot be mapped: {exc}"
        for slot in range(nslots):
            at = base + L_SLOTS + 2 * slot
            off, nb = int(ctl[at]), int(ctl[at + 1])
            if off < 0 or nb < 0 or off + nb > size:
                return f"slot {slot} at offset {off}, {nb} bytes, in a segment of {size} bytes"
        return None

    def try_commit(self) -> bool:
        key, at = self.key, self.base + L_DONE
        for r in self.others:
            if self.g.peer(r).ctl[at] != key:
                return False
        self.state = COMMITTED
        self.g.moves += 1
        return True

    def stash_outputs(self) -> None:
        """Compute the outputs into private memory now and free the lanes (a later op waits)."""
        self.stash = [torch.empty_like(o) for o in self.outputs]
        try:
            self.write(self.stash)
        except BaseException as exc:  # noqa: BLE001 - raised again by finish()
            self.stash_error = exc
        self._free_lanes()

    def _release(self) -> None:
        g = self.g
        if self in g.queue:
            g.queue.remove(self)
        self._free_lanes()
        if not g.queue and g.ctl is not None and g._epoll_fd is not None:
            g._set_blocked(False)

    def _free_lanes(self) -> None:
        if self.held and self.g.ctl is not None:
            self.held = False
            self.g.ctl[self.base + L_FREE] = self.key
            self.g.wake(self.others)

    # -- publishing (eager: whole payloads into my lane) ----------------------------------------------
    def sends(self) -> list[tuple[int, torch.Tensor]]:
        return []

    def publish(self) -> None:
        sends = self.sends()
        g, base = self.g, self.base
        ctl = g.ctl
        nslots = total = 0
        if sends:
            sizes = [_nbytes(t) for _, t in sends]
            total = sum(_align(nb) for nb in sizes)
            seg = g.lane_segment(self.lane, total)
            off = 0
            addr = seg.addr
            for i, ((slot, t), nb) in enumerate(zip(sends, sizes)):
                native.copy_ptr(addr + off, t.data_ptr(), nb, nb >= NT_MIN_BYTES)
                at = base + L_SLOTS + 2 * slot
                ctl[at] = off
                ctl[at + 1] = nb
                if slot >= nslots:
                    nslots = slot + 1
                off += (nb + 63) & ~63
                if i == 0 and self.others and self.fault_points:
                    faults.hit("mid_transfer")  # fault injection (tests): first payload written
        elif self.others and self.fault_points:
            faults.hit("mid_transfer")
        self._describe(nslots, total)
        ctl[base + L_PUB] = self.key

    def _describe(self, nslots: int, nbytes: int) -> None:
        ctl, base = self.g.ctl, self.base
        self.g.fp_words.write(ctl, base, self.fp, self.variant)
        ctl[base + L_NSLOTS] = nslots
        ctl[base + L_NBYTES] = nbytes

    def gathered(self) -> bool:
        key, at = self.key, self.base + L_PUB
        peer = self.g.peer
        for r in self.needs:
            if peer(r).ctl[at] != key:
                return False
        return True

    def _missing(self) -> tuple[int, ...]:
        return tuple(r for r in self.needs if self.g.peer(r).ctl[self.base + L_PUB] != self.key)

    # -- reading -------------------------------------------------------------------------------------
    def src(self, r: int, slot: int, nbytes: int) -> tuple[Segment, int]:
        """Where rank ``r`` published ``slot`` (segment, offset), checked to hold ``nbytes``."""
        g, base = self.g, self.base
        if r == self.me:
            ctl, seg = g.ctl, g.lanes[self.lane][1]
        else:
            p = g.peer(r)
            ctl = p.ctl
            seg = p.lane_segment(self.lane, base)
        if slot >= ctl[base + L_NSLOTS]:
            raise WireError(f"{self.name}: rank {r} published no block for slot {slot}: the ranks disagree "
                            "on the number of slots")
        at = base + L_SLOTS + 2 * slot
        off, nb = ctl[at], ctl[at + 1]
        if nb != nbytes or off < 0 or off + nb > seg.size:
            raise WireError(f"{self.name}: rank {r} published {nb} bytes at offset {off} for slot {slot}, "
                            f"this rank expects {nbytes} inside a segment of {seg.size} bytes")
        return seg, off

    def write(self, outs: list[torch.Tensor]) -> None:
        """Write the outputs into ``outs`` (the user's tensors, or a stash shaped like them)."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _copy_out(out: torch.Tensor, where: tuple[Segment, int]) -> None:
    nb = _nbytes(out)
    native.copy_ptr(out.data_ptr(), where[0].addr + where[1], nb, nb >= NT_MIN_BYTES)


def _reduce_into(op: ReduceOp, out: torch.Tensor, wheres: list[tuple[Segment, int]], scratch_for) -> None:
    """``out = fold(op, [the published tensors at wheres])`` (ascending rank order)."""
    nb = _nbytes(out)
    if nb == 0:
        return
    numel, dtype = out.numel(), out.dtype
    nt = nb >= NT_MIN_BYTES
    if len(wheres) == 1 and op is not ReduceOp.AVG and accumulator_dtype(dtype) is dtype:
        # a fold of one input is a copy of it (16-bit floats are not: the float32 round trip
        # re-encodes NaNs; AVG is not: x / 1 quiets a signalling NaN)
        native.copy_ptr(out.data_ptr(), wheres[0][0].addr + wheres[0][1], nb, nt)
        return
    if op in (ReduceOp.SUM, ReduceOp.AVG) and native.sum_ptr(dtype, out.data_ptr(),
                                                            [s.addr + o for s, o in wheres], numel, nt):
        if op is ReduceOp.AVG:
            torch.div(out, torch.tensor(len(wheres), dtype=dtype), out=out)
        return
    inputs = [s.bytes[o:o + nb].view(dtype) for s, o in wheres]
    fold_into(op, inputs, out.view(-1), scratch_for(numel), nt)


class _AllReduce(ShmOp):
    opcode = OpCode.ALL_REDUCE

    def __init__(self, g, ctx, tensor, op):
        super().__init__(g, ctx, tensor.dtype, int(op))
        self.tensor, self.op = tensor, ReduceOp(op)
        self.outputs = [tensor]
        self.needs = self.others

    def sends(self):
        return [(0, self.tensor)]

    def write(self, outs):
        nb = _nbytes(self.tensor)
        _reduce_into(self.op, outs[0], [self.src(r, 0, nb) for r in self.active], self.g.scratch_for)


class _Reduce(_AllReduce):
    opcode = OpCode.REDUCE

    def __init__(self, g, ctx, tensor, op, root):
        super().__init__(g, ctx, tensor, op)
        self.root = root
        if ctx.fingerprint is None:
            self.fp = Fingerprint(self.opcode, self.dtype_code, self.redop, root)
        if self.me != root:
            self.outputs, self.needs = [], ()
        else:
            self.needs = self.others

    def write(self, outs):
        if self.me == self.root:
            super().write(outs)


class _Broadcast(ShmOp):
    opcode = OpCode.BROADCAST

    def __init__(self, g, ctx, tensor, root):
        super().__init__(g, ctx, tensor.dtype, 0, root)
        self.tensor = tensor
        if self.me == root:
            self.needs = ()
        else:
            self.needs, self.outputs = (root,), [tensor]

    def sends(self):
        return [(0, self.tensor)] if self.me == self.root else []

    def write(self, outs):
        if self.me != self.root:
            _copy_out(outs[0], self.src(self.root, 0, _nbytes(self.tensor)))


def _fill(outs: list[torch.Tensor], present: set[int], where) -> None:
    for s, out in enumerate(outs):
        if s in present:
            _copy_out(out, where(s, _nbytes(out)))
        else:
            out.zero_()


class _AllGather(ShmOp):
    opcode = OpCode.ALL_GATHER

    def __init__(self, g, ctx, outputs, tensor):
        super().__init__(g, ctx, tensor.dtype)
        self.tensor = tensor
        self.outputs = list(outputs)
        self.needs = self.others

    def sends(self):
        return [(0, self.tensor)]

    def write(self, outs):
        _fill(outs, set(self.active), lambda s, nb: self.src(s, 0, nb))


class _Gather(_AllGather):
    opcode = OpCode.GATHER

    def __init__(self, g, ctx, outputs, tensor, root):
        super().__init__(g, ctx, outputs or [], tensor)
        self.root = root
        if ctx.fingerprint is None:
            self.fp = Fingerprint(self.opcode, self.dtype_code, self.redop, root)
        if self.me != root:
            self.outputs, self.needs = [], ()

    def write(self, outs):
        if self.me == self.root:
            super().write(outs)


class _Scatter(ShmOp):
    opcode = OpCode.SCATTER

    def __init__(self, g, ctx, tensor, inputs, root):
        super().__init__(g, ctx, tensor.dtype, 0, root)
        self.tensor, self.inputs = tensor, inputs
        self.outputs = [tensor]
        self.needs = () if self.me == root else (root,)

    def sends(self):
        if self.me != self.root:
            return []
        return [(r, self.inputs[r]) for r in self.active]

    def write(self, outs):
        _copy_out(outs[0], self.src(self.root, self.me, _nbytes(self.tensor)))


class _ReduceScatter(ShmOp):
    opcode = OpCode.REDUCE_SCATTER

    def __init__(self, g, ctx, output, inputs, op):
        super().__init__(g, ctx, output.dtype, int(op))
        self.output, self.inputs, self.op = output, inputs, ReduceOp(op)
        self.outputs = [output]
        self.needs = self.others

    def sends(self):
        return [(r, self.inputs[r]) for r in self.active]

    def write(self, outs):
        nb = _nbytes(self.output)
        _reduce_into(self.op, outs[0], [self.src(r, self.me, nb) for r in self.active], self.g.scratch_for)


class _AllToAll(ShmOp):
    opcode = OpCode.ALL_TO_ALL

    def __init__(self, g, ctx, outputs, inputs):
        dtype = inputs[0].dtype if inputs else (outputs[0].dtype if outputs else None)
        super().__init__(g, ctx, dtype)
        self.inputs = inputs
        self.outputs = list(outputs)
        self.needs = self.others

    def sends(self):
        return [(r, self.inputs[r]) for r in self.active]

    def write(self, outs):
        _fill(outs, set(self.active), lambda s, nb: self.src(s, self.me, nb))


class _Barrier(ShmOp):
    opcode = OpCode.BARRIER

    def __init__(self, g, ctx):
        super().__init__(g, ctx)
        self.needs = self.others


class _RingAllReduce(_AllReduce):
    """Pipelined reduce-scatter + copy-out for large all_reduce (see the module docstring)."""

    def __init__(self, g, ctx, tensor, op):
        super().__init__(g, ctx, tensor, op)
        n = len(self.active)
        self.flat = tensor.reshape(-1)
        numel = self.flat.numel()
        self.elt = tensor.element_size()
        per = _align(math.ceil(numel / n), ALIGN)
        self.parts = {r: (min(numel, i * per), min(numel, (i + 1) * per)) for i, r in enumerate(self.active)}
        self.chunk = max(ALIGN, CHUNK_BYTES // self.elt // ALIGN * ALIGN)
        self.chunk_bytes = self.chunk * self.elt
        self.pos = {r: i for i, r in enumerate(self.active)}
        lo, hi = self.parts[self.me]
        self.n_in = math.ceil((hi - lo) / self.chunk)
        self.n_out = {r: math.ceil((self.parts[r][1] - self.parts[r][0]) / self.chunk) for r in self.others}
        self.w_next = {r: 0 for r in self.others}
        self.f_next = 0
        self.red = False
        self.mid_hit = False
        self.ring_stride = RING_DEPTH * self.chunk_bytes
        self.variant = VARIANT_RING

    def _bounds_problem(self, r: int) -> str | None:
        """Rank ``r``'s ring must hold a ring per reader (the result region is checked when read)."""
        try:
            size = self.g.peer(r).ring_segment().size
        except SegmentError as exc:
            return f"its ring cannot be mapped: {exc}"
        need = len(self.others) * self.ring_stride
        return None if size >= need else f"a ring segment of {size} bytes, {need} needed"

    def _ring_index(self, writer: int, reader: int) -> int:
        """Where the ring (writer -> reader) sits among the writer's rings."""
        i = self.pos[reader]
        return i - 1 if self.pos[writer] < i else i

    def publish(self):
        g, base, ctl, lay = self.g, self.base, self.g.ctl, self.g.layout
        lo, hi = self.parts[self.me]
        g.lane_segment(self.lane, max(1, (hi - lo) * self.elt))
        ctl[base + L_RESULT_OFF] = 0
        self.ring = g.ring_segment(max(1, len(self.others)) * self.ring_stride)
        for r in self.others:
            ctl[lay.rc_cnt + r] = 0
            ctl[lay.rc_key + r] = self.key
            ctl[lay.rw_cnt + r] = 0
            ctl[lay.rw_key + r] = self.key
        self._describe(0, _nbytes(self.tensor))
        ctl[base + L_PUB] = self.key

    def _stream(self) -> bool:
        """Write ring chunks and fold my part's chunks while possible; True if anything moved."""
        g, lay, key, me = self.g, self.g.layout, self.key, self.me
        ctl = g.ctl
        moved = False
        elt, base_ptr = self.elt, self.flat.data_ptr()
        for r in self.others:
            j = self.w_next[r]
            if j >= self.n_out[r]:
                continue
            if j >= RING_DEPTH:
                pc = g.peer(r).ctl
                if pc[lay.rc_key + me] != key or pc[lay.rc_cnt + me] < j - RING_DEPTH + 1:
                    continue
            lo, hi = self.parts[r]
            a = lo + j * self.chunk
            b = min(hi, a + self.chunk)
            off = self._ring_index(me, r) * self.ring_stride + (j % RING_DEPTH) * self.chunk_bytes
            native.copy_ptr(self.ring.addr + off, base_ptr + a * elt, (b - a) * elt)
            if j == 0 and not self.mid_hit:
                self.mid_hit = True
                faults.hit("mid_transfer")  # fault injection (tests): first chunk written
            ctl[lay.rw_cnt + r] = j + 1
            self.w_next[r] = j + 1
            g.wake((r,))
            moved = True
            g.moves += 1
        j = self.f_next
        if j < self.n_in:
            for r in self.others:
                pc = g.peer(r).ctl
                if pc[lay.rw_key + me] != key or pc[lay.rw_cnt + me] < j + 1:
                    return moved
            lo, hi = self.parts[me]
            a = lo + j * self.chunk
            b = min(hi, a + self.chunk)
            nb = (b - a) * elt
            slot_off = (j % RING_DEPTH) * self.chunk_bytes
            dtype = self.tensor.dtype
            res_seg = g.lanes[self.lane][1]
            res_ptr = res_seg.addr + (a - lo) * elt
            ptrs = []
            for r in self.active:
                if r == me:
                    ptrs.append(base_ptr + a * elt)
                else:
                    ptrs.append(g.peer(r).ring_segment().addr + self._ring_index(r, me) * self.ring_stride
                                + slot_off)
            if not (self.op is ReduceOp.SUM and native.sum_ptr(dtype, res_ptr, ptrs, b - a, nt=True)):
                inputs = []
                for r in self.active:
                    if r == me:
                        inputs.append(self.flat[a:b])
                    else:
                        seg = g.peer(r).ring_segment()
                        off = self._ring_index(r, me) * self.ring_stride + slot_off
                        inputs.append(seg.bytes[off:off + nb].view(dtype))
                res = res_seg.bytes[(a - lo) * elt:(b - lo) * elt].view(dtype)
                fold_into(self.op, inputs, res, g.scratch_for(b - a), nt=True)
            for r in self.others:
                ctl[lay.rc_cnt + r] = j + 1
            self.f_next = j + 1
            g.wake(self.others)
            moved = True
            g.moves += 1
        return moved

    def gathered(self) -> bool:
        while self._stream():
            pass
        if self.f_next < self.n_in or any(self.w_next[r] < self.n_out[r] for r in self.others):
            return False
        if not self.red:
            self.red = True
            self.g.ctl[self.base + L_RED] = self.key
            self.g.wake(self.others)
        key, at = self.key, self.base + L_RED
        for r in self.others:
            if self.g.peer(r).ctl[at] != key:
                return False
        return True

    def _missing(self):
        return tuple(r for r in self.others if self.g.peer(r).ctl[self.base + L_RED] != self.key)

    def write(self, outs):
        g, elt = self.g, self.elt
        out_ptr = outs[0].data_ptr()
        for r in self.active:
            lo, hi = self.parts[r]
            nb = (hi - lo) * elt
            if r == self.me:
                src = g.lanes[self.lane][1].addr
            else:
                seg = g.peer(r).lane_segment(self.lane, self.base)
                if nb > seg.size:
                    raise WireError(f"{self.name}: rank {r}'s result region holds {seg.size} bytes, "
                                    f"its part {nb}")
                src = seg.addr
            native.copy_ptr(out_ptr + lo * elt, src, nb, nb >= NT_MIN_BYTES)


# ======================================================================================== the plane

class FastCpuGroup:
    """The ``PlaneGroup`` handed to the control plane: shared memory between the ranks of this host;
    an operation whose view has a rank on another host runs hybrid (``hybrid.py``: UCX to those ranks)."""

    def __init__(self, info):
        self.info = info
        # read per group (tests and benchmarks compare settings within one process)
        self.pipeline_min = int(os.environ.get("MOONCAKE_FAST_CPU_PIPELINE_MIN", PIPELINE_MIN_BYTES))
        self.ring_min_ranks = int(os.environ.get("MOONCAKE_FAST_CPU_RING_MIN_RANKS", RING_MIN_RANKS))
        self.shm = ShmGroup(info)
        from .hybrid import transport
        self._hybrid_transport = transport(self.shm)  # carries the operations that span hosts
        self.p2p = None
        from . import p2p
        self._p2p_reason = p2p.unavailable_reason()
        try:
            if self._p2p_reason is None:
                self.p2p = p2p.ShmP2P(self.shm)
            self.add_ranks({r: a for r, a in info.addresses.items() if r != info.rank})
        except BaseException:
            if self.p2p is not None:
                self.p2p.close()
            self.shm.close()
            raise

    @property
    def remote_ranks(self) -> list[int]:
        """The group's ranks known to run on other hosts (reached over UCX)."""
        return sorted(self.shm.remote)

    @property
    def hybrid(self) -> str | None:
        """How an operation spanning hosts moves its data, once the group has a rank on another host."""
        if not self.shm.remote:
            return None
        return (f"hybrid: rank(s) {self.remote_ranks} run on other hosts and are reached over UCX; ranks of "
                "this host over shared memory")

    @property
    def p2p_delegate(self) -> str | None:
        """Why P2P between two ranks of this host goes through the ref plane (UCX) instead of shared
        memory, or None."""
        return self._p2p_reason

    # ---- point to point (p2p.py): None means "use the ref plane" ----------------------------------
    def _p2p_local(self, rank: int) -> bool:
        return self.p2p is not None and rank not in self.shm.remote

    def p2p_send(self, tensor, dst, tag, seq):
        """Post message ``seq`` of (this rank, ``dst``, ``tag``) through shared memory; ``tensor`` is
        contiguous and unchanged until the op completes.  None (use the ref plane) when ``dst`` runs on
        another host or ``p2p_delegate`` is set."""
        return self.p2p.send(tensor, dst, tag, seq) if self._p2p_local(dst) else None

    def p2p_recv(self, tensor, src, tag, seq):
        """Post the receive of message ``seq`` of (``src``, this rank, ``tag``) into the contiguous
        ``tensor``.  None as for ``p2p_send``."""
        return self.p2p.recv(tensor, src, tag, seq) if self._p2p_local(src) else None

    def p2p_recv_any(self, tensor, sources, tag, take_seq, peek_seq, ref_ctx):
        """Post a receive of the next message with ``tag`` from any of ``sources`` (each one's FIFO
        kept: ``peek_seq(src)`` / ``take_seq(src)`` read / consume the seq expected next from it); the
        op's ``source_rank()`` names the sender.  None when every source runs on another host or
        ``p2p_delegate`` is set; sources on both sides of a host boundary: ``hybrid.MixedRecvAny``, its
        UCX side in the ref plane's P2P context ``ref_ctx``."""
        if self.p2p is None:
            return None
        local = [r for r in sources if r not in self.shm.remote]
        remote = [r for r in sources if r in self.shm.remote]
        if not local:
            return None
        if not remote:
            return self.p2p.recv_any(tensor, sources, tag, take_seq, peek_seq)
        from .hybrid import MixedRecvAny
        return MixedRecvAny(self.p2p, ref_ctx, tensor, local, remote, tag, take_seq, peek_seq)

    def _ref(self):
        from ...ref import collectives as ref
        return ref

    def _spans_hosts(self, ctx) -> bool:
        return any(r in self.shm.remote for r in ctx.view.active)

    def _hybrid(self, ctx):
        """``ctx`` for the ref plane's operation, its messages carried by the hybrid transport."""
        return dataclasses.replace(ctx, transport=self._hybrid_transport)

    def _run(self, op: ShmOp) -> ShmOp:
        return self.shm.enqueue(op)

    def all_reduce(self, ctx, tensor, op):
        if self._spans_hosts(ctx):
            return self._ref().all_reduce(self._hybrid(ctx), tensor, op)
        big = _nbytes(tensor) >= self.pipeline_min and len(ctx.view.active) >= self.ring_min_ranks
        return self._run((_RingAllReduce if big else _AllReduce)(self.shm, ctx, tensor, op))

    def broadcast(self, ctx, tensor, root):
        if self._spans_hosts(ctx):
            return self._ref().broadcast(self._hybrid(ctx), tensor, root)
        return self._run(_Broadcast(self.shm, ctx, tensor, root))

    def reduce(self, ctx, tensor, op, root):
        if self._spans_hosts(ctx):
            return self._ref().reduce(self._hybrid(ctx), tensor, op, root)
        return self._run(_Reduce(self.shm, ctx, tensor, op, root))

    def all_gather(self, ctx, outputs, tensor):
        if self._spans_hosts(ctx):
            return self._ref().all_gather(self._hybrid(ctx), outputs, tensor)
        return self._run(_AllGather(self.shm, ctx, outputs, tensor))

    def gather(self, ctx, outputs, tensor, root):
        if self._spans_hosts(ctx):
            return self._ref().gather(self._hybrid(ctx), outputs, tensor, root)
        return self._run(_Gather(self.shm, ctx, outputs, tensor, root))

    def scatter(self, ctx, tensor, inputs, root):
        if self._spans_hosts(ctx):
            return self._ref().scatter(self._hybrid(ctx), tensor, inputs, root)
        return self._run(_Scatter(self.shm, ctx, tensor, inputs, root))

    def reduce_scatter(self, ctx, output, inputs, op):
        if self._spans_hosts(ctx):
            return self._ref().reduce_scatter(self._hybrid(ctx), output, inputs, op)
        return self._run(_ReduceScatter(self.shm, ctx, output, inputs, op))

    def all_to_all(self, ctx, outputs, inputs):
        if self._spans_hosts(ctx):
            return self._ref().all_to_all(self._hybrid(ctx), outputs, inputs)
        return self._run(_AllToAll(self.shm, ctx, outputs, inputs))

    def barrier(self, ctx):
        if self._spans_hosts(ctx):
            return self._ref().barrier(self._hybrid(ctx))
        return self._run(_Barrier(self.shm, ctx))

    def add_ranks(self, addresses: dict[int, bytes]) -> None:
        self.shm.add_ranks(addresses)
        if self.p2p is not None:
            self.p2p.attach()

    def close(self) -> None:
        if self.p2p is not None:
            self.p2p.close()
        self.shm.close()
