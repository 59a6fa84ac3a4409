"""Jobs for the security tests (run inside mooncake.testing.cluster workers) and the attacker's
tools (run in the test process, which plays a process on the same host without the job secret:
it can reach every rank's UCX worker and the Store, as the trust model says)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- jobs (workers)

def group_info():
    """What an attacker on the host can learn (from the Store, or by probing): the UCX worker
    address, the group key, view epoch and next op number, the pid."""
    import os
    g = dist.group.WORLD
    return {"address": bytes(g._engine.address), "group_key": g._group_key, "epoch": g.view.epoch,
            "seq": g.membership.next_seq, "pid": os.getpid(), "prefix": g._prefix,
            "impl": g.implementation}


def all_reduce(value, delay_s=0.0, delay_rank=None):
    """One SUM all_reduce of ``[value + rank]`` (int64); ``delay_rank`` waits ``delay_s`` first,
    so a forged message reaches the others before the authentic one."""
    if delay_rank is not None and dist.get_rank() == delay_rank:
        time.sleep(delay_s)
    t = torch.tensor([value + dist.get_rank()], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def healthy(rounds=3):
    """Next ops correct on every rank, every rank still active: (results, active mask)."""
    import mooncake.pg as pg
    out = []
    for i in range(rounds):
        t = torch.tensor([float(dist.get_rank() + 1) * (i + 1)], dtype=torch.float32)
        dist.all_reduce(t)
        out.append(float(t.item()))
    mask = [int(v) for v in pg.get_active_ranks(dist.group.WORLD).tolist()]
    return out, mask


def send_recv(value, delay_s=0.0):
    """Rank 1 sends ``value`` (after ``delay_s``) to rank 0 (user tag 0); returns what rank 0 got."""
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_rank() == 1:
        time.sleep(delay_s)
        dist.send(t, 0)
        return value
    out = torch.zeros(1, dtype=torch.int64)
    dist.recv(out, 1)
    return int(out.item())


def p2p_seq(peer):
    g = dist.group.WORLD
    return g._p2p_recv_seq.get((peer, 0), 0)


def reject_on(rank, delay_s=0.0):
    """Op that rank ``rank`` rejects locally (bad argument): every rank takes the failure
    verdict through the Store agreement.  Returns the exception class name per rank."""
    time.sleep(delay_s)
    t = torch.ones(2, dtype=torch.float32)
    try:
        if dist.get_rank() == rank:
            dist.all_reduce(t, op=dist.ReduceOp.BAND)  # bitwise op on floats: rejected before sending
        else:
            dist.all_reduce(t)
    except Exception as exc:  # noqa: BLE001 - the test compares the class
        return type(exc).__name__
    return "ok"


def sleep_then_all_reduce(delay_rank, delay_s):
    return all_reduce(1, delay_s, delay_rank)


# ----------------------------------------------------------------------------- the attacker

class Attacker:
    """A process on the same host with its own UCX worker (no secret)."""

    def __init__(self):
        from mooncake.ref import ucx
        self.engine = ucx.Engine(None)
        self.requests = []

    def send(self, address: bytes, tag: int, payload: bytes | np.ndarray) -> None:
        peer = self.engine.peer(address)
        buf = np.frombuffer(bytes(payload), np.uint8).copy()
        req = self.engine.send(peer, tag, buf)
        self.requests.append(req)
        deadline = time.monotonic() + 5
        while not req.completed and time.monotonic() < deadline:
            self.engine.progress()
            time.sleep(0.0005)

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.engine.progress()
            time.sleep(0.001)


def message(header, payload: bytes = b"", sign_with=None, control: bool = False) -> bytes:
    """A wire message: ``header`` packed, then ``payload``; signed with ``sign_with`` (a
    ``WireAuth``: a recorded authentic message) or not at all (a forgery)."""
    from mooncake.control.wire import HEADER_BYTES
    buf = bytearray(HEADER_BYTES + len(payload))
    header.pack_into(memoryview(buf))
    buf[HEADER_BYTES:] = payload
    if sign_with is not None:
        sign_with.sign(buf, control=control)
    return bytes(buf)


def store_keys(store, suffix: str) -> list[str]:
    """Keys of the parent's TCPStore ending with ``suffix`` (TCPStore lists its keys to anyone)."""
    return [k for k in store.list_keys() if k.endswith(suffix)]
