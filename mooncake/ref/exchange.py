"""One operation's messages: every send and receive is posted at once, then awaited.

Every collective of the ref data plane is a single exchange ("one-shot"): no rank ever waits for
one message before posting the next, so operations cannot deadlock on each other and any number
of them may be in flight.  Each message is a wire header plus a copy of the payload; a received
header is validated against the expected one before its payload is handed out.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch

from ..control import faults
from ..control.errors import PeerFailureError, WireError
from ..control.wire import HEADER_BYTES, Header
from .ucx import Engine, Peer, Request

try:
    from ucxx._lib.libucxx import UCXMessageTruncatedError as _Truncated
except ImportError:  # pragma: no cover - older ucxx
    _Truncated = ()


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A uint8 numpy view of a contiguous CPU tensor (any dtype, zero-copy)."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def payload_tensor(buffer: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The payload of a received message as a tensor (zero-copy view of ``buffer``)."""
    return torch.from_numpy(buffer[HEADER_BYTES:]).view(dtype).reshape(shape)


class Exchange:
    """Posts ``sends`` (peer rank -> header, payload tensor) and ``recvs`` (peer rank -> expected
    header) at once, then the commit round with ``commit_peers`` (peer rank -> the DONE header
    this rank expects from it): once every payload is in, a DONE goes to each of them.

    Implements ``PlaneOp`` (control/plane.py) except ``finish``, which the operation adds.
    """

    def __init__(self, engine: Engine, peers: dict[int, Peer], op_name: str,
                 sends: dict[int, tuple[Header, torch.Tensor]], recvs: dict[int, Header],
                 commit_peers: dict[int, Header] | None = None):
        self.op_name = op_name
        self._engine = engine
        self._peers = peers
        self._expected = recvs
        self._send_reqs: dict[int, Request] = {}
        self._recv_reqs: dict[int, Request] = {}
        self._done_in: dict[int, Request] = {}
        self._done_out: dict[int, Request] = {}
        self._commit_peers = commit_peers or {}
        self.data_complete = False
        self.committed = False
        self._progress_lock = threading.Lock()
        for rank, header in self._commit_peers.items():
            self._done_in[rank] = engine.recv(peers[rank], header.tag(), np.empty(HEADER_BYTES, np.uint8))
        for rank, header in recvs.items():
            buffer = np.empty(HEADER_BYTES + header.num_bytes, np.uint8)
            self._recv_reqs[rank] = engine.recv(peers[rank], header.tag(), buffer)
        for rank, (header, payload) in sends.items():
            buffer = np.empty(HEADER_BYTES + header.num_bytes, np.uint8)
            header.pack_into(memoryview(buffer))
            buffer[HEADER_BYTES:] = tensor_bytes(payload)
            self._send_reqs[rank] = engine.send(peers[rank], header.tag(), buffer)
            if len(self._send_reqs) == 1 and self._commit_peers:
                faults.hit("mid_transfer")
        if not sends and self._commit_peers:
            faults.hit("mid_transfer")
        self.progress()

    def requests(self) -> list[Request]:
        return [*self._recv_reqs.values(), *self._send_reqs.values(), *self._done_in.values(),
                *self._done_out.values()]

    def progress(self) -> None:
        """Send the DONEs once every payload is in; mark the operation committed when it is.  Callers
        take turns (the constructor and ``Work._advance`` today), so the DONEs go out once and only after
        the ``after_data`` fault point has returned, whichever thread calls."""
        with self._progress_lock:
            self._progress()

    def _progress(self) -> None:
        if not self.data_complete and all(r.completed for r in self._recv_reqs.values()):
            if self._commit_peers:
                faults.hit("after_data")
            self.data_complete = True
            for rank, expected in self._commit_peers.items():
                header = dataclasses.replace(expected, src=expected.dst, dst=rank)
                buffer = np.empty(HEADER_BYTES, np.uint8)
                header.pack_into(memoryview(buffer))
                self._done_out[rank] = self._engine.send(self._peers[rank], header.tag(), buffer)
        if self.data_complete and not self.committed:
            self.committed = all(r.completed and r.error() is None for r in self._done_in.values()) \
                and all(r.completed for r in self._send_reqs.values())

    def failed_peers(self) -> frozenset[int]:
        failed = set()
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

    def result(self) -> dict[int, np.ndarray]:
        """Received buffers (header + payload) by peer rank, headers checked; raises on a lost
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
            Header.unpack(memoryview(req.buffer)).check_matches(expected)
            out[rank] = req.buffer
        return out
