"""Point-to-point through the fast CPU plane's shared memory (mooncake/fast/cpu/p2p.py), driven through
``torch.distributed`` on ``mooncake-cpu`` with MOONCAKE_IMPL=fast: FIFO per (peer, tag), tags never
cross, receives from any source, eager and in-place (process_vm_readv) payloads up to 64 MiB,
non-contiguous tensors, thousands of messages in flight, deadlines, idle waiters that sleep, a
killed peer on both sides, a replaced peer that never gets its predecessor's messages, and groups
spanning "hosts" (P2P through ref)."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from mooncake.fast.cpu.p2p import unavailable_reason
from mooncake.testing.cluster import ClusterError

ENV = {"MOONCAKE_IMPL": "fast"}
TIMEOUT_S = 60  # as test_backend.py: the same 3-rank clusters serve both files
KILL_TIMEOUT_S = 20  # group timeout of the kill cases: failures must be seen well before it
KILL_BOUND_S = 5.0


needs_shm_p2p = pytest.mark.skipif(unavailable_reason() is not None,
                                   reason=f"P2P cannot go through shared memory here: {unavailable_reason()}")


def _cluster(cluster_factory, n, **kwargs):
    kwargs.setdefault("timeout_s", TIMEOUT_S)
    return cluster_factory(n, "mooncake-cpu", env=dict(ENV), **kwargs)


def make_options(rank, world_size, capacity, extension=False):
    import mooncake.pg as pg
    return pg.MooncakeBackendOptions(torch.zeros(capacity, dtype=torch.int32), is_extension=extension,
                                     max_world_size=capacity)


def _delegate():
    return dist.group.WORLD._plane.p2p_delegate


def _bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ jobs

def _ordering():
    """3 ranks: interleaved tags received tag by tag (FIFO each), non-contiguous tensors, and rank 0
    receiving from any source while ranks 1 and 2 send."""
    rank = dist.get_rank()
    res = {"delegate": _delegate()}
    if rank == 0:
        ws = []
        for i in range(6):
            ws.append(dist.isend(torch.tensor([i], dtype=torch.int64), 1, tag=1))
            ws.append(dist.isend(torch.tensor([100 + i], dtype=torch.int64), 1, tag=2))
        ws.append(dist.isend(torch.arange(24, dtype=torch.float32).reshape(4, 6).t(), 1, tag=3))
        ws.append(dist.isend(torch.arange(50_000, dtype=torch.float64)[::2], 1, tag=3))  # 200 KB, in place
        for w in ws:
            w.wait()
    elif rank == 1:
        tag2 = [torch.zeros(1, dtype=torch.int64) for _ in range(6)]
        for w in reversed([dist.irecv(b, 0, tag=2) for b in tag2]):
            w.wait()
        tag1 = [torch.zeros(1, dtype=torch.int64) for _ in range(6)]
        for b in tag1:
            dist.recv(b, 0, tag=1)
        small = torch.zeros(4, 6).t()  # a non-contiguous receive buffer
        dist.recv(small, 0, tag=3)
        big = torch.zeros(50_000, dtype=torch.float64)[1::2]
        dist.recv(big, 0, tag=3)
        res.update(tag1=[int(b) for b in tag1], tag2=[int(b) for b in tag2], small=small, big=big)
    if rank == 0:
        got = []
        for _ in range(6):
            t = torch.zeros(2, dtype=torch.int64)
            src = dist.recv(t, tag=9)
            got.append((src, t.tolist()))
        res["any"] = got
    else:
        for i in range(3):
            dist.send(torch.tensor([rank, i]), 0, tag=9)
    dist.barrier()
    return res


def _exchange(sizes):
    """2 ranks: batch_isend_irecv of random bytes of each size in both directions; per size,
    whether the bytes received are the peer's."""
    rank = dist.get_rank()
    peer = 1 - rank
    ok = {}
    for n in sizes:
        x = _bytes(n, 1000 * rank + n)
        y = torch.empty(n, dtype=torch.uint8)
        for q in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]):
            q.wait()
        ok[n] = torch.equal(y, _bytes(n, 1000 * peer + n))
    return ok


def _many(count: int):
    """2 ranks: rank 0 posts ``count`` isends (more than the record slots), small ones with tag 5 and
    every 97th a 100 KB one with tag 6, before waiting on any; rank 1 posts all receives, then
    waits on them in reverse order."""
    rank = dist.get_rank()
    big = {i for i in range(count) if i % 97 == 0}
    if rank == 0:
        ws = [dist.isend(torch.full((25_000,), float(i)) if i in big else torch.tensor([i, -i]), 1,
                         tag=6 if i in big else 5) for i in range(count)]
        for w in ws:
            w.wait()
        return True
    bufs = [torch.zeros(25_000) if i in big else torch.zeros(2, dtype=torch.int64) for i in range(count)]
    ws = [dist.irecv(b, 0, tag=6 if i in big else 5) for i, b in enumerate(bufs)]
    for w in reversed(ws):
        w.wait()
    return all(torch.equal(b, torch.full((25_000,), float(i)) if i in big else torch.tensor([i, -i]))
               for i, b in enumerate(bufs))


