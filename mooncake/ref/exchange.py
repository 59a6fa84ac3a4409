"""One operation's messages: every send and receive is posted at once, then awaited.

Every collective of the ref data plane is a single exchange ("one-shot"): no rank ever waits for
one message before posting the next, so operations cannot deadlock on each other and any number
of them may be in flight.  Each message is a wire header plus a copy of the payload; a received
header is validated against the expected one before its payload is handed out.

With a job secret (control/auth.py) every header carries its group's MAC, and DONEs are MACed whole.
A received message that does not verify -- forged, garbage, or oversized (UCX reports it truncated)
-- is dropped, logged once, and its receive posted again: it never fails a peer or reaches a tensor.
Honest ranks that disagree on sizes (or on a root) keep their verdict: an oversized payload cannot be
told from a forgery, so its receive is posted again, but the DONEs still go out (with the fingerprints);
when the sender's authenticated DONE shows a call that disagrees with this rank's, the oversized payload
was its own and the operation fails with the usual ``MismatchError``; when it agrees, the oversized
message was not its and the operation waits for its payload before it commits.

Payload memory.  A message lives where its payload does: a CUDA tensor's payload goes out of (and a
receive meant for a CUDA tensor lands in) one device buffer, header and payload together, when the
engine hands CUDA memory to UCX (``Engine.cuda``) and payloads are not MACed byte by byte
(``MOONCAKE_AUTH_PAYLOAD=1`` needs them on the host); otherwise it is staged through host memory.  The
wire is the same either way.  Device buffers are filled on the operation's stream, which is synchronised
before anything is posted (UCX reads and writes them outside stream order, and a fresh buffer may be
memory the caching allocator just freed from pending work); a completed receive is in device memory,
visible to every stream; only its 64-byte header is copied to the host, to be checked.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from typing import Callable

import numpy as np
import torch

from ..control import auth, faults
from ..control import fingerprint as fp
from ..control.errors import MismatchError, PeerFailureError, WireError
from ..control.wire import HEADER_BYTES, Header, Kind
from ..control.streams import on_stream
from .ucx import Buffer, Engine, Peer, Request

try:
    from ucxx._lib.libucxx import UCXMessageTruncatedError as _Truncated
except ImportError:  # pragma: no cover - older ucxx
    _Truncated = ()


def _claimed_length(buffer: np.ndarray) -> int:
    """Header plus the payload size the (unverified) header claims, clipped to what was received."""
    if len(buffer) < HEADER_BYTES:
        return len(buffer)
    claimed = int.from_bytes(buffer[28:36].tobytes(), "little")
    return HEADER_BYTES + min(claimed, len(buffer) - HEADER_BYTES)


# the header fields that bind a message to its place: kind, group, source, destination, epoch, seq, P2P tag
_BINDING = struct.Struct("<6xBxIHHIQ10xH")


def _replayed(buffer: np.ndarray, want: Header, kind: Kind) -> str | None:
    """Why an authentic message does not belong where it arrived (a replay from another epoch,
    operation or pair of ranks), or None when it does."""
    got = _BINDING.unpack_from(buffer, 0)
    if got != (int(kind), want.group_key, want.src, want.dst, want.epoch, want.seq, want.user_tag):
        k, _, src, dst, epoch, seq, _ = got
        return f"replayed message (kind {k} of epoch {epoch}, op {seq}, rank {src} to {dst})"
    return None


def header_seq(headers: dict[int, Header]) -> int:
    return next(iter(headers.values())).seq


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor (any dtype, zero-copy)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def payload_tensor(buffer: Buffer, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The payload of a received message as a tensor (zero-copy view of ``buffer``, host or device)."""
    if isinstance(buffer, torch.Tensor):
        return buffer[HEADER_BYTES:].view(dtype).reshape(shape)
    return torch.from_numpy(buffer[HEADER_BYTES:]).view(dtype).reshape(shape)


