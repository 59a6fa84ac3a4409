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
