"""The UCX engine's view of a peer that dies: it stays dead, and nothing is posted to it again."""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

ucx = pytest.importorskip("mooncake.ref.ucx")

TAG = 77


def _child(conn) -> None:
    from mooncake.ref import ucx as child_ucx
    engine = child_ucx.engine()
    conn.send(engine.address)
    parent = engine.peer(conn.recv())
    buffer = np.zeros(8, np.uint8)
    request = engine.recv(parent, TAG, buffer)
    engine.wait_until(lambda: request.completed, time.monotonic() + 20)
    conn.send(bytes(buffer))
    time.sleep(60)  # until killed


def _wait(engine, done, limit_s: float = 10.0) -> bool:
    return engine.wait_until(done, time.monotonic() + limit_s)


def _answer(engine, conn, limit_s: float = 30.0):
    """The child's next message, progressing this engine meanwhile (the wire-up needs both sides)."""
    assert _wait(engine, lambda: conn.poll(0.001), limit_s), "the child did not answer"
    return conn.recv()


def test_dead_peer_stays_dead():
    engine = ucx.engine()
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_child, args=(there,), daemon=True)
    child.start()
    try:
        assert here.poll(60), "the child did not start its UCX engine"
        address = here.recv()
        here.send(engine.address)
        peer = engine.peer(address)
        sent = engine.send(peer, TAG, np.arange(8, dtype=np.uint8))
        assert _answer(engine, here) == bytes(range(8))
        assert _wait(engine, lambda: sent.completed) and sent.error() is None

        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        probe = engine.recv(peer, TAG + 1, np.zeros(8, np.uint8))  # fails once UCX sees the close
        assert _wait(engine, lambda: not engine.peer_alive(address)), "UCX never reported the peer gone"
        assert probe.completed and probe.error() is not None

        again = engine.peer(address)
        assert again is peer and not again.alive  # no new endpoint (UCX would wire up to a dead process)
        request = engine.send(again, TAG, np.zeros(8, np.uint8))
        assert request.completed and isinstance(request.error(), ConnectionResetError)
        assert not engine.reachable(address)
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)



def test_a_doorbell_closed_while_the_thread_sleeps_on_it():
    """A shared-memory plane closes its doorbell (its group is destroyed) just as the engine's
    thread goes to sleep on it: the thread lives on and still runs the pollers of later operations."""
    import socket
    engine = ucx.engine()
    bell, other = socket.socketpair()
    fd = bell.fileno()
    closed = []

    def arm():  # runs on the engine's thread between taking its list of doorbells and its select
        if not closed:
            engine.remove_sleeper(fd)
            bell.close()
            other.close()
            closed.append(1)
        return True

    engine.add_sleeper(fd, arm, lambda: None)
    runs = []
    engine.add_poller(lambda: runs.append(1), deadline=lambda: time.monotonic() + 5.0, urgent=True)
    try:
        assert _wait_for(lambda: closed, 10), "the engine's thread never went to sleep on the doorbell"
        time.sleep(0.05)
        assert engine._thread.is_alive()
        before = len(runs)
        engine.kick()
        assert _wait_for(lambda: len(runs) > before), "the thread no longer runs its pollers"
    finally:
        for poll in list(engine._pollers):
            engine.remove_poller(poll)


def _wait_for(done, limit_s: float = 5.0) -> bool:
    deadline = time.monotonic() + limit_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.001)
    return bool(done())


_LOST_WATCH = '''
import threading, time
import numpy as np
from mooncake.ref import ucx

a, b = ucx.Engine(None), ucx.Engine(None)
pa, pb = b.peer(a.address), a.peer(b.address)
req = a.recv(pb, 0x1234, np.empty(8, np.uint8))
seen, checked, caller_done = threading.Event(), threading.Event(), threading.Event()
hold = [False]

def watch():  # a NACK watch: looks at a control receive after every wake-up of a's thread
    if req.completed:
        seen.set()
    elif hold[0]:  # pre-empted right after this look: the GIL goes to a caller
        hold[0] = False
        checked.set()
        caller_done.wait(5)

a.add_watch(watch)
for _ in range(20):  # the wire-up settles
    a.progress(); b.progress(); time.sleep(0.01)
time.sleep(0.3)
hold[0] = True
a.kick()
assert checked.wait(5)
b.send(pa, 0x1234, np.arange(8, dtype=np.uint8))
with a.waiting():  # a caller's own wait that drives UCX itself and completes the receive
    end = time.monotonic() + 5
    while not req.completed and time.monotonic() < end:
        a.progress(); b.progress()
    for _ in range(100):
        a.progress(); b.progress(); time.sleep(0.001)
caller_done.set()
print("completed by the caller:", req.completed, "watch saw it:", seen.wait(2), flush=True)
'''


def test_a_watch_sees_what_a_waiting_caller_completed():
    """The engine's thread runs its watches (a peer's NACK) also after a caller that waited drove UCX itself
    and completed the receive the watch looks at, while the thread was between its watches and its sleep:
    the caller's leaving waiting() must wake it, or the NACK waits for the next message."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _LOST_WATCH], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert "completed by the caller: True watch saw it: True" in out.stdout, (out.stdout, out.stderr[-2000:])
