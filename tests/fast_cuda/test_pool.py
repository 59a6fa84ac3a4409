"""Pool memory (``mooncake.fast.cuda.pool``): which segment a tensor's address lies in, exported once per
segment, exported again when torch reuses a freed segment's address, no longer served once freed, and a
peer's mapping of it let go once no CUDA graph reads it.  On the CPU, with stand-ins for the CUDA library's
segment table (``mc_pool_find``, over ordinary memfds) and holds (``mc_hold_*``); the pool on a GPU is
exercised by tests/fast_cuda/test_cuda_pg_face.py and pg_graph.py's large step."""

from __future__ import annotations

import os
import threading
import types

import pytest

from mooncake.fast.cuda import pool, shared


class _Segments:
    """``mc_pool_find`` over a table base -> (size, fd, id), as the library keeps it."""

    def __init__(self):
        self.table: dict[int, tuple[int, int, int]] = {}
        self.next_id = 1

    def add(self, base: int, size: int) -> int:
        fd = os.memfd_create("mooncake-test-pool")
        os.ftruncate(fd, size)
        self.table[base] = (size, fd, self.next_id)
        self.next_id += 1
        return self.table[base][2]

    def free(self, base: int) -> None:
        os.close(self.table.pop(base)[1])

    def mc_pool_find(self, addr, base, size, fd, sid) -> int:
        for b, (n, f, i) in self.table.items():
            if b <= addr < b + n:
                base._obj.value, size._obj.value, fd._obj.value, sid._obj.value = b, n, os.dup(f), i
                return 1
        return 0


@pytest.fixture()
def lib(monkeypatch):
    monkeypatch.setattr(pool, "_served", {})
    segs = _Segments()
    yield segs
    for token in [t for _, _, t in pool._served.values()]:
        shared.withdraw(token)
    for b in list(segs.table):
        segs.free(b)


def _token(handle: bytes) -> int:
    return shared.HANDLE.unpack(handle)[2]


def test_a_segment_is_exported_once_and_offsets_are_relative_to_it(lib):
    lib.add(1 << 20, 4096)
    h1, off1 = pool.share(lib, (1 << 20) + 256)
    h2, off2 = pool.share(lib, (1 << 20) + 1024)
    assert (off1, off2) == (256, 1024) and h1 == h2
    assert shared.HANDLE.unpack(h1)[3] == 4096
    fd, size = shared.fetch(h1, 5.0)  # served to peers: this process's server hands it over
    os.close(fd)
    assert size == 4096
    assert pool.share(lib, 1 << 19) is None  # not pool memory


def test_a_freed_segment_stops_being_served_and_a_reused_address_is_exported_anew(lib):
    lib.add(1 << 20, 4096)
    old, _ = pool.share(lib, 1 << 20)
    fd, _ = shared.fetch(old, 5.0)
    os.close(fd)
    lib.free(1 << 20)
    with pytest.raises(shared.FetchError):  # at once: serving it held no reference to it
        shared.fetch(old, 5.0)
    lib.add(1 << 20, 8192)  # torch got the same address back for a new segment
    new, _ = pool.share(lib, 1 << 20)
    assert _token(new) != _token(old) and shared.HANDLE.unpack(new)[3] == 8192
    with pytest.raises(shared.FetchError):
        shared.fetch(old, 5.0)
    lib.free(1 << 20)
    lib.add(1 << 22, 4096)
    pool.share(lib, 1 << 22)  # any later share notices the freed one
    with pytest.raises(shared.FetchError):
        shared.fetch(new, 5.0)
    assert list(pool._served) == [1 << 22]


class _FakeHolds:
    """The library's holds (``mc_hold_*``) without a device: ``graph_done(h)`` is CUDA destroying a graph."""

    def __init__(self, refuse: bool = False):
        self.refs: dict[int, int] = {}
        self.refuse = refuse

    def mc_hold_new(self) -> int:
        h = len(self.refs) + 1
        self.refs[h] = 1
        return h

    def mc_hold_graph(self, h: int, stream: int) -> int:
        if self.refuse:
            return 801  # cudaErrorNotSupported
        self.refs[h] += 1
        return 0

    def graph_done(self, h: int) -> None:
        self.refs[h] -= 1

    def mc_hold_graphs(self, h: int) -> int:
        return self.refs[h] - 1

    def mc_hold_drop(self, h: int) -> None:
        self.refs[h] -= 1


class _Mem:
    index = 0

    def __init__(self):
        self.lib = _FakeHolds()

    @staticmethod
    def relaxed_capture():
        import contextlib
        return contextlib.nullcontext()


