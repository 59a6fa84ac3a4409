"""Wire headers, tags, views and implementation selection (in-process, no communication)."""

import os

import pytest

from mooncake import impl
from mooncake.control.errors import ArgumentError, WireError
from mooncake.control.view import View, initial_view
from mooncake.control.wire import HEADER_BYTES, Header, Kind, OpCode, collective_tag, p2p_tag


def _header(**overrides):
    fields = dict(kind=Kind.COLLECTIVE, op=OpCode.ALL_REDUCE, group_key=7, src=2, dst=1, epoch=3,
                  seq=41, num_bytes=4096, dtype_code=8, reduce_op=0)
    fields.update(overrides)
    return Header(**fields)


def test_header_round_trip_CPU():
    buf = bytearray(HEADER_BYTES)
    h = _header(kind=Kind.P2P, op=OpCode.SEND, user_tag=99)
    h.pack_into(memoryview(buf))
    assert Header.unpack(memoryview(buf)) == h


@pytest.mark.parametrize("field,value,fragment", [
    ("op", OpCode.BROADCAST, "rank 2 called broadcast while this rank called all_reduce"),
    ("num_bytes", 8, "rank 2 sent 8 bytes"),
    ("dtype_code", 4, "dtypes must agree"),
    ("reduce_op", 3, "reduce ops must agree"),
    ("seq", 40, "header field seq is 40, expected 41"),
])
def test_header_mismatch_names_the_field_CPU(field, value, fragment):
    with pytest.raises(WireError, match=fragment):
        _header(**{field: value}).check_matches(_header())


def test_header_rejects_foreign_and_future_messages_CPU():
    buf = bytearray(HEADER_BYTES)
    _header().pack_into(memoryview(buf))
    with pytest.raises(WireError, match="bad magic"):
        Header.unpack(memoryview(b"\0" * HEADER_BYTES))
    buf[4] = 99  # version
    with pytest.raises(WireError, match="wire version 99"):
        Header.unpack(memoryview(buf))
    with pytest.raises(WireError, match="shorter than"):
        Header.unpack(memoryview(b"\0" * 10))


def test_tags_separate_groups_sources_epochs_and_ops_CPU():
    base = collective_tag(5, 1, 0, 10)
    others = [collective_tag(6, 1, 0, 10), collective_tag(5, 2, 0, 10), collective_tag(5, 1, 1, 10),
              collective_tag(5, 1, 0, 11), p2p_tag(5, 1, 0, 0, 10)]
    assert len({base, *others}) == 1 + len(others)
    assert all(0 <= t < 2 ** 64 for t in [base, *others])


def test_initial_view_rules_CPU():
    assert initial_view(None, 3, 5, 0, False) == View(0, 5, (0, 1, 2))
    assert initial_view([0] * 5, 3, 5, 1, False).active == (0, 1, 2)  # all-zero = unset (upstream default)
    assert initial_view([1, 0, 1, 1, 1], 3, 5, 0, False).active == (0, 2)  # reserved slots stay inactive
    joiner = initial_view([1] * 5, 5, 5, 4, True)
    assert joiner.active == (4,) and joiner.visible_size == 5
    assert View(0, 4, (0, 2)).mask() == [1, 0, 1, 0]


def test_impl_selection_CPU(monkeypatch):
    impl.select.cache_clear()
    monkeypatch.setenv("MOONCAKE_IMPL", "ref")
    assert impl.select("cpu") == ("ref", "MOONCAKE_IMPL=ref")
    impl.select.cache_clear()
    monkeypatch.setenv("MOONCAKE_IMPL", "auto")
    choice, reason = impl.select("cpu")
    why_not = impl.fast_unavailable_reason("cpu")
    assert (choice, reason.startswith("auto")) == (("ref", True) if why_not else ("fast", True)), reason
    if why_not:
        assert why_not in reason
    impl.select.cache_clear()
    monkeypatch.setenv("MOONCAKE_IMPL", "turbo")
    with pytest.raises(ArgumentError, match="MOONCAKE_IMPL='turbo'"):
        impl.select("cpu")
    impl.select.cache_clear()


def test_process_state_tells_live_from_exited():
    import subprocess
    from mooncake.control.procs import exited, process_state
    assert process_state(os.getpid()) in ("R", "S") and exited(process_state(os.getpid())) is False
    child = subprocess.Popen(["true"])
    child.wait(10)
    assert process_state(child.pid) == "X" and exited("X") and exited("Z")
    assert exited(None) is None
