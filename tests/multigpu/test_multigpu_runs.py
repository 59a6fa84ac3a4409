"""The multi-GPU run on a host of >= 2 GPUs, one rank per GPU (the same runs as scripts/multigpu_run.sh, smaller).

Everything here skips without two GPUs, so CI (no GPU) skips it all.  ``MOONCAKE_MULTIGPU_CPU_CHECK=1``
also runs the fault driver's CPU mode (mooncake-cpu and gloo, 2-4 processes), which needs no GPU.
NVLink multicast is forced off in every process started here (the device tool's rule).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(REPO, "benchmarks", "multigpu_faults.py")
PGBENCH = os.path.join(REPO, "benchmarks", "pgbench.py")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
multi_gpu = pytest.mark.skipif(GPUS < 2, reason=f"needs >= 2 GPUs, found {GPUS} (scripts/multigpu_run.sh)")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return False
    return True


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **NO_MULTICAST, **extra)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str], timeout_s: float, **extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(**extra), capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    print(proc.stdout[-8000:], proc.stderr[-8000:], sep="\n")
    return proc


def _phases(out: str) -> list[dict]:
    with open(os.path.join(out, "faults.json")) as f:
        return json.load(f)["phases"]


@multi_gpu
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_faults_one_rank_per_gpu(tmp_path):
    """Kill mid-dispatch (before / after its send) and mid-all_reduce, replacements join, EP afterwards."""
    if not _has("ucxx"):
        pytest.skip("the mooncake backend needs ucxx (carry .whl/)")
    ranks = min(GPUS, 4)
    proc = _run([sys.executable, DRIVER, "faults", "--device", "cuda", "--backend", "mooncake", "--ranks",
                 str(ranks), "--out", str(tmp_path)], 540)
    assert proc.returncode == 0, proc.stdout[-4000:]
    phases = _phases(str(tmp_path))
    assert all(p["ok"] is not False for p in phases), phases
    names = {p["name"] for p in phases if p["ok"]}
    assert {"pg-kill-mid-all_reduce", "rejoin-rank0"} <= names
    from mooncake.fast.cuda import unavailable_reason

    if unavailable_reason() is None:
        assert {"ep-kill-before-send", "ep-kill-after-send", "ep-final (recovered group)"} <= names


@multi_gpu
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_epbench_one_rank_per_gpu(tmp_path):
    from mooncake.fast.cuda import unavailable_reason

    why = unavailable_reason()
    if why:
        pytest.skip(f"CUDA fast path unavailable: {why}")
    proc = _run([sys.executable, DRIVER, "ep-bench", "--ranks", "2", "--out", str(tmp_path), "--iters", "5",
                 "--warmup", "2", "--timeout", "300"], 360)
    assert proc.returncode == 0
    (report,) = [p for p in os.listdir(tmp_path) if p.endswith("-R2.json")]
    with open(tmp_path / report) as f:
        data = json.load(f)
    assert data["placement"].startswith("one rank per GPU") and data["gpus"] >= 2
    assert data["routings"]["uniform"]["graph"]["dispatch"]["p50_us"] > 0
    assert _run([sys.executable, DRIVER, "ep-compare", str(tmp_path)], 60).returncode == 0


def _pgbench_over_two_gpus(out, backends: str, collectives: str, *more: str) -> list[dict]:
    """pgbench with one rank on each of 2 GPUs, 8 B - 4 MiB; its result records."""
    proc = _run([sys.executable, PGBENCH, "--collective", collectives, "--backend", backends, "--device", "cuda",
                 "-g", "2", "-b", "8", "-e", "4M", "-f", "64", "-n", "2", "-w", "1", "--no-progress", "-J",
                 str(out), *more], 360)
    assert proc.returncode == 0
    with open(out) as f:
        return json.load(f)["results"]


@multi_gpu
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pgbench_nccl_side_by_side(tmp_path):
    """pgbench over 2 GPUs: nccl and (if ucxx is here) mooncake next to it; no wrong element anywhere."""
    backends = "nccl" + (",mooncake" if _has("ucxx") else "")
    out = tmp_path / "pg.json"
    records = _pgbench_over_two_gpus(out, backends, "all_reduce,all_gather,reduce_scatter,alltoall")
    assert {r["backend"] for r in records} == set(backends.split(","))
    for r in records:
        for mode in ("in_place", "out_of_place"):
            if r[mode] is not None:
                assert r[mode]["wrong"] <= 0, r
    assert _run([sys.executable, DRIVER, "pg-compare", str(out)], 60).returncode == 0


@multi_gpu
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_pgbench_nccl_side_by_side_in_graph_mode(tmp_path):
    """pgbench -G over 2 GPUs: each backend's calls captured in CUDA graphs and launched; nothing wrong."""
    backends = "nccl" + (",mooncake:fast" if _has("ucxx") else "")
    records = _pgbench_over_two_gpus(tmp_path / "graphs.json", backends, "all_reduce,all_gather_base,reduce_scatter",
                                     "-G", "2", "--mem-pool")
    assert {r["backend"] for r in records} == set(backends.split(","))
    for r in records:
        for mode in ("in_place", "out_of_place"):
            assert r[mode] is not None and r[mode]["wrong"] == 0, r


