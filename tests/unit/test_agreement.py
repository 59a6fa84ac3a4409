"""The agreement's pure parts: reports, decisions, and the decision rule."""

import pytest

from mooncake.control import faults
from mooncake.control.agreement import Decision, Report, decide, ready_to_decide
from mooncake.control.errors import WireError
from mooncake.control.join import Admission, JoinRequest


def report(rank, low, extra=(), suspects=(), epoch=3):
    return Report(epoch, rank, low, frozenset(extra), frozenset(suspects))


def test_records_round_trip():
    r = report(2, 17, extra=(19, 22), suspects=(0, 255))
    assert Report.decode(r.encode()) == r
    d = Decision(4, (0, 1, 3), (2,), 17, frozenset({19}))
    assert Decision.decode(d.encode()) == d
    assert JoinRequest.decode(JoinRequest(2**63 + 5, 8, 4, b"addr").encode()) == JoinRequest(2**63 + 5, 8, 4, b"addr")
    assert Admission.decode(Admission(9, 1000, 8, (0, 2, 7)).encode()) == Admission(9, 1000, 8, (0, 2, 7))


@pytest.mark.parametrize("data", [b"", b"\x00" * 8, Report(1, 0, 0, frozenset(), frozenset()).encode()[:-1] + b"\x01\x02"])
def test_malformed_records_raise(data):
    with pytest.raises(WireError):
        Decision.decode(data)


def test_silent_and_suspected_members_fail():
    members = (0, 1, 2, 3)
    reports = {0: report(0, 10, suspects=(3,)), 1: report(1, 10)}
    assert not ready_to_decide(members, reports)           # 2 is neither reported nor suspected
    assert ready_to_decide(members, reports, seen_dead=(2,))
    d = decide(3, members, reports)
    assert d.epoch == 4 and d.active == (0, 1) and d.failed == (2, 3)


def test_an_op_committed_anywhere_stands():
    reports = {0: report(0, 10), 1: report(1, 12, extra=(14,)), 2: report(2, 11, extra=(13,))}
    d = decide(3, (0, 1, 2), reports)
    assert [s for s in range(9, 16) if d.committed(s)] == [9, 10, 11, 13, 14]


def test_fault_arming_is_checked():
    with pytest.raises(ValueError, match="fault point"):
        faults.arm("nowhere", "kill")
    with pytest.raises(ValueError, match="fault action"):
        faults.arm("before_send", "explode")
    faults.arm("before_send", "stall", skip=1, stall_s=0)
    faults.hit("before_send")                          # skipped
    faults.hit("before_send")                          # stalls 0 s, then disarms
    faults.hit("before_send")
    faults.disarm()
