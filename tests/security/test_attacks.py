"""Attacks by a process on the same host that lacks the job secret (docs/semantics.md, "Trust model").

The test process plays the attacker: it reaches every rank's UCX worker and the Store (which it
hosts, as a launcher would; TCPStore lists its keys to anyone).  With a secret set, every attack is
dropped and the group goes on unaffected (next ops correct on every rank, nobody evicted), under ref
and fast.  Without a secret, the documented outcome: forged data is taken as a peer's.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from mooncake.control import auth
from mooncake.control.agreement import Decision, Report
from mooncake.control.wire import (HEADER_BYTES, Header, Kind, OpCode, collective_tag, p2p_tag)
from mooncake.model.reduce import DTYPE_CODES, ReduceOp
from mooncake.testing.cluster import Cluster
from security import attack_jobs as J

SECRET = os.urandom(32).hex()
RUN_S = 30
HEALTHY = ([3.0, 6.0, 9.0], [1, 1])  # healthy() on 2 ranks: (1 + 2) * (i + 1), both active
INT64 = DTYPE_CODES[torch.int64]

pytestmark = pytest.mark.timeout(300) if hasattr(pytest.mark, "timeout") else []


@pytest.fixture(scope="module")
def attacker():
    return J.Attacker()


@pytest.fixture(scope="module", params=["ref", "fast"])
def secured(request):
    """A 2-rank group with a job secret, per implementation."""
    from mooncake import impl as _impl
    if request.param == "fast" and _impl.fast_unavailable_reason("cpu"):
        pytest.skip(f"fast CPU plane unavailable: {_impl.fast_unavailable_reason('cpu')}")
    with Cluster(2, "mooncake-cpu", timeout_s=RUN_S,
                 env={"MOONCAKE_IMPL": request.param, auth.ENV: SECRET}) as c:
        yield c


def _info(c):
    return c.run(J.group_info)


def _check_healthy(c):
    assert c.run(J.healthy, timeout_s=RUN_S) == [HEALTHY, HEALTHY]


def _drops(c):
    return c.run(auth.drops)


def _header(info, kind, src, dst, nbytes=8, op=OpCode.ALL_REDUCE, **kw):
    fields = dict(kind=kind, op=op, group_key=info["group_key"], src=src, dst=dst,
                  epoch=info["epoch"], seq=info["seq"], num_bytes=nbytes, dtype_code=INT64,
                  reduce_op=int(ReduceOp.SUM))
    fields.update(kw)
    return Header(**fields)


def _forge_collective(attacker, info, victim, claimed_src, value):
    h = _header(info[victim], Kind.COLLECTIVE, claimed_src, victim)
    attacker.send(info[victim]["address"], h.tag(), J.message(h, np.array([value], np.int64).tobytes()))


# ------------------------------------------------------------------------------------- with a secret

def test_forged_collective_data_is_dropped(secured, attacker):
    info = _info(secured)
    _forge_collective(attacker, info, 0, 1, 1000)
    _forge_collective(attacker, info, 1, 0, 1000)
    got = secured.run(J.all_reduce, 1, 0.5, 1, timeout_s=RUN_S)  # rank 1 late: the forgery comes first
    assert got == [3, 3]
    _check_healthy(secured)


def test_forged_p2p_data_is_dropped(secured, attacker):
    info = _info(secured)
    seq = secured.run(J.p2p_seq, 1, ranks=[0])[0]
    h = Header(Kind.P2P, OpCode.SEND, info[0]["group_key"], 1, 0, 0, seq, 8, INT64, 0, 0)
    attacker.send(info[0]["address"], h.tag(), J.message(h, np.array([-7], np.int64).tobytes()))
    assert secured.run(J.send_recv, 3, 0.5, timeout_s=RUN_S) == [3, 3]
    _check_healthy(secured)


def test_forged_failure_notice_is_dropped(secured, attacker):
    info = _info(secured)
    nack = _header(info[0], Kind.NACK, 1, 0, 0, op=OpCode.NACK, seq=0, dtype_code=0, reduce_op=0)
    attacker.send(info[0]["address"], nack.tag(), bytes(64 * 1024))  # oversized on the notice tag
    attacker.send(info[0]["address"], nack.tag(), J.message(nack))   # then a well-formed, unsigned notice
    attacker.pump(0.3)
    _check_healthy(secured)
    after = _info(secured)
    assert [i["epoch"] for i in after] == [info[0]["epoch"]] * 2  # no agreement was even started


@pytest.mark.parametrize("kind", ["data", "done", "nack", "p2p"])
@pytest.mark.parametrize("size", ["truncated", "oversized"])
def test_bad_sizes_on_every_tag_are_dropped(secured, attacker, kind, size):
    info = _info(secured)
    body = bytes(10) if size == "truncated" else os.urandom(256 * 1024)
    for victim, src in ((0, 1), (1, 0)):
        i = info[victim]
        if kind == "data":
            tag = collective_tag(i["group_key"], src, i["epoch"], i["seq"])
        elif kind == "done":
            tag = collective_tag(i["group_key"], src, i["epoch"], i["seq"], Kind.DONE)
        elif kind == "nack":
            tag = collective_tag(i["group_key"], src, i["epoch"], 0, Kind.NACK)
        else:
            tag = p2p_tag(i["group_key"], src, 0, 0, secured.run(J.p2p_seq, src, ranks=[victim])[victim])
        attacker.send(i["address"], tag, body)
    attacker.pump(0.2)
    if kind == "p2p":
        assert secured.run(J.send_recv, 3, 0.3, timeout_s=RUN_S) == [3, 3]
    _check_healthy(secured)


def test_replayed_messages_from_another_epoch_are_dropped(secured, attacker):
    """Authentic messages (signed with the job's keys, as if recorded) moved to another epoch, op or
    rank pair: the MAC holds, the binding does not."""
    info = _info(secured)
    wire = auth.Keyring(auth.parse_secret(SECRET)).wire(info[0]["group_key"])
    i = info[0]
    old = _header(i, Kind.COLLECTIVE, 1, 0, epoch=i["epoch"] + 1)  # recorded in another epoch
    attacker.send(i["address"], collective_tag(i["group_key"], 1, i["epoch"], i["seq"]),
                  J.message(old, np.array([1000], np.int64).tobytes(), sign_with=wire))
    old_done = _header(i, Kind.DONE, 1, 0, 0, seq=i["seq"] + 7)
    attacker.send(i["address"], collective_tag(i["group_key"], 1, i["epoch"], i["seq"], Kind.DONE),
                  J.message(old_done, sign_with=wire, control=True))
    old_nack = _header(i, Kind.NACK, 1, 0, 0, op=OpCode.NACK, seq=0, dtype_code=0, reduce_op=0,
                       epoch=i["epoch"] + 256)  # same tag (epoch mod 256), another epoch
    attacker.send(i["address"], old_nack.tag(), J.message(old_nack, sign_with=wire, control=True))
    assert secured.run(J.all_reduce, 1, 0.5, 1, timeout_s=RUN_S) == [3, 3]
    _check_healthy(secured)
    assert [i["epoch"] for i in _info(secured)] == [info[0]["epoch"]] * 2


def _agree_key(c, info, what):
    """The full Store key of this group's agreement record (torch's prefix found by listing keys)."""
    hello = J.store_keys(c.store, f"{info['prefix']}/hello/0")
    assert hello, "the group's hello record is not in the Store"
    return hello[0][: -len("hello/0")] + f"agree/{info['epoch']}/{what}"


@pytest.mark.parametrize("forgery", ["forged", "garbage", "truncated", "replayed"])
def test_bad_store_decisions_and_reports_are_ignored(secured, forgery):
    info = _info(secured)
    key = _agree_key(secured, info[0], "decision")
    evict_1 = Decision(info[0]["epoch"] + 1, (0,), (1,)).encode()
    ring = auth.Keyring(auth.parse_secret(SECRET))
    if forgery == "forged":
        record = evict_1
    elif forgery == "garbage":
        record = os.urandom(300)
    elif forgery == "truncated":
        record = ring.seal(key, evict_1)[:-3]
    else:  # an authentic record of another epoch's key
        record = ring.seal(key.replace(f"/agree/{info[0]['epoch']}/", "/agree/999/"), evict_1)
    secured.store.set(key, record)
    for r, suspect in ((0, 1), (1, 0)):  # reports accusing the other rank
        secured.store.set(_agree_key(secured, info[0], f"report/{r}"),
                          Report(info[0]["epoch"], r, (), 0, suspects=frozenset({suspect})).encode())
    # a rank rejecting a call locally sends everyone into the agreement, which reads the Store
    assert secured.run(J.reject_on, 1, timeout_s=RUN_S) == ["ArgumentError", "ArgumentError"]
    _check_healthy(secured)


def test_handshake_that_never_completes(secured, attacker):
    """A connection that never sends an authentic message: half a header on a live tag, a few bytes
    on an unused one, and an endpoint held open."""
    info = _info(secured)
    for victim, src in ((0, 1), (1, 0)):
        i = info[victim]
        partial = J.message(_header(i, Kind.DONE, src, victim, 0))[:40]
        attacker.send(i["address"], collective_tag(i["group_key"], src, i["epoch"], i["seq"], Kind.DONE), partial)
        attacker.send(i["address"], 0x123456789, b"HELO")
    _check_healthy(secured)
    _check_healthy(secured)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _flood(path: bytes, seconds: float, conn) -> None:
    """Child: become another user, then ring ``path`` as fast as possible."""
    import socket
    os.setgid(65534)
    os.setuid(65534)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setblocking(False)
    sent = refused = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            s.sendto(b"!", path)
            sent += 1
        except OSError:
            refused += 1
    conn.send((sent, refused))


def test_doorbell_flood_by_another_user(secured):
    info = _info(secured)
    if info[0]["impl"] != "fast":
        pytest.skip("the ref plane has no doorbell")
    if os.getuid() != 0:
        pytest.skip("playing another user needs root (to setuid)")
    import glob
    import multiprocessing
    bells = glob.glob(f"/tmp/mooncake-{os.getuid()}/b{info[0]['pid']}-*")
    assert bells, "rank 0's doorbell is not in the per-user directory"
    st = os.stat(os.path.dirname(bells[0]))
    assert st.st_uid == os.getuid() and st.st_mode & 0o077 == 0
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_flood, args=(bells[0].encode(), 1.5, child))
    before = _cpu_seconds(info[0]["pid"])
    proc.start()
    try:
        # rank 0 blocks (asleep on its doorbell) while rank 1 is late, during the whole flood
        assert secured.run(J.all_reduce, 1, 1.5, 1, timeout_s=RUN_S) == [3, 3]
        sent, refused = parent.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
    used = _cpu_seconds(info[0]["pid"]) - before
    assert sent == 0 and refused > 0
    assert used < 0.3, f"rank 0 used {used:.2f} s of CPU while asleep under a flood"
    _check_healthy(secured)


def test_every_drop_was_logged_not_acted_on(secured):
    """The attacks above reached the ranks (ref receives them; fast never posts receives on most
    tags) and were counted; the group is still whole."""
    _check_healthy(secured)
    if _info(secured)[0]["impl"] == "ref":
        assert all(n > 0 for n in _drops(secured))


# ------------------------------------------------------------------------------------- without a secret

@pytest.fixture(scope="module")
def open_job():
    with Cluster(2, "mooncake-cpu", timeout_s=RUN_S, env={"MOONCAKE_IMPL": "ref", auth.ENV: ""}) as c:
        yield c


def test_without_a_secret_forged_data_is_taken(open_job, attacker):
    """The documented outcome: the job trusts every process that can reach its ports."""
    info = _info(open_job)
    _forge_collective(attacker, info, 0, 1, 1000)
    assert open_job.run(J.all_reduce, 1, 0.5, 1, timeout_s=RUN_S) == [1001, 3]


def test_without_a_secret_an_oversized_notice_evicts_nobody(open_job, attacker):
    info = _info(open_job)
    nack = _header(info[0], Kind.NACK, 1, 0, 0, op=OpCode.NACK, seq=0, dtype_code=0, reduce_op=0)
    attacker.send(info[0]["address"], nack.tag(), bytes(64 * 1024))
    attacker.pump(0.3)
    _check_healthy(open_job)
