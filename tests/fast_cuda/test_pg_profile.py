"""The trace analysis of tests/fast_cuda/pg_profile.py on records whose times are known (no GPU)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pg_profile as P  # noqa: E402


def _record(key: int, start_ns: int, steps_ns: list[int]) -> dict:
    ns = [start_ns]
    for d in steps_ns:
        ns.append(ns[-1] + d)
    return {"key": key, "ns": ns, "clock": [2 * t for t in ns], "blocks": 1}


def test_spans_gaps_and_skew_across_ranks():
    base = (1 << 40) | (1 << 39)
    ranks = []
    for r in range(2):  # rank 1 starts every op 1000 ns later; each op 6 steps of 500 ns, 2000 ns between ops
        recs = [_record(base + n, n * 5000 + r * 1000, [500] * 6) for n in range(P.OPS)]
        if r == 1:  # it publishes last, so rank 0 waits for it: its own wait is short
            for rec in recs:
                rec["ns"][4] = rec["ns"][3] + 100
        ranks.append(recs)
    summary, table = P.analyse_trace(ranks)
    spans = summary["spans"]
    assert summary["ops_matched"] == P.OPS
    assert summary["sm_clock_ghz_p50"] == 2.0
    assert spans["whole kernel"]["p50_us"] == 3.0
    assert spans["go: own count / trouble / epoch words"]["p50_us"] == 0.5
    assert spans["gap: previous kernel's end to this one's start"]["p50_us"] == 2.0
    assert spans["gap: previous kernel's end to this one's start"]["n"] == 2 * (P.OPS - 1)
    assert spans["period: start to the next op's start"]["p50_us"] == 5.0
    assert spans["ranks apart at start"]["p50_us"] == 1.0
    assert spans["ranks apart at publish"]["p50_us"] == 1.0
    assert spans["last publisher's wait for the others"]["p50_us"] == 0.1
    assert "wait for every peer's publish" in table


def test_ops_one_rank_did_not_finish_are_left_out():
    base = (1 << 40) | (1 << 39)
    ranks = [[_record(base + n, n * 5000, [500] * 6) for n in range(3)] for _ in range(2)]
    ranks[1][2]["ns"][6] = 0  # gave up before its finish
    del ranks[0][0]  # not recorded on rank 0
    summary, _ = P.analyse_trace(ranks)
    assert summary["ops_matched"] == 1


def test_eager_records_count_every_next_key_and_host_spans():
    ranks = [[_record(7 + n, n * 5000 + r * 1000, [500] * 6) for n in range(3)] for r in range(2)]
    summary, _ = P.analyse_trace(ranks, 0)
    assert summary["spans"]["gap: previous kernel's end to this one's start"]["n"] == 2 * 2
    assert summary["spans"]["gap: previous kernel's end to this one's start"]["p50_us"] == 2.0
    # rank 1 starts each call 3 µs after rank 0 and takes 10 µs more to return
    host = [[(n * 100_000 + r * 3000, n * 100_000 + r * 3000 + 20_000 + r * 10_000, n * 100_000 + 50_000)
             for n in range(4)] for r in range(2)]
    rows, table = P.analyse_host(host)
    assert rows["call: start to return (slowest rank)"]["p50_us"] == 30.0
    assert rows["ranks apart at the call's start"]["p50_us"] == 3.0
    assert rows["ranks apart at return"]["p50_us"] == 13.0
    assert rows["period: one call's start to the next (rank 0)"]["n"] == 3
    assert rows["period: one call's start to the next (rank 0)"]["p50_us"] == 100.0
    assert "ranks apart" in table
