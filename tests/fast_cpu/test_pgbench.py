"""benchmarks/pgbench.py runs end to end: every collective, three backends side by side, no wrong
elements, the nccl-tests table, JSON and a plot; upstream Mooncake's troubleshooting guide's CUDA smoke
command parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PGBENCH = os.path.join(REPO, "benchmarks", "pgbench.py")


@pytest.mark.timeout(600)
def test_pgbench_all_collectives_side_by_side(tmp_path):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [sys.executable, PGBENCH, "--collective", "all", "-g", "2", "-b", "8", "-e", "64K", "-f", "64",
           "-n", "3", "-w", "1", "--backend", "mooncake-cpu:fast,mooncake-cpu:ref,gloo", "-J", str(out_json),
           "--plot", str(out_png), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#wrong" in proc.stdout and "out-of-place" in proc.stdout and "side by side" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["meta"]["implementations"]["mooncake-cpu:fast"].startswith("fast")
    assert data["meta"]["implementations"]["mooncake-cpu:ref"].startswith("ref")
    seen = {(r["collective"], r["backend"]) for r in data["results"]}
    assert len(seen) == 10 * 3
    for r in data["results"]:
        for mode in ("out_of_place", "in_place"):
            m = r[mode]
            assert m is not None and m["time_us"] > 0
            assert m["wrong"] in (0, -1), (r["collective"], r["backend"], mode, m["wrong"])
    assert out_png.stat().st_size > 10_000


def test_seed_smoke_command_parses():
    """The guide's command (with our path) is accepted as written; on a machine without CUDA it
    stops with a clear message instead of a traceback."""
    sys.path.insert(0, os.path.dirname(PGBENCH))
    try:
        import pgbench
    finally:
        sys.path.pop(0)
    argv = ["--collective", "all_reduce", "--backend", "mooncake", "--device", "cuda", "-g", "2", "-b", "8",
            "-e", "1M", "-f", "2"]
    args = pgbench.parse_args(argv)
    assert args.backends == ["mooncake"] and args.device == "cuda" and args.ngpus == 2
    assert pgbench.sizes_of(args)[0] == 8 and pgbench.sizes_of(args)[-1] == 1 << 20
    import torch
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, PGBENCH, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "CUDA is not available" in proc.stderr, proc.stderr


def test_counts_and_busbw_factors():
    sys.path.insert(0, os.path.dirname(PGBENCH))
    try:
        import pgbench
    finally:
        sys.path.pop(0)
    assert pgbench.counts("all_reduce", 1024, 4, 2) == (256, 256, 256)
    assert pgbench.counts("all_gather", 1024, 4, 2) == (128, 256, 128)
    assert pgbench.counts("reduce_scatter", 1024, 4, 4) == (256, 64, 64)
    assert pgbench.counts("alltoall", 1000, 4, 3) == (240, 240, 80)  # blocks 16-byte aligned
    assert pgbench.busbw_factor("all_reduce", 4) == 1.5
    assert pgbench.busbw_factor("all_gather", 2) == 0.5
    assert pgbench.busbw_factor("broadcast", 8) == 1.0
    assert pgbench.parse_size("32M") == 32 << 20 and pgbench.parse_size("8") == 8


@pytest.mark.parametrize("argv, expected", [
    (["-G", "2", "--device", "cpu"], "-G/--cudagraph needs --device cuda"),
    (["-G", "2", "--backend", "mooncake,gloo", "--device", "cuda"], "capture in CUDA graphs: mooncake or nccl"),
    (["-G", "-1", "--device", "cuda"], "-G/--cudagraph must be >= 0"),
    (["--mem-pool", "--device", "cpu"], "--mem-pool needs --device cuda"),
])
def test_graph_mode_arguments_are_checked(argv, expected, capsys):
    """Graph mode asks for what it needs before any rank starts: CUDA and backends that capture."""
    sys.path.insert(0, os.path.dirname(PGBENCH))
    try:
        import pgbench
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as exc:
        pgbench.parse_args(["--collective", "all_reduce", *argv])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err