def on_device(device: torch.device | None, num_bytes: int, cuda_on: bool, mac_payload: bool) -> bool:
    """Whether a message with ``num_bytes`` of payload for a tensor on ``device`` lives in device memory
    (else in host memory: staged)."""
    return (device is not None and device.type == "cuda" and num_bytes > 0 and cuda_on
            and not mac_payload)


class Exchange:
    """Posts ``sends`` (peer rank -> header, payload tensor) and ``recvs`` (peer rank -> expected
    header) at once, then the commit round with ``commit_peers`` (peer rank -> the DONE header
    this rank expects from it): once every payload is in, a DONE carrying this rank's
    ``fingerprint`` goes to each of them.  With every DONE in, the op is committed if every
    fingerprint agrees; otherwise ``error`` holds the ``MismatchError`` every rank computes alike.

    Implements ``PlaneOp`` (control/plane.py) except ``finish``, which the operation adds.
    """

    def __init__(self, engine: Engine, peers: dict[int, Peer], op_name: str,
                 sends: dict[int, tuple[Header, torch.Tensor]], recvs: dict[int, Header],
                 commit_peers: dict[int, Header] | None = None, fingerprint: "fp.Fingerprint | None" = None,
                 me: int = -1, recv_devices: dict[int, torch.device] | None = None,
                 stream: "torch.cuda.Stream | None" = None, gate: "Callable[[], bool] | None" = None,
                 more_prints: "Callable[[], dict[int, fp.Fingerprint]] | None" = None):
        """``recv_devices`` names the device of the tensor each receive is for (absent: the host);
        ``stream`` is the CUDA stream the operation's device work is ordered on.  When this exchange is
        one half of an operation (the fast CPU plane's hybrid: UCX between hosts, shared memory within),
        the DONEs wait for ``gate()`` as well (the other half's payloads are in), and the verdict also
        compares ``more_prints()`` (the other half's ranks' fingerprints)."""
        self.op_name = op_name
        self._engine = engine
        self._peers = peers
        self._expected = recvs
        self._send_reqs: dict[int, Request] = {}
        self._recv_reqs: dict[int, Request] = {}
        self._done_in: dict[int, Request] = {}
        self._done_out: dict[int, Request] = {}
        self._commit_peers = commit_peers or {}
        self._fingerprint = fingerprint
        self._me = me
        self._gate = gate
        self._more_prints = more_prints
        self._garbage: set[int] = set()  # peers whose messages are not mooncake's: failed
        any_header = next(iter([*recvs.values(), *(h for h, _ in sends.values()), *self._commit_peers.values()]),
                          None)
        self._auth = None if any_header is None else auth.wire_auth(any_header.group_key)
        mac_payload = self._auth is not None and self._auth.mac_payload
        self._stream = stream
        self._recv_devices = {rank: device for rank, device in (recv_devices or {}).items()
                              if on_device(device, recvs[rank].num_bytes, engine.cuda.on, mac_payload)}
        self._verified: set[int] = set()      # ids of received requests whose MAC checked out
        self._truncated: dict[int, Request] = {}  # rank -> its oversized payload, until its DONE vouches for it
        self.data_complete = False
        # DONEs went out: every payload is in, or (with a secret) some receive got an oversized message
        # that its sender's DONE must still vouch for (``_screen``) before the op may commit
        self._done_sent = False
        self.committed = False
        self.error: BaseException | None = None
        self._progress_lock = threading.Lock()
        done_bytes = HEADER_BYTES + (fp.MAX_BYTES if fingerprint is not None else 0)
        self._done_bytes = done_bytes
        recv_buffers = {rank: self._recv_buffer(rank, HEADER_BYTES + header.num_bytes)
                        for rank, header in recvs.items()}
        send_buffers = {rank: self._message(header, payload, engine.cuda.on, mac_payload)
                        for rank, (header, payload) in sends.items()}
        if any(isinstance(b, torch.Tensor) for b in [*recv_buffers.values(), *send_buffers.values()]):
            self._settle()
        for rank, header in self._commit_peers.items():
            self._done_in[rank] = engine.recv(peers[rank], header.tag(), np.empty(done_bytes, np.uint8))
        for rank, header in recvs.items():
            self._recv_reqs[rank] = engine.recv(peers[rank], header.tag(), recv_buffers[rank])
        for rank, (header, _) in sends.items():
            self._send_reqs[rank] = engine.send(peers[rank], header.tag(), send_buffers[rank])
            if len(self._send_reqs) == 1 and self._commit_peers:
                faults.hit("mid_transfer")
        if not sends and self._commit_peers:
            faults.hit("mid_transfer")
        self.progress()

    # -- message memory --------------------------------------------------------------------------
    def _device_stream(self, device: torch.device) -> "torch.cuda.Stream":
        if self._stream is None:
            self._stream = torch.cuda.current_stream(device)
        return self._stream

    def _recv_buffer(self, rank: int, num_bytes: int) -> Buffer:
        """A buffer for ``rank``'s message: on its tensor's device where messages may live there."""
        device = self._recv_devices.get(rank)
        if device is None:
            return np.empty(num_bytes, np.uint8)
        with on_stream(self._device_stream(device)):
            return torch.empty(num_bytes, dtype=torch.uint8, device=device)

    def _message(self, header: Header, payload: torch.Tensor, cuda_on: bool, mac_payload: bool) -> Buffer:
        """The message for ``header``: header and payload in one buffer, on the payload's device where
        messages may live there (``on_device``), else on the host."""
        device = on_device(payload.device, header.num_bytes, cuda_on, mac_payload)
        head = np.empty(HEADER_BYTES if device else HEADER_BYTES + header.num_bytes, np.uint8)
        header.pack_into(memoryview(head))
        if not device:
            if header.num_bytes:
                with on_stream(self._stream if payload.is_cuda else None):
                    head[HEADER_BYTES:] = tensor_bytes(payload.to("cpu") if payload.is_cuda else payload)
            if self._auth is not None:
                self._auth.sign(head)
            return head
        if self._auth is not None:
            self._auth.sign(head)  # over the header: the payload is MACed only with MOONCAKE_AUTH_PAYLOAD=1
        with on_stream(self._device_stream(payload.device)):
            buffer = torch.empty(HEADER_BYTES + header.num_bytes, dtype=torch.uint8, device=payload.device)
            buffer[HEADER_BYTES:].copy_(payload.detach().reshape(-1).view(torch.uint8))
            buffer[:HEADER_BYTES].copy_(torch.from_numpy(head))  # from pageable memory: waits for the stream
        return buffer

    def _settle(self) -> None:
        """Wait until the stream's work up to the device buffers' copies is done: the producer's writes
        and the buffers' earlier users (UCX works outside stream order)."""
        self._stream.synchronize()

    def _head(self, req: Request) -> np.ndarray:
        """The host bytes of a completed received message: a host buffer itself; for a device buffer, a
        host copy of its header (made once, on a side stream: UCX's writes are complete)."""
        if not isinstance(req.buffer, torch.Tensor):
            return req.buffer
        if req.head is None:
            with torch.cuda.stream(_side_stream(req.buffer.device)):
                req.head = req.buffer[:HEADER_BYTES].to("cpu").numpy()
        return req.head

    def requests(self) -> list[Request]:
        return [*self._recv_reqs.values(), *self._send_reqs.values(), *self._done_in.values(),
                *self._done_out.values()]

    def progress(self) -> None:
        """Send the DONEs once every payload is in; mark the operation committed (or failed by a
        mismatch) when every DONE is.  Callers take turns (the constructor and ``Work._advance``
        today), so the DONEs go out once and only after the ``after_data`` fault point has
        returned, whichever thread calls."""
        with self._progress_lock:
            self._progress()

    def _progress(self) -> None:
        if self._auth is not None:
            self._screen()
        if not self._done_sent and all(r.completed or rank in self._truncated
                                       for rank, r in self._recv_reqs.items()) \
                and (self._gate is None or self._gate()):
            self._check_senders()
            if self._garbage or self._lost():
                # no DONE: nobody commits (a commit anywhere would promise that this rank holds every
                # payload); failed_peers() names the senders for the agreement
                return
            if self._commit_peers:
                faults.hit("after_data")
            self._done_sent = True
            payload = b"" if self._fingerprint is None else self._fingerprint.encode()
            for rank, expected in self._commit_peers.items():
                header = dataclasses.replace(expected, src=expected.dst, dst=rank, num_bytes=len(payload))
                buffer = np.empty(HEADER_BYTES + len(payload), np.uint8)
                header.pack_into(memoryview(buffer))
                buffer[HEADER_BYTES:] = np.frombuffer(payload, np.uint8)
                if self._auth is not None:
                    self._auth.sign(buffer, control=True)
                self._done_out[rank] = self._engine.send(self._peers[rank], header.tag(), buffer)
        if self._done_sent and not self.data_complete and not self._truncated \
                and all(r.completed for r in self._recv_reqs.values()):
            self.data_complete = True
        if self.data_complete and not self.committed and self.error is None \
                and all(r.completed and r.error() is None for r in self._done_in.values()) \
                and all(r.completed for r in self._send_reqs.values()):
            mismatch = self._verdict()
            if mismatch is not None:
                self.error = MismatchError(mismatch)
            elif not self._garbage:
                self.committed = True

    def _screen(self) -> None:
        """With a job secret: drop every received message that does not carry its group's MAC and
        post its receive again (see the module docstring)."""
        if len(self._verified) == len(self._recv_reqs) + len(self._done_in) and not self._truncated:
            return  # every receive verified already (the common case after the first look)
        for table, expected, control in ((self._recv_reqs, self._expected, False),
                                         (self._done_in, self._commit_peers, True)):
            for rank, req in list(table.items()):
                if id(req) in self._verified or not req.completed:  # (completed asks UCX: not free)
                    continue
                error = req.error()
                header = expected[rank]
                if error is None:
                    head = self._head(req)
                    if not self._auth.verify(head, _claimed_length(head), control):
                        reason = "bad or missing MAC"
                    else:
                        reason = _replayed(head, header, Kind.DONE if control else header.kind)
                        if reason is None:
                            self._verified.add(id(req))
                            continue
                elif isinstance(error, _Truncated):
                    reason = "oversized message"
                    if not control:
                        self._truncated[rank] = req
                else:
                    continue  # a lost connection: failed_peers() names it
                auth.drop(f"a sender posing as rank {rank} (group {header.group_key}, "
                          f"{'DONE' if control else header.kind.name}, epoch {header.epoch})", reason)
                if control:
                    buffer = np.empty(self._done_bytes, np.uint8)
                else:
                    buffer = self._recv_buffer(rank, HEADER_BYTES + header.num_bytes)
                    if isinstance(buffer, torch.Tensor):
                        self._settle()
                table[rank] = self._engine.recv(self._peers[rank], header.tag(), buffer)
        for rank in list(self._truncated):
            if id(self._recv_reqs[rank]) in self._verified:
                del self._truncated[rank]  # its authentic payload came: the oversized one was forged
                continue
            done = self._done_in.get(rank)
            if done is None or id(done) not in self._verified or self._fingerprint is None:
                continue
            try:
                theirs = fp.Fingerprint.decode(bytes(done.buffer[HEADER_BYTES:_claimed_length(done.buffer)]),
                                               f"rank {rank}'s DONE")
            except WireError:
                continue  # _verdict marks it
            if fp.mismatch(header_seq(self._commit_peers), {self._me: self._fingerprint, rank: theirs}):
                # its signed DONE says it called the op with other sizes: the oversized payload was its own
                self._engine.keep_alive([self._recv_reqs[rank]])
                self._recv_reqs[rank] = self._truncated.pop(rank)
                self._verified.add(id(self._recv_reqs[rank]))
            else:
                del self._truncated[rank]  # it agrees on the sizes: the oversized message was not its

    def _lost(self) -> bool:
        """A receive ended by a lost connection (not by an oversized message: that is a mismatch)."""
        return any(req.completed and req.error() is not None and not isinstance(req.error(), _Truncated)
                   for rank, req in self._recv_reqs.items() if rank not in self._truncated)

    def _check_senders(self) -> None:
        """A received message whose header is not a mooncake header at all (bad magic, version,
        kind, source) comes from a broken or foreign sender: that peer counts as failed.  Headers
        that merely disagree (another op, size or dtype) are a mismatch the fingerprints name."""
        for rank, req in self._recv_reqs.items():
            if rank in self._truncated or req.error() is not None:
                continue  # truncated (a mismatch) or lost (failed_peers)
            try:
                header = Header.unpack(memoryview(self._head(req)))
            except WireError:
                self._garbage.add(rank)
                continue
            want = self._expected[rank]
            if (header.kind, header.src, header.dst, header.epoch, header.seq) != \
                    (want.kind, want.src, want.dst, want.epoch, want.seq):
                self._garbage.add(rank)

    def _verdict(self) -> str | None:
        """Compare every rank's fingerprint (from the DONEs); a DONE that does not decode marks its
        sender failed."""
        if self._fingerprint is None or not self._commit_peers:
            return None
        prints = {self._me: self._fingerprint, **(self._more_prints() if self._more_prints else {})}
        for rank, req in self._done_in.items():
            try:
                header = Header.unpack(memoryview(req.buffer))
                if header.kind is not Kind.DONE or header.src != rank or header.num_bytes > fp.MAX_BYTES:
                    raise WireError(f"rank {rank} sent a malformed DONE")
                prints[rank] = fp.Fingerprint.decode(
                    bytes(req.buffer[HEADER_BYTES:HEADER_BYTES + header.num_bytes]), f"rank {rank}'s DONE")
            except WireError:
                self._garbage.add(rank)
        if self._garbage:
            return None
        return fp.mismatch(self._expected_seq(), prints)

    def payloads_ok(self) -> bool:
        """The DONEs went out and every payload arrived intact (``data_complete`` also counts a receive
        that a lost connection ended)."""
        return self.data_complete and all(r.error() is None for r in self._recv_reqs.values())

    def _expected_seq(self) -> int:
        header = next(iter(self._commit_peers.values()))
        return header.seq

    def failed_peers(self) -> frozenset[int]:
        failed = set(self._garbage)
        for table in (self._recv_reqs, self._send_reqs, self._done_in, self._done_out):
            for rank, req in table.items():
                if req.completed and req.error() is not None and not isinstance(req.error(), _Truncated):
                    failed.add(rank)
        return frozenset(failed)

    def pending_ranks(self) -> tuple[int, ...]:
        ranks = set()
        for table in (self._recv_reqs, self._send_reqs, self._done_in):
            ranks |= {r for r, q in table.items() if not q.completed}
        return tuple(sorted(ranks))

    def abandon(self) -> None:
        """Hand unfinished requests to the engine so their buffers outlive them."""
        self._engine.keep_alive([r for r in self.requests() if not r.completed])

    def result(self) -> dict[int, Buffer]:
        """Received buffers (header + payload, host or device) by peer rank, headers checked; raises on a lost
        connection or a message that does not match."""
        failed = self.failed_peers() & set(self._recv_reqs)
        if failed:
            raise PeerFailureError(f"{self.op_name}: lost connection to rank(s) {sorted(failed)}",
                                   tuple(failed))
        out = {}
        for rank, req in self._recv_reqs.items():
            expected = self._expected[rank]
            if isinstance(req.error(), _Truncated):
                raise WireError(f"{self.op_name}: rank {rank} sent more than the {expected.num_bytes} "
                                "bytes this rank expects: tensor sizes must agree across ranks")
            Header.unpack(memoryview(self._head(req))).check_matches(expected)
            out[rank] = req.buffer
        return out


_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """A stream of ``device`` for reading received headers, ordered after no user work."""
    stream = _side_streams.get(device.index)
    if stream is None:
        stream = _side_streams.setdefault(device.index, torch.cuda.Stream(device))
    return stream