def _device_path(rank: int):
    from mooncake.fast.cuda import pg as P
    dev = P._DevicePath.__new__(P._DevicePath)
    dev.g = types.SimpleNamespace(mem=_Mem(), rank=rank, lock=threading.RLock())
    dev.pool_maps, dev.pool_pending = {}, frozenset()
    return dev


def _offer(pid: int, offset: int) -> bytes:
    from mooncake.fast.cuda import pg as P
    return shared.HANDLE.pack(pid, 1, pid, 1 << 20) + P._OFFSET.pack(offset)


def test_every_rank_maps_its_peers_segments_or_says_it_could_not(monkeypatch):
    """At capture, where every rank offered a pool tensor, a rank maps its peers' segments (once per segment)
    and says whether all could be mapped (the PG face's second round); a partial offer asks for no round.
    The tensors' addresses then follow from the mappings."""
    mapped = []

    def attach(lib, device, handle, timeout_s):
        pid = shared.HANDLE.unpack(handle)[0]
        if pid == 13:
            raise shared.FetchError("process 13 did not hand over shared device memory")
        mapped.append(pid)
        return types.SimpleNamespace(addr=pid << 32, close=lambda: None)

    monkeypatch.setattr(shared, "attach", attach)
    view = types.SimpleNamespace(active=(0, 1, 2))
    call = types.SimpleNamespace(kind="all_reduce", input=types.SimpleNamespace(data_ptr=lambda: 0xABC))
    dev = _device_path(rank=1)
    offers = {0: _offer(10, 64), 1: _offer(11, 0), 2: _offer(12, 128)}
    assert dev.capture_prepare(view, call, {0: offers[0], 1: offers[1], 2: b""}, 5.0) is None
    assert dev.capture_prepare(view, call, offers, 5.0) == b"\1"
    assert dev.capture_prepare(view, call, offers, 5.0) == b"\1" and sorted(mapped) == [10, 12]  # once each
    assert dev._direct_addrs(view.active, call, offers) == ((10 << 32) + 64, 0xABC, (12 << 32) + 128)
    assert dev._direct_addrs(view.active, call, {}) is None  # the ranks agreed not to take up the offers
    assert _device_path(rank=0).capture_prepare(view, call, {**offers, 2: _offer(13, 0)}, 5.0) == b"\0"


def _pool_map(dev, handle: bytes):
    from mooncake.fast.cuda import pg as P
    closed = []
    mapping = types.SimpleNamespace(addr=len(dev.pool_maps) << 30, close=lambda: closed.append(handle))
    m = dev.pool_maps[handle] = P._PoolMap(dev.g.mem.lib, mapping)
    return m, closed


def test_a_peers_segment_is_unmapped_once_no_graph_reads_it():
    """Kept while a capture is preparing to use it or a graph holds it; unmapped, and its hold given back,
    once its last graph is gone; kept for good where no hold could be taken."""
    dev = _device_path(rank=0)
    lib = dev.g.mem.lib
    stream = types.SimpleNamespace(cuda_stream=7)
    a, a_closed = _pool_map(dev, b"a")
    b, b_closed = _pool_map(dev, b"b")
    dev.pool_pending = frozenset({b"a", b"b"})  # mapped for the capture in progress
    dev.release_pool_maps()
    assert set(dev.pool_maps) == {b"a", b"b"}
    a.hold(stream, 0, "all_reduce")  # captured: two graphs read a, one reads b
    a.hold(stream, 0, "all_reduce")
    b.hold(stream, 0, "all_reduce")
    dev.pool_pending = frozenset()
    dev.release_pool_maps()
    assert set(dev.pool_maps) == {b"a", b"b"} and not a_closed + b_closed
    a_hold, b_hold = a.held, b.held
    lib.graph_done(a_hold)
    lib.graph_done(b_hold)
    dev.release_pool_maps()
    assert set(dev.pool_maps) == {b"a"} and b_closed == [b"b"] and lib.refs[b_hold] == 0
    lib.graph_done(a_hold)
    dev.release_pool_maps()
    assert dev.pool_maps == {} and a_closed == [b"a"] and lib.refs[a_hold] == 0
    d, d_closed = _pool_map(dev, b"d")  # mapped for a capture that then fails
    dev.pool_pending = frozenset({b"d"})
    dev.release_pool_maps()
    assert b"d" in dev.pool_maps
    dev.capture_ended()
    dev.release_pool_maps()
    assert b"d" not in dev.pool_maps and d_closed == [b"d"]
    lib.refuse = True
    c, c_closed = _pool_map(dev, b"c")
    c.hold(stream, 0, "all_reduce")
    dev.release_pool_maps()
    assert set(dev.pool_maps) == {b"c"} and not c_closed and c.pinned