def _idle_and_timeout():
    """2 ranks, group timeout 1.5 s.  Rank 1 waits for a message that never comes (CPU time while
    idle, then OpTimeoutError); rank 0 sends 4 MiB nobody receives (OpTimeoutError; the message is
    withdrawn, so rank 1's later receive of it fails).  Then the pair works as before."""
    import mooncake.pg as pg
    rank = dist.get_rank()
    group = dist.group.WORLD
    pg.set_timeout(group, timedelta(seconds=1.5))
    res = {}
    try:
        if rank == 1:
            w = dist.irecv(torch.zeros(4), 0, tag=21)
            cpu, wall = time.process_time(), time.monotonic()
            res["early"] = _outcome(lambda: w.wait(timedelta(seconds=0.8)))[0]  # raises, as gloo's
            res["cpu"], res["wall"] = time.process_time() - cpu, time.monotonic() - wall
            res["recv"] = _outcome(w.wait)
        else:
            res["send"] = _outcome(lambda: dist.send(torch.ones(1 << 20), 1, tag=22))
        dist.barrier()
        if rank == 1:
            res["withdrawn"] = _outcome(lambda: dist.recv(torch.zeros(1 << 20), 0, tag=22))
    finally:
        pg.set_timeout(group, timedelta(seconds=TIMEOUT_S))
    out = torch.zeros(3)
    for q in dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((3,), rank + 1.0), 1 - rank, tag=23),
                                     dist.P2POp(dist.irecv, out, 1 - rank, tag=23)]):
        q.wait()
    res["after"] = out
    return res


def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), tuple(getattr(exc, "pending_ranks", ()))
    return ("ok", "", ())


def _die_after(seconds: float):
    time.sleep(seconds)
    os.kill(os.getpid(), signal.SIGKILL)


def _with_dying_peer():
    """Rank 0: a 4 MiB isend (read in place: completes only once received) and an irecv with rank 1,
    which dies without taking part; (exception type, failed ranks) of each and the seconds taken."""
    start = time.monotonic()
    works = {"send": dist.isend(torch.ones(1 << 20), 1, tag=31), "recv": dist.irecv(torch.zeros(4), 1, tag=32)}
    out = {}
    for name, w in works.items():
        try:
            w.wait()
            out[name] = ("ok", ())
        except Exception as exc:  # noqa: BLE001
            out[name] = (type(exc).__name__, tuple(getattr(exc, "failed_ranks", ())))
    out["seconds"] = time.monotonic() - start
    return out


def _send_old():
    """Rank 0: a small message with tag 41 to rank 1, never received (it completes: eager)."""
    dist.send(torch.full((4,), -1.0), 1, tag=41)
    return True


def _all_reduce_mask():
    import mooncake.pg as pg
    x = torch.ones(2)
    dist.all_reduce(x)
    return pg.get_active_ranks(dist.group.WORLD).tolist()


def _admit_and_send(rank_in: int):
    import mooncake.pg as pg
    group = dist.group.WORLD
    deadline = time.monotonic() + 30
    while not all(pg.get_peer_state(group, [rank_in])):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank_in} did not ask to join")
        time.sleep(0.05)
    pg.recover_ranks(group, [rank_in])
    if dist.get_rank() == 0:
        dist.send(torch.full((4,), 7.0), rank_in, tag=41)
    dist.barrier()
    return True


def _join_and_recv():
    import mooncake.pg as pg
    pg.join_group(dist.group.WORLD)
    first = torch.zeros(4)
    dist.recv(first, 0, tag=41)
    late = dist.irecv(torch.zeros(4), 0, tag=41)  # the predecessor's message must not turn up either
    dist.barrier()
    return first, _outcome(lambda: late.wait(timedelta(seconds=0.5)))[0], _delegate()


# ------------------------------------------------------------------------------------------ tests

@needs_shm_p2p
@pytest.mark.timeout(300)
def test_fifo_tags_any_source_noncontiguous(cluster_factory):
    res = _cluster(cluster_factory, 3).run(_ordering)
    assert all(r["delegate"] is None for r in res), [r["delegate"] for r in res]
    assert res[1]["tag1"] == list(range(6)) and res[1]["tag2"] == [100 + i for i in range(6)]
    assert torch.equal(res[1]["small"], torch.arange(24, dtype=torch.float32).reshape(4, 6).t())
    assert torch.equal(res[1]["big"], torch.arange(50_000, dtype=torch.float64)[::2])
    got = res[0]["any"]
    assert sorted(src for src, _ in got) == [1, 1, 1, 2, 2, 2]
    for src in (1, 2):  # each sender's FIFO is kept, and the source is reported
        assert [v for s, v in got if s == src] == [[src, i] for i in range(3)]


