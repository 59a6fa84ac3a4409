"""The wheel is the product: build it (``pip wheel``), install it into a fresh venv, and from outside the
source tree check that the doctor finds every native CPU piece in place (prebuilt, no compiler needed)
and that a 2-rank all_reduce runs on the fast plane; its speed is printed next to the editable install's.

The fresh venv gets the wheel only (``--no-deps``); torch, numpy and ucxx come from this test's own
environment through a ``.pth`` line (a plain path: the editable install's own ``.pth`` hooks there are not
run, so ``import mooncake`` can only find the wheel's copy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: what an sdist carries (MANIFEST.in): enough to build the wheel
SDIST_PARTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "LICENSE", "README.md", "mooncake", "csrc")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONCAKE_", "PYTHON"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=kw.pop("timeout", 240), **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for part in SDIST_PARTS:
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        else:
            shutil.copy(REPO / part, src / part)
    dist = tmp / "dist"
    # no build isolation: the test extra brings setuptools>=77 into this environment (no download)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", dist],
         env=_env())
    [wheel] = list(dist.glob("*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(site, "_mooncake_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], env=_env())
    cache = tmp / "cache"  # empty, and no compiler: anything that tried to compile would fail
    cache.mkdir(mode=0o700)
    work = tmp / "work"  # outside the source tree
    work.mkdir()
    env = _env(MOONCAKE_CACHE_DIR=str(cache), CC="/nonexistent/cc")
    return {"wheel": wheel, "py": py, "site": Path(site), "cache": cache, "work": work, "env": env}


def test_wheel_contents(wheel_env):
    wheel = wheel_env["wheel"]
    assert wheel.name.startswith("mooncake_ft-") and "-py3-none-linux_" in wheel.name, wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("mooncake/fast/cpu/libmooncake_shm.so", "mooncake/fast/cpu/libmooncake_shm.json",
                   "mooncake/_csrc/cpu/mooncake_shm.c", "mooncake/_csrc/mooncake_ep_cuda.cu",
                   "mooncake/_csrc/mooncake_pg_cuda.cu", "mooncake/py.typed"):
        assert needed in names, needed
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "csrc/")) for n in names)
    meta = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("METADATA"))
    assert "Name: mooncake-ft" in meta and "Requires-Python: >=3.11" in meta
    assert 'ucxx-cu13>=0.52; extra == "cu13"' in meta and 'ucxx-cu12>=0.52; extra == "cu12"' in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not any("numba" in r or "mpi4py" in r for r in requires), requires  # (the README may name them)


def test_doctor_from_the_installed_wheel(wheel_env):
    proc = subprocess.run([wheel_env["py"], "-m", "mooncake.doctor", "--json"], capture_output=True, text=True,
                          timeout=240, cwd=wheel_env["work"], env=wheel_env["env"])
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["mooncake"]["details"]["location"].startswith(str(wheel_env["site"])), checks["mooncake"]
    assert checks["mooncake"]["details"]["install"] == "installed package"
    native = [c for c in report["checks"] if c["name"].startswith("native")]
    assert [c["name"] for c in native][:2] == ["native", "native.cpu"]
    for check in native:
        assert check["verdict"] == "ok", check
    cpu = checks["native.cpu"]["details"]
    assert cpu["origin"] == "package" and cpu["path"].startswith(str(wheel_env["site"])), cpu
    assert cpu["sources_from"] == "package" and cpu["isa"], cpu
    assert report["verdict"] != "fail", [c for c in report["checks"] if c["verdict"] == "fail"]
    assert not any(wheel_env["cache"].iterdir()), "the installed wheel compiled something"
    # the CUDA sources are found in the package (compiling them needs a GPU machine)
    probe = ("from mooncake.fast.cuda import build; from mooncake import _nativebuild as nb; "
             "print(build.csrc_dir(), nb.csrc_root()[1], build.source_hash())")
    out = _run([wheel_env["py"], "-c", probe], cwd=wheel_env["work"], env=wheel_env["env"]).stdout.split()
    assert out[0] == str(wheel_env["site"] / "mooncake" / "_csrc") and out[1] == "package"


def _all_reduce(py, pgbench: Path, cwd: Path, env: dict, out: Path) -> dict:
    cmd = [py, pgbench, "--collective", "all_reduce", "-g", "2", "-b", "4M", "-e", "4M", "-n", "20", "-w", "3",
           "-R", "3", "--stat", "min", "--backend", "mooncake-cpu:fast", "-J", out, "--no-progress"]
    _run(cmd, cwd=cwd, env=env, timeout=240)
    data = json.loads(out.read_text())
    assert data["meta"]["implementations"]["mooncake-cpu:fast"].startswith("fast"), data["meta"]
    [row] = data["results"]
    for mode in ("out_of_place", "in_place"):
        assert row[mode]["wrong"] == 0, row
    return row


def test_all_reduce_on_the_fast_plane_from_the_wheel(wheel_env, tmp_path, capsys):
    bench = wheel_env["work"] / "pgbench.py"  # a copy outside the tree: it cannot reach the checkout
    shutil.copy(REPO / "benchmarks" / "pgbench.py", bench)
    probe = "from mooncake.fast.cpu import native; native.load(); print(native.origin, native.isa, native.reason)"
    origin = _run([wheel_env["py"], "-c", probe], cwd=wheel_env["work"], env=wheel_env["env"]).stdout.split()
    assert origin[0] == "package", origin
    wheel = _all_reduce(wheel_env["py"], bench, wheel_env["work"], wheel_env["env"], tmp_path / "wheel.json")
    editable = _all_reduce(sys.executable, REPO / "benchmarks" / "pgbench.py", REPO, _env(), tmp_path / "edit.json")
    with capsys.disabled():
        w, e = wheel["in_place"]["time_us"], editable["in_place"]["time_us"]
        print(f"\n  all_reduce 4 MiB, 2 ranks, mooncake-cpu:fast: wheel ({origin[0]} helper, {origin[1]}) "
              f"{w:.0f} us, editable install {e:.0f} us (x{e / w:.2f})")
