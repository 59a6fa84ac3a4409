"""The agreement's pure parts: reports, decisions, and the decision rule."""

import pytest

from mooncake.control import faults
from mooncake.control.agreement import Decision, Report, Verdict, VerdictKind, decide, ready_to_decide
from mooncake.control.errors import WireError
from mooncake.control.join import Admission, JoinRequest


def report(rank, committed=(), high=10, suspects=(), epoch=3, timed_out=(), slow=(), failures=()):
    return Report(epoch, rank, tuple(committed), high, frozenset(suspects), frozenset(timed_out),
                  frozenset(slow), tuple(failures))


def test_records_round_trip():
    r = report(2, ((3, 17), (19, 20), (22, 23)), 25, suspects=(0, 255), timed_out=(23,), slow=(1,),
               failures=((24, VerdictKind.REJECTED, "rank 2 rejected this call: bad \u00e9"),))
    assert Report.decode(r.encode()) == r
    d = Decision(4, (0, 1, 3), (2,), ((0, 17), (19, 20)), 25,
                 ((23, Verdict(VerdictKind.TIMEOUT, (1,), "late")),))
    assert Decision.decode(d.encode(), members=(0, 1, 2, 3)) == d
    assert JoinRequest.decode(JoinRequest(2**63 + 5, 8, 4, b"addr").encode()) == JoinRequest(2**63 + 5, 8, 4, b"addr")
    assert Admission.decode(Admission(9, 1000, 8, (0, 2, 7)).encode()) == Admission(9, 1000, 8, (0, 2, 7))


_GOOD = Decision(4, (0, 1), (2,), ((0, 5),), 7, ((6, Verdict(VerdictKind.REJECTED, (1,), "no")),)).encode()


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 8, _GOOD[:-1], _GOOD + b"\x00",
    report(1).encode(),                                         # a report where a decision belongs
    _GOOD[:20] + b"\x02" + _GOOD[21:],                         # a mask byte that is not 0/1
    _GOOD.replace(b"no", b"\xff\xfe"),                         # a message that is not UTF-8
], ids=["empty", "short", "truncated", "trailing", "report", "mask", "utf8"])
def test_malformed_decisions_raise(data):
    with pytest.raises(WireError):
        Decision.decode(data)


def test_a_decision_must_split_the_members():
    d = Decision(4, (0, 1), (200,), (), 0).encode()
    with pytest.raises(WireError, match="do not split"):
        Decision.decode(d, members=(0, 1, 2))


def test_silent_and_suspected_members_fail():
    members = (0, 1, 2, 3)
    reports = {0: report(0, suspects=(3,)), 1: report(1)}
    assert not ready_to_decide(members, reports)           # 2 is neither reported nor suspected
    assert ready_to_decide(members, reports, seen_dead=(2,))
    d = decide(3, members, reports)
    assert d.epoch == 4 and d.active == (0, 1) and d.failed == (2, 3)


def test_an_op_committed_anywhere_stands():
    reports = {0: report(0, ((9, 11),)), 1: report(1, ((9, 12), (14, 15))), 2: report(2, ((9, 11), (13, 14)))}
    d = decide(3, (0, 1, 2), reports)
    assert [s for s in range(8, 17) if d.committed(s)] == [9, 10, 11, 13, 14]


def test_an_op_failed_locally_is_never_counted_as_committed():
    # rank 0 failed op 10 on a mismatch and committed 11; rank 1 never saw op 10 end
    reports = {0: report(0, ((9, 10), (11, 12)), 12, failures=((10, VerdictKind.MISMATCH, "op 10: differ"),)),
               1: report(1, ((9, 10),), 12, timed_out=(10,))}
    d = decide(3, (0, 1), reports)
    assert not d.committed(10) and d.verdict(10) == Verdict(VerdictKind.MISMATCH, (0,), "op 10: differ")


def test_a_late_member_is_named_and_the_rest_run_again():
    # rank 0 called ops 5, 6, 7 (5 timed out); rank 1 is alive but had only reached op 5
    reports = {0: report(0, (), 8, timed_out=(5,), slow=(1,)), 1: report(1, (), 5)}
    d = decide(3, (0, 1), reports)
    assert d.failed == () and d.high == 8
    v = d.verdict(5)
    assert v.kind is VerdictKind.TIMEOUT and v.ranks == (1,) and "had not called it" in v.message
    assert d.verdict(6) is None and d.verdict(7) is None   # run again under the new view


def test_a_slow_member_is_named_when_everyone_called_it():
    reports = {0: report(0, (), 6, timed_out=(5,), slow=(1,)), 1: report(1, (), 6)}
    v = decide(3, (0, 1), reports).verdict(5)
    assert v.ranks == (1,) and "every rank had called it" in v.message


def test_a_rejection_wins_and_a_death_excuses_timeouts():
    reports = {0: report(0, (), 6, timed_out=(4, 5)),
               1: report(1, (), 6, failures=((5, VerdictKind.REJECTED, "rank 1 rejected this call: x"),))}
    d = decide(3, (0, 1, 2), reports)               # rank 2 is silent: failed
    assert d.failed == (2,)
    assert d.verdict(4) is None                      # timed out because rank 2 died: run again
    assert d.verdict(5) == Verdict(VerdictKind.REJECTED, (1,), "rank 1 rejected this call: x")


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
