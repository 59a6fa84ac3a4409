"""Shared device memory (``mooncake.fast.cuda.shared``): descriptors handed between processes over the
owner's Unix socket (on any machine, with an ordinary memfd), and, on a GPU, a lane that stays readable
and writable by its importer after the process that allocated it was killed (``test_cuda_*``)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from mooncake.fast.cuda import shared

WAIT_S = 60


def _owner(conn, payload: bytes) -> None:
    """Serve a memfd holding ``payload``; send its handle, then wait to be told to withdraw it or die."""
    fd = os.memfd_create("mooncake-test-shared")
    os.write(fd, payload)
    handle, token = shared.export(fd, len(payload))
    conn.send(handle)
    if conn.poll(WAIT_S) and conn.recv() == "withdraw":
        shared.withdraw(token)
        conn.send("withdrawn")
        conn.poll(WAIT_S)


def _start_owner(payload: bytes):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_owner, args=(child, payload), daemon=True)
    proc.start()
    assert parent.poll(WAIT_S), "the owner did not send its handle"
    return proc, parent, parent.recv()


def _read(fd: int, n: int) -> bytes:
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_a_descriptor_travels_withdrawn_and_dead_owners_refuse():
    payload = os.urandom(64)
    proc, conn, handle = _start_owner(payload)
    try:
        fd, size = shared.fetch(handle, 10)
        assert size == len(payload) and _read(fd, size) == payload
        fd, _ = shared.fetch(handle, 10)  # as often as asked (a replacement rank attaches later)
        assert _read(fd, size) == payload
        forged = shared.HANDLE.pack(*shared.HANDLE.unpack(handle)[:2], 12345, size)
        with pytest.raises(shared.FetchError, match="no longer shares"):
            shared.fetch(forged, 10)
        conn.send("withdraw")
        assert conn.poll(WAIT_S) and conn.recv() == "withdrawn"
        with pytest.raises(shared.FetchError, match="no longer shares"):
            shared.fetch(handle, 10)
    finally:
        proc.kill()
        proc.join(10)
    with pytest.raises(shared.FetchError, match=f"process {proc.pid} did not hand over"):
        shared.fetch(handle, 10)


@pytest.mark.timeout(60)
def test_a_source_is_asked_at_each_request_and_nothing_is_held_in_between():
    """Memory served through a source (a pool segment the allocator may free): each request gets a fresh
    descriptor from it, the server closes its copy once sent, and a source that says the memory is gone
    makes the request fail."""
    payload = os.urandom(32)
    fd = os.memfd_create("mooncake-test-source")
    os.write(fd, payload)
    asked, alive = [], [True]

    def source():
        asked.append(1)
        return os.dup(fd) if alive[0] else None

    handle, token = shared.export_source(source, len(payload))
    try:
        opened = len(os.listdir("/proc/self/fd"))
        got, size = shared.fetch(handle, 10)
        assert size == len(payload) and _read(got, size) == payload
        deadline = time.monotonic() + 5
        while len(os.listdir("/proc/self/fd")) != opened and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(os.listdir("/proc/self/fd")) == opened  # the server let go of its copy
        assert len(asked) == 1
        alive[0] = False
        with pytest.raises(shared.FetchError, match="no longer shares"):
            shared.fetch(handle, 10)
        assert len(asked) == 2

        def broken():
            raise RuntimeError("the allocator's table is gone")

        broken_handle, broken_token = shared.export_source(broken, 1)
        try:
            with pytest.raises(shared.FetchError, match="no longer shares"):
                shared.fetch(broken_handle, 10)
        finally:
            shared.withdraw(broken_token)
        alive[0] = True  # the server lives on
        got, _ = shared.fetch(handle, 10)
        assert _read(got, len(payload)) == payload
    finally:
        shared.withdraw(token)
        os.close(fd)
    with pytest.raises(shared.FetchError, match="no longer shares"):
        shared.fetch(handle, 10)
    assert len(asked) == 3  # withdrawn: not asked again


@pytest.mark.timeout(60)
def test_a_forked_child_lets_go_of_the_parents_descriptors():
    """Each served descriptor keeps its memory alive: a forked child (a data loader worker) closes its
    copies, and serves nothing of the parent's."""
    fd = os.memfd_create("mooncake-test-fork")
    _, token = shared.export(fd, 1)
    try:
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            code = 3
            try:
                try:
                    os.fstat(fd)
                    code = 1  # still open
                except OSError:
                    code = 0 if shared._server is None else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        os.fstat(fd)  # the parent still serves it
    finally:
        shared.withdraw(token)


# ---- on a GPU: a dead owner's lane stays mapped

def _cuda_owner(conn) -> None:
    from mooncake.fast.cuda.pg import _CudaMemory
    mem = _CudaMemory()
    buf = mem.allocate(3 << 20, "test-lane")
    buf.view.view(torch.int32)[:] = torch.arange(buf.size // 4, dtype=torch.int32, device=mem.device)
    torch.cuda.synchronize()
    conn.send((buf.handle, buf.size))
    conn.poll(WAIT_S)  # killed here


def _importer(conn, handle: bytes, size: int) -> None:
    """Map the owner's lane; once told the owner is dead, read and write it again."""
    try:
        from mooncake.fast.cuda.pg import _CudaMemory
        mem = _CudaMemory()
        buf = mem.attach(handle, size, "the owner", mem.index)
        want = torch.arange(size // 4, dtype=torch.int32, device=mem.device)
        before = bool(torch.equal(buf.view.view(torch.int32), want))
        conn.send("mapped")
        assert conn.poll(WAIT_S) and conn.recv() == "owner killed"
        after = bool(torch.equal(buf.view.view(torch.int32), want))
        buf.view.view(torch.int32).add_(1)
        written = bool(torch.equal(buf.view.view(torch.int32), want + 1))
        torch.cuda.synchronize()
        buf.close()
        conn.send(("ok", before, after, written))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.timeout(180)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_dead_owners_lane_stays_readable_and_writable():
    from mooncake.fast.cuda.pg import unavailable_reason
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    ctx = mp.get_context("spawn")
    own_parent, own_child = ctx.Pipe()
    owner = ctx.Process(target=_cuda_owner, args=(own_child,), daemon=True)
    owner.start()
    imp = None
    try:
        assert own_parent.poll(WAIT_S), "the owner did not allocate"
        handle, size = own_parent.recv()
        imp_parent, imp_child = ctx.Pipe()
        imp = ctx.Process(target=_importer, args=(imp_child, handle, size), daemon=True)
        imp.start()
        assert imp_parent.poll(WAIT_S), "the importer did not map the lane"
        assert imp_parent.recv() == "mapped"
        os.kill(owner.pid, signal.SIGKILL)
        owner.join(30)
        imp_parent.send("owner killed")
        assert imp_parent.poll(WAIT_S), "the importer did not report"
        result = imp_parent.recv()
        assert result == ("ok", True, True, True), result
        imp.join(30)
        assert imp.exitcode == 0
    finally:
        for p in (owner, imp):
            if p is not None and p.is_alive():
                p.kill()
                p.join(10)