@needs_shm_p2p
@pytest.mark.timeout(300)
def test_payload_sizes_up_to_64mib(cluster_factory):
    from mooncake.fast.cpu.p2p import EAGER_MAX
    sizes = [0, 1, 8, EAGER_MAX - 1, EAGER_MAX, EAGER_MAX + 1, (1 << 20) + 3, 64 << 20]
    for rank, ok in enumerate(_cluster(cluster_factory, 2).run(_exchange, sizes)):
        assert all(ok.values()), (rank, ok)


@needs_shm_p2p
@pytest.mark.timeout(300)
def test_many_messages_in_flight(cluster_factory):
    assert _cluster(cluster_factory, 2).run(_many, 3000) == [True, True]


@needs_shm_p2p
@pytest.mark.timeout(300)
def test_idle_waiter_sleeps_and_deadlines(cluster_factory):
    r0, r1 = _cluster(cluster_factory, 2).run(_idle_and_timeout)
    assert r1["early"] == "OpTimeoutError"  # wait(timeout) raises and the receive goes on
    assert r1["cpu"] < 0.25 * r1["wall"], f"an idle receiver used {r1['cpu']:.3f} s of CPU in {r1['wall']:.3f} s"
    kind, _, pending = r1["recv"]
    assert kind == "OpTimeoutError" and pending == (0,), r1["recv"]
    kind, _, pending = r0["send"]
    assert kind == "OpTimeoutError" and pending == (1,), r0["send"]
    kind, message, _ = r1["withdrawn"]
    assert kind == "MooncakeError" and "withdrew" in message, r1["withdrawn"]
    assert r0["after"].tolist() == [2.0] * 3 and r1["after"].tolist() == [1.0] * 3


@needs_shm_p2p
@pytest.mark.timeout(300)
def test_killed_peer_fails_send_and_recv(cluster_factory):
    cluster = _cluster(cluster_factory, 2, timeout_s=KILL_TIMEOUT_S)
    with pytest.raises(ClusterError) as died:
        cluster.run_each({0: (_with_dying_peer, (), {}), 1: (_die_after, (0.5,), {})})
    assert died.value.errors.keys() == {1} and died.value.errors[1].kind == "died"
    out = died.value.results[0]
    assert out["send"] == ("PeerFailureError", (1,)) and out["recv"] == ("PeerFailureError", (1,)), out
    assert out["seconds"] < 0.5 + KILL_BOUND_S, out


@needs_shm_p2p
@pytest.mark.timeout(300)
def test_replaced_peer_never_gets_predecessor_messages(cluster_factory):
    options = (f"{__name__}.make_options", (), {"capacity": 3})
    cluster = _cluster(cluster_factory, 3, timeout_s=KILL_TIMEOUT_S, options=options)
    assert cluster.run(_send_old, ranks=[0])[0] is True
    cluster.kill(1)
    masks = cluster.run(_all_reduce_mask, ranks=[0, 2])
    assert masks[0] == masks[2] == [1, 0, 1]
    cluster.spawn(1, options=(f"{__name__}.make_options", (), {"capacity": 3, "extension": True}))
    results = cluster.run_each({0: (_admit_and_send, (1,), {}), 2: (_admit_and_send, (1,), {}),
                                1: (_join_and_recv, (), {})})
    first, late, delegate = results[1]
    assert delegate is None
    assert first.tolist() == [7.0] * 4, "the replacement received its predecessor's message"
    assert late == "OpTimeoutError"  # nothing arrived: the wait(timeout) raised, as gloo's does


def _p2p_across_hosts():
    """A ring (each rank's neighbours: one on its own host, one on the other), then rank 0 receives from
    any source three times, the senders on both hosts (a mixed receive-any)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    out = torch.zeros(3, dtype=torch.int64)
    for q in dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.full((3,), rank), (rank + 1) % n),
                                     dist.P2POp(dist.irecv, out, (rank - 1) % n)]):
        q.wait()
    got = []
    if rank == 0:
        for _ in range(n - 1):
            t = torch.zeros(2, dtype=torch.int32)
            src = dist.recv(t, tag=9)
            got.append((src, t.tolist()))
    else:
        dist.send(torch.tensor([rank, 7 * rank], dtype=torch.int32), dst=0, tag=9)
    dist.barrier()
    plane = dist.group.WORLD._plane
    return _delegate(), plane.remote_ranks, out.tolist(), sorted(got)


@pytest.mark.timeout(300)
def test_group_spanning_hosts_routes_p2p_by_pair(cluster_factory):
    """Two emulated hosts (rank r on host r % 2): same-host pairs use shared memory, the others UCX; a
    receive from any source takes senders of both hosts; every message arrives once, in order."""
    env = {**ENV, "MOONCAKE_FAST_CPU_HOST_ID": "rank-mod-2"}
    res = cluster_factory(4, "mooncake-cpu", env=env, timeout_s=TIMEOUT_S).run(_p2p_across_hosts)
    for rank, (delegate, remote, got, anysrc) in enumerate(res):
        assert delegate is None
        assert remote == [r for r in range(4) if r % 2 != rank % 2]
        assert got == [(rank - 1) % 4] * 3
    assert res[0][3] == [(s, [s, 7 * s]) for s in (1, 2, 3)]
