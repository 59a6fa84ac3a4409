"""The torch.distributed face: a ``dist.ProcessGroup`` subclass that validates every call before
any communication, stages tensors, numbers operations and hands them to a data plane.

Layering: this module owns argument checking, CPU staging of CUDA / non-contiguous tensors and
Work objects; ``mooncake.control`` owns views and sequence numbers; the data plane (``mooncake.ref``
today) moves bytes and does the math defined in ``mooncake.model``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import struct
import threading
import time
import weakref
import zlib
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d

from .. import impl
from ..control import auth, faults, join
from ..control.capture import agree_on_capture
from ..control.store import BoundedStore
from ..control.errors import ArgumentError, MooncakeError, OpTimeoutError, PeerFailureError
from ..control.plane import GraphCall, GroupInfo
from ..control.view import View, initial_view
from ..control.fingerprint import Fingerprint
from ..control.wire import MAX_P2P_TAG, MAX_RANKS, VERSION, OpCode
from ..model import collectives as _model
from ..model.reduce import DTYPE_CODES, PREMUL_SUM, ReduceOp, check_premul, check_reducible, premul, premul_factor
from ..ref import collectives as ref
from ..ref import p2p as ref_p2p
from ..ref import ucx
from . import options as _options
from . import membership as _membership
from ..control.agreement import ProposalKind
from .membership import Membership
from .quick import QuickLane
from .work import CapturedWork, Collective, ComposedWork, MooncakeWork, NotPosted

class _Settled(Exception):
    """A proposal found its change already made (by an equivalent proposal that won first)."""

    def __init__(self, response):
        super().__init__("settled")
        self.response = response


class RootInactiveError(ArgumentError, _model.RootInactiveError):
    """The root of broadcast / reduce / gather / scatter is not active; raised on every caller."""


_HELLO = struct.Struct("<HHHB16s")  # version, capacity, world_size, is_extension, host; then mask, address
_backend_counts: dict[str, int] = {}
_world_generation = -1
_backend_index_lock = threading.Lock()
_DEFAULT_GROUP_NAME = "0"  # torch's name for the default group; it restarts its group names after a destroy


def _next_backend_index(group_id: str) -> str:
    """This group's key prefix index, the same on every member: the default group's generation in
    this process, then how many times this process created a group of this torch name in it.  torch
    names groups the same on every rank (every rank calls ``new_group``) but creates a backend only on
    a subgroup's members, and it starts its names afresh after ``destroy_process_group``: a
    per-process count of the backends created, or of a name across generations, would differ between
    ranks, and the next group's ranks would wait for each other (or read stale records) under
    different keys.  The member list is not part of the key: a rank joining later declares a larger
    world."""
    global _world_generation
    key = str(group_id)
    with _backend_index_lock:
        if key == _DEFAULT_GROUP_NAME:
            _world_generation += 1
            _backend_counts.clear()
        n = _backend_counts.get(key, 0)
        _backend_counts[key] = n + 1
        return f"{max(_world_generation, 0)}.{key}.{n}"


def _reduce_op(opts) -> ReduceOp:
    """The plane's reduce op; PREMUL_SUM runs as SUM over inputs scaled first (``_premul_factor``)."""
    name = opts.reduceOp.op.name if hasattr(opts.reduceOp, "op") else str(opts.reduceOp)
    if name.rpartition(".")[2] == PREMUL_SUM:
        return ReduceOp.SUM
    try:
        return ReduceOp[name]
    except KeyError:
        raise ArgumentError(f"reduce op {name} is not supported (supported: "
                            f"{', '.join(o.name for o in ReduceOp)}, PREMUL_SUM)") from None


def _premul_factor(opts, dtype: torch.dtype) -> float | None:
    """The factor of a PREMUL_SUM (``dist._make_nccl_premul_sum``), else None; checks the dtype."""
    op = opts.reduceOp
    name = op.op.name if hasattr(op, "op") else str(op)
    if name.rpartition(".")[2] != PREMUL_SUM:
        return None
    reason = check_premul(dtype)
    if reason:
        raise ArgumentError(f"Unsupported reduce op/dtype: {reason}")
    factor = getattr(op, "factor", None)
    if factor is None:
        raise ArgumentError("PREMUL_SUM needs a factor: build the op with "
                            "torch.distributed._make_nccl_premul_sum(factor)")
    try:
        return premul_factor(factor)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def _one(tensors: Sequence[torch.Tensor], what: str = "tensors") -> torch.Tensor:
    if len(tensors) != 1:
        raise ArgumentError(f"Expecting one tensor only but got multiple. ({what}: {len(tensors)} tensors)")
    return tensors[0]


def _fp(op: OpCode, t: torch.Tensor, reduce_op: ReduceOp = ReduceOp.SUM, **fields) -> Fingerprint:
    """The fingerprint of a call on tensors of ``t``'s dtype (see control/fingerprint.py)."""
    return _fingerprint(op, t.dtype, reduce_op, **fields)


@functools.lru_cache(maxsize=1024)
def _fingerprint(op: OpCode, dtype: torch.dtype, reduce_op: ReduceOp, **fields) -> Fingerprint:
    """(Fingerprints are immutable: a loop's calls share one.)"""
    return Fingerprint(op, DTYPE_CODES[dtype], int(reduce_op) if op in _REDUCING else 0, **fields)


_REDUCING = (OpCode.ALL_REDUCE, OpCode.REDUCE, OpCode.REDUCE_SCATTER)


def _stream_captured(t) -> bool:
    """``t`` is a CUDA tensor and the caller's current stream is being captured into a CUDA graph."""
    return isinstance(t, torch.Tensor) and t.is_cuda and torch.cuda.is_current_stream_capturing()


_calls = threading.local()  # the collective call being validated on this thread (see _collective)


def _collective(name: str, list_arg: int | None = None):
    """Decorate a collective: a call rejected locally (``ArgumentError``) still takes the sequence
    numbers the call would have taken (one, or one per tensor of argument ``list_arg`` for the
    coalesced forms) and tells the peers, which fail the same ops with the same error
    (docs/semantics.md, "One verdict per operation").  Nested calls count in the outermost."""

    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            if getattr(_calls, "issued", None) is not None:  # part of a coalesced call: its Work waits on it
                nested = getattr(_calls, "nested", False)
                _calls.nested = True
                try:
                    return method(self, *args, **kwargs)
                finally:
                    _calls.nested = nested
            _calls.issued = 0
            try:
                return method(self, *args, **kwargs)
            except ArgumentError as exc:
                count = 1
                if list_arg is not None and list_arg < len(args):
                    with contextlib.suppress(TypeError):
                        count = max(1, len(args[list_arg]))
                if count > _calls.issued:
                    self._reject(name, exc, count - _calls.issued)
                raise
            finally:
                _calls.issued = None
        return call
    return wrap


