"""``python -m mooncake.doctor`` on CPU: the report's shape, verdicts, fixes, exit codes, and the Store probe.

Most cases call ``mooncake.doctor.main`` in this process (fast); two run the module as a command, the way
users and the console script ``mooncake-doctor`` (``mooncake.doctor:main``) do.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from mooncake import doctor, impl

REPO_ROOT = Path(__file__).resolve().parents[2]
def _has_fast_cpu_plane() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("mooncake.fast.cpu") is not None
    except ImportError:
        return False


CPU_CHECKS = ["python", "mooncake", "torch", "native"] + (["native.cpu"] if _has_fast_cpu_plane() else []) + \
    ["pg", "impl.cpu", "ucx", "host", "device_filter", "rdma", "cuda"]
CHECK_KEYS = {"name", "verdict", "summary", "fix", "details"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """A known environment: no implementation override, no device filter; impl's per-process cache cleared."""
    for name in ("MOONCAKE_IMPL", "MOONCAKE_PGTEST_DEVICE_FILTERS", "MOONCAKE_HOST_IP", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    impl.select.cache_clear()
    yield
    impl.select.cache_clear()


def run_main(capsys, *args) -> tuple[int, dict]:
    code = doctor.main(["--json", *args])
    return code, json.loads(capsys.readouterr().out)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def run_command(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MOONCAKE_IMPL"}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO_ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ schema


def test_json_schema_and_verdicts(capsys):
    code, report = run_main(capsys)
    assert report["schema"] == doctor.SCHEMA
    assert set(report) == {"schema", "verdict", "counts", "seconds", "checks"}
    names = [c["name"] for c in report["checks"]]
    assert names == CPU_CHECKS, names  # no CUDA here: one cuda line, no ipc / peer / mps lines
    for check in report["checks"]:
        assert set(check) == CHECK_KEYS, check
        assert check["verdict"] in doctor.VERDICTS
        assert isinstance(check["summary"], str) and check["summary"]
        assert isinstance(check["details"], dict)
        if check["verdict"] != "ok":
            assert check["fix"], f"{check['name']} is {check['verdict']} without a fix"
    counts = {v: sum(c["verdict"] == v for c in report["checks"]) for v in doctor.VERDICTS}
    assert report["counts"] == counts
    worst = max((c["verdict"] for c in report["checks"]), key=doctor.VERDICTS.index)
    assert report["verdict"] == worst
    assert code == (1 if worst == "fail" else 0)


def test_cpu_machine_facts(capsys):
    import torch

    code, report = run_main(capsys)
    checks = by_name(report)
    assert code == 0, [c for c in report["checks"] if c["verdict"] == "fail"]
    assert checks["torch"]["details"]["version"] == torch.__version__
    assert checks["torch"]["details"]["cuda"] == torch.version.cuda
    if doctor._native_extensions():
        assert checks["native"]["details"]["extensions"]
    else:
        assert checks["native"]["verdict"] == "ok" and "not built" in checks["native"]["summary"]
    assert checks["impl.cpu"]["details"]["implementation"] == impl.select("cpu")[0]
    assert checks["impl.cpu"]["details"]["reason"] == impl.select("cpu")[1]
    ucx = checks["ucx"]
    assert ucx["verdict"] == "ok"
    assert ucx["details"]["ucx"].count(".") == 2 and ucx["details"]["transports"]["tcp"], ucx
    assert "tcp/lo" in ucx["details"]["resources"]
    assert {k: checks["host"]["details"][k] for k in ("host_ip", "interface")} == \
        {"host_ip": "127.0.0.1", "interface": "lo"}
    assert checks["host"]["details"]["source"].startswith("loopback")
    assert checks["device_filter"]["details"]["filters"] == []
    if not torch.cuda.is_available():
        assert checks["cuda"]["details"]["available"] is False


def test_text_report_one_line_per_check(capsys):
    code = doctor.main([])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mooncake doctor")
    assert out[-1].startswith("verdict: ")
    lines = [line for line in out[1:-1] if line.startswith("[")]
    assert [line.split("]")[1].split()[0] for line in lines] == CPU_CHECKS
    for line in lines:
        assert line[:6] in ("[ ok ]", "[warn]", "[fail]"), line
    assert code in (0, 1)


# ------------------------------------------------------------------------------------------ failing lines


def test_bad_impl_fails_with_fix(capsys, monkeypatch):
    monkeypatch.setenv("MOONCAKE_IMPL", "bogus")
    code, report = run_main(capsys)
    check = by_name(report)["impl"]
    assert check["verdict"] == "fail" and "MOONCAKE_IMPL='bogus' is not one of ref, fast, auto" in check["summary"]
    assert "ref, fast or auto" in check["fix"]
    assert code == 1 and report["verdict"] == "fail"


def test_impl_fast_unavailable_fails_ref_ok(monkeypatch):
    if impl.fast_unavailable_reason("cpu") is None:
        pytest.skip("this build has a CPU fast path")
    monkeypatch.setenv("MOONCAKE_IMPL", "fast")
    check = {c.name: c for c in doctor.check_impl()}["impl.cpu"]
    assert check.verdict == "fail" and check.summary.startswith("MOONCAKE_IMPL=fast but ")
    assert "MOONCAKE_IMPL" in check.fix
    impl.select.cache_clear()
    monkeypatch.setenv("MOONCAKE_IMPL", "ref")
    check = {c.name: c for c in doctor.check_impl()}["impl.cpu"]
    assert check.verdict == "ok" and check.details["reason"] == "MOONCAKE_IMPL=ref"


def test_device_filter_unknown_device_fails(monkeypatch):
    monkeypatch.setenv("MOONCAKE_PGTEST_DEVICE_FILTERS", "lo,mlx5_does_not_exist")
    check = doctor.check_device_filter()
    assert check.verdict == "fail" and check.details["unknown"] == ["mlx5_does_not_exist"]
    assert check.details["source"] == "MOONCAKE_PGTEST_DEVICE_FILTERS"
    assert "same filter on every rank" in check.fix


def test_device_filter_known_device_ok():
    os.environ["MOONCAKE_PGTEST_DEVICE_FILTERS"] = "lo"  # removed again by clean_env's monkeypatch
    check = doctor.check_device_filter()
    assert check.verdict == "ok" and check.details["filters"] == ["lo"]


def test_native_extension_built_for_another_torch(monkeypatch):
    """Upstream Mooncake's troubleshooting guide's "Mooncake EP was not built against torch==..." case, with a fake extension."""
    import mooncake

    fake = Path(mooncake.__file__).parent / "ep" / "_native.cpython-311-x86_64-linux-gnu.so"
    monkeypatch.setattr(doctor, "_native_extensions", lambda: [fake])
    monkeypatch.setattr(doctor, "_probe", lambda code, timeout_s, env=None: ({"torch": "0.0.1", "cuda": None}, ""))
    check = doctor.check_native(5.0)
    assert check.verdict == "fail" and "mooncake.ep._native: built against torch==0.0.1" in check.summary
    assert "rebuild" in check.fix
    monkeypatch.setattr(doctor, "_probe", lambda code, timeout_s, env=None: (None, "exit code 1: ImportError: x"))
    check = doctor.check_native(5.0)
    assert check.verdict == "fail" and "does not load" in check.summary


@pytest.mark.parametrize("answer,verdict,needle,fix", [
    ({"has_native": True, "native_reason": None, "plane_reason": None, "origin": "package", "isa": "avx",
      "path": "/x/libmooncake_shm.so"}, "ok", "prebuilt, shipped with the package", None),
    ({"has_native": True, "native_reason": None, "plane_reason": None, "origin": "cache", "isa": "sse2",
      "path": "/c/libmooncake_shm-1.so"}, "ok", "compiled on first use into the cache", None),
    ({"has_native": True, "native_reason": "no compiled helpers for csrc/cpu/mooncake_shm.c: no C compiler: `cc` is "
      "not on PATH", "problem": "no-compiler", "fix": "install one (e.g. `apt-get install gcc`) or set CC",
      "plane_reason": None}, "warn", "no C compiler: torch fallbacks", "apt-get install gcc"),
    ({"has_native": True, "native_reason": "no compiled helpers ...: source /s/_csrc/cpu/mooncake_shm.c not found "
      "(package)", "problem": "source-missing", "fix": "reinstall the package from a wheel built by `pip wheel .`",
      "plane_reason": None}, "warn", "the C source is missing", "pip wheel"),
    ({"has_native": True, "native_reason": "... cache directory /c belongs to bob", "problem": "cache-not-owned",
      "fix": "set MOONCAKE_CACHE_DIR to a directory of your own", "plane_reason": None}, "warn",
     "the build cache is not yours", "MOONCAKE_CACHE_DIR"),
    ({"has_native": True, "native_reason": "... cache directory /c is writable by group", "fix": "chmod go-w /c",
      "problem": "cache-writable-by-others", "plane_reason": None}, "warn", "writable by others", "chmod go-w"),
    ({"has_native": True, "native_reason": "... `cc -O3` failed (exit 1): boom", "problem": "compiler-failed",
      "fix": "fix the compiler (try the command by hand) or set CC", "plane_reason": None}, "warn",
     "the C compiler failed", "set CC"),
    ({"has_native": True, "native_reason": "MOONCAKE_FAST_CPU_NATIVE=0", "problem": "disabled", "plane_reason": None},
     "ok", "switched off", None),
])
def test_fast_cpu_native_helpers(monkeypatch, answer, verdict, needle, fix):
    if not _has_fast_cpu_plane():
        pytest.skip("this install has no shared-memory CPU plane")
    monkeypatch.setattr(doctor, "_probe", lambda code, timeout_s, env=None: (answer, ""))
    [check] = doctor.check_native_fast_cpu(5.0)
    assert check.name == "native.cpu" and check.verdict == verdict and needle in check.summary, check.summary
    assert fix is None or fix in check.fix


def test_fast_cpu_native_helpers_really_named(capsys, monkeypatch, tmp_path):
    """Not mocked: a cache directory others can write is named with its fix (this checkout compiles the
    helper on first use, so it needs the cache)."""
    if not _has_fast_cpu_plane():
        pytest.skip("this install has no shared-memory CPU plane")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("MOONCAKE_CACHE_DIR", str(shared / "mc"))
    [check] = doctor.check_native_fast_cpu(20.0)
    if check.details.get("origin") == "package":
        pytest.skip("a prebuilt helper is in use: no cache involved")
    assert check.verdict == "warn" and check.details["problem"] == "cache-writable-by-others", check
    assert str(shared) in check.summary and f"chmod go-w {shared}" in check.fix


def test_ctypes_libraries_are_not_taken_for_extension_modules(monkeypatch, tmp_path):
    import mooncake

    monkeypatch.setattr(mooncake, "__file__", str(tmp_path / "mooncake" / "__init__.py"))
    (tmp_path / "mooncake" / "fast" / "cpu").mkdir(parents=True)
    (tmp_path / "mooncake" / "fast" / "cpu" / "libmooncake_shm.so").write_bytes(b"")
    (tmp_path / "mooncake" / "_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert [p.name for p in doctor._native_extensions()] == ["_ext.cpython-311-x86_64-linux-gnu.so"]


def test_native_extension_that_does_not_import_really_fails(monkeypatch):
    import mooncake

    fake = Path(mooncake.__file__).parent / "_no_such_ext.cpython-311-x86_64-linux-gnu.so"
    monkeypatch.setattr(doctor, "_native_extensions", lambda: [fake])
    check = doctor.check_native(20.0)
    assert check.verdict == "fail" and "mooncake._no_such_ext: does not load" in check.summary
    assert "ModuleNotFoundError" in check.summary


@pytest.mark.parametrize("devices,verdict,needle", [
    ([], "ok", "no RDMA devices"),
    ([{"name": "mlx5_0", "ports": [{"port": "1", "state": "1: DOWN", "link_layer": "InfiniBand", "rate": None}]}],
     "warn", "no port is ACTIVE"),
])
def test_rdma_verdicts(monkeypatch, devices, verdict, needle):
    monkeypatch.setattr(doctor, "_rdma_devices", lambda: devices)
    check = doctor.check_rdma({"resources": ["tcp/lo"]})
    assert check.verdict == verdict and needle in check.summary
    assert verdict == "ok" or check.fix


def test_rdma_active_but_ucx_without_verbs_warns(monkeypatch):
    devices = [{"name": "mlx5_0", "ports": [{"port": "1", "state": "4: ACTIVE", "link_layer": "InfiniBand",
                                              "rate": "200 Gb/sec"}]}]
    monkeypatch.setattr(doctor, "_rdma_devices", lambda: devices)
    monkeypatch.setattr(doctor.os.path, "isdir", lambda path: True)
    check = doctor.check_rdma({"resources": ["tcp/lo", "posix/memory"]})
    assert check.verdict == "warn" and "UCX lists no RDMA transport" in check.summary
    check = doctor.check_rdma({"resources": ["tcp/lo", "rc_mlx5/mlx5_0:1"]})
    assert check.verdict == "ok" and "mlx5_0:1" in check.summary


def test_classify_transports():
    kinds = doctor._classify(["self/memory", "tcp/lo", "sysv/memory", "posix/memory", "cma/memory",
                              "rc_mlx5/mlx5_0:1", "ud_verbs/mlx5_0:1", "dc_mlx5/mlx5_0:1", "cuda_ipc/cuda",
                              "cuda_copy/cuda", "gdr_copy/mlx5_0"])
    assert kinds["tcp"] == ["tcp/lo"]
    assert kinds["shm"] == ["sysv/memory", "posix/memory", "cma/memory"]
    assert kinds["rdma"] == ["rc_mlx5/mlx5_0:1", "ud_verbs/mlx5_0:1", "dc_mlx5/mlx5_0:1"]
    assert kinds["cuda"] == ["cuda_ipc/cuda", "cuda_copy/cuda", "gdr_copy/mlx5_0"]


def test_check_rejects_unknown_verdict():
    with pytest.raises(ValueError):
        doctor.Check("x", "maybe", "y")
    assert doctor.overall([]) == "ok"
    assert doctor.overall([doctor.Check("a", "ok", "."), doctor.Check("b", "warn", ".", fix="f")]) == "warn"


def test_a_crashing_check_becomes_a_fail_line():
    def boom():
        raise RuntimeError("kaput")

    [check] = doctor._safe("thing", boom)
    assert check.verdict == "fail" and "RuntimeError: kaput" in check.summary and check.fix


# ------------------------------------------------------------------------------------------ Store


@pytest.mark.parametrize("address,host,port", [("127.0.0.1:29500", "127.0.0.1", 29500), ("node-3:1", "node-3", 1),
                                               ("[::1]:29500", "::1", 29500)])
def test_parse_store(address, host, port):
    assert doctor.parse_store(address) == (host, port)


@pytest.mark.parametrize("address", ["127.0.0.1", "host:", ":29500", "host:70000", "host:0", "a:b"])
def test_parse_store_rejects(address):
    with pytest.raises(ValueError, match="HOST:PORT"):
        doctor.parse_store(address)


def test_store_reachable(capsys):
    master = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    code, report = run_main(capsys, "--store", f"127.0.0.1:{master.port}", "--store-timeout", "2")
    check = by_name(report)["store"]
    assert check["verdict"] == "ok", check
    assert check["details"]["reachable"] and check["details"]["roundtrip_ok"]
    assert code == 0
    assert master.num_keys() <= 1  # the probe removed its key (a fresh TCPStore may hold one of its own)


def test_store_unreachable_fails_in_bounded_time():
    port = free_port()
    t0 = time.monotonic()
    check = doctor.check_store(f"127.0.0.1:{port}", 1.0)
    elapsed = time.monotonic() - t0
    assert check.verdict == "fail" and f"127.0.0.1:{port} is not reachable within 1 s" in check.summary
    assert "TCPStore" in check.fix and check.details["reachable"] is False
    assert elapsed < 20, elapsed  # 1 s connection timeout (torch retries it once) + a child's `import torch`


def test_store_bad_address():
    check = doctor.check_store("no-port-here", 1.0)
    assert check.verdict == "fail" and "--store expects HOST:PORT" in check.summary and check.fix


# ------------------------------------------------------------------------------------------ as a command


def test_module_command_json_and_exit_code():
    proc = run_command("-m", "mooncake.doctor", "--json")
    report = json.loads(proc.stdout)
    assert report["schema"] == doctor.SCHEMA
    assert proc.returncode == (1 if report["verdict"] == "fail" else 0), proc.stderr
    assert [c["name"] for c in report["checks"]][:3] == ["python", "mooncake", "torch"]


def test_console_script_entry_point_fails_on_fail():
    """pyproject's ``mooncake-doctor = "mooncake.doctor:main"``: main() returns the exit status."""
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'mooncake-doctor = "mooncake.doctor:main"' in pyproject
    proc = run_command("-c", "import sys; from mooncake.doctor import main; sys.exit(main())",
                       env={"MOONCAKE_IMPL": "bogus"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[fail] impl" in proc.stdout and "fix: set MOONCAKE_IMPL" in proc.stdout


# ------------------------------------------------------------------------------------------ CUDA lines (faked on CPU)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend torch sees ``n`` GPUs; returns a setter for the peer-access answer."""
    import torch

    state = {"peer": True, "n": 2}
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state["n"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: state["peer"])
    monkeypatch.setattr(doctor, "probe_ipc", lambda device, timeout_s: (True, {"child_saw": 1.0}, ""))
    monkeypatch.setattr(doctor, "_mps_status", lambda: {"daemon_processes": [], "pipe_directory": "/tmp/x",
                                                        "control_pipe": False})
    return state


def test_cuda_lines_two_gpus(fake_cuda):
    checks = {c.name: c for c in doctor.check_cuda(5.0)}
    assert list(checks) == ["cuda", "cuda.peer_access", "cuda.ipc", "cuda.mps"]
    assert checks["cuda"].verdict == "ok" and "2 GPU(s)" in checks["cuda"].summary
    assert checks["cuda.peer_access"].verdict == "ok"
    assert checks["cuda.ipc"].verdict == "ok"
    assert checks["cuda.mps"].verdict == "ok"  # not needed with one rank per GPU
    fake_cuda["peer"] = False
    checks = {c.name: c for c in doctor.check_cuda(5.0)}
    assert checks["cuda.peer_access"].verdict == "warn" and "0->1" in checks["cuda.peer_access"].summary


def test_cuda_lines_one_gpu_without_mps_warns(fake_cuda, monkeypatch):
    fake_cuda["n"] = 1
    monkeypatch.setattr(doctor, "probe_ipc", lambda device, timeout_s: (False, None, "no answer within 5 s"))
    checks = {c.name: c for c in doctor.check_cuda(5.0)}
    assert checks["cuda.peer_access"].verdict == "ok"
    assert checks["cuda.ipc"].verdict == "fail" and "--ipc=host" in checks["cuda.ipc"].fix
    assert checks["cuda.mps"].verdict == "warn" and "nvidia-cuda-mps-control -d" in checks["cuda.mps"].fix


def test_cuda_build_without_gpu_warns(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    [check] = doctor.check_cuda(5.0)
    assert check.verdict == "warn" and "sees no GPU" in check.summary and "nvidia-smi" in check.fix


def test_ipc_probe_plumbing_on_cpu():
    """The CUDA IPC probe's two-process exchange, run with a shared-memory CPU tensor."""
    ok, result, why = doctor.probe_ipc("cpu", 60.0)
    assert ok, (result, why)


# ------------------------------------------------------------------------------------------ native.cuda


def test_native_cuda_line_only_with_a_gpu():
    import torch

    if not torch.cuda.is_available():
        assert doctor.check_native_cuda() == []


@pytest.fixture
def cuda_build_env(fake_cuda, monkeypatch, tmp_path):
    """A fake GPU (sm_90) and a private CUDA cache; no library built, nvcc found."""
    from mooncake.fast.cuda import build

    for name in ("MOONCAKE_CSRC", "MOONCAKE_CUDA_ARCHS", "MOONCAKE_CUDA_LIB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOONCAKE_CUDA_CACHE", str(tmp_path / "cuda-cache"))
    monkeypatch.setattr(build, "device_archs", lambda: ["90"])
    monkeypatch.setattr(build, "nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    return tmp_path


def test_native_cuda_compiles_on_first_use(cuda_build_env):
    [check] = doctor.check_native_cuda()
    assert check.verdict == "ok" and "sm_90" in check.summary and "compiled on first use" in check.summary
    assert check.details["archs"] == ["90"] and check.details["sources_from"] == "checkout"


def test_native_cuda_missing_sources(cuda_build_env, monkeypatch):
    monkeypatch.setenv("MOONCAKE_CSRC", str(cuda_build_env / "nowhere"))
    [check] = doctor.check_native_cuda()
    assert check.verdict == "warn" and "CUDA sources are missing" in check.summary
    assert check.details["problem"] == "source-missing" and "MOONCAKE_CSRC" in check.fix


def test_native_cuda_old_gpu(cuda_build_env, monkeypatch):
    from mooncake.fast.cuda import build

    monkeypatch.setattr(build, "device_archs", lambda: ["75"])
    [check] = doctor.check_native_cuda()
    assert check.verdict == "warn" and "sm_75" in check.summary and check.details["problem"] == "arch"


def test_native_cuda_no_nvcc(cuda_build_env, monkeypatch):
    from mooncake.fast.cuda import build

    monkeypatch.setattr(build, "nvcc_path", lambda: None)
    [check] = doctor.check_native_cuda()
    assert check.verdict == "warn" and "no nvcc" in check.summary and "CUDA_HOME" in check.fix


def test_native_cuda_cache_writable_by_others(cuda_build_env):
    cache = cuda_build_env / "cuda-cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    [check] = doctor.check_native_cuda()
    assert check.verdict == "warn" and check.details["problem"] == "cache-writable-by-others"
    assert f"chmod go-w {cache}" in check.fix