def test_pg_compare_labels_each_file(tmp_path):
    """``LABEL=JSON`` names a file's columns, so runs of one backend (eager / graph, R = 2 / 8) sit side by side."""
    def result(us):
        return {"time_us": us, "busbw": 1.0, "algbw": 1.0, "wrong": 0}
    for name, world, us in (("e2", 2, 90.0), ("g8", 8, 14.0)):
        data = {"meta": {"world_size": world}, "results": [
            {"collective": "all_reduce", "backend": "mooncake:fast", "size_bytes": 16, "in_place": result(us),
             "out_of_place": result(us)}]}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    md = tmp_path / "t.md"
    proc = _run([sys.executable, DRIVER, "pg-compare", f"R=2 eager={tmp_path / 'e2.json'}",
                 f"R=8 graph={tmp_path / 'g8.json'}", "--md", str(md)], 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = md.read_text()
    assert "2/8 ranks" in text and "R=2 eager us" in text and "R=8 graph us" in text
    row = next(line for line in text.splitlines() if line.startswith("| 16 |"))
    assert "90" in row and "14" in row, row


@multi_gpu
def test_peer_access_and_nvls_off(tmp_path):
    proc = _run([sys.executable, DRIVER, "machine", "--out", str(tmp_path), "--mib", "64"], 120)
    assert proc.returncode == 0
    with open(tmp_path / "machine.json") as f:
        info = json.load(f)
    assert info["env"]["NCCL_NVLS_ENABLE"] == "0" and info["gpus"] >= 2
    assert all(v > 0 for v in info["p2p_copy_GBps"].values())


@pytest.mark.skipif(os.environ.get("MOONCAKE_MULTIGPU_CPU_CHECK") != "1",
                    reason="the CPU mode of the fault driver runs on request: MOONCAKE_MULTIGPU_CPU_CHECK=1")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,ranks", [("mooncake-cpu", 3), ("gloo", 2)])
def test_fault_driver_cpu_mode(tmp_path, backend, ranks):
    proc = _run([sys.executable, DRIVER, "faults", "--device", "cpu", "--backend", backend, "--ranks", str(ranks),
                 "--out", str(tmp_path)], 280)
    assert proc.returncode == 0
    phases = _phases(str(tmp_path))
    assert all(p["ok"] is not False for p in phases)
    ran = {p["name"] for p in phases if p["ok"]}
    assert {"ep-healthy", "ep-kill-before-send"} <= ran
    if backend == "mooncake-cpu":
        assert {"ep-kill-after-send", "pg-kill-mid-all_reduce", "rejoin-rank0", "ep-final (recovered group)"} <= ran
