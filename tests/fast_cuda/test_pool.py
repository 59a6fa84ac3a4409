"""Pool memory (``mooncake.fast.cuda.pool``): which segment a tensor's address lies in, exported once per
segment, exported again when torch reuses a freed segment's address, and no longer served once freed.  On
the CPU, with a stand-in for the CUDA library's segment table (``mc_pool_find``) over ordinary memfds; the
pool on a GPU is exercised by tests/fast_cuda/test_cuda_pg_face.py and pg_graph.py's large step."""

from __future__ import annotations

import os

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
    lib.free(1 << 20)
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


class _Mem:
    lib, index = None, 0

    @staticmethod
    def relaxed_capture():
        import contextlib
        return contextlib.nullcontext()


def _device_path(rank: int):
    import types

    from mooncake.fast.cuda import pg as P
    dev = P._DevicePath.__new__(P._DevicePath)
    dev.g = types.SimpleNamespace(mem=_Mem(), rank=rank)
    dev.pool_maps = {}
    return dev


def _offer(pid: int, offset: int) -> bytes:
    from mooncake.fast.cuda import pg as P
    return shared.HANDLE.pack(pid, 1, pid, 1 << 20) + P._OFFSET.pack(offset)


def test_every_rank_maps_its_peers_segments_or_says_it_could_not(monkeypatch):
    """At capture, where every rank offered a pool tensor, a rank maps its peers' segments (once per segment)
    and says whether all could be mapped (the PG face's second round); a partial offer asks for no round.
    The tensors' addresses then follow from the mappings."""
    import types
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
