"""benchmarks/pgbench.py in graph mode (``-G``) on the ``mooncake`` backend's fast plane: each case's calls
captured in a CUDA graph and launched, on buffers from ``mooncake.pg.mem_pool()``; what the plane captures
is timed and checked exact, what it refuses (P2P) is reported with its error.  Skipped where no CUDA device
is usable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PGBENCH = os.path.join(REPO, "benchmarks", "pgbench.py")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.timeout(400)
def test_graph_mode_times_and_checks_every_captured_collective(tmp_path):
    out_json = tmp_path / "graphs.json"
    cmd = [sys.executable, PGBENCH, "--collective", "all_reduce,all_gather,all_gather_base,reduce_scatter,"
           "alltoall,broadcast,sendrecv", "--backend", "mooncake:fast", "--device", "cuda", "-g", "2",
           "-b", "64", "-e", "4M", "-f", "256", "-n", "4", "-w", "1", "-G", "3", "--mem-pool", "--no-progress",
           "-J", str(out_json), "--timeout", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out_json.read_text())
    assert data["meta"]["cudagraph"] == 3 and data["meta"]["mem_pool"] is True
    sizes = {r["size_bytes"] for r in data["results"] if r["collective"] == "all_reduce"}
    assert sizes == {64, 16384, 4 << 20}  # 4 MiB: the captured all_reduce on the ranks' pool tensors
    for r in data["results"]:
        for mode in ("out_of_place", "in_place"):
            if r["collective"] == "sendrecv":  # P2P is refused while capturing, on every rank alike
                assert r[mode] is None and "ArgumentError" in r["capture_error"][mode], r
                continue
            m = r[mode]
            assert m is not None and m["time_us"] > 0, (r["collective"], mode, r.get("capture_error"))
            assert m["wrong"] in (0, -1), (r["collective"], r["size_bytes"], mode, m["wrong"])
            assert m["wrong"] == 0 or (mode == "in_place" and r["collective"] == "alltoall")