class MooncakeProcessGroup(dist.ProcessGroup):
    """A mooncake group.  Created by torch through ``init_process_group`` / ``new_group``."""

    def __init__(self, backend_name: str, device_type: str, store, rank: int, world_size: int,
                 timeout: timedelta, group_id: str, global_ranks: Sequence[int],
                 options: "_options.MooncakeBackendOptions | None"):
        capacity = _options.check_for_backend(options, device_type, world_size)
        implementation = impl.select(device_type)
        mask = None if options is None or options.active_ranks is None else \
            [int(v) for v in options.active_ranks.tolist()]
        is_extension = bool(options is not None and options.is_extension)
        view = initial_view(mask, world_size, capacity, rank, is_extension)
        if not is_extension and rank not in view.active:
            raise ArgumentError(f"active_ranks[{rank}] is 0 on rank {rank}, which is not an extension "
                                "rank: a founding rank must mark itself active (or pass "
                                "is_extension=True to join later)")
        super().__init__(rank, view.visible_size if not is_extension else world_size)
        self.implementation, self._implementation_reason = implementation
        self._backend_name = backend_name
        self._device_type = device_type
        self._store = auth.wrap_store(store)  # with a job secret: records sealed, read verified
        self._rank = rank
        self._world_size = world_size
        self._capacity = capacity
        self._is_extension = is_extension
        self._initial_view = view
        self._timeout_s = timeout.total_seconds()
        self._global_ranks = list(global_ranks) or list(range(world_size))
        self._index = _next_backend_index(group_id)
        self._prefix = f"mooncake/{self._index}"
        self._incarnation = int.from_bytes(os.urandom(8), "little")
        self._admitted: dict[int, int] = {}  # rank -> incarnation last admitted by recover_ranks
        self._group_key = zlib.crc32(f"{group_id}/{self._index}".encode()) & 0xFFFF
        self._group_name: str | None = None
        self._p2p_send_seq: dict[tuple[int, int], int] = {}
        self._p2p_recv_seq: dict[tuple[int, int], int] = {}
        self._mask_tensor = options.active_ranks if options is not None else None
        self._manual = bool(options is not None and options.manual)
        self._addresses: dict[int, bytes] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._captured = False  # an operation of this group was captured in a CUDA graph
        self._captures: tuple[int, int] = (-1, 0)  # (view epoch, calls captured in it)
        self._capture_store: BoundedStore | None = None  # a private Store connection for the capture check
        self._in_flight: "weakref.WeakSet[MooncakeWork]" = weakref.WeakSet()
        self._engine = ucx.engine(_net_devices())
        self._rendezvous()
        self._plane = self._open_plane()
        self._membership = Membership(
            rank=rank, capacity=capacity, view=view, store=store, prefix=self._prefix,
            engine=self._engine, peers=self._peers, addresses=self._addresses, group_key=self._group_key,
            timeout_s=lambda: self._timeout_s,
            failure_mode=options.failure_mode if options is not None else "complete",
            on_view=self._on_view, keep_failed=self._manual, on_join=self._on_join)
        self._quick = QuickLane(self) if hasattr(self._plane, "quick_entry") else None
        self._sync_mask_tensor()

    # -- identity ------------------------------------------------------------------------------
    def size(self) -> int:
        return self._world_size if self._is_extension else self.view.visible_size

    def rank(self) -> int:
        return self._rank

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return self._backend_name

    def name(self) -> str:
        return self._backend_name

    @property
    def group_name(self) -> str | None:
        return self._group_name

    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def view(self) -> View:
        return self._membership.view

    @property
    def membership(self) -> Membership:
        return self._membership

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self._timeout_s)

    def set_timeout(self, timeout: timedelta) -> None:
        """Deadline of every later operation of this group (also ``mooncake.pg.set_timeout``)."""
        if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
            raise ArgumentError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")
        self._timeout_s = timeout.total_seconds()

    # -- start-up ------------------------------------------------------------------------------
    def _key(self, what: str, rank: int) -> str:
        return f"{self._prefix}/{what}/{rank}"

    def _rendezvous(self) -> None:
        """Publish this rank's address and settings; check the founders' agree with ours."""
        from ..fast.cpu.segment import host_identity
        hello = _HELLO.pack(VERSION, self._capacity, self._world_size, int(self._is_extension), host_identity())
        view = self._initial_view
        mask = bytes(view.mask()) if not self._is_extension else bytes(self._capacity)
        self._store.set(self._key("hello", self._rank), hello + mask + self._engine.address)
        self._addresses[self._rank] = self._engine.address
        if self._is_extension:
            return
        if self._store.check([join.view_key(self._prefix)]):
            raise ArgumentError(f"rank {self._rank}: this group is already running (its membership "
                                "changed since it started); a rank that comes back must be started "
                                "with MooncakeBackendOptions(..., is_extension=True) and call "
                                "mooncake.pg.join_group")
        others = [r for r in view.active if r != self._rank]
        keys = [self._key("hello", r) for r in others]
        try:
            self._store.wait(keys, timedelta(seconds=self._timeout_s))
        except Exception as exc:  # torch raises DistStoreError / DistNetworkError
            raise MooncakeError(f"rank {self._rank}: not every rank of {list(view.active)} "
                                f"reached init within {self._timeout_s:.0f} s ({exc})") from None
        for r in others:
            self._addresses[r] = self._check_hello(r, self._store.get(self._key("hello", r)))

    def _check_hello(self, rank: int, record: bytes, joining: bool = False) -> bytes:
        """Check a peer's hello record against this rank's settings; returns its UCX address.
        A joiner checks only the wire version (the group may have been extended since)."""
        from ..fast.cpu.segment import host_identity
        version, capacity, world_size, is_extension, host = _HELLO.unpack_from(record)
        mask = list(record[_HELLO.size:_HELLO.size + capacity])
        if version != VERSION:
            raise MooncakeError(f"rank {rank} runs wire version {version}, this rank {VERSION}")
        if host != host_identity():
            _options.check_not_loopback_for([rank])  # never advertise loopback to another host (any plane)
        if joining:
            return bytes(record[_HELLO.size + capacity:])
        if capacity != self._capacity:
            raise ArgumentError(f"max_world_size differs across ranks: rank {rank} has capacity "
                                f"{capacity}, this rank {self._capacity}")
        if world_size != self._world_size:
            raise ArgumentError(f"world_size differs across ranks: rank {rank} passed {world_size}, "
                                f"this rank {self._world_size}")
        if not is_extension and mask != self._initial_view.mask():
            raise ArgumentError(f"active_ranks differs across ranks: rank {rank} starts with active "
                                f"mask {mask}, this rank {self._initial_view.mask()}")
        return bytes(record[_HELLO.size + capacity:])

    @property
    def implementation_reason(self) -> str:
        """Why ``implementation`` serves this group, and where its plane hands the collectives to the ref
        plane (ranks on another host, GPUs that cannot map each other's memory), why."""
        delegate = getattr(getattr(self, "_plane", None), "delegate", None)
        return self._implementation_reason if not delegate else f"{self._implementation_reason}; but {delegate}"

    def _open_plane(self):
        """The data plane serving this group's collectives, and its P2P where it offers it (the fast CPU
        plane between ranks of one host; everything else goes through ref)."""
        info = GroupInfo(self._store, f"mooncake/{self._index}", self._rank, self._capacity,
                         self._group_key, self._timeout_s, self._engine, self._addresses,
                         self._device_type)
        if self.implementation == "fast":  # mooncake.fast.cpu / .cuda, imported only when selected
            return importlib.import_module(f"..fast.{self._device_type}", __package__).open_group(info)
        return ref.open_group(info)

    def _peers(self, ranks: Sequence[int]) -> dict[int, ucx.Peer]:
        return {r: self._engine.peer(self._addresses[r]) for r in ranks}

    def _on_view(self, view: View) -> None:
        """A new view was adopted (failure agreement or elastic protocol)."""
        self._plane.add_ranks({r: self._addresses[r] for r in view.active if r in self._addresses})
        graph_view = getattr(self._plane, "graph_view", None)
        if graph_view is not None:  # graphs captured under an earlier view no longer run (check_graphs says so)
            graph_view(view.epoch)
        self._sync_mask_tensor()
        self._store.set(join.view_key(self._prefix), str(view.epoch))

    # -- elastic membership (docs/semantics.md, "Joining") ---------------------------------------
    def _check_ranks(self, ranks, what: str) -> list[int]:
        if isinstance(ranks, int) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise ArgumentError(f"{what}: ranks must be a list of ints, got {ranks!r}")
        for r in ranks:
            if not 0 <= r < self._capacity:
                raise ArgumentError(f"{what}: rank {r} out of range [0, {self._capacity}) "
                                    "(Rank out of range; raise capacity with extend_group_size_to)")
        return list(ranks)

    def _quiet(self, what: str) -> None:
        self._settle_quick()
        if self._membership.has_pending():
            raise ArgumentError(f"{what} must be called at an op boundary: wait for this group's "
                                "collectives in flight first")

    @contextlib.contextmanager
    def _store_access(self, what: str):
        """Turn a lost Store connection into a MooncakeError that names it."""
        try:
            yield
        except dist.DistNetworkError as exc:
            raise MooncakeError(f"{what}: the Store is unreachable ({exc}); joining needs it: host the "
                                "Store in a process that outlives the ranks") from None

    def _join_request(self, rank: int) -> "join.JoinRequest | None":
        """The join request of ``rank`` if one is pending and its process is reachable (None if
        absent, already admitted, or left by a joiner that died)."""
        key = join.request_key(self._prefix, rank)
        if not self._store.check([key]):
            return None
        request = join.JoinRequest.decode(self._store.get(key))
        if self._admitted.get(rank) == request.incarnation or not self._engine.reachable(request.address):
            return None
        return request

    def get_peer_state(self, ranks) -> list[bool]:
        """For each rank: True if it is active (and, in manual mode, not suspended) or has called
        ``join_group`` from a reachable process.  A local query, as upstream's: no collective, so
        members may poll it at their own pace; ``activate_ranks`` decides for all of them."""
        ranks = self._check_ranks(ranks, "get_peer_state")
        self._check_open()
        if self._is_extension:
            raise ArgumentError("get_peer_state is called by the healthy ranks; this rank is still "
                                "joining (call join_group)")
        view, suspended = self.view, self._membership.suspended
        with self._store_access("get_peer_state"):
            return [r not in suspended if view.is_active(r) else self._join_request(r) is not None
                    for r in ranks]

    # -- membership proposals (docs/semantics.md, "Manual membership and proposals") ------------
    def _redundant(self, ranks, side: str) -> "_membership.ProposalResponse | None":
        """A proposal equivalent to the one the latest membership change applied, made before this
        rank issued anything since (its caller raced the proposer): Applied, at the current epoch."""
        decision = self._change_at_this_boundary()
        if decision is None:
            return None
        changed = set(decision.left) if side == "left" else set(decision.joined) | (
            set(decision.active) - set(decision.suspended))
        if not set(ranks) <= changed:
            return None
        status = _membership.ProposalStatus
        return _membership.ProposalResponse(status.AppliedWithDroppedRanks if decision.failed else status.Applied,
                                            decision.epoch, sorted(decision.failed))

    def _respond(self, won, decision, epoch: int, mine: bool, pre_dropped=()) -> "_membership.ProposalResponse":
        status = _membership.ProposalStatus
        new_epoch = self.view.epoch
        if not mine:
            return _membership.ProposalResponse(status.Rejected, new_epoch, [], (
                f"{won.describe()} won that epoch first (one proposal per epoch, written with "
                f"compare_set); the group applied it instead and is now at epoch {decision.epoch}: "
                "re-read the view and propose again if still needed"))
        if decision.proposal != won.nonce:
            return _membership.ProposalResponse(status.Rejected, new_epoch, [], (
                f"the agreement of epoch {epoch} was decided before it saw {won.describe()} (a failure "
                f"agreement overtook it, or it would have emptied the view); the group is at epoch "
                f"{decision.epoch}: propose again"))
        dropped = sorted(set(decision.failed) | set(pre_dropped)
                         | {r for r in won.ranks if won.kind is ProposalKind.ACTIVATE
                            and (r not in decision.active or r in decision.suspended)})
        return _membership.ProposalResponse(status.AppliedWithDroppedRanks if dropped else status.Applied,
                                            decision.epoch, dropped)

    def deactivate_ranks(self, ranks) -> "_membership.ProposalResponse":
        """Propose that ``ranks`` leave the view (a rank may name itself: a graceful leave).  One
        call from any member suffices; the epoch's agreement applies it on every member at one op
        boundary; a racing different proposal of the same epoch wins or loses as a whole."""
        ranks = self._check_ranks(ranks, "deactivate_ranks")
        self._check_open()
        if not ranks:
            raise ArgumentError("deactivate_ranks: name at least one rank")
        self._quiet("deactivate_ranks")
        self._membership.settle_agreement()
        self._check_open()
        if not all(self.view.is_active(r) for r in ranks):
            redundant = self._redundant(ranks, "left")
            if redundant is not None:
                return redundant
            raise ArgumentError(f"deactivate_ranks: rank(s) {[r for r in ranks if not self.view.is_active(r)]} "
                                f"are not active (active ranks: {list(self.view.active)})")

        def check(view: View) -> None:
            if not all(view.is_active(r) for r in ranks):
                raise _Settled(self._redundant(ranks, "left") or _membership.ProposalResponse(
                    _membership.ProposalStatus.Rejected, view.epoch, [],
                    f"rank(s) {ranks} left the view meanwhile, through another proposal or a failure"))
            if set(view.active) <= set(ranks):
                raise ArgumentError("deactivate_ranks: the proposal would leave the group with no active "
                                    "rank; destroy the process group instead")

        try:
            won, decision, epoch, mine = self._membership.propose(ProposalKind.DEACTIVATE, tuple(ranks),
                                                                  check=check)
        except _Settled as settled:
            return settled.response
        return self._respond(won, decision, epoch, mine)

    def _change_at_this_boundary(self):
        """The decision of the latest membership change if this rank has issued nothing since it was applied
        (so it was applied at the op boundary this rank is at), else None."""
        membership = self._membership
        with membership.lock:
            last = membership.joined_at
            return last[0] if last is not None and last[1] == membership.next_seq else None

    def admitted_at_this_boundary(self) -> list[int]:
        """The ranks the latest membership change admitted, if this rank has issued nothing since it was
        applied: a peer's ``recover_ranks`` that the agreement applied here while this rank was still on its
        way to the same op boundary (``elastic.admit_replacements`` must then catch those ranks up too)."""
        decision = self._change_at_this_boundary()
        return [] if decision is None else sorted(r for r in decision.joined if self.view.is_active(r))

    def recover_ranks(self, ranks) -> "_membership.ProposalResponse":
        """Alias of ``activate_ranks`` (upstream's name)."""
        return self.activate_ranks(ranks, "recover_ranks")

    def activate_ranks(self, ranks, what: str = "activate_ranks") -> "_membership.ProposalResponse":
        """Propose that ``ranks`` enter the view: ranks that called ``join_group`` (a joiner, a
        replacement, or a removed rank rejoining in place), or, in manual mode, suspended members
        that answer again.  One call from any member suffices; equivalent calls from several members
        at the same boundary are all Applied."""
        ranks = self._check_ranks(ranks, what)
        self._check_open()
        self._quiet(what)
        self._membership.settle_agreement()
        self._check_open()
        suspended = self._membership.suspended
        if any(self.view.is_active(r) and r not in suspended for r in ranks):
            redundant = self._redundant(ranks, "joined")
            if redundant is not None:
                return redundant
            active = [r for r in ranks if self.view.is_active(r) and r not in suspended]
            raise ArgumentError(f"{what}: rank {active[0]} is already active")
        incarnations, proposed, pre_dropped = [], [], []
        for r in ranks:
            if r in suspended and self.view.is_active(r):
                proposed.append(r)
                incarnations.append(0)
                continue
            with self._store_access(what):
                key = join.request_key(self._prefix, r)
                present = self._store.check([key])
                request = self._join_request(r) if present else None
            if request is None:
                if present:
                    pre_dropped.append(r)   # a request left by a joiner that died: never admitted
                    continue
                raise ArgumentError(f"{what}: rank {r} has not called join_group (wait until "
                                    f"get_peer_state(group, [{r}]) is True)")
            if request.capacity != self._capacity:
                raise ArgumentError(f"{what}: rank {r} joins with max_world_size {request.capacity}, "
                                    f"this group has capacity {self._capacity}: use the same max_world_size "
                                    "(and extend_group_size_to) on every rank")
            proposed.append(r)
            incarnations.append(request.incarnation)
        if not proposed:
            return _membership.ProposalResponse(_membership.ProposalStatus.AppliedWithDroppedRanks,
                                                self.view.epoch, sorted(pre_dropped))

        def check(view: View) -> None:
            if any(view.is_active(r) and r not in self._membership.suspended for r in proposed):
                raise _Settled(self._redundant(proposed, "joined") or _membership.ProposalResponse(
                    _membership.ProposalStatus.Rejected, view.epoch, [],
                    f"rank(s) {proposed} became active meanwhile, through another proposal"))

        try:
            won, decision, epoch, mine = self._membership.propose(ProposalKind.ACTIVATE, tuple(proposed),
                                                                  tuple(incarnations), check=check)
        except _Settled as settled:
            return settled.response
        return self._respond(won, decision, epoch, mine, pre_dropped)

    def _on_join(self, decision, proposal, store) -> None:
        """Agreement thread, before a decision that activates ranks outside the view is adopted: learn
        the joiners' addresses and write each one's admission (every member writes the same record;
        the first write wins)."""
        if proposal is None:
            return
        incarnation = dict(zip(proposal.ranks, proposal.incarnations))
        for r in decision.joined:
            inc = incarnation.get(r, 0)
            try:
                request = join.JoinRequest.decode(store.get(join.request_key(self._prefix, r)))
            except Exception:  # noqa: BLE001 - the joiner's record is gone: its first op finds it failed
                continue
            with self._lock:
                self._addresses[r] = request.address
                self._admitted[r] = inc
                self._reset_p2p(r)
            admission = join.Admission(decision.epoch, decision.join_seq, self._capacity, decision.active)
            with contextlib.suppress(Exception):
                store.compare_set(join.admit_key(self._prefix, r, inc), "", admission.encode())

    def sync_after_failure(self) -> "_membership.SyncAfterFailureResponse":
        """Settle this rank's evidence of failed peers through the agreement and adopt its decision."""
        status = _membership.SyncAfterFailureStatus
        if self._closed:
            raise MooncakeError("this mooncake process group was shut down")
        if self._is_extension:
            return _membership.SyncAfterFailureResponse(status.NoPending, "", self.view.epoch)
        reconciled, reason = self._membership.sync()
        if reason:
            return _membership.SyncAfterFailureResponse(status.Rejected, reason, self.view.epoch)
        return _membership.SyncAfterFailureResponse(status.Reconciled if reconciled else status.NoPending, "",
                                                    self.view.epoch)

    def join_group(self, timeout: timedelta | None = None) -> None:
        """On a rank started with ``is_extension=True``, or one that was removed or deactivated
        (in place: same process, same group object): ask to join and block until a member admits
        it (``activate_ranks`` / ``recover_ranks``) or ``timeout`` (default: the group timeout)."""
        in_place = not self._is_extension and self._membership.evicted is not None
        if not self._is_extension and not in_place:
            raise ArgumentError("joinGroup is only valid for extension backends: this rank was not "
                                "started with MooncakeBackendOptions(..., is_extension=True), nor removed "
                                "from the group (a removed or deactivated rank may rejoin in place)")
        if self._closed:
            raise MooncakeError("this mooncake process group was shut down")
        if in_place:
            self._membership.rejoin()
            self._incarnation = int.from_bytes(os.urandom(8), "little")
        else:
            self._check_open()
            self._quiet("join_group")
        timeout_s = timeout.total_seconds() if timeout is not None else self._timeout_s
        request = join.JoinRequest(self._incarnation, self._capacity, self._world_size, self._engine.address)
        key = join.admit_key(self._prefix, self._rank, self._incarnation)
        with self._store_access("join_group"):
            self._store.set(join.request_key(self._prefix, self._rank), request.encode())
            faults.hit("during_join")
            try:
                self._store.wait([key], timedelta(seconds=timeout_s))
            except dist.DistStoreError:  # the wait timed out
                if in_place:
                    self._membership.evicted = (f"rank {self._rank} asked to rejoin in place but was not "
                                                f"admitted within {timeout_s:.3g} s")
                raise OpTimeoutError(f"join_group: rank {self._rank} was not admitted within {timeout_s:.3g} s; "
                                     f"the healthy ranks must poll get_peer_state(group, [{self._rank}]) and "
                                     "then call recover_ranks", ()) from None
            admission = join.Admission.decode(self._store.get(key))
            for r in admission.active:
                if r != self._rank:
                    self._addresses[r] = self._check_hello(r, self._store.get(self._key("hello", r)), joining=True)
        self._is_extension = False
        self._membership.set_view(View(admission.epoch, self._capacity, admission.active), admission.next_seq)

    def extend_group_size_to(self, size: int) -> None:
        """Reserve rank slots up to ``size`` (every active rank calls it at the same op boundary);
        the new slots stay inactive until ``recover_ranks`` admits ranks into them."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise ArgumentError(f"extend_group_size_to: size must be an int, got {type(size).__name__}")
        if not 0 < size <= MAX_RANKS:
            raise ArgumentError(f"extend_group_size_to: Size out of range: {size} not in [1, {MAX_RANKS}]")
        if size < self.size():
            raise ArgumentError(f"extend_group_size_to: newSize < oldSize ({size} < the visible size {self.size()})")
        self._quiet("extend_group_size_to")
        if size <= self._capacity:
            return
        self._capacity = size
        membership = self._membership
        with membership.lock:
            membership.capacity = size
            membership.set_view(View(membership.view.epoch, size, membership.view.active))

    def _reset_p2p(self, rank: int) -> None:
        for table in (self._p2p_send_seq, self._p2p_recv_seq):
            for key in [k for k in table if k[0] == rank]:
                del table[key]

    def _sync_mask_tensor(self) -> None:
        if self._mask_tensor is not None:
            mask = torch.tensor(self.view.mask(), dtype=torch.int32)
            if self._mask_tensor.numel() != mask.numel():  # extend_group_size_to: in place, as upstream
                self._mask_tensor.resize_(mask.numel())
            self._mask_tensor.copy_(mask.to(self._mask_tensor.device))

    def _get_backend(self, device) -> "MooncakeProcessGroup":
        """torch's per-device backend lookup (``group._get_backend(torch.device("cpu"))``): this group
        is its own backend, for its one device type."""
        device_type = torch.device(device).type
        if device_type != self._device_type:
            raise ArgumentError(f"No backend type associated with device type {device_type} (backend "
                                f"{self._backend_name} takes {self._device_type} tensors)")
        return self

    def _device(self) -> torch.device:
        """Where this backend's tensors live: CPU, or the current CUDA device."""
        return torch.device("cuda", torch.cuda.current_device()) if self._device_type == "cuda" else torch.device("cpu")

    def active_ranks_tensor(self) -> torch.Tensor:
        """The group's mask as int32 [capacity] on the backend's device (the user's tensor if given)."""
        if self._mask_tensor is not None:
            return self._mask_tensor
        device = "cuda" if self._device_type == "cuda" else "cpu"
        return torch.tensor(self.view.mask(), dtype=torch.int32, device=device)

    # -- checks --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise MooncakeError("this mooncake process group was shut down")
        if self._membership.evicted:
            raise self._membership.removed_error(self._backend_name)

    def _check_tensor(self, t: torch.Tensor, what: str, capturable: bool = False) -> None:
        """``t`` is a tensor this backend carries (``capturable``: also while a CUDA graph is captured)."""
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_sparse:
            raise ArgumentError(f"Sparse op not supported. ({what} is sparse)")
        if t.dtype not in DTYPE_CODES:
            raise ArgumentError(f"{what} has dtype {t.dtype}, which mooncake does not carry "
                                f"(supported: {', '.join(str(d) for d in DTYPE_CODES)})")
        want = "cuda" if self._device_type == "cuda" else "cpu"
        if t.device.type != want:
            raise ArgumentError(f"{what} is on {t.device}, but backend {self._backend_name} takes "
                                f"{want} tensors")
        if not capturable and _stream_captured(t):
            raise ArgumentError(f"{what}: CUDA graph capture of this mooncake process-group operation is not "
                                "supported (it commits through host-side control words, which a graph cannot "
                                "replay); issue it outside the captured region. all_reduce, reduce, "
                                "reduce_scatter_tensor, all_gather(_into_tensor), gather, scatter, all_to_all_single "
                                "(equal splits) and broadcast on the fast CUDA plane, and mooncake.ep.Buffer "
                                "dispatch/combine, can be captured.")

    def _check_like(self, t: torch.Tensor, ref_t: torch.Tensor, what: str, capturable: bool = False) -> None:
        self._check_tensor(t, what, capturable)
        if t.dtype != ref_t.dtype or t.numel() != ref_t.numel():
            raise ArgumentError(f"{what} must match the input: expected {ref_t.numel()} elements of "
                                f"{ref_t.dtype}, got {t.numel()} of {t.dtype}")

    def _check_slots(self, k: int, what: str) -> None:
        if not self.size() <= k <= self._capacity:
            raise ArgumentError(f"{what} holds {k} slots; expected between the group size "
                                f"{self.size()} and its capacity {self._capacity}")

    def _check_root(self, root: int, what: str) -> None:
        if not 0 <= root < self._capacity:
            raise ArgumentError(f"{what} {root} is out of range [0, {self._capacity})")
        if not self.view.is_active(root):
            raise RootInactiveError(f"{what} {root} is not active (active ranks: {list(self.view.active)})")

    def _check_reduce(self, op: ReduceOp, t: torch.Tensor) -> None:
        reason = check_reducible(op, t.dtype)
        if reason:
            raise ArgumentError(f"Unsupported reduce op/dtype: {reason}")

    # -- issuing -------------------------------------------------------------------------------
    def _post(self, name: str, build, seq: int, view: View, root: int | None,
              fingerprint: Fingerprint | None = None):
        """Post ``build`` as operation ``seq`` under ``view`` (first time, or again after a failure)."""
        if root is not None and not view.is_active(root):
            raise PeerFailureError(f"{name}: root rank {root} failed; the survivors {list(view.active)} "
                                   "agreed on it, so this operation cannot complete", (root,))
        suspended = self._membership.suspended_error(name, view)
        if suspended is not None:
            raise suspended
        faults.hit("before_send")
        return build(ref.OpContext(self._engine, self._peers, self._group_key, self._rank, view, seq, name,
                                   fingerprint))

    def _timeout_of(self, opts) -> float:
        timeout = getattr(opts, "timeout", None)
        if timeout is not None and timeout.total_seconds() > 0:
            return timeout.total_seconds()
        return self._timeout_s

    def _issue(self, name: str, opts, build, outputs: list[torch.Tensor],
               staged: list[tuple[torch.Tensor, torch.Tensor]] = (), root: int | None = None,
               fingerprint: Fingerprint | None = None) -> MooncakeWork:
        """Number ``build(ctx)`` as the group's next collective, post it and wrap it; ``staged``
        pairs (user tensor, staging copy) are written back to the user's tensors when it completes.

        Nothing is posted while the group's view is under agreement, nor for an op the members
        already settled while this rank had not called it (it is late): such an op takes the
        agreement's verdict first (docs/semantics.md, "One verdict per operation")."""
        self._check_open()
        self._settle_quick()
        if self._captured:
            self.check_graphs()
        issued_at = time.monotonic()
        membership = self._membership
        membership.poll()
        with membership.lock:
            seq = membership.begin()
            if self._nested():
                _calls.issued += 1
            view = membership.view
            late = membership.late_decision(seq)
            posted = late is None and not membership.under_agreement(view.epoch)
            op = NotPosted()
            suspended = membership.suspended_error(name, view) if posted else None
            if suspended is not None:   # manual mode: every member fails this op the same way
                membership.settle(seq)
                return self._track(MooncakeWork(self._engine, op, self._timeout_of(opts), outputs, name=name,
                                                failed=suspended))
            if posted:
                try:
                    op = self._post(name, build, seq, view, root, fingerprint)
                except BaseException as exc:
                    membership.reject(seq, f"rank {self._rank} could not post this call: {exc}")
                    raise
        urgent = getattr(opts, "asyncOp", True)
        return self._work(name, self._timeout_of(opts), op, build, outputs, staged, root, fingerprint, seq, view,
                          posted, late, issued_at, urgent, not urgent and not getattr(_calls, "nested", False))

    def _work(self, name: str, timeout_s: float, op, build, outputs: list[torch.Tensor],
              staged: Sequence[tuple[torch.Tensor, torch.Tensor]], root: int | None, fingerprint: Fingerprint | None,
              seq: int, view: View, posted: bool, late, issued_at: float, urgent: bool,
              waited_at_once: bool, stream=None) -> MooncakeWork:
        """The tracked ``MooncakeWork`` of collective ``seq`` (``op``: what ``_post`` gave for it under
        ``view``, or ``NotPosted``; ``stream``: where its outputs are written, default the current one);
        see ``_issue``."""
        membership = self._membership

        def repost():
            self._settle_quick()
            with membership.lock:
                view = membership.view
                return self._post(name, build, seq, view, root, fingerprint), view.epoch

        def write_back() -> None:
            for user, stage in staged:
                user.copy_(stage)

        return self._track(MooncakeWork(self._engine, op, timeout_s, outputs, write_back if staged else None,
                                        name=name, collective=Collective(membership, seq, view.epoch, repost, posted,
                                                                         late),
                                        issued_at=issued_at, urgent=urgent, waited_at_once=waited_at_once,
                                        stream=stream))

    def _settle_quick(self) -> None:
        """A quick-lane operation still pending becomes an ordinary one first (``QuickLane.settle``)."""
        if self._quick is not None and self._quick.pending is not None:
            self._quick.settle()

    @staticmethod
    def _nested() -> bool:
        """This call is part of another call of this thread (a coalesced form)."""
        return getattr(_calls, "issued", None) is not None

    def _reject(self, name: str, exc: BaseException, count: int) -> None:
        """This rank rejected a call that takes ``count`` sequence numbers: take them and tell the
        members (an op the members already settled while this rank was late needs no telling)."""
        self._settle_quick()
        membership = self._membership
        with membership.lock:
            for _ in range(count):
                seq = membership.begin()
                late = membership.late_decision(seq)
                if late is not None and (late.verdict(seq) is not None or
                                         (late.failed and membership.failure_mode == "raise")):
                    membership.settle(seq)
                else:
                    membership.reject(seq, f"rank {self._rank} rejected this call: {exc}")

    def _track(self, work: MooncakeWork) -> MooncakeWork:
        self._in_flight.add(work)
        return work

    def _stage(self, t: torch.Tensor, staged: list, is_output: bool, p2p: bool = False) -> torch.Tensor:
        """A contiguous tensor to work on: the caller's own when it is a contiguous CPU tensor, or a
        contiguous device tensor and the data plane takes device tensors (collectives: the plane's
        ``takes_device_tensors``; P2P: UCX that takes CUDA memory, where the plane has no P2P of its own);
        else a contiguous copy (on the device for such a plane, on the CPU otherwise).  Outputs are copied
        back on completion."""
        if p2p:
            on_device = (t.device.type != "cpu" and getattr(self._plane, "p2p_send", None) is None
                         and ref_p2p.takes_device_tensors(self._engine, t))
        else:
            on_device = t.device.type != "cpu" and getattr(self._plane, "takes_device_tensors", False)
        if (on_device or t.device.type == "cpu") and t.is_contiguous():
            return t
        if on_device:
            stage = t.detach().clone(memory_format=torch.contiguous_format)
        else:
            stage = t.detach().to("cpu", copy=True).contiguous()
        if is_output:
            staged.append((t, stage))
        return stage

    # -- collectives ---------------------------------------------------------------------------
    def allreduce(self, tensors, opts=None):
        if self._quick is not None and opts is not None:  # a repeated blocking call on the device path
            work = self._quick.all_reduce(tensors, opts)
            if work is not None:
                return work
        return self._allreduce(tensors, opts)

    @_collective("all_reduce")
    def _allreduce(self, tensors, opts=None):
        opts = opts or c10d.AllreduceOptions()
        t = _one(tensors)
        capturing = self._enter_capture(t)
        self._check_tensor(t, "tensor", capturable=True)
        op = _reduce_op(opts)
        self._check_reduce(op, t)
        factor = _premul_factor(opts, t.dtype)
        fingerprint = _fp(OpCode.ALL_REDUCE, t, op, numel=t.numel())
        if capturing:
            return self._capture("all_reduce", GraphCall("all_reduce", t, t, op=op), fingerprint, opts,
                                 premul=factor)
        staged: list = []
        x = self._stage(t, staged, True)
        if factor is not None:  # the plane sums scaled copies; the result lands in t on completion
            x = premul(x, factor)
            staged.append((t, x))
        return self._issue("all_reduce", opts, lambda ctx: self._plane.all_reduce(ctx, x, op), [t], staged,
                           fingerprint=fingerprint)

    # -- CUDA graphs ---------------------------------------------------------------------------
    @staticmethod
    def _enter_capture(t) -> bool:
        """Whether this call is issued while the caller's stream is captured into a CUDA graph.  Such a
        call takes no sequence number, so a refusal concerns this rank alone: nothing to tell the peers."""
        if not _stream_captured(t):
            return False
        _calls.issued = math.inf
        return True

    def _capture(self, name: str, call: GraphCall, fingerprint: Fingerprint, opts,
                 outputs: list[torch.Tensor] | None = None, premul=None) -> CapturedWork:
        """``call`` (its arguments checked) issued while the caller's stream is captured into a CUDA graph:
        enqueued into the graph by the fast CUDA plane's device path and run at each replay
        (docs/semantics.md, "CUDA graphs").  It takes no sequence number: every rank captures the same
        calls.  ``outputs``: what the Work reports (default: ``call.output``); ``premul``: the PREMUL_SUM
        factor of a reduction (refused: the kernel does not scale)."""
        if premul is not None:
            raise ArgumentError(f"{name} with PREMUL_SUM cannot be captured in a CUDA graph: scale the input "
                                "inside the captured region and use SUM")
        self._check_open()
        self._settle_quick()
        self.check_graphs()
        view = self._membership.view
        if not view.is_active(self._rank):
            raise ArgumentError(f"{name} cannot be captured in a CUDA graph on rank {self._rank}: this rank is not "
                                f"in the group's view (active ranks {list(view.active)}); join the group first")
        refusal = getattr(self._plane, "capture_refusal", None)
        reason = (refusal(view, call) if refusal is not None else
                  f"the {self.implementation} plane runs every operation through host-side control words")
        if reason:
            raise ArgumentError(f"{name} cannot be captured in a CUDA graph here: {reason}; issue it outside "
                                "the captured region")
        timeout_s = self._timeout_of(opts)
        offer = getattr(self._plane, "capture_offer", None)
        offers, index = self._agree_on_capture(name, view, fingerprint, timeout_s,
                                               offer(view, call) if offer is not None else b"")
        prepare = getattr(self._plane, "capture_prepare", None)
        try:
            ready = prepare(view, call, offers, timeout_s) if prepare is not None else None
            if ready is not None:  # every rank took up the offers, or none does (a second round: "mapped")
                took = agree_on_capture(self._capture_store, f"{self._prefix}/mapped", view.epoch, index, self._rank,
                                        view.active, fingerprint, timeout_s, name, ready)
                if not all(v == b"\1" for v in took.values()):
                    offers = {}
            self._plane.capture(view, call, fingerprint, timeout_s, offers)
        finally:
            ended = getattr(self._plane, "capture_ended", None)
            if ended is not None:
                ended()
        self._captured = True
        return CapturedWork(outputs if outputs is not None else [call.output])

    def _agree_on_capture(self, name: str, view: View, fingerprint: Fingerprint, timeout_s: float,
                          offer: bytes) -> tuple[dict[int, bytes], int]:
        """Every active rank's n-th captured call of this view is the same call, else every rank raises the
        same ``MismatchError`` now, at capture (control/capture.py); a rank that captures nothing within
        ``timeout_s``: ``OpTimeoutError``.  Returns every active rank's ``offer`` (the plane's, for this
        call) and n."""
        epoch, count = self._captures
        index = count if epoch == view.epoch else 0
        self._captures = (view.epoch, index + 1)
        if self._capture_store is None:
            try:
                conn = self._store.clone()
            except (AttributeError, RuntimeError):  # a Store without clone(): share the group's connection
                conn = self._store
            self._capture_store = BoundedStore(conn, lambda: self._capture_deadline_s)
        self._capture_deadline_s = timeout_s + 5.0  # the Store's own wait ends first
        return agree_on_capture(self._capture_store, self._prefix, view.epoch, index, self._rank, view.active,
                                fingerprint, timeout_s, name, offer), index

    def check_graphs(self) -> None:
        """Raise what a CUDA-graph replay of this group's captured collectives ran into since the last
        call, then let captured collectives start over (capture the graph again):
        ``PeerFailureError`` naming the ranks the survivors agreed failed, ``OpTimeoutError`` when they
        agree nobody failed (a peer was late, or the ranks captured different calls), or ``MooncakeError``
        for a graph captured under an earlier view.  A replay that gives up tells every active rank, also
        one whose own replay got through, and the agreement is one per view epoch: every survivor raises
        the same error.  Every operation of the group calls it first."""
        trouble = getattr(self._plane, "graph_trouble", None)
        found = trouble() if trouble is not None else None
        if found is None:
            return
        epoch, stale, dead = found
        membership = self._membership
        if stale:
            self._plane.graph_reset(membership.view.epoch)
            raise MooncakeError(f"a CUDA graph captured under view epoch {epoch} of this group was replayed "
                                "after the view changed: its collectives did not run; capture it again")
        if epoch == membership.view.epoch:
            membership.trouble(epoch, suspects=dead)
            decision = membership._wait_decision(epoch, membership._bound())
        else:  # the members already agreed on that epoch (this rank's own report, a peer's, or a NACK came first)
            decision = membership.decision(epoch)
        self._plane.graph_reset(membership.view.epoch)
        if decision is None:
            raise OpTimeoutError(f"a replay of a CUDA graph's collective gave up under view epoch {epoch}; "
                                 "its outputs are not valid; capture the graph again", ())
        if decision.failed:
            raise PeerFailureError(f"a replay of a CUDA graph's collective gave up: rank(s) "
                                   f"{sorted(decision.failed)} failed and the survivors {list(decision.active)} "
                                   "agreed on it; that replay's outputs are not valid; capture the graph "
                                   "again", tuple(sorted(decision.failed)))
        raise OpTimeoutError(f"a replay of a CUDA graph's collective gave up waiting for a peer (late, or it "
                             f"captured a different call); the members {list(decision.active)} agreed nobody "
                             "failed; that replay's outputs are not valid; capture the graph again", ())

    @_collective("all_reduce_coalesced", list_arg=0)
    def allreduce_coalesced(self, tensors, opts=None):
        opts = opts or c10d.AllreduceCoalescedOptions()
        return self._coalesced([self.allreduce([t], opts) for t in self._checked_list(tensors)], tensors)

    @_collective("broadcast")
    def broadcast(self, tensors, opts=None):
        opts = opts or c10d.BroadcastOptions()
        t = _one(tensors)
        capturing = self._enter_capture(t)
        self._check_tensor(t, "tensor", capturable=True)
        root = opts.rootRank
        self._check_root(root, "broadcast src")
        if capturing:
            return self._capture("broadcast", GraphCall("broadcast", t, t, root=root),
                                 _fp(OpCode.BROADCAST, t, root=root, numel=t.numel()), opts)
        staged: list = []
        x = self._stage(t, staged, True)
        return self._issue("broadcast", opts, lambda ctx: self._plane.broadcast(ctx, x, root), [t], staged, root,
                           _fp(OpCode.BROADCAST, t, root=root, numel=t.numel()))

    @_collective("reduce")
    def reduce(self, tensors, opts=None):
        opts = opts or c10d.ReduceOptions()
        t = _one(tensors)
        capturing = self._enter_capture(t)
        self._check_tensor(t, "tensor", capturable=True)
        op = _reduce_op(opts)
        self._check_reduce(op, t)
        root = opts.rootRank
        self._check_root(root, "reduce dst")
        factor = _premul_factor(opts, t.dtype)
        if capturing:
            return self._capture("reduce", GraphCall("reduce", t, t, op=op, root=root),
                                 _fp(OpCode.REDUCE, t, op, root=root, numel=t.numel()), opts, premul=factor)
        staged: list = []
        x = self._stage(t, staged, True)
        if factor is not None:  # non-roots keep their input unchanged: only the root's result is copied
            x = premul(x, factor)
            if self._rank == root:
                staged.append((t, x))
        return self._issue("reduce", opts, lambda ctx: self._plane.reduce(ctx, x, op, root), [t], staged, root,
                           _fp(OpCode.REDUCE, t, op, root=root, numel=t.numel()))

    @_collective("all_gather")
    def allgather(self, output_tensors, input_tensors, opts=None):
        opts = opts or c10d.AllgatherOptions()
        t = _one(input_tensors, "input_tensors")
        outs = _one(output_tensors, "output_tensors")
        capturing = self._enter_capture(t)
        self._check_tensor(t, "input tensor", capturable=True)
        self._check_slots(len(outs), "the all_gather output list")
        for i, o in enumerate(outs):
            self._check_like(o, t, f"output_tensor_list[{i}]", capturable=True)
        fingerprint = _fp(OpCode.ALL_GATHER, t, numel=t.numel(), slots=len(outs))
        if capturing:  # into one buffer (the graph's memory), then copies into the list, in the graph
            flat = torch.empty((len(outs), t.numel()), dtype=t.dtype, device=t.device)
            work = self._capture("all_gather", GraphCall("all_gather", t, flat, slots=len(outs)), fingerprint,
                                 opts, outs)
            for o, slot in zip(outs, flat.unbind(0)):
                o.copy_(slot.view(o.shape))
            return work
        staged: list = []
        x = self._stage(t, staged, False)
        ys = [self._stage(o, staged, True) for o in outs]
        return self._issue("all_gather", opts, lambda ctx: self._plane.all_gather(ctx, ys, x), outs, staged,
                           fingerprint=fingerprint)

    @_collective("all_gather_coalesced", list_arg=1)
    def allgather_coalesced(self, output_lists, input_list, opts=None):
        opts = opts or c10d.AllgatherOptions()
        if len(output_lists) != len(input_list):
            raise ArgumentError(f"all_gather_coalesced: {len(output_lists)} output lists for "
                                f"{len(input_list)} inputs")
        works = [self.allgather([outs], [t], opts) for outs, t in zip(output_lists, input_list)]
        return self._coalesced(works, [o for outs in output_lists for o in outs])

    @_collective("all_gather_into_tensor")
    def all_gather_single(self, output, input, opts=None):
        opts = opts or c10d.AllgatherOptions()
        capturing = self._enter_capture(input)
        self._check_tensor(input, "input_tensor", capturable=True)
        self._check_tensor(output, "output_tensor", capturable=True)
        k = self._slots_of(output.numel(), input.numel(), "all_gather_into_tensor output")
        if output.dtype != input.dtype:
            raise ArgumentError(f"all_gather_into_tensor: output dtype {output.dtype} != input dtype {input.dtype}")
        fingerprint = _fp(OpCode.ALL_GATHER, input, numel=input.numel(), slots=k)
        if capturing:
            return self._capture("all_gather_into_tensor", GraphCall("all_gather", input, output, slots=k),
                                 fingerprint, opts)
        staged: list = []
        x = self._stage(input, staged, False)
        y = self._stage(output, staged, True)
        slots = list(y.reshape(k, -1).unbind(0))
        xs = x.reshape(-1)
        return self._issue("all_gather_into_tensor", opts,
                           lambda ctx: self._plane.all_gather(ctx, slots, xs), [output], staged,
                           fingerprint=fingerprint)

    _allgather_base = all_gather_single

    @_collective("all_gather_into_tensor_coalesced", list_arg=1)
    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        opts = opts or c10d.AllgatherOptions()
        works = [self.all_gather_single(o, i, opts) for o, i in zip(outputs, inputs)]
        return self._coalesced(works, list(outputs))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    @_collective("gather")
    def gather(self, output_tensors, input_tensors, opts=None):
        opts = opts or c10d.GatherOptions()
        t = _one(input_tensors, "input_tensors")
        capturing = self._enter_capture(t)
        self._check_tensor(t, "input tensor", capturable=True)
        root = opts.rootRank
        self._check_root(root, "gather dst")
        if self._rank == root:
            outs = _one(output_tensors, "output_tensors")
            self._check_slots(len(outs), "gather_list")
            for i, o in enumerate(outs):
                self._check_like(o, t, f"gather_list[{i}]", capturable=True)
        else:
            if output_tensors and any(len(o) for o in output_tensors):
                raise ArgumentError(f"gather_list must be empty on non-destination rank {self._rank}")
            outs = []
        fingerprint = _fp(OpCode.GATHER, t, root=root, numel=t.numel())
        if capturing:  # the root's slots into one buffer (the graph's memory), then copies into the list
            flat = torch.empty((len(outs), t.numel()), dtype=t.dtype, device=t.device) if outs else t
            work = self._capture("gather", GraphCall("gather", t, flat, slots=len(outs), root=root), fingerprint,
                                 opts, outs)
            for o, slot in zip(outs, flat.unbind(0) if outs else ()):
                o.copy_(slot.view(o.shape))
            return work
        staged: list = []
        x = self._stage(t, staged, False)
        ys = [self._stage(o, staged, True) for o in outs] if self._rank == root else None
        return self._issue("gather", opts, lambda ctx: self._plane.gather(ctx, ys, x, root), outs, staged, root,
                           fingerprint)

    @_collective("scatter")
    def scatter(self, output_tensors, input_tensors, opts=None):
        opts = opts or c10d.ScatterOptions()
        t = _one(output_tensors, "output_tensors")
        capturing = self._enter_capture(t)
        self._check_tensor(t, "output tensor", capturable=True)
        root = opts.rootRank
        self._check_root(root, "scatter src")
        ins = []
        if self._rank == root:
            ins = _one(input_tensors, "input_tensors")
            self._check_slots(len(ins), "scatter_list")
            for i, s in enumerate(ins):
                self._check_like(s, t, f"scatter_list[{i}]", capturable=True)
        elif input_tensors and any(len(i) for i in input_tensors):
            raise ArgumentError(f"scatter_list must be empty on non-source rank {self._rank}")
        fingerprint = _fp(OpCode.SCATTER, t, root=root, numel=t.numel())
        if capturing:  # the root's slots into one buffer (a copy in the graph), every rank reads its own
            flat = torch.cat([s.reshape(-1) for s in ins]) if ins else t
            return self._capture("scatter", GraphCall("scatter", flat, t, slots=len(ins), root=root), fingerprint,
                                 opts)
        staged: list = []
        y = self._stage(t, staged, True)
        xs = [self._stage(s, staged, False) for s in ins] if self._rank == root else None
        return self._issue("scatter", opts, lambda ctx: self._plane.scatter(ctx, y, xs, root), [t], staged, root,
                           fingerprint)

    @_collective("reduce_scatter")
    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        opts = opts or c10d.ReduceScatterOptions()
        t = _one(output_tensors, "output_tensors")
        ins = _one(input_tensors, "input_tensors")
        self._check_tensor(t, "output tensor")
        op = _reduce_op(opts)
        self._check_reduce(op, t)
        self._check_slots(len(ins), "the reduce_scatter input list")
        for i, s in enumerate(ins):
            self._check_like(s, t, f"input_list[{i}]")
        factor = _premul_factor(opts, t.dtype)
        staged: list = []
        y = self._stage(t, staged, True)
        xs = [self._stage(s, staged, False) for s in ins]
        if factor is not None:
            xs = [premul(x, factor) for x in xs]
        return self._issue("reduce_scatter", opts, lambda ctx: self._plane.reduce_scatter(ctx, y, xs, op),
                           [t], staged, fingerprint=_fp(OpCode.REDUCE_SCATTER, t, op, numel=t.numel(),
                                                        slots=len(ins)))

    @_collective("reduce_scatter_tensor")
    def reduce_scatter_single(self, output, input, opts=None):
        opts = opts or c10d.ReduceScatterOptions()
        capturing = self._enter_capture(input)
        self._check_tensor(input, "input_tensor", capturable=True)
        self._check_tensor(output, "output_tensor", capturable=True)
        op = _reduce_op(opts)
        self._check_reduce(op, input)
        k = self._slots_of(input.numel(), output.numel(), "reduce_scatter_tensor input")
        if output.dtype != input.dtype:
            raise ArgumentError(f"reduce_scatter_tensor: output dtype {output.dtype} != input dtype {input.dtype}")
        factor = _premul_factor(opts, input.dtype)
        fingerprint = _fp(OpCode.REDUCE_SCATTER, output, op, numel=output.numel(), slots=k)
        if capturing:
            return self._capture("reduce_scatter_tensor",
                                 GraphCall("reduce_scatter", input, output, slots=k, op=op), fingerprint, opts,
                                 premul=factor)
        staged: list = []
        y = self._stage(output, staged, True)
        x = self._stage(input, staged, False)
        xs = list((x if factor is None else premul(x, factor)).reshape(k, -1).unbind(0))
        ys = y.reshape(-1)
        return self._issue("reduce_scatter_tensor", opts,
                           lambda ctx: self._plane.reduce_scatter(ctx, ys, xs, op), [output], staged,
                           fingerprint=fingerprint)

    _reduce_scatter_base = reduce_scatter_single

    @_collective("reduce_scatter_tensor_coalesced", list_arg=1)
    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        opts = opts or c10d.ReduceScatterOptions()
        works = [self.reduce_scatter_single(o, i, opts) for o, i in zip(outputs, inputs)]
        return self._coalesced(works, list(outputs))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    @_collective("all_to_all")
    def alltoall(self, output_tensors, input_tensors, opts=None):
        opts = opts or c10d.AllToAllOptions()
        self._check_slots(len(input_tensors), "the all_to_all input list")
        if len(output_tensors) != len(input_tensors):
            raise ArgumentError(f"all_to_all: output list has {len(output_tensors)} tensors, input "
                                f"list {len(input_tensors)}; both need one per rank")
        dtype = input_tensors[0].dtype if input_tensors else None
        for i, (o, s) in enumerate(zip(output_tensors, input_tensors)):
            self._check_tensor(s, f"input_tensor_list[{i}]")
            self._check_tensor(o, f"output_tensor_list[{i}]")
            if s.dtype != dtype or o.dtype != dtype:
                raise ArgumentError(f"all_to_all: every tensor must have dtype {dtype}; "
                                    f"entry {i} has {s.dtype} / {o.dtype}")
        me = self._rank
        if output_tensors[me].numel() != input_tensors[me].numel():
            raise ArgumentError(f"all_to_all: output_tensor_list[{me}] has {output_tensors[me].numel()} "
                                f"elements but this rank sends itself {input_tensors[me].numel()}")
        staged: list = []
        xs = [self._stage(s, staged, False) for s in input_tensors]
        ys = [self._stage(o, staged, True) for o in output_tensors]
        fingerprint = _fp(OpCode.ALL_TO_ALL, input_tensors[0], slots=len(input_tensors),
                          sends=tuple(s.numel() for s in input_tensors),
                          recvs=tuple(o.numel() for o in output_tensors))
        return self._issue("all_to_all", opts, lambda ctx: self._plane.all_to_all(ctx, ys, xs),
                           list(output_tensors), staged, fingerprint=fingerprint)

    @_collective("all_to_all_single")
    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        opts = opts or c10d.AllToAllOptions()
        capturing = self._enter_capture(input)
        self._check_tensor(input, "input", capturable=True)
        self._check_tensor(output, "output", capturable=True)
        if output.dtype != input.dtype:
            raise ArgumentError(f"all_to_all_single: output dtype {output.dtype} != input dtype {input.dtype}")
        k = len(input_split_sizes) or len(output_split_sizes) or self.size()
        in_splits = self._splits(input, input_split_sizes, k, "input_split_sizes")
        out_splits = self._splits(output, output_split_sizes, k, "output_split_sizes")
        if in_splits[self._rank] != out_splits[self._rank]:
            raise ArgumentError(f"all_to_all_single: this rank sends itself {in_splits[self._rank]} rows "
                                f"but expects {out_splits[self._rank]}")
        if capturing:
            for what, splits in (("input_split_sizes", in_splits), ("output_split_sizes", out_splits)):
                if len(set(splits)) > 1:
                    raise ArgumentError(f"all_to_all_single with uneven splits cannot be captured in a CUDA graph: "
                                        f"{what} is {splits}; pass equal splits (or none) or issue it outside the "
                                        "captured region")
            if input.numel() != output.numel():
                raise ArgumentError(f"all_to_all_single captured in a CUDA graph needs equal slots on both sides: "
                                    f"input has {input.numel()} elements, output {output.numel()}")
            part = input.numel() // k
            return self._capture("all_to_all_single", GraphCall("all_to_all", input, output, slots=k),
                                 _fp(OpCode.ALL_TO_ALL, input, slots=k, sends=(part,) * k, recvs=(part,) * k), opts)
        staged: list = []
        x = self._stage(input, staged, False)
        y = self._stage(output, staged, True)
        xs = list(x.split(in_splits)) if x.dim() else [x]
        ys = list(y.split(out_splits)) if y.dim() else [y]
        fingerprint = _fp(OpCode.ALL_TO_ALL, input, slots=k, sends=tuple(x.numel() for x in xs),
                          recvs=tuple(y.numel() for y in ys))
        return self._issue("all_to_all_single", opts, lambda ctx: self._plane.all_to_all(ctx, ys, xs),
                           [output], staged, fingerprint=fingerprint)

    @_collective("barrier")
    def barrier(self, opts=None):
        opts = opts or c10d.BarrierOptions()
        return self._issue("barrier", opts, lambda ctx: self._plane.barrier(ctx), [],
                           fingerprint=Fingerprint(OpCode.BARRIER))

    def monitored_barrier(self, timeout: timedelta | None = None, wait_all_ranks: bool = False) -> None:
        """gloo's monitored_barrier (``dist.monitored_barrier`` accepts only gloo groups): see
        ``mooncake.pg.monitored``."""
        from .monitored import monitored_barrier
        monitored_barrier(self, timeout, wait_all_ranks)

    # -- point to point ------------------------------------------------------------------------
    def _check_peer(self, peer: int, tag: int, what: str) -> None:
        if not 0 <= peer < self._capacity:
            raise ArgumentError(f"P2P {what}: rank {peer} out of range [0, {self._capacity})")
        if peer == self._rank:
            raise ArgumentError(f"P2P {what}: rank {peer} is this rank; send/recv need a peer")
        if not self.view.is_active(peer):
            raise ArgumentError(f"P2P {what}: rank {peer} is not active (active ranks: {list(self.view.active)})")
        if peer in self._membership.seen_dead():
            raise PeerFailureError(f"P2P {what}: rank {peer} has failed (its connection closed); the "
                                   "next collective will agree on it with the other ranks", (peer,))
        if not 0 <= tag <= MAX_P2P_TAG:
            raise ArgumentError(f"P2P {what}: tag {tag} out of range [0, {MAX_P2P_TAG}]")

    def _p2p_seq(self, table: dict, peer: int, tag: int) -> int:
        seq = table.get((peer, tag), 0)
        table[(peer, tag)] = seq + 1
        return seq

    def send(self, tensors, dstRank, tag=0):  # noqa: N803 - torch's names
        t = _one(tensors)
        self._check_tensor(t, "tensor")
        self._check_peer(dstRank, tag, "send")
        self._check_open()
        staged: list = []
        x = self._stage(t, staged, False, p2p=True).clone()
        plane_send = getattr(self._plane, "p2p_send", None)  # the fast CPU plane: shared memory
        with self._lock:
            seq = self._p2p_seq(self._p2p_send_seq, dstRank, tag)
            op = plane_send(x, dstRank, tag, seq) if plane_send is not None else None
            if op is None:
                op = ref_p2p.send(self._p2p_context(), x, dstRank, tag, seq)
        return self._track(MooncakeWork(self._engine, op, self._timeout_s, [t],
                                        name=f"send to rank {dstRank}"))

    def recv(self, tensors, srcRank, tag=0):  # noqa: N803
        t = _one(tensors)
        self._check_tensor(t, "tensor")
        self._check_peer(srcRank, tag, "recv")
        self._check_open()
        staged: list = []
        y = self._stage(t, staged, True, p2p=True)
        plane_recv = getattr(self._plane, "p2p_recv", None)
        with self._lock:
            seq = self._p2p_seq(self._p2p_recv_seq, srcRank, tag)
            op = plane_recv(y, srcRank, tag, seq) if plane_recv is not None else None
            if op is None:
                op = ref_p2p.recv(self._p2p_context(), y, srcRank, tag, seq)
        return self._track(MooncakeWork(self._engine, op, self._timeout_s, [t],
                                        (lambda: t.copy_(y)) if staged else None, source_rank=srcRank,
                                        name=f"recv from rank {srcRank}"))

    def recv_anysource(self, tensors, tag=0):
        t = _one(tensors)
        self._check_tensor(t, "tensor")
        if not 0 <= tag <= MAX_P2P_TAG:
            raise ArgumentError(f"P2P recv: tag {tag} out of range [0, {MAX_P2P_TAG}]")
        self._check_open()
        staged: list = []
        y = self._stage(t, staged, True, p2p=True)
        sources = [r for r in self.view.active if r != self._rank]
        if not sources:
            raise ArgumentError("P2P recv from any source: this rank has no active peer")
        take_seq = lambda src: self._p2p_seq(self._p2p_recv_seq, src, tag)  # noqa: E731
        peek_seq = lambda src: self._p2p_recv_seq.get((src, tag), 0)  # noqa: E731
        plane_recv_any = getattr(self._plane, "p2p_recv_any", None)
        with self._lock:
            op = (plane_recv_any(y, sources, tag, take_seq, peek_seq, self._p2p_context())
                  if plane_recv_any is not None else None)
            if op is None:
                op = ref_p2p.recv_any(self._p2p_context(), y, sources, tag, take_seq, peek_seq)
        return self._track(MooncakeWork(self._engine, op, self._timeout_s, [t],
                                        (lambda: t.copy_(y)) if staged else None,
                                        source_rank=op.source_rank,
                                        name=f"recv from any source (tag {tag})"))

    def _p2p_context(self) -> ref.OpContext:
        return ref.OpContext(self._engine, self._peers, self._group_key, self._rank, self.view, 0, "p2p")

    # -- helpers -------------------------------------------------------------------------------
    def _slots_of(self, big: int, small: int, what: str) -> int:
        if small == 0 or big % small:
            raise ArgumentError(f"{what} must hold a whole number of slots: {big} elements is not a "
                                f"multiple of {small}")
        k = big // small
        self._check_slots(k, what)
        return k

    def _splits(self, t: torch.Tensor, splits: Sequence[int], k: int, what: str) -> list[int]:
        rows = t.shape[0] if t.dim() else 1
        if not splits:
            if rows % k:
                raise ArgumentError(f"all_to_all_single: {rows} rows of dim 0 do not split evenly "
                                    f"over {k} ranks; pass {what}")
            return [rows // k] * k
        self._check_slots(len(splits), what)
        if len(splits) != k:
            raise ArgumentError(f"{what} has {len(splits)} entries, expected {k}")
        if any(s < 0 for s in splits) or sum(splits) != rows:
            raise ArgumentError(f"{what} {list(splits)} must be non-negative and add up to dim 0 "
                                f"of the tensor ({rows})")
        return list(splits)

    def _checked_list(self, tensors) -> list[torch.Tensor]:
        if not tensors:
            raise ArgumentError("coalesced operation needs at least one tensor")
        return list(tensors)

    @staticmethod
    def _coalesced(works: list[MooncakeWork], outputs) -> ComposedWork:
        return ComposedWork(works, list(outputs))

    # -- teardown ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Let in-flight operations finish (each within its own deadline), then close the group.

        Unwaited sends are flushed so that a rank may exit right after ``destroy_process_group``.
        """
        self._settle_quick()
        for work in list(self._in_flight):
            try:
                work.wait()
            except MooncakeError:
                pass  # reported to whoever waits on it; shutdown itself goes on
        self._closed = True
        self._membership.close()
        self._plane.close()

    def abort(self) -> None:
        """Close the group at once; operations still in flight fail at their deadline."""
        self._closed = True

    def __repr__(self) -> str:
        return (f"MooncakeProcessGroup({self._backend_name}, rank={self._rank}, size={self.size()}, "
                f"capacity={self._capacity}, active={list(self.view.active)})")


def _net_devices() -> str | None:
    devices = [ucx.interface_of(_options.host_ip())] + _options.get_device_filter()
    return ",".join(dict.fromkeys(devices))


def create_cpu(dist_opts, pg_options):
    return _create("mooncake-cpu", "cpu", dist_opts, pg_options)


def create_cuda(dist_opts, pg_options):
    return _create("mooncake", "cuda", dist_opts, pg_options)


def _create(name: str, device: str, dist_opts, pg_options):
    if dist_opts.group_size > MAX_RANKS:
        raise ArgumentError(f"The number of ranks exceeds the limit: {dist_opts.group_size} > {MAX_RANKS}")
    return MooncakeProcessGroup(name, device, dist_opts.store, dist_opts.group_rank,
                                dist_opts.group_size, dist_opts.timeout, dist_opts.group_id,
                                dist_opts.global_ranks_in_group, pg_options)

