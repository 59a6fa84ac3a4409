"""One operation's messages: every send and receive is posted at once, then awaited.

Every collective of the ref data plane is a single exchange ("one-shot"): no rank ever waits for
one message before posting the next, so operations cannot deadlock on each other and any number
of them may be in flight.  Each message is a wire header plus a copy of the payload; a received
header is validated against the expected one before its payload is handed out.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..control.errors import OpTimeoutError, PeerFailureError, WireError
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
    header); ``done()`` polls, ``result()`` returns received buffers or raises."""

    def __init__(self, engine: Engine, peers: dict[int, Peer], op_name: str,
                 sends: dict[int, tuple[Header, torch.Tensor]], recvs: dict[int, Header]):
        self.op_name = op_name
        self._engine = engine
        self._expected = recvs
        self._send_reqs: dict[int, Request] = {}
        self._recv_reqs: dict[int, Request] = {}
        for rank, header in recvs.items():
            buffer = np.empty(HEADER_BYTES + header.num_bytes, np.uint8)
            self._recv_reqs[rank] = engine.recv(peers[rank], header.tag(), buffer)
        for rank, (header, payload) in sends.items():
            buffer = np.empty(HEADER_BYTES + header.num_bytes, np.uint8)
            header.pack_into(memoryview(buffer))
            buffer[HEADER_BYTES:] = tensor_bytes(payload)
            self._send_reqs[rank] = engine.send(peers[rank], header.tag(), buffer)

    def requests(self):
        return list(self._recv_reqs.values()) + list(self._send_reqs.values())

    def done(self) -> bool:
        return all(r.completed for r in self.requests())

    def pending_ranks(self) -> tuple[int, ...]:
        ranks = {r for r, q in self._recv_reqs.items() if not q.completed}
        ranks |= {r for r, q in self._send_reqs.items() if not q.completed}
        return tuple(sorted(ranks))

    def abandon(self) -> None:
        """Hand unfinished requests to the engine so their buffers outlive them."""
        self._engine.keep_alive([r for r in self.requests() if not r.completed])

    def result(self) -> dict[int, np.ndarray]:
        """Received buffers (header + payload) by peer rank; raises on any failed message."""
        failed = {}
        for rank, req in list(self._recv_reqs.items()) + list(self._send_reqs.items()):
            err = req.error()
            if err is not None and not isinstance(err, _Truncated):
                failed[rank] = err
        if failed:
            detail = "; ".join(f"rank {r}: {type(e).__name__}" for r, e in sorted(failed.items()))
            raise PeerFailureError(f"{self.op_name}: lost connection to rank(s) "
                                   f"{sorted(failed)} ({detail})", tuple(failed))
        out = {}
        for rank, req in self._recv_reqs.items():
            expected = self._expected[rank]
            if isinstance(req.error(), _Truncated):
                raise WireError(f"{self.op_name}: rank {rank} sent more than the {expected.num_bytes} "
                                "bytes this rank expects: tensor sizes must agree across ranks")
            Header.unpack(memoryview(req.buffer)).check_matches(expected)
            out[rank] = req.buffer
        return out

    def timeout_error(self, timeout_s: float) -> OpTimeoutError:
        pending = self.pending_ranks()
        return OpTimeoutError(f"{self.op_name} did not complete within {timeout_s:.3g} s; still "
                              f"waiting on rank(s) {list(pending)}", pending)


def monotonic_deadline(timeout_s: float) -> float:
    return time.monotonic() + timeout_s
