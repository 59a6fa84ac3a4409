"""PG collectives on CUDA tensors between the ranks of one host: shared device lanes, host control words.

``open_group(info)`` returns the ``PlaneGroup`` (``mooncake.control.plane``) for a group whose tensors are
on CUDA.  It takes the caller's CUDA tensors as they are (``takes_device_tensors``: the PG face need not
stage them through host memory) and gives the bits of the ref plane / ``mooncake.model``.

Memory.  Each rank owns, per group, two *lanes* (operation ``seq`` uses lane ``seq % 2``): device memory
made with ``cuMemCreate`` and exported as a file descriptor (``mooncake.fast.cuda.shared``); peers map it and
view it as a torch tensor (``__cuda_array_interface__``).  A mapping keeps the memory alive, so a peer that
dies while others read its lane leaves them reading valid memory.  A lane grows (a new buffer, a new
generation) only while every peer has released it.  Each rank also owns a small host *control* segment (a
``memfd``, attached by peers through ``/proc``: ``mooncake.fast.cpu.segment``) with one block of int64 words
per lane; only its owner writes them (except the wake-up futex):

    PUB   key of the operation whose payload is in the lane (written once the copy has completed on the GPU)
    DONE  key of the operation whose every payload this rank now holds in private memory (the commit round)
    HOLD / FREE   key of the operation whose peers' lanes this rank started / finished reading
    META, NSLOTS, NBYTES, slot table (offset, bytes per slot), GEN, SIZE, HANDLE (the lane's share handle)

``key = epoch << 40 | seq``.  An operation, on the caller's current CUDA stream ``S`` (remembered per
``seq``, so a re-post after a failure uses it too):

1. **post**: once every active peer has released this lane (``FREE >= HOLD`` or it holds this operation
   already), enqueue the copy of this rank's payload(s) into its lane on ``S``, write the slot table and
   record an event; once the event has completed, write ``PUB = key``.
2. **read**: once every peer whose payload this rank needs has ``PUB = key`` (and posted the same opcode,
   dtype, reduce op and root), write ``HOLD = key`` and enqueue on ``S`` the computation of this rank's
   outputs into fresh private tensors (the *stash*), reading the peers' lanes directly: reductions are
   ``mooncake.model.reduce.fold`` run on the GPU tensors (ascending active-rank order seeded with the
   lowest, float32 accumulators for 16-bit floats, AVG as the model); slots are copies; inactive slots
   stay zero.  Record an event.
3. **data complete**: the event has completed: ``FREE = key`` (peers may reuse their lanes) and
   ``DONE = key``.
4. **committed**: every other active rank has ``DONE = key``.  ``finish()`` enqueues the copies of the
   stash into the user's tensors on ``S``; ``abandon()`` drops the stash.  The user's tensors are written
   by ``finish`` only, so a failed operation leaves them untouched and may be re-posted with them.  The
   one exception keeps that promise: all_reduce writes a contiguous tensor in place as soon as its result
   is computed, and ``abandon()`` copies this rank's input back from its lane (or from a copy of it, saved
   when a later operation took the lane before this one was finished).

Operations advance in order of ``seq``: one starts posting once the previous one is committed here (a
committed operation holds its results in its stash, so it never blocks its peers while unfinished).

Large all_reduce (``PARTS_MIN_BYTES`` and up, 2+ ranks) has two phases: in step 2 each active rank folds
only its part (a contiguous range of elements) from every lane into a result region of its own lane and
announces it (``RED = key``); once every part is announced each rank copies all parts into its tensor.  Per
rank that reads the tensor about once for the fold, whatever the number of ranks.

The fold.  Floating-point SUM / AVG / PRODUCT / MIN / MAX fold in one kernel (``csrc/mooncake_pg_cuda.cu``:
every input read once, the output written once, the host-fold flag below computed on the way); other
reductions run the model's torch ops (``MOONCAKE_FAST_CUDA_FOLD=torch`` forces those everywhere).

Same bits as the CPU.  Elementwise IEEE additions, multiplications, divisions and comparisons of finite
values give the same bits on the GPU as on the CPU (no FMA: the kernel's operations are explicitly rounded,
the torch fold is separate ops).  Two things may
not: NaN encodings (GPU arithmetic may write a canonical NaN where the CPU propagates an operand's payload,
and the CPU's own vector and scalar loops differ) and MIN/MAX of ``+0.0`` against ``-0.0`` (the CPU's vector
loop returns the second operand, its scalar loop the first).  So a floating-point reduction whose result holds a
NaN (or, for MIN/MAX, a zero) is folded again on the host from the same held inputs, exactly as the ref
plane folds (``MOONCAKE_FAST_CUDA_EXACT_HOST=auto``; ``always`` / ``never`` for tests).  The check is one
extra read of the result on the GPU (a float64 sum: NaN iff some element is NaN, or an inf - inf, which only
costs a needless host fold), or none where the fold kernel checks its outputs as it writes them.

Waiting.  ``progress()`` never blocks.  ``op.wait(timeout_s)`` blocks until the operation is committed, a
peer is newly found dead or the timeout passes: while this rank's own GPU work is pending it polls that
CUDA event for up to ``SPIN_S`` (a small operation's work is done by then) and then sleeps on it
(blocking-sync; ``DEVICE_SPIN_S`` for a launch of the device path, which waits for the peers on the GPU);
else it spins ``SPIN_S`` and sleeps on a process-shared futex in the control segment that
peers bump when they change a word.  No GPU kernel ever waits for a peer (the GPU only gets work once
its inputs are published), so a dead peer can never leave a stuck kernel.  Liveness: a pidfd per peer
(``/proc/<pid>/stat`` where ``pidfd_open`` fails) and its CLOSED word.  An idle group runs nothing.

Groups with a rank on another host use the ref plane (UCX) over host copies of the tensors.  A tensor
handed over on the CPU (a PG face that stages through host memory) also goes to the ref plane.

Measured (one H100, R ranks under MPS; benchmarks/results/cuda/pg): every collective bitwise equal to the
model and to ref for R = 1..8; all_reduce of 256 MiB at 2.85x the HBM floor for R = 8, 4.58x for R = 2
(about 5 N bytes moved per rank where 2 N would do, and three host-observed phase boundaries per operation).

Streams and devices.  The PG face's ``Work.wait()`` orders the caller's current stream after the stream the
outputs were written on.  A peer on another GPU of the host is served too: its lanes are opened with peer
access and viewed as tensors of this rank's device, so this rank's fold and copies read them over NVLink / PCIe.

The device path.  A small in-place all_reduce (``DEVICE_MAX_BYTES``, a kernel-folded dtype and op, every
earlier operation committed here, every peer's lane already big enough) runs the same protocol in one launch
with no host step: every rank's control segment is registered with the device (``cudaHostRegister``), and the
kernel (``csrc/mooncake_pg_cuda.cu``, "device protocol") waits for the peers' release of the lane, copies the
input into the lane, writes the fingerprint and PUB, waits for every peer's PUB (comparing fingerprints),
writes HOLD, folds every lane into the tensor, then FREE and DONE: the same words with the same keys, so a
peer on the host protocol and one on the device path serve each other.  Every wait of the kernel is bounded
(``DEVICE_WAIT_S``, GPU clock); a kernel that gives up leaves the words as far as it got (nothing, or PUB:
the output untouched) and the host protocol carries on from there, with its liveness checks, agreement and
re-posts.  The host only launches, then reads the words once the launch's event completed; a result the kernel
flags (a NaN, a MIN/MAX zero) is folded again on the host as above.  ``MOONCAKE_FAST_CUDA_DEVICE=off`` turns
it off (``on`` also in the CPU emulation, where the kernel's steps run on the host).

The quick lane.  A blocking eager all_reduce that the device path already launched in the same shape (lane
parity, data pointer, element count, dtype, reduce op, stream, view epoch) is posted by the PG face's quick lane
(``mooncake.pg.quick``) without an op object: ``quick_entry`` checks that nothing the launch relies on changed
(no earlier operation here, the same lane buffers: their generations), ``quick_post`` writes the lane's host
words only if another operation wrote them since, and launches the kernel with the arguments kept from the
last launch, recording a library event (``MOONCAKE_FAST_CUDA_QUICK=off`` turns the lane off).  ``quick_wait``
spins in the library, without the GIL, until every active rank's DONE holds the key (committed: the face
commits it in the membership) or the launch is over without that; then, or on anything unusual, the face
hands the operation over (``quick_handover``): it becomes the ``_AllReduce`` that ``post`` would have left,
with the launch's event, and the host protocol goes on from its words as for any launch of the device path.

CUDA graphs.  all_reduce, reduce_scatter_tensor, all_gather_into_tensor (and all_gather into a list),
all_to_all_single (equal splits), broadcast, reduce, gather and scatter issued while the caller's stream is
captured (``torch.cuda.graph``) are enqueued as one launch of the device path's kernel (``_shape`` says what it copies
in and reads; the fold is the eager all_reduce's) on dedicated lanes (``GRAPH_LANES``) and keys ``epoch << 40
| GRAPH_BIT | n``, n read at run time from the count word (``W_GRAPH_COUNT``: the view epoch and the number of
captured ops run in it; every replay has fresh keys, all ranks replay in step, and a new view starts at 0).
Captured ops keep their words (the graph lanes' blocks, count, epoch, trouble) in the rank's *pad*: device
memory with the control segment's word layout, published like a lane (block ``PAD_LANE``), so their waits
read device memory rather than host memory across PCIe.  Lanes and the pad are allocated and peers' opened
while capturing (relaxed capture mode); replaced lanes, and the control words, lanes and pad of a replaced
peer, stay mapped while the group lives, since older graphs hold their addresses.  A captured op that waits
past the group's timeout, or sees a peer's call differ, writes its key into the trouble word
(``W_GRAPH_TROUBLE``) of every active rank, in its pad and in its host words; every later captured op of that
view then exits at once, on every rank.  The PG face sets the epoch word (``W_GRAPH_EPOCH``, host and pad)
whenever it adopts a new view: an op captured under an older one exits at once and leaves its key in the
host stale word (``W_GRAPH_STALE``).  The host reads trouble and stale in its host words only.  The group's
next call raises (``check_graphs`` in the PG face): no re-post inside a graph, the replay's outputs are not
valid.  Concurrent captured ops of one group (forked streams inside a
graph) would share the lanes: a group's captured ops must be ordered on one stream.

Tensors in place: a captured in-place all_reduce in parts whose tensor lies in pool memory (``pool.py``,
``mooncake.pg.mem_pool``) on every rank runs on the ranks' tensors (``KIND_ALL_REDUCE_DIRECT``): at capture
each rank offers its pool segment's handle and the tensor's offset (``capture_offer``, carried by the
capture check's Store record), and where every active rank offered one, each maps its peers' segments
(``capture_prepare``) and the PG face runs a second round in which the ranks learn whether all could; only
then does the kernel read and write the tensors themselves, no lane (else every rank takes the lanes).
Each graph captured on a peer's segment holds it (a CUDA user object, ``_PoolMap``); the group's next collective
after the last such graph is destroyed unmaps it (``release_pool_maps``), so that freeing the pool on its
owner gives the memory back to the device.

Not done: zero-copy for eager operations (a re-post needs the input, so they keep their lane copy), the
device path for the other eager collectives and for large eager all_reduce, capture of uneven all_to_all
splits, list forms of reduce_scatter and all_to_all, barrier and P2P.

Test mode: ``MOONCAKE_FAST_CUDA_EMULATE=cpu`` runs the same protocol on CPU tensors with lanes in shared
memory and GPU events that complete after ``MOONCAKE_FAST_CUDA_EMULATE_LAG`` queries (tests/fast_cuda).

Fault injection (tests): with ``MOONCAKE_FAST_CUDA_STALL_WORD=1`` every launch reads the rank's stall word
(``W_STALL``, ``_DevicePath.set_stall``) right before it publishes and waits that many nanoseconds: a peer that
is late past its peers' deadline while they wait, read or write (tests/fast_cuda/pg_graph.py, ``late``).

Profiling: ``MOONCAKE_FAST_CUDA_TRACE=1`` makes every single-block launch write, per op, the GPU's global
timer and its SM's clock at each step of the protocol (start, go, lane released, published, peers published,
read, finished) into a device buffer that ``_DevicePath.trace_records`` reads (tests/fast_cuda/pg_profile.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import select
import struct
import threading
import time
from datetime import timedelta
from typing import NamedTuple, Sequence

import torch

from ... import log
from ...control import faults
from ...control.auth import AuthError
from ...control.streams import current_stream, is_current
from ...control.procs import exited, process_state
from ...control.errors import MismatchError, MooncakeError, WireError
from ...control.fingerprint import Fingerprint, LaneWords
from ...control.wire import OpCode
from ...model.reduce import DTYPE_CODES, ReduceOp, fold
from ..cpu import native
from ..cpu.segment import Segment, SegmentError, host_identity
from . import pool, shared

EMULATE_ENV = "MOONCAKE_FAST_CUDA_EMULATE"
EXACT_HOST_ENV = "MOONCAKE_FAST_CUDA_EXACT_HOST"
FOLD_ENV = "MOONCAKE_FAST_CUDA_FOLD"  # "kernel" (default): csrc's one-pass fold; "torch": one torch op per input

SPIN_S = float(os.environ.get("MOONCAKE_FAST_CUDA_SPIN_US", 50)) * 1e-6
# a launch of the device path waits on the GPU for its peers: its host polls it this long before sleeping
DEVICE_SPIN_S = float(os.environ.get("MOONCAKE_FAST_CUDA_DEVICE_SPIN_US", 1000)) * 1e-6
# while the host polls a launch's DONE word(s) (pausing, the GIL released): query its event this often
_DEVICE_POLL_SLICE_S = float(os.environ.get("MOONCAKE_FAST_CUDA_DEVICE_POLL_US", 20)) * 1e-6
SLEEP_SLICE_S = 0.002
LIVENESS_PERIOD_S = 0.002
DEVICE_ENV = "MOONCAKE_FAST_CUDA_DEVICE"  # "auto" (default): the device path on a GPU; "on" (also emulated); "off"
# where captured ops keep their words: "pad" (default, device memory) or "host" (the control words, for
# comparison); every rank of a job must use the same
GRAPH_WORDS_ENV = "MOONCAKE_FAST_CUDA_GRAPH_WORDS"
# "1": single-block launches of the device path record when each step ran (``_DevicePath.trace_records``)
TRACE_ENV = "MOONCAKE_FAST_CUDA_TRACE"
# tests, "1": launches of the device path read this rank's stall word (W_STALL, ns) before publishing: a late peer
STALL_ENV = "MOONCAKE_FAST_CUDA_STALL_WORD"
# "on" (default): a repeated eager all_reduce of the device path is posted and waited for by the quick lane; "off"
QUICK_ENV = "MOONCAKE_FAST_CUDA_QUICK"
#: all_reduce of at most this many bytes may take the device path
DEVICE_MAX_BYTES = int(os.environ.get("MOONCAKE_FAST_CUDA_DEVICE_MAX", 256 << 10))
#: how long a kernel of the device path waits for a peer before the host protocol takes over (eager)
DEVICE_WAIT_S = float(os.environ.get("MOONCAKE_FAST_CUDA_DEVICE_WAIT_MS", 100)) * 1e-3
DEVICE_BLOCK_BYTES = 64 << 10  # the device kernel runs one block per this many bytes (device_blocks)
MAX_BLOCKS_ENV = "MOONCAKE_FAST_CUDA_MAX_BLOCKS"  # at most this many blocks per launch (1 to 1024)
MAX_BLOCKS_DEFAULT = 64
# int32 words of one launch (McPgDevArgs.arrive): a block count and a flag per step (3 steps), then whether the
# first launch of an all_reduce on pool tensors run one launch per step published
ARRIVE_WORDS = 8
MIN_LANE_BYTES = 1 << 20
SHARE_FETCH_S = 5.0  # a peer's server hands over a lane's descriptor within this
#: all_reduce of at least this many bytes (and 2+ ranks) folds one part per rank, then gathers the parts
PARTS_MIN_BYTES = int(os.environ.get("MOONCAKE_FAST_CUDA_PARTS_MIN", 1 << 20))
PART_ALIGN = 256  # elements: part boundaries are multiples of this
SLOT_ALIGN = 256
SEQ_BITS = 40
_STREAMS_KEPT = 256

# ---- control segment layout (int64 words) ------------------------------------------------------
_MAGIC = 0x4D43435530303031  # "MCCU0001"
W_MAGIC, W_VERSION, W_PID, W_CAPACITY, W_CLOSED, W_DEVICE = range(6)
W_FUTEX = 8  # int32 in the low half of word 8: peers bump it to wake this rank
W_SLEEPING = 9
# captured ops: the current view epoch, the key of one that gave up, epoch << 40 | ops run in that epoch, the key
# of one captured under an earlier view (module doc, "CUDA graphs")
W_GRAPH_EPOCH, W_GRAPH_TROUBLE, W_GRAPH_COUNT, W_GRAPH_STALE = 10, 11, 12, 13
W_STALL = 14  # tests (STALL_ENV): nanoseconds this rank's launches wait before publishing
STALL_MAX_NS = 60_000_000_000  # the kernel's bound on that wait, as the emulation's
LANE0 = 16
GRAPH_LANES = (2, 3)  # lanes of captured ops (eager ops use 0 and 1)
PAD_LANE = 4  # the block that publishes the rank's pad (module doc, "CUDA graphs") as if it were a lane
GRAPH_BIT = 1 << (SEQ_BITS - 1)  # in the keys of captured ops
# what one launch of the device path moves (McPgDevArgs.kind): fold kinds, then copy kinds
KIND_ALL_REDUCE, KIND_REDUCE_SCATTER, KIND_ALL_GATHER, KIND_ALL_TO_ALL, KIND_BROADCAST = range(5)
KIND_ALL_REDUCE_PARTS = 5  # a large all_reduce in two phases: every rank folds one part, then gathers the parts
KIND_ALL_REDUCE_DIRECT = 6  # in parts on the ranks' own tensors (pool memory): fold one part into every tensor
_KIND_NAMES = {KIND_ALL_REDUCE: "all_reduce", KIND_REDUCE_SCATTER: "reduce_scatter", KIND_ALL_GATHER: "all_gather",
               KIND_ALL_TO_ALL: "all_to_all", KIND_BROADCAST: "broadcast", KIND_ALL_REDUCE_PARTS: "all_reduce in parts",
               KIND_ALL_REDUCE_DIRECT: "all_reduce on pool tensors"}
# a captured call's kind -> the launch that runs it: reduce is an all_reduce that only its root reads out, gather
# an all_gather that only its root reads, scatter a broadcast of every slot from which each rank reads its own
GRAPH_KINDS = {**{v: k for k, v in _KIND_NAMES.items() if k not in (KIND_ALL_REDUCE_PARTS, KIND_ALL_REDUCE_DIRECT)},
               "reduce": KIND_ALL_REDUCE, "gather": KIND_ALL_GATHER,
               "scatter": KIND_BROADCAST}
L_PUB, L_META, L_NSLOTS, L_NBYTES, L_GEN, L_SIZE, L_DONE, L_HOLD, L_FREE, L_RED, L_RESULT = range(11)
L_HANDLE = 11  # 8 words: the lane's share handle (shared.HANDLE, zero-padded to 64 bytes)
L_META_NUMEL, L_META_SLOTS = 19, 20  # with L_META and the vectors after the slots: the call's fingerprint
L_DRAIN = 21  # an all_reduce on pool tensors: this rank's writes into its peers' tensors are over (the kernel's)
L_SLOTS = 22  # (offset, nbytes) per slot, then the fingerprint's sends[capacity] and recvs[capacity]

_OFFSET = struct.Struct("<q")  # a pool tensor's offset in its segment (capture_offer)
_RECORD = struct.Struct("<QHHiiQ16si16s")  # magic, version, capacity, pid, ctrl fd + size, host, GPU, GPU UUID

QUEUED, DEVICE, PUBLISHING, POSTED, FOLDING, REDUCED, READING, DATA, COMMITTED, FINISHED, ABANDONED = range(11)
_GPU_BUSY = (DEVICE, PUBLISHING, FOLDING, READING)  # states that wait for this rank's own GPU work
_KERNEL_FOLD_OPS = (ReduceOp.SUM, ReduceOp.PRODUCT, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.AVG)
_KERNEL_FOLD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Layout:
    def __init__(self, capacity: int):
        self.capacity = capacity
        lw = (L_SLOTS + 4 * capacity + 7) // 8 * 8
        self.lane = tuple(LANE0 + i * lw for i in range(5))  # eager lanes 0, 1; GRAPH_LANES; PAD_LANE
        self.words = LANE0 + 5 * lw
        self.nbytes = (self.words * 8 + 4095) // 4096 * 4096


def _key(epoch: int, seq: int) -> int:
    if seq >= 1 << SEQ_BITS or epoch >= 1 << (63 - SEQ_BITS):
        raise MooncakeError(f"operation number {seq} / epoch {epoch} out of the CUDA plane's range")
    return (epoch << SEQ_BITS) | seq


def _align(n: int, a: int = SLOT_ALIGN) -> int:
    return (n + a - 1) // a * a


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record_key(prefix: str, rank: int) -> str:
    return f"{prefix}/fast-cuda/{rank}"


def unreachable_pair(devices, peer_access) -> tuple[int, int] | None:
    """Two of ``devices`` (GPU ordinals of one host's ranks) of which the first cannot map the second's memory
    (``peer_access(a, b)`` not True), lowest first; None when every rank can read every other's lanes.  Every
    rank asks about the same devices, so all decide alike."""
    ordered = sorted(devices)
    for a in ordered:
        for b in ordered:
            if a != b and peer_access(a, b) is not True:
                return a, b
    return None


# GPU UUID -> the most ranks of one group this process has seen on that GPU (device_blocks)
_RANKS_ON_GPU: dict[bytes, int] = {}


def max_blocks() -> int:
    """``MAX_BLOCKS_ENV``: the most blocks one launch of the device path may run."""
    raw = os.environ.get(MAX_BLOCKS_ENV, "").strip()
    if not raw:
        return MAX_BLOCKS_DEFAULT
    if not raw.isdigit() or not 1 <= int(raw) <= 1024:
        raise MooncakeError(f"{MAX_BLOCKS_ENV}={raw!r}: expected a whole number of blocks from 1 to 1024")
    return int(raw)


def device_blocks(nbytes: int, sms: int, ranks_on_gpu: int, most: int = MAX_BLOCKS_DEFAULT) -> int:
    """Blocks of one launch of the device path that moves ``nbytes``: one per ``DEVICE_BLOCK_BYTES``, at most
    ``most`` and at most the GPU's ``sms`` shared out among the ``ranks_on_gpu`` ranks that run kernels on it.
    Every rank's blocks of an operation wait for the others', so all must be resident together: one block per
    SM over all ranks is half of what the kernel's launch bounds guarantee, which leaves room for another
    group's operation; ``most`` leaves SMs to the compute that runs beside the collective."""
    cap = max(1, min(most, sms // max(1, ranks_on_gpu)))
    return max(1, min(cap, -(-nbytes // DEVICE_BLOCK_BYTES)))


def numbering_clash(gpus: dict[int, tuple[int, bytes]]) -> str | None:
    """Why one host's ranks cannot share lanes by GPU ordinal (``gpus``: rank -> (ordinal, UUID)): two ranks
    that number the same GPU differently or give one ordinal to two GPUs (their CUDA_VISIBLE_DEVICES differ),
    with the fix; None when the numbering is one.  Every rank reads the same records, so all decide
    alike."""
    by_ordinal: dict[int, tuple[int, bytes]] = {}
    by_uuid: dict[bytes, tuple[int, int]] = {}
    for rank, (ordinal, uuid) in sorted(gpus.items()):
        seen = by_ordinal.setdefault(ordinal, (rank, uuid))
        other = by_uuid.setdefault(uuid, (rank, ordinal))
        if seen[1] != uuid or other[1] != ordinal:
            first = seen[0] if seen[1] != uuid else other[0]
            return (f"ranks {first} and {rank} of this host number their GPUs differently (rank {rank} is on its "
                    f"GPU {ordinal}; their CUDA_VISIBLE_DEVICES differ: give every rank of a host the same one and "
                    "choose its GPU with torch.cuda.set_device(local_rank))")
    return None


def emulated() -> bool:
    return os.environ.get(EMULATE_ENV, "").strip().lower() == "cpu"


def unavailable_reason() -> str | None:
    """Why this process cannot run the CUDA PG plane, or None when it can."""
    from ..cpu import unavailable_reason as shm_reason
    reason = shm_reason()
    if reason:
        return f"the CUDA PG plane keeps its control words in host shared memory: {reason}"
    if emulated():
        return None
    from .lib import load
    lib, reason = load()
    if lib is None:
        return reason
    why = ctypes.c_int(0)
    if not lib.mc_vmm_supported(torch.cuda.current_device(), ctypes.byref(why)):
        return {1: "the CUDA driver lacks the virtual memory management entry points (cuMemCreate & co.)",
                2: "the device does not support CUDA virtual memory management",
                3: "the device cannot export memory as POSIX file descriptors"}.get(why.value, "no shareable memory")
    return None


# ======================================================================================== memory

class _Buffer:
    """A lane's memory: ``addr`` .. ``addr + size``, and how to let it go."""

    def __init__(self, addr: int, size: int, handle: bytes, release, keep=None):
        self.addr, self.size, self.handle = addr, size, handle
        self._release, self._keep = release, keep
        self.view: torch.Tensor | None = None  # uint8 tensor over the whole buffer

    def close(self) -> None:
        self.view = None
        if self._release is not None:
            release, self._release = self._release, None
            release()


class _DevicePointer:
    """Exposes raw device memory to ``torch.as_tensor`` (``__cuda_array_interface__`` v2, no stream)."""

    def __init__(self, addr: int, size: int):
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (addr, False),
                                         "strides": None, "version": 2}


class _CudaMemory:
    """Lanes in shared device memory (``shared``); work on CUDA streams; completion by CUDA events."""

    emulated = False

    def __init__(self):
        from .lib import check, load
        lib, reason = load()
        if lib is None:
            raise MooncakeError(f"CUDA PG plane unavailable: {reason}")
        self.lib, self._check = lib, check
        self.index = torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.fold_kernel = os.environ.get(FOLD_ENV, "kernel").strip().lower() != "torch"
        self.fold_max_inputs = lib.mc_pg_fold_max_inputs()
        self.device_flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._warned_device = False
        uuid = ctypes.create_string_buffer(16)
        check(lib, lib.mc_device_uuid(self.index, uuid), "cuDeviceGetUuid")
        self.uuid = uuid.raw  # the GPU, whatever its ordinal in another process
        sms = ctypes.c_int(0)
        check(lib, lib.mc_sm_count(self.index, ctypes.byref(sms)), "SM count")
        self.sms = sms.value

    def accepts(self, t: torch.Tensor) -> bool:
        if t.is_cuda and t.get_device() != self.index and not self._warned_device:
            self._warned_device = True
            log.logger.warning("the mooncake group's CUDA plane lives on cuda:%d (the current device when the "
                               "group was created) but is given a tensor on %s: every operation copies across "
                               "GPUs and none is captured in a CUDA graph; call torch.cuda.set_device(local_rank) "
                               "before init_process_group / new_group", self.index, t.device)
        return t.is_cuda

    def peer_access(self, device: int, peer: int) -> bool | None:
        """Whether a process on GPU ``device`` can map memory on GPU ``peer`` (None: the driver cannot say)."""
        got = self.lib.mc_vmm_peer_access(device, peer)
        return None if got < 0 else bool(got)

    def caller_stream(self):
        return current_stream(self.index)

    def on(self, stream):
        if is_current(stream):  # the usual case: the caller's stream on this rank's device
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(stream))
        return stack

    def record(self, stream):
        ev = torch.cuda.Event(blocking=True)
        ev.record(stream)
        return ev

    @staticmethod
    def done(ev) -> bool:
        return ev.query()

    @staticmethod
    def sync(ev) -> None:
        ev.synchronize()

    @staticmethod
    def wait_event(stream, ev) -> None:
        stream.wait_event(ev)

    def flag(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.int32).pin_memory()

    def quick_event(self) -> "_RawEvent":
        return _RawEvent(self.lib)

    def quick_post(self, entry: "_QuickEntry", key: int, ev: "_RawEvent") -> None:
        rc = self.lib.mc_pg_dev_post(entry.args_ref, key, entry.blocks, entry.stream_ptr, ev.handle)
        if rc:
            self._check(self.lib, rc, f"device path (all_reduce, {entry.dtype}, {len(entry.active)} ranks)")

    def quick_wait(self, entry: "_QuickEntry", key: int, ev: "_RawEvent", budget_s: float) -> bool:
        rc = self.lib.mc_pg_quick_wait(entry.done_words, len(entry.active), entry.mine, key, ev.handle,
                                       int(budget_s * 1e9), int(_DEVICE_POLL_SLICE_S * 1e9))
        if rc < 0:  # a CUDA error: the op's hand-over meets it again at the event
            log.logger.debug("quick lane: the wait failed with CUDA error %d", -rc)
        return rc == 1

    def can_fold(self, op: ReduceOp, inputs: list[torch.Tensor], out: torch.Tensor | None) -> bool:
        """The one-pass fold kernel takes this reduction: floating dtypes, arithmetic and MIN / MAX ops,
        contiguous inputs of one dtype and size, and ``out`` (None: a fresh tensor) likewise, on this
        rank's device."""
        x = inputs[0]
        return (self.fold_kernel and op in _KERNEL_FOLD_OPS and x.dtype in _KERNEL_FOLD_DTYPES
                and len(inputs) <= self.fold_max_inputs
                and all(t.dtype is x.dtype and t.numel() == x.numel() and t.is_contiguous() for t in inputs)
                and (out is None or (out.device == self.device and out.dtype is x.dtype
                                     and out.numel() == x.numel() and out.is_contiguous())))

    def fold(self, op: ReduceOp, inputs: list[torch.Tensor], out: torch.Tensor, check: bool, stream) -> None:
        """Enqueue ``out <- fold(op, inputs)`` on ``stream`` in one kernel (``can_fold`` said yes); with
        ``check``, ``device_flag`` becomes 1 where the result needs the host fold."""
        ptrs = (ctypes.c_int64 * len(inputs))(*(t.data_ptr() for t in inputs))
        flag = self.device_flag.data_ptr() if check else 0
        rc = self.lib.mc_pg_fold(int(op), DTYPE_CODES[out.dtype], ptrs, len(inputs), out.data_ptr(), out.numel(),
                                 flag, stream.cuda_stream)
        self._check(self.lib, rc, f"fold kernel ({ReduceOp(op).name}, {out.dtype}, {len(inputs)} inputs)")

    def map_host(self, addr: int, size: int) -> int:
        """Register host memory (control words of this or a peer process) for the device; its device address."""
        dev = ctypes.c_int64(0)
        self._check(self.lib, self.lib.mc_host_register(addr, size, self.index, ctypes.byref(dev)),
                    f"cudaHostRegister of {size} bytes of control words")
        return dev.value

    def unmap_host(self, addr: int) -> None:
        self.lib.mc_host_unregister(addr, self.index)

    def store_word(self, addr: int, value: int) -> None:
        """The int64 at device address ``addr`` = ``value``, from any thread, also while another captures
        (waits for nothing else on the device)."""
        self._check(self.lib, self.lib.mc_store64(self.index, addr, value), "writing a word of device memory")

    def load_word(self, addr: int) -> int:
        out = ctypes.c_int64(0)
        self._check(self.lib, self.lib.mc_load64(self.index, addr, ctypes.byref(out)),
                    "reading a word of device memory")
        return out.value

    @contextlib.contextmanager
    def relaxed_capture(self):
        """Allocate / open lanes while this thread captures a CUDA graph (relaxed capture mode)."""
        saved = ctypes.c_int(0)
        self._check(self.lib, self.lib.mc_capture_mode(1, ctypes.byref(saved)), "cudaThreadExchangeStreamCaptureMode")
        try:
            yield
        finally:
            self.lib.mc_capture_mode(0, ctypes.byref(saved))

    def _view(self, buf: _Buffer, owner_device: int | None = None) -> torch.Tensor:
        """A uint8 tensor over ``buf`` on this rank's device.  A lane of a peer on another GPU of the host
        (opened with peer access) gets a view labelled with this device too, so that the fold and the copies
        run here and read the peer's memory over NVLink / PCIe."""
        if owner_device is not None and owner_device != self.index:
            storage = torch._C._construct_storage_from_data_pointer(buf.addr, self.device, buf.size)
            return torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)
        t = torch.as_tensor(_DevicePointer(buf.addr, buf.size), device=self.device)
        if t.data_ptr() != buf.addr or t.dtype is not torch.uint8 or t.numel() != buf.size:
            raise MooncakeError(f"CUDA PG plane: viewing device memory at {buf.addr:#x} gave a tensor at "
                                f"{t.data_ptr():#x} ({t.dtype}, {t.numel()} elements)")
        return t

    def allocate(self, size: int, tag: str) -> _Buffer:
        """At least ``size`` bytes of zeroed device memory that peers map (``attach``) and keep alive."""
        m = shared.allocate(self.lib, self.index, size, tag)
        buf = _Buffer(m.addr, size, m.handle, m.close)
        try:
            buf.view = self._view(buf)
        except BaseException:
            buf.close()
            raise
        return buf

    def attach(self, handle: bytes, size: int, owner: str, owner_device: int) -> _Buffer:
        try:
            m = shared.attach(self.lib, self.index, handle, SHARE_FETCH_S)
        except shared.FetchError as exc:
            raise SegmentError(0, f"{owner}'s lane: {exc}") from None
        if m.size < size:
            m.close()
            raise SegmentError(0, f"{owner}'s lane is {m.size} bytes, its words say {size}")
        buf = _Buffer(m.addr, size, handle, m.close)
        try:
            buf.view = self._view(buf, owner_device)
        except BaseException:
            buf.close()
            raise
        return buf


class _FakeEvent:
    def __init__(self, lag: int):
        self.left = lag

    def query(self) -> bool:
        if self.left > 0:
            self.left -= 1
            return False
        return True

    def synchronize(self) -> None:
        self.left = 0


class _RawEvent:
    """A CUDA event of the library (no torch object per launch): ``query`` / ``synchronize`` as torch's."""

    def __init__(self, lib):
        from .lib import check
        self.lib, self._check = lib, check
        handle = ctypes.c_int64()
        check(lib, lib.mc_event_create(ctypes.byref(handle)), "cudaEventCreate")
        self.handle = handle.value

    def query(self) -> bool:
        rc = self.lib.mc_event_query(self.handle)
        if rc > 0:
            self._check(self.lib, rc, "cudaEventQuery")
        return rc == 0

    def synchronize(self) -> None:
        self._check(self.lib, self.lib.mc_event_sync(self.handle), "cudaEventSynchronize")

    def close(self) -> None:
        if self.handle:
            self.lib.mc_event_destroy(self.handle)
            self.handle = 0


class _EmulatedMemory:
    """Test mode: CPU tensors, lanes in memfd segments, events that complete after a few queries."""

    emulated = True

    def __init__(self):
        self.index = -1
        self.uuid = bytes(16)
        self.sms = 132  # an H100's, so that block counts come out as on one
        self.device = torch.device("cpu")
        self.lag = int(os.environ.get("MOONCAKE_FAST_CUDA_EMULATE_LAG", "1"))

    def accepts(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    @staticmethod
    def peer_access(device: int, peer: int) -> bool:
        return True

    def caller_stream(self):
        return None

    def on(self, stream):
        return contextlib.nullcontext()

    def record(self, stream):
        return _FakeEvent(self.lag)

    @staticmethod
    def done(ev) -> bool:
        return ev.query()

    @staticmethod
    def sync(ev) -> None:
        ev.synchronize()

    @staticmethod
    def wait_event(stream, ev) -> None:
        pass  # CPU: copies are done when they return

    def flag(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.int32)

    def quick_event(self) -> "_FakeEvent":
        return _FakeEvent(0)

    @staticmethod
    def quick_post(entry: "_QuickEntry", key: int, ev: "_FakeEvent") -> None:
        pass  # the kernel's steps ran on the host (_DevicePath.quick_post)

    @staticmethod
    def quick_wait(entry: "_QuickEntry", key: int, ev: "_FakeEvent", budget_s: float) -> bool:
        end = time.monotonic() + budget_s
        words = entry.done_views
        while True:
            if all(ctl[i] == key for ctl, i in words):
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(20e-6)

    @staticmethod
    def can_fold(op: ReduceOp, inputs: list[torch.Tensor], out: torch.Tensor | None) -> bool:
        return False  # CPU tensors: torch ops

    @staticmethod
    def map_host(addr: int, size: int) -> int:
        return addr

    @staticmethod
    def unmap_host(addr: int) -> None:
        pass

    def allocate(self, size: int, tag: str) -> _Buffer:
        seg = Segment.create(tag, size)
        buf = _Buffer(seg.addr, size, struct.pack("<qqq", os.getpid(), seg.fd, size), seg.close, seg)
        buf.view = seg.bytes[:size]
        return buf

    def attach(self, handle: bytes, size: int, owner: str, owner_device: int = 0) -> _Buffer:
        pid, fd, seg_size = struct.unpack_from("<qqq", handle)
        seg = Segment.attach(pid, fd, seg_size)
        buf = _Buffer(seg.addr, size, handle, seg.close, seg)
        buf.view = seg.bytes[:size]
        return buf


# ======================================================================================== the group

class _Peer:
    """A mapped peer: its control words and the lanes of it this rank has opened."""

    def __init__(self, rank: int, pid: int, address: bytes, ctrl: Segment, layout: Layout):
        self.rank, self.pid, self.address = rank, pid, address
        self.ctrl = ctrl
        self.ctl = ctrl.words(0, layout.words)
        self.futex_addr = ctrl.addr + W_FUTEX * 8
        self.lanes: dict[int, tuple[int, _Buffer]] = {}
        self.retired: list[_Buffer] = []  # captured ops' lanes replaced while a graph may still read them
        self.pidfd: int | None = None
        self.gone = False
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.gone = True  # already gone
        except OSError:
            pass  # no pidfd here (old kernel, seccomp): /proc is polled instead

    def dead(self) -> bool:
        """Without a pidfd: the process is gone or a zombie (as seen in /proc)."""
        if self.gone:
            return True
        self.gone = bool(exited(process_state(self.pid)))
        return self.gone

    def lane_view(self, mem, lane: int, base: int) -> torch.Tensor | None:
        gen = int(self.ctl[base + L_GEN])
        if gen <= 0:
            return None
        have = self.lanes.get(lane)
        if have is not None and have[0] == gen:
            return have[1].view
        if have is not None:
            del self.lanes[lane]
            if lane in GRAPH_LANES or lane == PAD_LANE:
                self.retired.append(have[1])
            else:
                have[1].close()
        size = int(self.ctl[base + L_SIZE])
        handle = b"".join(struct.pack("<q", int(self.ctl[base + L_HANDLE + i])) for i in range(8))
        buf = mem.attach(handle, size, f"rank {self.rank}", int(self.ctl[W_DEVICE]))
        self.lanes[lane] = (gen, buf)
        return buf.view

    def close(self) -> None:
        for buf in [b for _, b in self.lanes.values()] + self.retired:
            buf.close()
        self.lanes.clear()
        self.retired.clear()
        self.ctrl.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class _QuickEntry:
    """One call shape on one lane parity as the device path last launched it (``_DevicePath._remember``): its
    kernel arguments, the generations of the lanes they point into, the DONE words to wait on."""

    __slots__ = ("lane", "base", "epoch", "nb", "dtype", "op", "fp", "active", "me", "mine", "others", "stream",
                 "stream_ptr", "buf", "peer_gens", "done_views", "done_words", "lanes", "args", "args_ref", "blocks")


class _QuickOp:
    """An all_reduce the quick lane launched: what its wait, its commit or its hand-over need."""

    __slots__ = ("entry", "tensor", "seq", "key", "base", "active", "me", "others", "dtype", "op", "fp", "stream")

    def __init__(self, e: _QuickEntry, tensor: torch.Tensor, seq: int, key: int):
        self.entry, self.tensor, self.seq, self.key = e, tensor, seq, key
        self.base, self.active, self.me, self.others = e.base, e.active, e.me, e.others
        self.dtype, self.op, self.fp, self.stream = e.dtype, e.op, e.fp, e.stream


class _PoolMap:
    """A peer's pool segment mapped here for captured ops that read it, with a count of the CUDA graphs that
    still do (``mc_hold_*``: each graph keeps a reference until it is destroyed)."""

    def __init__(self, lib, mapping: "shared.Mapping"):
        self.lib, self.mapping, self.addr = lib, mapping, mapping.addr
        self.held = lib.mc_hold_new()
        self.pinned = False  # a graph reads it but could not take a hold: mapped until the group closes

    def hold(self, stream, rank: int, kind: str) -> None:
        """The graph ``stream`` is capturing reads this segment: it stays mapped while that graph lives."""
        rc = self.lib.mc_hold_graph(self.held, stream.cuda_stream) if self.held else -1
        if rc != 0 and not self.pinned:
            self.pinned = True
            log.logger.warning("rank %d: fast CUDA plane: a captured %s could not tie a peer's pool memory to its "
                               "graph (CUDA error %d); it stays mapped until the group is destroyed", rank, kind, rc)

    def graphs(self) -> int:
        """How many CUDA graphs read it (pinned: at least one, for good)."""
        return max(self.lib.mc_hold_graphs(self.held) if self.held else 0, int(self.pinned))

    def close(self) -> None:
        held, self.held = self.held, 0
        if held:
            self.mapping.close()
            self.lib.mc_hold_drop(held)


class _DevicePath:
    """The device path of one group (module doc, "The device path"): every rank's control words mapped into
    this rank's device, the kernels' block counters, the lanes of captured operations, and the kernels'
    launches (on the host, step for step, when emulated)."""

    def __init__(self, g: "CudaGroup"):
        self.g = g
        mem = g.mem
        if not mem.emulated:
            from .lib import DEV_MAX_RANKS
            layout = (ctypes.c_int64 * 13)()
            mem.lib.mc_pg_dev_layout(layout)
            want = (W_GRAPH_EPOCH, L_PUB, L_META, L_DONE, L_HOLD, L_FREE, L_META_NUMEL, L_META_SLOTS,
                    W_GRAPH_TROUBLE, W_GRAPH_COUNT, W_GRAPH_STALE, L_DRAIN, W_STALL)
            if tuple(layout) != want:
                raise MooncakeError(f"the CUDA library's control-word layout {tuple(layout)} is not this "
                                    f"mooncake's {want}: rebuild it")
            self.max_ranks = DEV_MAX_RANKS
        else:
            self.max_ranks = 16
        self.mapped: dict[int, tuple[int, int]] = {g.rank: (g.ctrl.addr, mem.map_host(g.ctrl.addr, g.ctrl.size))}
        # the kernels' block counters (McPgDevArgs.arrive, 2 per step): eager ops, then captured ops
        self.arrive = torch.zeros(2 * ARRIVE_WORDS, dtype=torch.int32, device=mem.device)
        self.graph_lanes: dict[int, _Buffer] = {}  # GRAPH_LANES and the pad (PAD_LANE)
        self.pad_epoch = -1  # the view epoch last written into the pad
        self.pad_lock = threading.Lock()  # the pad's words and pad_epoch
        self.graph_words = os.environ.get(GRAPH_WORDS_ENV, "pad").strip().lower() or "pad"
        if self.graph_words not in ("pad", "host"):
            raise MooncakeError(f"{GRAPH_WORDS_ENV}={self.graph_words!r}: expected 'pad' or 'host'")
        self.retired: list[_Buffer] = []
        # replaced peers (their words' device mapping, the peer): graphs captured earlier may still read them
        self.retired_peers: list[tuple[tuple[int, int] | None, _Peer]] = []
        self.captured = False  # an operation was captured: keep what graphs may read until close()
        self.reported = 0  # the trouble / stale word's value last handed to the control plane
        self.handled = -1  # trouble of this view epoch and earlier was raised already
        self.outcomes = {"done": 0, "published": 0, "not posted": 0}  # how eager launches ended (tests, stats)
        self.args: dict[tuple, object] = {}  # kernel arguments by call shape (McPgDevArgs)
        self.pool_maps: dict[bytes, _PoolMap] = {}  # peers' pool segments captured ops read (by handle)
        self.pool_pending: frozenset[bytes] = frozenset()  # mapped for the capture in progress, not held yet
        self.direct_captures = 0  # captured ops that run on the ranks' own tensors (tests, stats)
        self.last_blocks = 0  # blocks of the latest launch (tests, stats)
        self.trace: torch.Tensor | None = None  # TRACE_ENV: the kernels' step times (McPgDevArgs.trace)
        if os.environ.get(TRACE_ENV, "").strip() == "1" and not mem.emulated:
            shape = (ctypes.c_int32 * 3)()
            mem.lib.mc_pg_dev_trace_shape(shape)
            self.trace_shape = tuple(shape)
            self.trace = torch.zeros(shape[0] * shape[1], dtype=torch.int64, device=mem.device)
        self.stall = int(os.environ.get(STALL_ENV, "").strip() == "1")  # McPgDevArgs.stall
        # the quick lane (module doc): call shapes by (lane, data pointer, numel, dtype, op, stream), the op it
        # posted and that has not ended yet, and the event its launches record
        self.quick_on = os.environ.get(QUICK_ENV, "on").strip().lower() != "off"
        self.quick: dict[tuple, _QuickEntry] = {}
        self.quick_op: _QuickOp | None = None
        self.quick_posts = 0  # operations the quick lane launched (tests, stats)
        self.quick_handovers = 0  # ...of which handed over to the host protocol
        self.quick_ev = mem.quick_event() if self.quick_on else None

    def set_stall(self, ns: int) -> None:
        """Tests (``STALL_ENV``): make this rank's launches from now on, captured ones included, wait ``ns``
        before publishing (0: no more)."""
        if not self.stall:
            raise MooncakeError(f"set_stall needs {STALL_ENV}=1 when the group is created")
        self.g.ctl[W_STALL] = int(ns)

    def trace_records(self) -> list[dict]:
        """The kernels' step times (``TRACE_ENV``; empty when off), once this device's work is done: per op
        run (the last one of each seq % records), its key and, at each step, the global timer ``ns`` and the
        SM clock ``clock``; step order: start, go, released, published, peers_published, read, finished (0:
        not reached)."""
        if self.trace is None:
            return []
        torch.cuda.synchronize(self.g.mem.device)
        records, width, marks = self.trace_shape
        rows = self.trace.view(records, width).tolist()
        return [{"key": r[0], "ns": r[1:1 + marks], "clock": r[1 + marks:1 + 2 * marks], "blocks": r[width - 1]}
                for r in rows if r[2] != 0]  # the go step reached

    def map_peer(self, r: int, p: _Peer) -> None:
        self.unmap_peer(r)
        self.quick.clear()
        self.mapped[r] = (p.ctrl.addr, self.g.mem.map_host(p.ctrl.addr, p.ctrl.size))

    def unmap_peer(self, r: int) -> None:
        have = self.mapped.pop(r, None)
        self.quick.clear()
        if have is not None:
            self.g.mem.unmap_host(have[0])

    def retire_peer(self, r: int, p: _Peer) -> None:
        """Rank ``r`` was replaced: keep its old words mapped and its lanes open until close() (graphs
        captured earlier hold their addresses)."""
        self.quick.clear()
        self.retired_peers.append((self.mapped.pop(r, None), p))

    def close(self) -> None:
        """Unmap everything; after a capture, only once this device's work is done (a replay still
        running reads these words and lanes; a graph must not be replayed after the group is destroyed)."""
        if self.captured and not self.g.mem.emulated:
            torch.cuda.synchronize(self.g.mem.device)
        for r in list(self.mapped):
            self.unmap_peer(r)
        for mapped, p in self.retired_peers:
            if mapped is not None:
                self.g.mem.unmap_host(mapped[0])
            p.close()
        self.retired_peers.clear()
        for buf in list(self.graph_lanes.values()) + self.retired + list(self.pool_maps.values()):
            buf.close()
        self.graph_lanes.clear()
        self.retired.clear()
        self.pool_maps.clear()
        self.quick.clear()
        if isinstance(self.quick_ev, _RawEvent):
            self.quick_ev.close()

    # ---- eager operations ----------------------------------------------------------------------------
    def eager_ok(self, op: "_AllReduce") -> bool:
        """``op`` may run as one launch: a small in-place all_reduce the kernel folds, every earlier
        operation of the group committed here, every peer's lane mapped and big enough (so that the
        peer keeps using the buffer opened now)."""
        g = self.g
        nb = _nbytes(op.tensor)
        if (op.two_phase or not op.in_place or type(op) is not _AllReduce or op.op not in _KERNEL_FOLD_OPS
                or op.dtype not in _KERNEL_FOLD_DTYPES or not 0 < nb <= DEVICE_MAX_BYTES
                or len(op.active) > self.max_ranks or (faults.armed() and not g.mem.emulated)):
            return False
        for earlier in g.queue:
            if earlier is op:
                break
            if earlier.state < COMMITTED:
                return False
        for r in op.others:
            ctl = g.peer(r).ctl
            if r not in self.mapped or ctl[op.base + L_GEN] <= 0 or ctl[op.base + L_SIZE] < nb:
                return False
        return True

    def post(self, op: "_AllReduce") -> None:
        """Enqueue ``op`` as one launch on its stream, after writing the words the host protocol needs
        should it take over (slot table, fingerprint)."""
        g, base = self.g, op.base
        nb = _nbytes(op.tensor)
        mine = g.lane_view(op.lane, nb)
        self._write_lane_words(op.lane, base, nb, op.fp, None)
        g.flag_word.value = 0
        lanes = [mine if r == op.me else g.peer(r).lane_view(g.mem, op.lane, base) for r in op.active]
        launched = None
        with g.mem.on(op.stream):
            if g.mem.emulated:
                self._emulate(op, lanes, nb)
            else:
                ctls = tuple(self.mapped[r][1] for r in op.active)
                addrs = tuple(x.data_ptr() for x in lanes)
                launched = self._launch(op.active, op.me, ctls, ctls, (addrs, addrs), (base, base), op.tensor, op.op,
                                        op.key, op.fp, DEVICE_WAIT_S, graph=False, flag=g.exact_host == "auto",
                                        stream=op.stream)
            op.ev = g.mem.record(op.stream)
        if self.quick_on:
            self._remember(op, lanes, nb, launched)

    def _write_lane_words(self, lane: int, base: int, nb: int, fp: Fingerprint, owner: "_QuickEntry | None") -> None:
        """The words the host protocol reads should it take over a launch (one slot of ``nb`` bytes, the
        fingerprint); ``owner``: the quick entry whose words these are (skipped when they are already)."""
        g = self.g
        ctl = g.ctl
        ctl[base + L_SLOTS], ctl[base + L_SLOTS + 1] = 0, nb
        g.fp_words.write(ctl, base, fp, 0)
        ctl[base + L_NSLOTS], ctl[base + L_NBYTES], ctl[base + L_RESULT] = 1, _align(nb), _align(nb)
        g.lane_owner[lane] = owner

    # ---- the quick lane ----------------------------------------------------------------------------
    def _remember(self, op: "_AllReduce", lanes: list[torch.Tensor], nb: int, launched) -> None:
        """Keep what a later call of ``op``'s shape on this lane parity needs to be posted by the quick lane."""
        g, base = self.g, op.base
        stream_ptr = 0 if op.stream is None else op.stream.cuda_stream
        key = (op.lane, op.tensor.data_ptr(), op.tensor.numel(), op.dtype, op.op, stream_ptr)
        have = self.quick.get(key)
        if have is not None and have.epoch == op.key >> SEQ_BITS and have.buf is g.lanes[op.lane] and \
                have.args is (None if launched is None else launched[0]) and \
                all(ctl[i] == gen for ctl, i, gen in have.peer_gens):
            return  # (an async loop's shape on the usual path: nothing changed since it was kept)
        if len(self.quick) >= 64:
            self.quick.clear()
        e = _QuickEntry()
        e.lane, e.base, e.epoch, e.nb, e.dtype, e.op, e.fp = op.lane, base, op.key >> SEQ_BITS, nb, op.dtype, op.op, op.fp
        e.active, e.me, e.others = op.active, op.me, op.others
        e.mine = op.active.index(op.me)
        e.stream, e.stream_ptr = op.stream, stream_ptr
        e.buf = g.lanes[op.lane]
        e.peer_gens = tuple((g.peer(r).ctl, base + L_GEN, int(g.peer(r).ctl[base + L_GEN])) for r in op.others)
        views = [(g.ctl if r == op.me else g.peer(r).ctl, base + L_DONE) for r in op.active]
        addrs = [(g.ctrl if r == op.me else g.peer(r).ctrl).addr + (base + L_DONE) * 8 for r in op.active]
        e.done_views, e.done_words = views, (ctypes.c_int64 * len(addrs))(*addrs)
        e.lanes = lanes
        e.args = None
        if launched is not None:
            e.args, e.blocks = launched
            e.args_ref = ctypes.byref(e.args)
        self.quick[key] = e

    def quick_entry(self, t: torch.Tensor, op: ReduceOp, lane: int, epoch: int) -> "_QuickEntry | None":
        """The entry to post ``t``'s all_reduce with as operation of ``lane`` under view ``epoch`` on the quick
        lane, or None (not seen on the device path in this shape yet, or anything changed since:
        ``eager_ok``'s conditions, the lanes' generations, an earlier operation still here)."""
        g = self.g
        if self.quick_op is not None or g.queue or g.closed or faults.armed():
            return None
        stream = g.mem.caller_stream()
        if stream is not None and not is_current(stream):  # another device is current: post() switches, this does not
            return None
        e = self.quick.get((lane, t.data_ptr(), t.numel(), t.dtype, op, 0 if stream is None else stream.cuda_stream))
        if e is None or e.epoch != epoch or g.lanes.get(lane) is not e.buf or not t.is_contiguous():
            return None
        for ctl, i, gen in e.peer_gens:
            if ctl[i] != gen:
                return None
        return e

    def quick_post(self, e: "_QuickEntry", t: torch.Tensor, seq: int, key: int) -> "_QuickOp":
        """Launch operation ``seq`` (``key``) on ``e``'s shape: the words, the kernel, the event."""
        g = self.g
        if g.lane_owner.get(e.lane) is not e:
            self._write_lane_words(e.lane, e.base, e.nb, e.fp, e)
        g.flag_word.value = 0
        q = _QuickOp(e, t, seq, key)
        if g.mem.emulated:
            self._emulate(q, e.lanes, e.nb)
        else:
            g.mem.quick_post(e, key, self.quick_ev)
        self.quick_op = q
        self.quick_posts += 1
        return q

    def quick_wait(self, q: "_QuickOp", budget_s: float) -> bool:
        """Whether every active rank's DONE holds ``q``'s key within ``budget_s`` (False: the launch is over
        without that, or still running)."""
        return self.g.mem.quick_wait(q.entry, q.key, self.quick_ev, budget_s)

    def quick_result_ok(self) -> bool:
        """The result of a quick op that is done may stand as the kernel wrote it (no host fold wanted)."""
        mode = self.g.exact_host
        return mode == "never" or (mode == "auto" and not self.g.flag_word.value)

    def quick_finish(self, q: "_QuickOp") -> None:
        """``q`` committed: what ``try_device_done`` and ``device_result`` do for a launch that got through."""
        self.quick_op = None
        self.outcomes["done"] += 1
        self.g.wake(q.others)
        torch.autograd.graph.increment_version(q.tensor)

    def quick_handover(self, q: "_QuickOp", ctx) -> "_AllReduce":
        """(Under the group's lock.) Hand ``q`` to the host protocol as the device path's launch of operation
        ``ctx.seq``: the op as ``post`` leaves it, queued (its Work drives it)."""
        g = self.g
        self.quick_op = None
        self.quick_handovers += 1
        g.streams[q.seq] = q.stream
        op = _AllReduce(g, ctx, q.tensor, q.op)
        op.device_tried, op.state, op.ev = True, DEVICE, self.quick_ev
        return g.enqueue(op, pump=False)

    def _launch(self, active, me, ctls, notes, lanes, bases, tensor, redop, key, fp, timeout_s, graph, flag, stream,
                shape: "_Shape | None" = None) -> None:
        """Enqueue the kernel(s) on ``stream``: ``ctls`` the device addresses of the active ranks' words
        (captured: their pads), ``notes`` of their host control words, ``lanes`` the addresses of their lane
        buffers (or, for an all_reduce on pool tensors, of their tensors) for lane parity 0 and 1, ``bases``
        the lane blocks' word indices; what is copied in and read: ``shape`` (None: all_reduce of ``tensor``
        in place)."""
        from .lib import McPgDevArgs, check
        g, mem = self.g, self.g.mem
        if shape is None:
            nb, p = _nbytes(tensor), tensor.data_ptr()
            shape = _Shape(KIND_ALL_REDUCE, p, p, nb, 0, tensor.numel(), 1, -1, int(redop), DTYPE_CODES[tensor.dtype],
                           nb, nb)
        ptrs = (tuple(lanes[0]), tuple(lanes[1]))
        call = (active, ctls, notes, ptrs, bases, shape, fp, timeout_s, graph, flag)
        a = self.args.get(call)
        if a is None:  # arguments of a call seen before are reused with a new key (DDP's buckets, decode steps)
            a = McPgDevArgs()
            for i, r in enumerate(active):
                a.ctl[i], a.note[i] = ctls[i], notes[i]
                a.lane[0][i], a.lane[1][i] = ptrs[0][i], ptrs[1][i]
                a.rank[i] = r
            a.base[0], a.base[1] = bases
            a.src, a.dst, a.in_bytes, a.rd_off, a.count = shape.src, shape.dst, shape.in_bytes, shape.rd_off, shape.count
            a.part = shape.part
            a.kind, a.slots, a.root, a.graph = shape.kind, shape.slots, shape.root, int(graph)
            a.fp[0], a.fp[1], a.fp[2] = _fp_words(g.fp_words, fp)
            a.timeout_ns = int(timeout_s * 1e9)
            a.flag = g.flag.data_ptr() if flag else 0
            a.arrive = self.arrive.data_ptr() + (4 * ARRIVE_WORDS if graph else 0)
            a.trace = self.trace.data_ptr() if self.trace is not None else 0
            a.stall = self.stall
            a.n, a.me, a.op, a.dtype = len(active), active.index(me), shape.op, shape.dtype
            if len(self.args) >= 64:
                self.args.clear()
            self.args[call] = a
        a.key = key
        blocks = g.launch_blocks(max(shape.in_bytes, shape.out_bytes))
        self.last_blocks = blocks
        rc = mem.lib.mc_pg_dev_launch(ctypes.byref(a), blocks, stream.cuda_stream)
        if rc:
            check(mem.lib, rc, f"device path ({_KIND_NAMES[shape.kind]}, {tensor.dtype}, {len(active)} ranks)")
        return a, blocks

    def _emulate(self, op: "_AllReduce", lanes: list[torch.Tensor], nb: int) -> None:
        """The kernel's steps on the host, on the same words in the same order (MOONCAKE_FAST_CUDA_EMULATE)."""
        g, base, key = self.g, op.base, op.key
        ctls = {r: (g.ctl if r == op.me else g.peer(r).ctl) for r in op.active}
        deadline = time.monotonic() + DEVICE_WAIT_S

        def wait_all(cond) -> bool:
            for r in op.others:
                while not cond(ctls[r]):
                    if time.monotonic() > deadline:
                        return cond(ctls[r])
                    time.sleep(20e-6)
            return True

        if not wait_all(lambda c: c[base + L_FREE] >= c[base + L_HOLD] or c[base + L_HOLD] >= key):
            return
        lanes[op.active.index(op.me)][:nb].copy_(op.tensor.reshape(-1).view(torch.uint8))
        if op.others:
            faults.hit("mid_transfer")
        if self.stall and g.ctl[W_STALL] > 0:
            time.sleep(min(g.ctl[W_STALL], STALL_MAX_NS) * 1e-9)
        head = g.fp_words.head(op.fp, 0)
        mine = ctls[op.me]
        mine[base + L_META], mine[base + L_META_NUMEL], mine[base + L_META_SLOTS] = head
        mine[base + L_PUB] = key
        g.wake(op.others)
        if not wait_all(lambda c: c[base + L_PUB] == key):
            return
        if any((ctls[r][base + L_META], ctls[r][base + L_META_NUMEL], ctls[r][base + L_META_SLOTS]) != head
               for r in op.others):
            return
        mine[base + L_HOLD] = key
        result = fold(op.op, [lane[:nb].view(op.dtype) for lane in lanes])
        op.tensor.reshape(-1).copy_(result.reshape(-1))
        if op.others:
            faults.hit("after_data")
        mine[base + L_FREE] = key
        mine[base + L_DONE] = key
        g.wake(op.others)

    # ---- captured operations -----------------------------------------------------------------------------
    def capture_refusal(self, view, call) -> str | None:
        """Why ``call`` (a ``GraphCall``) cannot be captured in a CUDA graph on this group, or None."""
        if self.g.delegate:
            return self.g.delegate
        if self.g.mem.emulated:
            return "the CUDA plane is emulated on the CPU"
        if len(view.active) > self.max_ranks:
            return f"captured collectives take groups of up to {self.max_ranks} active ranks"
        return None

    def capture_offer(self, view, call) -> bytes:
        """For an all_reduce that runs in parts, in place on a tensor of a pool (``pool.mem_pool``): the
        pool segment's handle and the tensor's offset in it (40 bytes); else nothing."""
        x = call.input
        if (call.kind != "all_reduce" or call.output.data_ptr() != x.data_ptr() or len(view.active) < 2
                or _nbytes(x) < PARTS_MIN_BYTES):
            return b""
        try:
            found = pool.share(self.g.mem.lib, x.data_ptr())
        except OSError as exc:  # offering nothing keeps every rank on the lanes
            log.logger.warning("rank %d: fast CUDA plane: the pool tensor of a captured %s cannot be shared, it "
                               "takes the lanes: %s", self.g.rank, call.kind, exc)
            return b""
        return b"" if found is None else found[0] + _OFFSET.pack(found[1])

    def capture_prepare(self, view, call, offers: dict[int, bytes], timeout_s: float) -> bytes | None:
        """Where every active rank offered its pool tensor (``capture_offer``): map the peers' segments (kept
        while a graph captured on them lives: ``release_pool_maps``) and say whether all of them could be
        (b"\\1") or not (b"\\0"), for the PG face's second round, after which every rank takes up the offers
        or none does; else None."""
        if not self._all_offered(view.active, offers):
            return None
        with self.g.lock:
            self.pool_pending = frozenset(offers[r][:shared.HANDLE.size] for r in view.active if r != self.g.rank)
        self.release_pool_maps()
        with self.g.mem.relaxed_capture():  # mapping peers' memory is not capturable
            for r in view.active:
                handle = offers[r][:shared.HANDLE.size]
                if r == self.g.rank or handle in self.pool_maps:
                    continue
                try:
                    mapping = shared.attach(self.g.mem.lib, self.g.mem.index, handle, min(timeout_s, SHARE_FETCH_S))
                    with self.g.lock:
                        self.pool_maps[handle] = _PoolMap(self.g.mem.lib, mapping)
                except shared.FetchError as exc:
                    log.logger.warning("rank %d: fast CUDA plane: rank %d's pool tensor of a captured %s could not be "
                                       "mapped, every rank takes the lanes: %s", self.g.rank, r, call.kind, exc)
                    return b"\0"
        return b"\1"

    @staticmethod
    def _all_offered(active, offers: dict[int, bytes]) -> bool:
        return all(len(offers.get(r, b"")) == shared.HANDLE.size + _OFFSET.size for r in active)

    def _direct_addrs(self, active, call, offers: dict[int, bytes]) -> tuple[int, ...] | None:
        """Every active rank's tensor address here where every rank offered one and every rank mapped its peers'
        segments (``capture_prepare``; else ``offers`` is empty); else None."""
        if not self._all_offered(active, offers):
            return None
        addrs = []
        for r in active:
            handle, offset = offers[r][:shared.HANDLE.size], _OFFSET.unpack_from(offers[r], shared.HANDLE.size)[0]
            addrs.append(call.input.data_ptr() if r == self.g.rank else self.pool_maps[handle].addr + offset)
        return tuple(addrs)

    def capture(self, view, call, fp: Fingerprint, timeout_s: float, offers: dict[int, bytes]) -> None:
        """Enqueue ``call`` (a ``GraphCall``) of ``view`` on the capturing stream: keys from the count word
        at run time, the graph lanes (grown now, while capturing, if too small; the peers' as they grow
        them in their own capture of the same call, waited for up to ``timeout_s``), or the ranks' own
        tensors where every rank offered its tensor's pool segment (``offers``: ``capture_offer`` of each)."""
        g = self.g
        active = tuple(view.active)
        direct = self._direct_addrs(active, call, offers)
        shape = _shape(call, active, g.rank, direct=direct is not None)
        self.direct_captures += direct is not None
        nb = max(shape.lane_bytes, 1)
        bases = tuple(g.layout.lane[x] for x in GRAPH_LANES)
        pad_base, pad_bytes = g.layout.lane[PAD_LANE], g.layout.words * 8
        use_pad = self.graph_words != "host"
        with g.lock, g.mem.relaxed_capture():
            self.captured = True  # from now on a replaced peer stays mapped (retire_peer)
            pad = self._graph_lane(PAD_LANE, pad_bytes) if use_pad else None
            self.graph_view(view.epoch)
            mine = [self._graph_lane(lane, nb) for lane in GRAPH_LANES]
            missing = [r for r in active if r not in self.mapped]
            if missing:
                raise MooncakeError(f"{call.kind} captured in a CUDA graph: the control words of rank(s) {missing} "
                                    "could not be mapped into this device")
            notes = tuple(self.mapped[r][1] for r in active)
            peers = {r: g.peer(r) for r in active if r != g.rank}
        deadline = time.monotonic() + timeout_s
        for r, p in peers.items():  # without the lock: the words stay mapped (captured)
            for base, need in [(b, nb) for b in bases] + ([(pad_base, pad_bytes)] if use_pad else []):
                while p.ctl[base + L_GEN] <= 0 or p.ctl[base + L_SIZE] < need:
                    if time.monotonic() > deadline and base == pad_base:
                        raise MooncakeError(f"{call.kind} captured in a CUDA graph: rank {r} has not captured its "
                                            f"first collective within {timeout_s:.0f} s; every rank of the group "
                                            "must capture the same calls in the same order")
                    if time.monotonic() > deadline:
                        raise MooncakeError(f"{call.kind} captured in a CUDA graph: rank {r} has not captured a "
                                            f"collective that needs {nb} bytes of lane within {timeout_s:.0f} s; "
                                            "every rank of the group must capture the same calls in the same order")
                    time.sleep(0.001)
        with g.lock, g.mem.relaxed_capture():
            lanes = [direct or tuple((mine[i] if r == g.rank else peers[r].lane_view(g.mem, lane, bases[i])).data_ptr()
                                     for r in active)
                     for i, lane in enumerate(GRAPH_LANES)]
            ctls = notes if pad is None else tuple(
                (pad if r == g.rank else peers[r].lane_view(g.mem, PAD_LANE, pad_base)).data_ptr() for r in active)
            stream = torch.cuda.current_stream(g.mem.index)
            key = view.epoch << SEQ_BITS | GRAPH_BIT
            self._launch(active, g.rank, ctls, notes, lanes, bases, call.output, call.op, key, fp, timeout_s,
                         graph=True, flag=False, stream=stream, shape=shape)
            if direct is not None:
                for r in peers:
                    self.pool_maps[offers[r][:shared.HANDLE.size]].hold(stream, g.rank, call.kind)

    def capture_ended(self) -> None:
        """The call that ``capture_prepare`` mapped peers' segments for was captured, or failed: the segments
        no longer wait for its holds (``release_pool_maps`` lets go of those no graph holds)."""
        with self.g.lock:
            self.pool_pending = frozenset()

    def release_pool_maps(self) -> None:
        """Unmap the peers' pool segments that no CUDA graph reads any more (every graph captured on them was
        destroyed and its replays are over), so that their memory goes back to the device once the owner
        frees it too.  Also while this thread captures a graph (relaxed capture mode, as for mapping)."""
        with self.g.lock:
            gone = [h for h, m in self.pool_maps.items() if h not in self.pool_pending and not m.graphs()]
            if not gone:
                return
            with self.g.mem.relaxed_capture():
                for handle in gone:
                    self.pool_maps.pop(handle).close()

    def _graph_lane(self, lane: int, nbytes: int) -> torch.Tensor:
        have = self.graph_lanes.get(lane)
        if have is None or have.size < nbytes:
            if have is not None:
                self.retired.append(have)  # graphs captured earlier keep reading it
            self.graph_lanes[lane] = have = self.g.publish_lane(lane, nbytes)
        return have.view

    def trouble(self) -> tuple[int, bool, frozenset[int]] | None:
        """What captured ops ran into since the last call, once: (the view epoch of one that gave up, False,
        peers found dead), or (the view epoch one was captured under, True, ()) for a graph replayed after
        the view changed; else None."""
        g = self.g
        if self.pool_maps:
            self.release_pool_maps()
        value, stale = int(g.ctl[W_GRAPH_TROUBLE]), int(g.ctl[W_GRAPH_STALE])
        if value and value >> SEQ_BITS > self.handled and value != self.reported:
            self.reported = value
            g._live_checked = 0.0
            return value >> SEQ_BITS, False, g.failed(tuple(g.peers))
        if stale and stale != self.reported:
            self.reported = stale
            return stale >> SEQ_BITS, True, frozenset()
        return None

    def graph_view(self, epoch: int) -> None:
        """The group adopted view ``epoch``: captured ops of earlier views exit at once from now on (called
        by the thread that adopts views, and under the group's lock)."""
        ctl = self.g.ctl
        if ctl is None:
            return
        with self.pad_lock:
            self._adopt_epoch(epoch, force=False)

    def _adopt_epoch(self, epoch: int, force: bool) -> None:
        """(Under ``pad_lock``) the host's epoch word moves forward to ``epoch``, and the pad's (the one
        captured ops read) follows it where it differs from the last write, or always with ``force``; best
        effort off the capture path: a failure is logged and the write retried at the next call (a replay
        then exits as stale)."""
        ctl = self.g.ctl
        if epoch > int(ctl[W_GRAPH_EPOCH]):
            ctl[W_GRAPH_EPOCH] = epoch
        pad = self.graph_lanes.get(PAD_LANE)
        want = int(ctl[W_GRAPH_EPOCH])
        if pad is None or (want == self.pad_epoch and not force):
            return
        try:
            self.g.mem.store_word(pad.addr + 8 * W_GRAPH_EPOCH, want)
        except Exception as exc:  # noqa: BLE001 - a CudaError: captured ops keep seeing the older view
            self.pad_epoch = -1
            log.logger.warning("rank %d: fast CUDA plane: writing view epoch %d into the pad failed: %s",
                               self.g.rank, want, exc)
            return
        self.pad_epoch = want

    def reset(self, epoch: int) -> None:
        """What captured ops ran into was raised: once this device's work is done (a replay may still run),
        forget trouble of views before ``epoch`` (a peer's late report of it included) and stale reports,
        zero the captured ops' block counters, and let captured ops run under view ``epoch``."""
        g = self.g
        if not g.mem.emulated and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize(g.mem.device)
            self.arrive[ARRIVE_WORDS:].zero_()
            torch.cuda.synchronize(g.mem.device)
        ctl = g.ctl
        self.handled = max(self.handled, epoch - 1)

        def earlier(trouble: int) -> bool:
            return trouble != 0 and trouble >> SEQ_BITS < epoch

        if earlier(int(ctl[W_GRAPH_TROUBLE])):
            ctl[W_GRAPH_TROUBLE] = 0
        ctl[W_GRAPH_STALE] = 0
        with self.pad_lock:
            pad = self.graph_lanes.get(PAD_LANE)
            if pad is not None and earlier(g.mem.load_word(pad.addr + 8 * W_GRAPH_TROUBLE)):
                g.mem.store_word(pad.addr + 8 * W_GRAPH_TROUBLE, 0)
            self._adopt_epoch(epoch, force=True)
        self.reported = 0


def _fp_words(words: LaneWords, fp: Fingerprint) -> tuple[int, int, int]:
    """The fingerprint words a kernel of the device path publishes and compares: the head of ``fp``, with
    an all_to_all's element count (the sum of its sends: its splits are equal) in the numel word."""
    meta, numel, slots = words.head(fp, 0)
    return meta, sum(fp.sends) if fp.sends else numel, slots


def _graph_call_problem(call, device: torch.device) -> str | None:
    """Why the device path's kernel cannot run ``call`` (a ``GraphCall``) on ``device``, naming the
    argument, or None."""
    for what, t in (("input", call.input), ("output", call.output)):
        if not t.is_contiguous() or t.device != device:
            return f"the {what} tensor must be contiguous and on {device} (got {t.device}, strides {t.stride()})"
    if GRAPH_KINDS[call.kind] in (KIND_ALL_REDUCE, KIND_REDUCE_SCATTER) and (
            ReduceOp(call.op) not in _KERNEL_FOLD_OPS or call.input.dtype not in _KERNEL_FOLD_DTYPES):
        return (f"captured {call.kind} takes SUM / AVG / PRODUCT / MIN / MAX of float16, bfloat16, float32, "
                f"float64 (got {ReduceOp(call.op).name} of {call.input.dtype})")
    return None


class _Shape(NamedTuple):
    """What one launch of the device path moves (``McPgDevArgs``): ``kind`` (KIND_*), this rank's input
    ``src`` and output ``dst`` (addresses), ``in_bytes`` of src copied into its lane, each read starting
    ``rd_off`` bytes into a lane, ``count`` elements folded (fold kinds) or bytes per output slot (copy
    kinds), ``slots`` output slots, ``root`` the broadcast root's active index (else -1), the reduce op and
    dtype code; ``lane_bytes`` every rank's lane holds at least, ``out_bytes`` written into dst; ``part``
    the elements per part of an all_reduce in parts (``rd_off``: its result region), else 0."""

    kind: int
    src: int
    dst: int
    in_bytes: int
    rd_off: int
    count: int
    slots: int
    root: int
    op: int
    dtype: int
    lane_bytes: int
    out_bytes: int
    part: int = 0


def _part_elems(numel: int, n: int) -> int:
    """Elements per part of an all_reduce in parts over ``n`` ranks: part i is ``[i * p, (i + 1) * p)``
    clipped to ``numel`` (a multiple of ``PART_ALIGN``, so parts start aligned)."""
    per = -(-numel // n)
    return -(-per // PART_ALIGN) * PART_ALIGN


def _shape(call, active: Sequence[int], rank: int, direct: bool = False) -> _Shape:
    """The launch of ``call`` (a ``GraphCall``) on group rank ``rank`` of a view whose active ranks are
    ``active`` (ascending); ``direct``: an all_reduce in parts on the ranks' own tensors (every rank offered
    its pool tensor)."""
    kind = GRAPH_KINDS[call.kind]
    x, y = call.input, call.output
    nin, nout = _nbytes(x), _nbytes(y)
    src, dst, dtype = x.data_ptr(), y.data_ptr(), DTYPE_CODES[x.dtype]
    root_reads = rank == call.root
    if call.kind == "reduce":  # every rank sends, only the root folds
        return _Shape(kind, src, dst, nin, 0, x.numel() if root_reads else 0, 1, -1, int(call.op), dtype, nin,
                      nout if root_reads else 0)
    if call.kind == "gather":  # every rank sends, only the root reads its slots
        return _Shape(kind, src, dst, nin, 0, nin, call.slots if root_reads else 0, -1, 0, dtype, nin,
                      nout if root_reads else 0)
    if call.kind == "scatter":  # the root sends the first `size` slots, rank r reads slot r of the root's lane
        size = max(active) + 1
        return _Shape(kind, src, dst, size * nout if root_reads else 0, rank * nout, nout, 1, active.index(call.root),
                      0, dtype, size * nout, nout)
    if direct:  # fold a part of every rank's tensor into every rank's tensor
        return _Shape(KIND_ALL_REDUCE_DIRECT, src, dst, 0, 0, x.numel(), 1, -1, int(call.op), dtype, 0, nout,
                      _part_elems(x.numel(), len(active)))
    if kind == KIND_ALL_REDUCE and len(active) > 1 and nin >= PARTS_MIN_BYTES:  # fold a part, gather the parts
        return _Shape(KIND_ALL_REDUCE_PARTS, src, dst, nin, _align(nin), x.numel(), 1, -1, int(call.op), dtype,
                      _align(nin) + nin, nout, _part_elems(x.numel(), len(active)))
    if kind == KIND_ALL_REDUCE:
        return _Shape(kind, src, dst, nin, 0, x.numel(), 1, -1, int(call.op), dtype, nin, nout)
    if kind == KIND_REDUCE_SCATTER:
        return _Shape(kind, src, dst, nin, rank * nout, y.numel(), 1, -1, int(call.op), dtype, nin, nout)
    if kind == KIND_ALL_GATHER:
        return _Shape(kind, src, dst, nin, 0, nin, call.slots, -1, 0, dtype, nin, nout)
    if kind == KIND_ALL_TO_ALL:
        part = nin // call.slots
        return _Shape(kind, src, dst, nin, rank * part, part, call.slots, -1, 0, dtype, nin, nout)
    root = active.index(call.root)
    return _Shape(kind, src, dst, nin if rank == call.root else 0, 0, nin, 1, root, 0, dtype, nin, nout)


class CudaGroup:
    """The CUDA PG plane of one group on one rank (a ``PlaneGroup``)."""

    takes_device_tensors = True

    def __init__(self, info):
        self.info = info
        self.rank = info.rank
        self.capacity = info.capacity
        self.prefix = info.key_prefix
        self.timeout_s = info.timeout_s
        self.max_blocks = max_blocks()  # before anything is opened: a bad value fails the group's creation
        self.mem = _EmulatedMemory() if emulated() else _CudaMemory()
        self.layout = Layout(info.capacity)
        self.fp_words = LaneWords(L_META, L_META_NUMEL, L_META_SLOTS, L_SLOTS + 2 * info.capacity, info.capacity)
        self.lock = threading.RLock()
        self.queue: list[_Op] = []
        self.peers: dict[int, _Peer] = {}
        self.delegate: str | None = None  # why ops go to the ref plane (a remote rank, GPUs without P2P), else None
        # this host's ranks -> (GPU ordinal, UUID)
        self.gpus: dict[int, tuple[int, bytes]] = {self.rank: (self.mem.index, self.mem.uuid)}
        self.closed = False
        self.exact_host = os.environ.get(EXACT_HOST_ENV, "auto").strip().lower()
        native.load()
        self.ctrl = Segment.create(f"mooncake-fastcuda-{self.rank}-ctrl", self.layout.nbytes)
        self.ctl = self.ctrl.words(0, self.layout.words)
        for base in self.layout.lane:
            for field in (L_PUB, L_DONE, L_HOLD, L_FREE, L_RED):
                self.ctl[base + field] = -1
        self.ctl[W_VERSION], self.ctl[W_PID], self.ctl[W_CAPACITY] = 1, os.getpid(), self.capacity
        self.ctl[W_DEVICE] = self.mem.index
        self.ctl[W_MAGIC] = _MAGIC
        self.futex_addr = self.ctrl.addr + W_FUTEX * 8
        self.futex = self.ctrl.words(W_FUTEX * 8, 1).cast("B").cast("i")
        self.sleeping_addr = self.ctrl.addr + W_SLEEPING * 8
        self.lanes: dict[int, _Buffer] = {}
        self.lane_owner: dict[int, object] = {}  # lane -> the quick entry whose words its block holds (None: other)
        self.gen = 0
        self.streams: dict[int, object] = {}
        self.flag = self.mem.flag()
        self.flag_word = ctypes.c_int32.from_address(self.flag.data_ptr())  # host view: no torch op per call
        self._dead: set[int] = set()
        self._live_checked = 0.0
        self.host = host_identity()
        self.address = info.addresses.get(self.rank, b"")
        record = _RECORD.pack(_MAGIC, 1, self.capacity, os.getpid(), self.ctrl.fd, self.ctrl.size, self.host,
                              self.mem.index, self.mem.uuid)
        self.dev: _DevicePath | None = None
        self.dev_reason: str | None = None  # why the device path is off
        mode = os.environ.get(DEVICE_ENV, "auto").strip().lower()
        if mode == "on" or (mode == "auto" and not self.mem.emulated):
            self._device_path(lambda: _DevicePath(self))
        else:
            self.dev_reason = f"{DEVICE_ENV}={mode or 'auto'}"
        info.store.set(_record_key(self.prefix, self.rank), record + self.address)
        try:
            self.add_ranks({r: a for r, a in info.addresses.items() if r != info.rank})
        except BaseException:
            self.close()
            raise

    # ---- membership -----------------------------------------------------------------------------
    def add_ranks(self, addresses: dict[int, bytes]) -> None:
        """Attach the control segments of ranks not known yet (or replaced: a new address)."""
        todo = {r: a for r, a in addresses.items()
                if r != self.rank and (r not in self.peers or self.peers[r].address != a)}
        if not todo:
            return
        records = self._records(todo)
        with self.lock:
            self._place(records)
            if self.delegate is not None:
                return
            for r, rec in records.items():
                _, _, capacity, pid, fd, size, _, _, _ = rec
                if capacity != self.capacity:
                    raise MooncakeError(f"rank {r} opened the group with capacity {capacity}, this rank "
                                        f"{self.capacity}")
                try:
                    ctrl = Segment.attach(pid, fd, size)
                except SegmentError as exc:
                    raise MooncakeError(f"fast CUDA plane: cannot attach rank {r}'s control words: {exc}; "
                                        "use MOONCAKE_IMPL=ref") from None
                old = self.peers.pop(r, None)
                if old is not None and self.dev is not None and self.dev.captured:
                    self.dev.retire_peer(r, old)  # graphs captured earlier may still read its words and lanes
                elif old is not None:
                    if self.dev is not None:
                        self.dev.unmap_peer(r)
                    old.close()
                self.peers[r] = peer = _Peer(r, pid, todo[r], ctrl, self.layout)
                self._dead.discard(r)
                if self.dev is not None:
                    self._device_path(lambda: self.dev.map_peer(r, peer) or self.dev)

    def launch_blocks(self, nbytes: int) -> int:
        """Blocks of one device-path launch of this group that moves ``nbytes`` (``device_blocks``)."""
        return device_blocks(nbytes, self.mem.sms, _RANKS_ON_GPU.get(self.mem.uuid, 1), self.max_blocks)

    def _place(self, records: dict[int, tuple]) -> None:
        """Whether the group's collectives stay on this plane, from where its ranks are (their records): a rank
        on another host, two ranks numbering their GPUs differently, or two GPUs that cannot map each other's
        memory send them to the ref plane (``delegate``: why), on every rank alike."""
        remote = sorted(r for r, rec in records.items() if rec[6] != self.host)
        self.gpus.update({r: (rec[7], rec[8]) for r, rec in records.items() if rec[6] == self.host})
        sharing = sum(1 for _, u in self.gpus.values() if u == self.mem.uuid)
        _RANKS_ON_GPU[self.mem.uuid] = max(_RANKS_ON_GPU.get(self.mem.uuid, 1), sharing)
        if self.delegate is not None:
            return
        why = f"rank(s) {remote} run on another host" if remote else numbering_clash(self.gpus)
        unreachable = None if why else unreachable_pair({g for g, _ in self.gpus.values()}, self.mem.peer_access)
        if unreachable is not None:
            why = (f"GPUs {unreachable[0]} and {unreachable[1]} of this host cannot map each other's memory (no "
                   "peer-to-peer access between them)")
        if why:
            self.delegate = f"{why}; this group's collectives use the ref plane (UCX) over host copies"
            # ranks on several hosts: expected; the others: a GPU set-up to fix
            (log.logger.info if remote else log.logger.warning)("rank %d: %s", self.rank, self.delegate)

    def _device_path(self, make) -> None:
        """Set up (a part of) the device path; where that fails the group keeps to the host protocol."""
        try:
            self.dev = make()
        except Exception as exc:  # noqa: BLE001 - a CudaError / MooncakeError: the host protocol serves
            if self.dev is not None:
                self.dev.close()
            self.dev, self.dev_reason = None, f"the device path is off: {exc}"
            log.logger.info("rank %d: fast CUDA plane: %s", self.rank, self.dev_reason)

    def _records(self, addresses: dict[int, bytes]) -> dict[int, tuple]:
        store = self.info.store
        deadline = time.monotonic() + self.timeout_s
        keys = {r: _record_key(self.prefix, r) for r in addresses}
        try:
            store.wait(list(keys.values()), timedelta(seconds=max(self.timeout_s, 1.0)))
        except Exception as exc:  # DistStoreError / DistNetworkError
            raise MooncakeError(f"fast CUDA plane: ranks {sorted(addresses)} did not publish their control "
                                f"words within {self.timeout_s:.0f} s ({exc})") from None
        out, pending = {}, dict(addresses)
        while pending:
            for r in list(pending):
                try:
                    raw = store.get(keys[r])
                except AuthError:
                    continue  # not signed with the job's secret: dropped, wait for the authentic one
                rec = _RECORD.unpack_from(raw) if len(raw) >= _RECORD.size else None
                if rec is None or rec[0] != _MAGIC:
                    raise MooncakeError(f"fast CUDA plane: rank {r} published a malformed record ({len(raw)} "
                                        "bytes); was the Store written by another job?")
                if not pending[r] or bytes(raw[_RECORD.size:]) == pending[r]:
                    out[r] = rec
                    del pending[r]
            if pending:
                if time.monotonic() > deadline:
                    raise MooncakeError(f"fast CUDA plane: rank(s) {sorted(pending)} did not publish a record "
                                        "for their current incarnation in time")
                time.sleep(0.005)
        return out

    def peer(self, rank: int) -> _Peer:
        p = self.peers.get(rank)
        if p is None:
            raise MooncakeError(f"fast CUDA plane: rank {rank} is in the view but its control words were "
                                "never attached (add_ranks missing)")
        return p

    # ---- my lanes ---------------------------------------------------------------------------------
    def lane_view(self, lane: int, nbytes: int) -> torch.Tensor | None:
        """My lane's buffer, grown to ``nbytes`` when needed (only while every peer has released it and
        my own work on it has completed)."""
        have = self.lanes.get(lane)
        if have is not None and have.size >= nbytes:
            return have.view
        if nbytes == 0:
            return None if have is None else have.view
        if have is not None:
            del self.lanes[lane]
            have.close()
        self.lanes[lane] = buf = self.publish_lane(lane, nbytes)
        return buf.view

    def publish_lane(self, lane: int, nbytes: int) -> _Buffer:
        """A new buffer of at least ``nbytes`` for ``lane``, its handle published in the lane's words."""
        size = max(MIN_LANE_BYTES, 1 << math.ceil(math.log2(nbytes)))
        buf = self.mem.allocate(size, f"mooncake-fastcuda-{self.rank}-lane{lane}")
        self.gen += 1
        base = self.layout.lane[lane]
        for i in range(8):
            self.ctl[base + L_HANDLE + i] = struct.unpack_from("<q", buf.handle.ljust(64, b"\0"), 8 * i)[0]
        self.ctl[base + L_SIZE] = size
        self.ctl[base + L_GEN] = self.gen
        return buf

    def stream_for(self, seq: int):
        """The stream operation ``seq`` runs on: the caller's current one when first posted."""
        s = self.streams.get(seq)
        if s is None:
            s = self.streams[seq] = self.mem.caller_stream()
            if len(self.streams) > 2 * _STREAMS_KEPT:  # keep the latest seqs (numbered in order, mostly)
                for old in sorted(self.streams)[:len(self.streams) - _STREAMS_KEPT]:
                    del self.streams[old]
        return s

    # ---- signals --------------------------------------------------------------------------------
    def wake(self, ranks: Sequence[int]) -> None:
        if native.lib is None:
            return
        native.lib.mc_fence()
        for r in ranks:
            p = self.peers.get(r)
            if p is not None and p.ctl[W_SLEEPING]:
                native.lib.mc_futex_bump_wake(p.futex_addr)

    def failed(self, ranks: Sequence[int]) -> frozenset[int]:
        now = time.monotonic()
        if now - self._live_checked >= LIVENESS_PERIOD_S:
            self._live_checked = now
            fds = {p.pidfd: r for r, p in self.peers.items() if p.pidfd is not None and r not in self._dead}
            if fds:
                readable, _, _ = select.select(list(fds), [], [], 0)
                self._dead.update(fds[fd] for fd in readable)
            for r, p in self.peers.items():
                if p.ctl[W_CLOSED] or (p.pidfd is None and r not in self._dead and p.dead()):
                    self._dead.add(r)
        return frozenset(r for r in ranks if r in self._dead)

    # ---- driving --------------------------------------------------------------------------------
    def enqueue(self, op: "_Op", pump: bool = True) -> "_Op":
        with self.lock:
            if self.closed:
                raise MooncakeError("the fast CUDA plane of this group is closed")
            i = len(self.queue)
            while i > 0 and self.queue[i - 1].seq > op.seq:
                i -= 1
            self.queue.insert(i, op)
            if pump:
                self.pump()
        return op

    def pump(self) -> None:
        """Advance queued operations in order, as far as they can go without waiting."""
        with self.lock:
            for op in list(self.queue):
                if op.state == QUEUED and not op.try_post():
                    return
                if op.state == DEVICE and not op.try_device_done():
                    return
                if op.state == PUBLISHING and not op.try_pub():
                    return
                if op.state == POSTED and not op.try_read():
                    if op.state == ABANDONED:  # the ranks disagree on the call: it left the queue
                        continue
                    return
                if op.state == FOLDING and not op.try_reduced():
                    return
                if op.state == REDUCED and not op.try_gather():
                    return
                if op.state == READING and not op.try_data():
                    return
                if op.state == DATA and not op.try_commit():
                    return

    def _own_event(self, until: "_Op") -> "tuple[_Op, object] | None":
        """The first stuck operation up to ``until`` that waits for its GPU event, and the event (None: it
        waits for peers)."""
        with self.lock:
            for op in self.queue:
                if op.state in _GPU_BUSY:
                    return op, op.ev
                if op.state < COMMITTED or op is until:
                    return None
        return None

    def wait(self, op: "_Op", timeout_s: float) -> bool:
        """Block until ``op`` is committed (True), a peer of it is newly found dead, or ``timeout_s``
        passed (False)."""
        now = time.monotonic()
        deadline = now + max(timeout_s, 0.0)
        spin_end = now + SPIN_S
        known_dead = self.failed(op.others)
        while True:
            self.pump()
            if op.state >= COMMITTED:
                return op.state != ABANDONED
            if self.failed(op.others) - known_dead:
                return False
            now = time.monotonic()
            if now >= deadline:
                return False
            busy = self._own_event(op)
            if busy is not None:  # this rank's own copies / fold: short for small operations, else bounded
                busy_op, ev = busy  # (another thread pumping may clear busy_op.ev meanwhile: ev stays valid)
                device = busy_op.state == DEVICE
                spin = DEVICE_SPIN_S if device else SPIN_S  # device: peers' DONE come from GPUs
                spin_end = now + spin
                if device:  # its DONE word (host memory), the event between slices (a launch that gave up)
                    landed = busy_op.device_landed
                    done_addr = self.ctrl.addr + (busy_op.base + L_DONE) * 8
                    while time.monotonic() < spin_end and not self.closed:  # (close() unmaps the word)
                        # keys only grow: DONE >= key is this op's (landed() checks == key below)
                        got = native.spin_until_ge(done_addr, busy_op.key, _DEVICE_POLL_SLICE_S)
                        if got is None:  # no native library: one look per pass
                            got = busy_op.device_done_word()
                        if got or self.mem.done(ev):
                            break
                else:
                    landed = self.mem.done
                    while not landed(ev) and time.monotonic() < spin_end:
                        pass
                if not landed(ev):
                    self.mem.sync(ev)
                spin_end = time.monotonic() + spin
                continue
            if now < spin_end:
                os.sched_yield()
                continue
            seen = int(self.futex[0])
            native.store_fence(self.sleeping_addr, 1)
            self.pump()
            if op.state < COMMITTED and self._own_event(op) is None:
                native.futex_wait(self.futex_addr, seen, min(deadline - now, SLEEP_SLICE_S))
            self.ctl[W_SLEEPING] = 0
            spin_end = time.monotonic() + SPIN_S / 4

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for op in list(self.queue):
                op.abandon()
            self.ctl[W_CLOSED] = 1
            self.wake(list(self.peers))
            if self.dev is not None:
                self.dev.close()
                self.dev = None
            for p in self.peers.values():
                p.close()
            self.peers.clear()
            for buf in self.lanes.values():
                buf.close()
            self.lanes.clear()
            self.futex = None
            self.ctl = None
            self.ctrl.close()


# ======================================================================================== operations

class _Op:
    """One collective on this rank (a ``PlaneOp``).  Subclasses say what is published, whose
    publications are needed, and how the outputs are computed."""

    opcode: OpCode

    def __init__(self, group: CudaGroup, ctx, dtype: torch.dtype | None = None, redop: int = 0,
                 root: int = -1):
        self.g = group
        self.ctx = ctx
        self.name = ctx.name
        self.seq = seq = ctx.seq
        self.key = _key(ctx.view.epoch, seq)
        self.lane = seq & 1
        self.base = group.layout.lane[self.lane]
        self.me = me = ctx.rank
        self.active = active = tuple(ctx.view.active)
        self.others = tuple(r for r in active if r != me)
        self.dtype = dtype
        self.dtype_code = 255 if dtype is None else DTYPE_CODES[dtype]
        self.redop = int(redop)
        self.root = root
        # the call as the control plane describes it (planes driven directly get the bare minimum)
        self.fp: Fingerprint = ctx.fingerprint or Fingerprint(self.opcode, self.dtype_code, self.redop, root)
        self.verified = False
        self.state = QUEUED
        self.needs: tuple[int, ...] = ()
        self.outputs: list[torch.Tensor] = []
        self.stash: list[torch.Tensor | None] | None = None
        self.error: BaseException | None = None  # a verdict every rank reaches alike (mismatch)
        self.finish_error: BaseException | None = None  # raised by finish() on this rank
        self.stream = group.stream_for(seq)
        self.ev = None
        self.held = False
        self.checked: set[int] = set()
        # reductions: the GPU fold's inputs, result and destination, for the host fold when flagged
        self.fold_op: ReduceOp | None = None
        self.fold_inputs: list[torch.Tensor] = []
        self.fold_out: torch.Tensor | None = None
        self.fold_dst: torch.Tensor | None = None
        self.fold_slice: tuple[int, int] | None = None
        self.kernel_flag = False  # the fold kernel computes the host-fold flag itself
        self.two_phase = False  # large all_reduce: fold one part per rank, then gather the parts
        self.device_tried = False  # posted through the device path once (a second post takes the host protocol)

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

    def wait(self, timeout_s: float) -> bool:
        """Block until committed (True), a peer of this op is newly found dead, or ``timeout_s``
        passed (False); see ``CudaGroup.wait``."""
        return self.g.wait(self, timeout_s)

    def failed_peers(self) -> frozenset[int]:
        return self.g.failed(self.others)

    def pending_ranks(self) -> tuple[int, ...]:
        with self.g.lock:
            if self.state == QUEUED:
                return tuple(r for r in self.others if not self._released(r))
            if self.state in (DEVICE, POSTED):
                return tuple(r for r in self.needs if self.g.peer(r).ctl[self.base + L_PUB] != self.key)
            if self.state == REDUCED:
                return tuple(r for r in self.others if self.g.peer(r).ctl[self.base + L_RED] != self.key)
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
                if self.finish_error is not None:
                    try:
                        self._restore()
                    except BaseException as exc:  # noqa: BLE001 - the op's own error is the one to report
                        raise self.finish_error from exc
                    raise self.finish_error
                with g.mem.on(self.stream):
                    for out, val in zip(self.outputs, self.stash):
                        if val is None:
                            out.zero_()
                        elif val is not out:
                            out.copy_(val)
            finally:
                self.state = FINISHED
                self._release()

    def abandon(self) -> None:
        with self.g.lock:
            if self.state in (FINISHED, ABANDONED):
                return
            try:
                if self.state in _GPU_BUSY and self.ev is not None:
                    self.g.mem.sync(self.ev)  # nothing of this op may still touch a lane
                    if self.state == DEVICE:
                        self._adopt_device_words()
                self._restore()
            finally:
                self._free()
                self.state = ABANDONED
                self._release()

    # -- state machine (under the group lock) --------------------------------------------------
    def _released(self, r: int) -> bool:
        """Rank ``r`` no longer reads this lane of an earlier operation."""
        ctl = self.g.peer(r).ctl
        held = ctl[self.base + L_HOLD]
        return ctl[self.base + L_FREE] >= held or held >= self.key

    def try_post(self) -> bool:
        g = self.g
        if g.closed:
            return False
        if g.dev is not None and not self.device_tried and self.device_ok():
            self.device_tried = True
            g.dev.post(self)
            self.state = DEVICE
            return self.try_device_done()
        for r in self.others:
            if not self._released(r):
                return False
        for op in g.queue:  # earlier ops on this lane that may still need their input from it save it first
            if op is self:
                break
            if op.lane == self.lane:
                saved = op.vacate_lane()
                if saved is not None:
                    g.mem.wait_event(self.stream, saved)
        ctl, base = g.ctl, self.base
        sends = self.sends()
        table = []  # (slot, offset, nbytes)
        total = 0
        for slot, t in sends:
            nb = _nbytes(t)
            table.append((slot, total, nb))
            total += _align(nb)
        result_off = total
        view = g.lane_view(self.lane, total + _align(self.result_bytes()))
        with g.mem.on(self.stream):
            for (slot, t), (_, off, nb) in zip(sends, table):
                if nb:
                    view[off:off + nb].copy_(t.reshape(-1).view(torch.uint8))
            self.ev = g.mem.record(self.stream)
        nslots = max((slot + 1 for slot, _, _ in table), default=0)
        for i in range(nslots):
            ctl[base + L_SLOTS + 2 * i + 1] = -1
        for slot, off, nb in table:
            ctl[base + L_SLOTS + 2 * slot] = off
            ctl[base + L_SLOTS + 2 * slot + 1] = nb
        g.fp_words.write(ctl, base, self.fp, int(self.two_phase))
        g.lane_owner[self.lane] = None
        ctl[base + L_NSLOTS] = nslots
        ctl[base + L_NBYTES] = total
        ctl[base + L_RESULT] = result_off
        self.state = PUBLISHING
        return self.try_pub()

    def device_ok(self) -> bool:
        """This op may take the device path (``_DevicePath.eager_ok``)."""
        return False

    def try_device_done(self) -> bool:
        """The device path's launch completed: carry on from where its words say it got (committed here,
        published only, or nothing) with the host protocol."""
        g = self.g
        if not self.device_landed(self.ev):
            return False
        self.ev = None
        ctl, base, key = g.ctl, self.base, self.key
        g.wake(self.others)
        self._adopt_device_words()
        outcomes = g.dev.outcomes if g.dev is not None else {}
        if ctl[base + L_DONE] == key:
            outcomes["done"] = outcomes.get("done", 0) + 1
            self.verified = True
            self.device_result()
            self.state = DATA
            return self.try_commit()
        if ctl[base + L_PUB] == key:
            outcomes["published"] = outcomes.get("published", 0) + 1
            self.state = POSTED
            return self.try_read()
        outcomes["not posted"] = outcomes.get("not posted", 0) + 1
        self.state = QUEUED
        return self.try_post()

    def device_done_word(self) -> bool:
        """The device path's launch committed this op here: its DONE, written after its last write of the
        result (one read of host memory)."""
        return self.g.ctl[self.base + L_DONE] == self.key

    def device_landed(self, ev) -> bool:
        """The device path's launch, recorded by ``ev``, is over: its DONE or, where it gave up, its event."""
        return self.device_done_word() or self.g.mem.done(ev)

    def _adopt_device_words(self) -> None:
        """After the device path's launch: take over what its words say it did.  HOLD = key: this rank
        reads its peers' lanes until it writes FREE (also when the op is abandoned).  PUB = key: the lane
        holds the whole input and blocks past their wait may have written their part of the output, so a
        failed op restores the caller's tensor from the lane."""
        ctl, base, key = self.g.ctl, self.base, self.key
        if ctl[base + L_HOLD] == key:
            self.held = True
        if ctl[base + L_PUB] == key:
            self.device_published()

    def device_published(self) -> None:
        """The device path published this op and may have written part of its output (``_AllReduce``)."""

    def device_result(self) -> None:
        """The device path wrote this op's result (``_AllReduce``)."""

    def try_pub(self) -> bool:
        if not self.g.mem.done(self.ev):
            return False
        if self.others:
            faults.hit("mid_transfer")  # fault injection (tests): payload in my lane, not announced
        self.g.ctl[self.base + L_PUB] = self.key
        self.ev = None
        self.state = POSTED
        self.g.wake(self.others)
        return self.try_read()

    def verify(self) -> bool:
        """Once every other active rank has published this op: compare every rank's fingerprint
        (all ranks read the same words, so all reach the same verdict).  Nothing of a peer is read
        before this returns True; a mismatch ends the op with ``error``."""
        g, key, at = self.g, self.key, self.base + L_PUB
        for r in self.others:
            if g.peer(r).ctl[at] != key:
                return False
        problem = g.fp_words.verdict(self.seq, self.base, self.me, self.fp, int(self.two_phase),
                                     {r: g.peer(r).ctl for r in self.others})
        if problem is not None:
            self.error = MismatchError(problem)
            self.state = ABANDONED
            self._release()
            g.wake(self.others)
            return False
        self.verified = True
        return True

    def try_read(self) -> bool:
        g, base, key = self.g, self.base, self.key
        if not self.verified and not self.verify():
            return False
        for r in self.needs:
            if g.peer(r).ctl[base + L_PUB] != key:
                return False
        g.ctl[base + L_HOLD] = key
        self.held = True
        with g.mem.on(self.stream):
            try:
                if self.two_phase:
                    self.fold_part()
                else:
                    self.stash = self.compute()
                self._flag_inexact()
            except BaseException as exc:  # noqa: BLE001 - raised again by finish()
                self.finish_error, self.stash = exc, None
                self.fold_op = None
            self.ev = g.mem.record(self.stream)
        if self.two_phase:
            self.state = FOLDING
            return self.try_reduced()
        self.state = READING
        return self.try_data()

    def try_reduced(self) -> bool:
        """(two-phase) my part is folded into my lane's result region: announce it (RED)."""
        g = self.g
        if not g.mem.done(self.ev):
            return False
        self.ev = None
        self._exact()
        g.ctl[self.base + L_RED] = self.key
        self.state = REDUCED
        g.wake(self.others)
        return self.try_gather()

    def try_gather(self) -> bool:
        """(two-phase) every owner's part is folded: copy them all into the stash."""
        g, key, at = self.g, self.key, self.base + L_RED
        for r in self.others:
            if g.peer(r).ctl[at] != key:
                return False
        with g.mem.on(self.stream):
            if self.finish_error is None:
                try:
                    self.stash = self.gather()
                except BaseException as exc:  # noqa: BLE001 - raised again by finish()
                    self.finish_error, self.stash = exc, None
            self.ev = g.mem.record(self.stream)
        self.state = READING
        return self.try_data()

    def _flag_inexact(self) -> None:
        """Enqueue the check whether the GPU fold's result needs the host fold (see the module doc):
        a NaN anywhere makes the float64 sum NaN (an inf - inf there only costs a needless host fold)."""
        op, out = self.fold_op, self.fold_out
        if op is None or self.exact_mode == "never" or not out.dtype.is_floating_point:
            self.fold_op = None
            return
        if self.exact_mode == "always":
            return
        if self.kernel_flag:
            bad = self.g.mem.device_flag
        else:
            bad = torch.isnan(out.sum(dtype=torch.float64))
            if op in (ReduceOp.MIN, ReduceOp.MAX):
                bad = bad | (out == 0).any()
            bad = bad.to(torch.int32).reshape(1)
        self.g.flag.copy_(bad, non_blocking=True)

    @property
    def exact_mode(self) -> str:
        return self.g.exact_host

    def _exact(self) -> None:
        """After the fold's event: take the host fold when it was flagged."""
        if self.fold_op is not None and (self.exact_mode == "always" or self.g.flag_word.value):
            try:
                self._host_fold()
            except BaseException as exc:  # noqa: BLE001 - raised again by finish()
                self.finish_error, self.stash = exc, None
        self.fold_op, self.fold_inputs, self.fold_out = None, [], None

    def try_data(self) -> bool:
        g = self.g
        if not g.mem.done(self.ev):
            return False
        self.ev = None
        self._exact()
        if self.others:
            faults.hit("after_data")  # fault injection (tests): every payload held here, no DONE yet
        self._free()
        g.ctl[self.base + L_DONE] = self.key
        self.state = DATA
        g.wake(self.others)
        return self.try_commit()

    def _host_fold(self) -> None:
        """The fold again on host copies of the whole inputs, as the ref plane folds (the CPU's bits: NaN
        encodings, signed zeros); the GPU result ``fold_dst`` (the slice ``fold_slice`` of it) is
        overwritten."""
        g = self.g
        with g.mem.on(self.stream):
            host = [x.to("cpu", copy=True) for x in self.fold_inputs]  # synchronises with the stream
            result = fold(self.fold_op, host).reshape(-1)
            lo, hi = self.fold_slice if self.fold_slice is not None else (0, result.numel())
            self.fold_dst.copy_(result[lo:hi].view(self.fold_dst.shape))

    def try_commit(self) -> bool:
        key, at = self.key, self.base + L_DONE
        for r in self.others:
            if self.g.peer(r).ctl[at] != key:
                return False
        self.state = COMMITTED
        return True

    def _free(self) -> None:
        if self.held and self.g.ctl is not None:
            self.held = False
            self.g.ctl[self.base + L_FREE] = self.key
            self.g.wake(self.others)

    def _release(self) -> None:
        self.stash = None
        self.fold_op, self.fold_inputs, self.fold_out, self.fold_dst = None, [], None, None
        if self in self.g.queue:
            self.g.queue.remove(self)

    # -- what subclasses define ------------------------------------------------------------------
    def sends(self) -> list[tuple[int, torch.Tensor]]:
        return []

    def compute(self) -> list[torch.Tensor | None]:
        """Enqueue the outputs' computation on the op's stream: one stash entry per output (None: zeros)."""
        return []

    def result_bytes(self) -> int:
        """(two-phase) bytes of this rank's result region after its payload in its lane."""
        return 0

    def _restore(self) -> None:
        """Give the caller's tensors back their inputs where this op wrote them before its commit (the
        host waits for that copy: the caller may read the tensor on any stream once the op failed)."""

    def vacate_lane(self):
        """A later operation is about to overwrite this op's lane: save what ``_restore`` would read from
        it; returns the event the overwrite must wait for (None: nothing to save)."""
        return None

    # -- reading ---------------------------------------------------------------------------------
    def src(self, r: int, slot: int, like: torch.Tensor) -> torch.Tensor:
        """Rank ``r``'s published block ``slot`` as a tensor shaped like ``like`` (a view of its lane)."""
        g, base = self.g, self.base
        nbytes = _nbytes(like)
        if r == self.me:
            ctl = g.ctl
            lane = g.lanes.get(self.lane)
            view = None if lane is None else lane.view
        else:
            p = g.peer(r)
            ctl = p.ctl
            view = p.lane_view(g.mem, self.lane, base)
        if slot >= ctl[base + L_NSLOTS] or ctl[base + L_SLOTS + 2 * slot + 1] < 0:
            raise WireError(f"{self.name}: rank {r} published no block for slot {slot}: the ranks disagree "
                            "on the number of slots")
        at = base + L_SLOTS + 2 * slot
        off, nb = int(ctl[at]), int(ctl[at + 1])
        if nb != nbytes:
            raise WireError(f"{self.name}: rank {r} sent {nb} bytes for slot {slot}, this rank expects "
                            f"{nbytes}: tensor sizes must agree across ranks")
        if nbytes == 0:
            return torch.empty(like.shape, dtype=like.dtype, device=g.mem.device)
        if view is None or off + nb > view.numel():
            raise WireError(f"{self.name}: rank {r}'s block for slot {slot} lies outside its lane")
        return view[off:off + nb].view(like.dtype).view(like.shape)

    def reduced(self, op: ReduceOp, inputs: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` (fresh when None) <- the model's fold of ``inputs`` on the op's stream, returned: one kernel
        where it applies (it also computes the host-fold flag), else torch ops.  Kept for the host fold."""
        mem = self.g.mem
        self.kernel_flag = mem.can_fold(op, inputs, out)
        if self.kernel_flag:
            res = dst = out if out is not None else torch.empty_like(inputs[0])
            mem.fold(op, inputs, dst, self.exact_mode == "auto", self.stream)
        else:
            res = device_fold(op, inputs)
            dst = res if out is None else out.copy_(res.view(out.shape))
        self.fold_op, self.fold_inputs, self.fold_out, self.fold_dst, self.fold_slice = op, inputs, res, dst, None
        return dst


def device_fold(op: ReduceOp, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``mooncake.model.reduce.fold`` step for step, minus its first copy where no conversion is needed:
    ``op(x0, x1)`` equals ``op(copy of x0, x1)`` bit for bit, and the combining function is the model's."""
    from ...model.reduce import _combine, accumulator_dtype
    op = ReduceOp(op)
    if len(inputs) < 2 or op is ReduceOp.AVG or accumulator_dtype(inputs[0].dtype) is not inputs[0].dtype:
        return fold(op, inputs)
    acc = _combine(op, inputs[0], inputs[1])
    for x in inputs[2:]:
        acc = _combine(op, acc, x)
    return acc


class _AllReduce(_Op):
    """Small: every rank folds the whole tensor from every lane.  Large (``PARTS_MIN_BYTES``): every
    active rank folds one part (a contiguous range of elements, in active-rank order) from every lane into
    its lane's result region and announces it (RED); then every rank copies all parts into its stash.
    Per rank that reads about the tensor once for the fold, whatever the number of ranks.

    A contiguous tensor is written in place as soon as its result is computed (the fold's output, or
    the gather of the parts), not by ``finish``: this rank's input stays in its lane until the next
    operation on that lane (which first has it saved, ``vacate_lane``, if this op is not finished yet),
    and ``abandon`` (or a failed ``finish``) copies it back, so a failed operation still leaves the
    caller's tensor as it was."""

    opcode = OpCode.ALL_REDUCE

    def __init__(self, g, ctx, tensor, op):
        super().__init__(g, ctx, tensor.dtype, int(op))
        self.tensor, self.op = tensor, ReduceOp(op)
        self.outputs = [tensor]
        self.needs = self.others
        self.in_place = type(self) is _AllReduce and tensor.is_contiguous() and tensor.device == g.mem.device
        self.wrote = False  # the caller's tensor holds (part of) the result
        self.saved_input: torch.Tensor | None = None  # this rank's input, once a later op needs the lane
        n, numel = len(self.active), tensor.numel()
        if type(self) is _AllReduce and n > 1 and _nbytes(tensor) >= PARTS_MIN_BYTES:
            self.two_phase = True
            per = _part_elems(numel, n)
            self.parts = {r: (min(numel, i * per), min(numel, (i + 1) * per)) for i, r in enumerate(self.active)}

    def sends(self):
        return [(0, self.tensor)]

    def device_ok(self):
        return self.g.dev.eager_ok(self)

    def device_published(self):
        self.wrote = True

    def device_result(self):
        self.wrote = True
        self.stash = [self.tensor]
        torch.autograd.graph.increment_version(self.tensor)
        mode = self.exact_mode
        if mode == "always" or (mode == "auto" and self.g.flag_word.value):  # flagged: the host fold from the lanes
            self.fold_op, self.fold_out = self.op, self.tensor
            self.fold_inputs = [self.src(r, 0, self.tensor) for r in self.active]
            self.fold_dst, self.fold_slice = self.tensor, None
            self._exact()

    def compute(self):
        inputs = [self.src(r, 0, self.tensor) for r in self.active]
        if not self.in_place:
            return [self.reduced(self.op, inputs)]
        self.wrote = True
        out = self.reduced(self.op, inputs, out=self.tensor)
        if self.kernel_flag:  # written through its pointer: tell autograd, as an in-place torch op would
            torch.autograd.graph.increment_version(self.tensor)
        return [out]

    def _restore(self):
        if self.wrote:
            self.wrote = False
            with self.g.mem.on(self.stream):
                saved = self.saved_input if self.saved_input is not None else self.src(self.me, 0, self.tensor)
                self.tensor.copy_(saved.view(self.tensor.shape))
                self.g.mem.sync(self.g.mem.record(self.stream))

    def _release(self):
        self.saved_input = None
        super()._release()

    def vacate_lane(self):
        if not self.wrote or self.saved_input is not None:
            return None
        with self.g.mem.on(self.stream):
            self.saved_input = self.src(self.me, 0, self.tensor).clone()
            return self.g.mem.record(self.stream)

    def result_bytes(self):
        if not self.two_phase:
            return 0
        lo, hi = self.parts[self.me]
        return (hi - lo) * self.tensor.element_size()

    def region(self, r: int) -> torch.Tensor:
        """Rank ``r``'s result region (its part of the fold), typed and flat."""
        g, base = self.g, self.base
        lo, hi = self.parts[r]
        nb = (hi - lo) * self.tensor.element_size()
        if r == self.me:
            ctl, lane = g.ctl, g.lanes.get(self.lane)
            view = None if lane is None else lane.view
        else:
            p = g.peer(r)
            ctl, view = p.ctl, p.lane_view(g.mem, self.lane, base)
        if nb == 0:
            return torch.empty(0, dtype=self.dtype, device=g.mem.device)
        off = int(ctl[base + L_RESULT])
        if view is None or off < 0 or off + nb > view.numel():
            raise WireError(f"{self.name}: rank {r}'s result region lies outside its lane: the ranks disagree "
                            "on the tensor size")
        return view[off:off + nb].view(self.dtype)

    def fold_part(self):
        inputs = [self.src(r, 0, self.tensor) for r in self.active]
        lo, hi = self.parts[self.me]
        self.reduced(self.op, [x.reshape(-1)[lo:hi] for x in inputs], out=self.region(self.me))
        self.fold_inputs, self.fold_slice = inputs, (lo, hi)

    def gather(self):
        if self.in_place:
            self.wrote = True
            result = self.tensor
        else:
            result = torch.empty_like(self.tensor, memory_format=torch.contiguous_format)
        flat = result.view(-1)
        for r in self.active:
            lo, hi = self.parts[r]
            if hi > lo:
                flat[lo:hi].copy_(self.region(r))
        return [result]


class _Reduce(_AllReduce):
    opcode = OpCode.REDUCE

    def __init__(self, g, ctx, tensor, op, root):
        super().__init__(g, ctx, tensor, op)
        self.root = root
        if ctx.fingerprint is None:
            self.fp = Fingerprint(self.opcode, self.dtype_code, self.redop, root)
        if self.me != root:
            self.outputs, self.needs = [], ()

    def compute(self):
        return super().compute() if self.me == self.root else []


class _Broadcast(_Op):
    opcode = OpCode.BROADCAST

    def __init__(self, g, ctx, tensor, root):
        super().__init__(g, ctx, tensor.dtype, 0, root)
        self.tensor = tensor
        if self.me != root:
            self.needs, self.outputs = (root,), [tensor]

    def sends(self):
        return [(0, self.tensor)] if self.me == self.root else []

    def compute(self):
        return [self.src(self.root, 0, self.tensor).clone()] if self.me != self.root else []


class _AllGather(_Op):
    opcode = OpCode.ALL_GATHER

    def __init__(self, g, ctx, outputs, tensor):
        super().__init__(g, ctx, tensor.dtype)
        self.tensor = tensor
        self.outputs = list(outputs)
        self.needs = self.others

    def sends(self):
        return [(0, self.tensor)]

    def compute(self):
        return [self.src(s, 0, out).clone() if s in self.active else None for s, out in enumerate(self.outputs)]


class _Gather(_AllGather):
    opcode = OpCode.GATHER

    def __init__(self, g, ctx, outputs, tensor, root):
        super().__init__(g, ctx, outputs or [], tensor)
        self.root = root
        if ctx.fingerprint is None:
            self.fp = Fingerprint(self.opcode, self.dtype_code, self.redop, root)
        if self.me != root:
            self.outputs, self.needs = [], ()

    def compute(self):
        return super().compute() if self.me == self.root else []


class _Scatter(_Op):
    opcode = OpCode.SCATTER

    def __init__(self, g, ctx, tensor, inputs, root):
        super().__init__(g, ctx, tensor.dtype, 0, root)
        self.tensor, self.inputs = tensor, inputs
        self.outputs = [tensor]
        self.needs = () if self.me == root else (root,)

    def sends(self):
        return [(r, self.inputs[r]) for r in self.active] if self.me == self.root else []

    def compute(self):
        return [self.src(self.root, self.me, self.tensor).clone()]


class _ReduceScatter(_Op):
    opcode = OpCode.REDUCE_SCATTER

    def __init__(self, g, ctx, output, inputs, op):
        super().__init__(g, ctx, output.dtype, int(op))
        self.output, self.inputs, self.op = output, inputs, ReduceOp(op)
        self.outputs = [output]
        self.needs = self.others

    def sends(self):
        return [(r, self.inputs[r]) for r in self.active]

    def compute(self):
        return [self.reduced(self.op, [self.src(r, self.me, self.output) for r in self.active])]


class _AllToAll(_Op):
    opcode = OpCode.ALL_TO_ALL

    def __init__(self, g, ctx, outputs, inputs):
        dtype = inputs[0].dtype if inputs else (outputs[0].dtype if outputs else None)
        super().__init__(g, ctx, dtype)
        self.inputs = inputs
        self.outputs = list(outputs)
        self.needs = self.others

    def sends(self):
        return [(r, self.inputs[r]) for r in self.active]

    def compute(self):
        return [self.src(s, self.me, out).clone() if s in self.active else None
                for s, out in enumerate(self.outputs)]


class _Barrier(_Op):
    opcode = OpCode.BARRIER

    def __init__(self, g, ctx):
        super().__init__(g, ctx)
        self.needs = self.others


# ======================================================================================== ref fallback

class _HostStaged:
    """A ref-plane operation over host copies of CUDA tensors; ``finish`` copies the outputs back on the
    operation's stream."""

    def __init__(self, inner, pairs: list[tuple[torch.Tensor, torch.Tensor]], stream, mem):
        self.inner, self.pairs, self.stream, self.mem = inner, pairs, stream, mem

    @property
    def data_complete(self) -> bool:
        return self.inner.data_complete

    @property
    def committed(self) -> bool:
        return self.inner.committed

    def progress(self) -> None:
        self.inner.progress()

    def failed_peers(self) -> frozenset[int]:
        return self.inner.failed_peers()

    def pending_ranks(self) -> tuple[int, ...]:
        return self.inner.pending_ranks()

    def abandon(self) -> None:
        self.inner.abandon()

    def finish(self) -> None:
        self.inner.finish()
        with self.mem.on(self.stream):
            for dev, host in self.pairs:
                dev.copy_(host)


# ======================================================================================== the plane

class FastCudaGroup:
    """The ``PlaneGroup`` handed to the control plane: shared device memory while every rank of the group runs
    on this host, the ref plane (UCX, host copies) once any rank does not."""

    takes_device_tensors = True

    def __init__(self, info):
        self.info = info
        self.g = CudaGroup(info)

    @property
    def delegate(self) -> str | None:
        return self.g.delegate

    def _run(self, op: _Op) -> _Op:
        return self.g.enqueue(op)

    def _ref(self, ctx, name: str, tensors: list, outputs: list[int], *args):
        """Run ``ref.<name>`` on host copies of ``tensors`` (a tensor, a list of tensors or None each);
        ``outputs`` are the indices of ``tensors`` written back by ``finish``."""
        from ...ref import collectives as ref
        fn = getattr(ref, name)
        g = self.g
        on_device = any(_is_device(t, g.mem) for t in tensors) and not g.mem.emulated
        if not on_device:
            return fn(ctx, *tensors, *args)
        stream = g.stream_for(ctx.seq)
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        host: list = []
        with g.mem.on(stream):
            for i, t in enumerate(tensors):
                if t is None:
                    host.append(None)
                elif isinstance(t, torch.Tensor):
                    h = t.to("cpu", copy=True)
                    host.append(h)
                    if i in outputs:
                        pairs.append((t, h))
                else:
                    hs = [x.to("cpu", copy=True) for x in t]
                    host.append(hs)
                    if i in outputs:
                        pairs.extend(zip(t, hs))
        return _HostStaged(fn(ctx, *host, *args), pairs, stream, g.mem)

    def _local(self, *tensors) -> bool:
        """Serve this call here: no remote rank, and tensors on the plane's device."""
        if self.g.delegate:
            return False
        for t in tensors:
            if t is None:
                continue
            for x in (t if isinstance(t, (list, tuple)) else [t]):
                if not self.g.mem.accepts(x):
                    return False
        return True

    def all_reduce(self, ctx, tensor, op):
        if not self._local(tensor):
            return self._ref(ctx, "all_reduce", [tensor], [0], op)
        return self._run(_AllReduce(self.g, ctx, tensor, op))

    def broadcast(self, ctx, tensor, root):
        if not self._local(tensor):
            return self._ref(ctx, "broadcast", [tensor], [0], root)
        return self._run(_Broadcast(self.g, ctx, tensor, root))

    def reduce(self, ctx, tensor, op, root):
        if not self._local(tensor):
            return self._ref(ctx, "reduce", [tensor], [0], op, root)
        return self._run(_Reduce(self.g, ctx, tensor, op, root))

    def all_gather(self, ctx, outputs, tensor):
        if not self._local(outputs, tensor):
            return self._ref(ctx, "all_gather", [outputs, tensor], [0])
        return self._run(_AllGather(self.g, ctx, outputs, tensor))

    def gather(self, ctx, outputs, tensor, root):
        if not self._local(outputs, tensor):
            return self._ref(ctx, "gather", [outputs, tensor], [0], root)
        return self._run(_Gather(self.g, ctx, outputs, tensor, root))

    def scatter(self, ctx, tensor, inputs, root):
        if not self._local(tensor, inputs):
            return self._ref(ctx, "scatter", [tensor, inputs], [0], root)
        return self._run(_Scatter(self.g, ctx, tensor, inputs, root))

    def reduce_scatter(self, ctx, output, inputs, op):
        if not self._local(output, inputs):
            return self._ref(ctx, "reduce_scatter", [output, inputs], [0], op)
        return self._run(_ReduceScatter(self.g, ctx, output, inputs, op))

    def all_to_all(self, ctx, outputs, inputs):
        if not self._local(outputs, inputs):
            return self._ref(ctx, "all_to_all", [outputs, inputs], [0])
        return self._run(_AllToAll(self.g, ctx, outputs, inputs))

    def barrier(self, ctx):
        if self.g.delegate:
            from ...ref import collectives as ref
            return ref.barrier(ctx)
        return self._run(_Barrier(self.g, ctx))

    # ---- the quick lane (the device path) -------------------------------------------------------------
    def quick_entry(self, tensor: torch.Tensor, op: ReduceOp, seq: int, epoch: int):
        """What posts all_reduce ``seq`` of ``tensor`` under view ``epoch`` on the quick lane, or None (the
        call goes the usual way).  No side effect."""
        dev = self.g.dev
        if dev is None or not dev.quick_on or self.g.delegate:
            return None
        return dev.quick_entry(tensor, op, seq & 1, epoch)

    def quick_post(self, entry, tensor: torch.Tensor, seq: int, epoch: int) -> _QuickOp:
        """Launch all_reduce ``seq`` of ``tensor`` on ``entry`` (``quick_entry``'s answer for it)."""
        return self.g.dev.quick_post(entry, tensor, seq, _key(epoch, seq))

    def quick_wait(self, q: _QuickOp) -> bool:
        """Whether ``q`` got through on every rank within ``DEVICE_SPIN_S`` and its result stands as written;
        False: hand it over (``quick_handover``)."""
        dev = self.g.dev
        return dev is not None and dev.quick_wait(q, DEVICE_SPIN_S) and dev.quick_result_ok()

    def quick_finish(self, q: _QuickOp) -> None:
        """``q`` committed."""
        self.g.dev.quick_finish(q)

    def quick_handover(self, q: _QuickOp, ctx) -> _Op | None:
        """``q`` as the ``PlaneOp`` of operation ``ctx.seq``, queued for the host protocol to carry on (its
        Work drives it); None: the plane was closed meanwhile."""
        with self.g.lock:
            dev = self.g.dev
            if dev is None or self.g.closed:
                return None
            return dev.quick_handover(q, ctx)

    # ---- CUDA graphs (the device path) -----------------------------------------------------------------
    def capture_refusal(self, view, call) -> str | None:
        """Why ``call`` (a ``GraphCall``) cannot be captured in a CUDA graph here, or None."""
        problem = _graph_call_problem(call, self.g.mem.device)
        if problem:
            return problem
        if self.g.dev is None:
            return self.g.dev_reason or "the device path is off"
        return self.g.dev.capture_refusal(view, call)

    def capture_offer(self, view, call) -> bytes:
        """What this rank offers its peers for ``call`` at capture (``_DevicePath.capture_offer``)."""
        return self.g.dev.capture_offer(view, call)

    def capture_prepare(self, view, call, offers: dict[int, bytes], timeout_s: float) -> bytes | None:
        """Take up every rank's offer, or say why not (``_DevicePath.capture_prepare``)."""
        return self.g.dev.capture_prepare(view, call, offers, timeout_s)

    def capture(self, view, call, fp: Fingerprint, timeout_s: float, offers: dict[int, bytes]) -> None:
        """Enqueue ``call`` into the graph being captured (``capture_refusal`` said None); ``offers``: every
        active rank's ``capture_offer``."""
        self.g.dev.capture(view, call, fp, timeout_s, offers)

    def capture_ended(self) -> None:
        """The call being captured was enqueued, or failed (``_DevicePath.capture_ended``)."""
        dev = self.g.dev
        if dev is not None:
            dev.capture_ended()

    def graph_trouble(self) -> tuple[int, bool, frozenset[int]] | None:
        """What replayed captured ops ran into since the last call (``_DevicePath.trouble``), or None."""
        dev = self.g.dev
        return None if dev is None or self.g.closed else dev.trouble()

    def graph_reset(self, epoch: int) -> None:
        """The PG face raised what captured ops ran into; they run under view ``epoch`` from now on."""
        dev = self.g.dev
        if dev is not None and not self.g.closed:
            dev.reset(epoch)

    def graph_view(self, epoch: int) -> None:
        """The PG face adopted view ``epoch``: ops captured under earlier views exit at once."""
        dev = self.g.dev
        if dev is not None and not self.g.closed:
            dev.graph_view(epoch)

    def add_ranks(self, addresses: dict[int, bytes]) -> None:
        self.g.add_ranks(addresses)

    def close(self) -> None:
        self.g.close()


def _is_device(t, mem) -> bool:
    if t is None:
        return False
    if isinstance(t, torch.Tensor):
        return t.device.type != "cpu"
    return any(x.device.type != "cpu" for x in t)


def open_group(info) -> FastCudaGroup:
    """The CUDA PG plane of one group (``info``: ``mooncake.control.plane.GroupInfo``)."""
    return FastCudaGroup(info)
