"""A short, seed-fixed slice of the randomized correctness soak (benchmarks/correctness_soak.py).

Random collectives, dtypes, reduce ops, sizes either side of the fast CPU plane's (lowered)
thresholds, async bursts, subgroups, masks and group create/destroy cycles on 2-4 ranks; every
rank-result is compared bitwise with mooncake.model.  ~40 s per implementation on a 2-core machine.
"""

import json

import pytest

import correctness_soak
from mooncake import impl as _impl


@pytest.mark.timeout(240)
@pytest.mark.parametrize("which", ["ref", "fast", "fast-hosts2"])
def test_soak_slice(which, tmp_path):
    if which.startswith("fast"):
        reason = _impl.fast_unavailable_reason("cpu")
        if reason:
            pytest.skip(f"fast CPU plane unavailable: {reason}")
    out = tmp_path / "soak.json"
    rc = correctness_soak.main(["--seed", "20261206", "--duration", "40", "--round-s", "20", "--impls", which,
                                "--world-sizes", "2,3,4", "--segment-ops", "80", "--timeout", "30",
                                "--out", str(out), "--quiet"])
    report = json.loads(out.read_text())
    totals = report["totals"]
    assert totals["wrong"] == 0, report["details"]
    assert totals["errors"] == 0, report["errors"]
    assert totals["segments"] >= 2 and totals["rank_results"] >= 200, totals
    assert {r["impl"] for r in report["rounds"]} == {which}
    assert rc == 0
