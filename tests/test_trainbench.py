"""benchmarks/trainbench.py at a small size, for correctness only: 2 ranks, DDP and FSDP2, on
mooncake-cpu fast and ref, every final parameter bitwise equal to gloo's (with 2 ranks every
reduction is exact whatever its order), plus the table, JSON and plot it writes; and 4 ranks on two
emulated hosts (the hybrid plane) bitwise equal to ref and to fast on one host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINBENCH = os.path.join(REPO, "benchmarks", "trainbench.py")


def _trainbench(tmp_path, ranks: str, modes: str, backends: str, *more: str) -> list[dict]:
    """Run benchmarks/trainbench.py at the small size; its result rows."""
    cmd = [sys.executable, TRAINBENCH, "--ranks", ranks, "--modes", modes, "--backends", backends, "--width", "64",
           "--layers", "3", "--batch", "8", "--steps", "2", "--warmup", "1", "--timeout", "150", *more,
           "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "trainbench.json").read_text())["results"]


@pytest.mark.timeout(400)
def test_trainbench_parameters_match_gloo(tmp_path):
    rows = _trainbench(tmp_path, "2", "ddp,ddp_nosync,ddp_bf16,fsdp2", "gloo,mooncake-cpu:fast,mooncake-cpu:ref",
                       "--check")
    assert len(rows) == 4 * 3
    for row in rows:
        assert not row.get("error"), row
        if row["backend"] != "gloo":
            assert row["equal"], row
            assert row["impl"] == row["backend"].split(":")[1]
    assert "equal (bitwise)" in (tmp_path / "trainbench.txt").read_text()
    assert (tmp_path / "trainbench.png").stat().st_size > 10_000


@pytest.mark.timeout(400)
def test_training_across_two_hosts_matches_ref(tmp_path):
    """DDP and FSDP2 steps with 4 ranks, ranks 0, 2 on one emulated host and 1, 3 on the other: every final
    parameter bitwise equal to ref's and to fast's on one host (the same fold order, any placement)."""
    rows = _trainbench(tmp_path, "4", "ddp,fsdp2", "mooncake-cpu:ref,mooncake-cpu:fast,mooncake-cpu:fast-hosts2")
    assert len(rows) == 2 * 3
    for row in rows:
        assert not row.get("error"), row
        assert row["impl"] == ("ref" if row["backend"].endswith(":ref") else "fast"), row
        if not row["backend"].endswith(":ref"):
            assert row["equal"], row


@pytest.mark.parametrize("argv, expected", [
    (["--device", "cuda", "--backends", "mooncake-cpu:fast"], "cannot carry CUDA tensors"),
    (["--device", "cpu", "--backends", "gloo,mooncake:fast"], "need --device cuda"),
])
def test_device_and_backends_must_fit(argv, expected, capsys):
    sys.path.insert(0, os.path.dirname(TRAINBENCH))
    try:
        import trainbench
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        trainbench.parse_args(argv)
    assert expected in capsys.readouterr().err
    assert trainbench.parse_args(["--device", "cuda"]).backends == ["mooncake:ref", "mooncake:fast"]
