"""The CPU plane's compiled helper: where it comes from (prebuilt / first-use build), the cache's safety
checks, the problems it names, and its folds at every vector width, bitwise against the model."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mooncake import _nativebuild as nb
from mooncake.fast.cpu import native
from mooncake.model.reduce import ReduceOp, fold
from mooncake.testing.compare import bitwise_equal

REPO = Path(__file__).resolve().parents[2]


def _lib():
    if native.load() is None:
        pytest.skip(f"no compiled helpers: {native.reason}")
    return native.lib


# ------------------------------------------------------------------------------------------ folds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sum_every_vector_width_matches_model(dtype):
    lib = _lib()
    have = lib.mc_isa_limit(9)
    g = torch.Generator().manual_seed(1)
    try:
        for level in range(have + 1):
            assert lib.mc_isa_limit(level) == level
            for k in (1, 2, 3, 4):
                for n in (1, 15, 16, 17, 257, 4099):
                    xs = [(torch.randn(n, generator=g, dtype=torch.float64) * 1e3).to(dtype) for _ in range(k)]
                    for j, x in enumerate(xs):
                        x[:: 7] = float("nan")
                        x[3:: 11] = float("inf")
                        x[5:: 13] = -0.0
                        # NaNs of different payloads (quiet and signalling) where several inputs
                        # meet: which of two NaN operands an addition returns is part of the bits
                        bits = x.view(torch.int32 if dtype is torch.float32 else torch.int64)
                        quiet, signalling = (0x7FC00000, 0x7F800000) if dtype is torch.float32 else \
                            (0x7FF8000000000000, 0x7FF0000000000000)
                        bits[j % 2:: 5] = quiet | (j + 1)
                        bits[2 + j:: 9] = signalling | (j + 1)
                    want = fold(ReduceOp.SUM, xs)
                    for nt in (0, 1):
                        big = torch.empty(n + 16, dtype=dtype)
                        out = big[1: n + 1]  # misaligned output: scalar head, vector bulk, scalar tail
                        ptrs = (ctypes.c_void_p * k)(*[x.data_ptr() for x in xs])
                        getattr(lib, "mc_sum_f32" if dtype is torch.float32 else "mc_sum_f64")(
                            out.data_ptr(), ptrs, k, n, nt)
                        assert bitwise_equal(out, want), (level, k, n, nt)
    finally:
        lib.mc_isa_limit(have)
    assert native.isa == lib.mc_isa().decode()


def test_no_march_native_in_the_flags():
    assert not any(f.startswith(("-march", "-mtune", "-mavx", "-ffast-math")) for f in nb.CPU_FLAGS)
    assert "-ffp-contract=off" in nb.CPU_FLAGS


# ------------------------------------------------------------------------------------------ sources


def test_sources_checkout_override_and_package(monkeypatch, tmp_path):
    monkeypatch.delenv("MOONCAKE_CSRC", raising=False)
    assert nb.csrc_root() == (REPO / "csrc", "checkout")
    assert nb.source_path(nb.CPU_SOURCE) == REPO / "csrc" / nb.CPU_SOURCE
    monkeypatch.setenv("MOONCAKE_CSRC", str(tmp_path))
    assert nb.csrc_root() == (tmp_path, "MOONCAKE_CSRC")
    with pytest.raises(nb.NativeProblem) as err:
        nb.source_path(nb.CPU_SOURCE)
    assert err.value.code == "source-missing" and str(tmp_path) in str(err.value) and "MOONCAKE_CSRC" in err.value.fix
    monkeypatch.delenv("MOONCAKE_CSRC")
    packaged = tmp_path / "_csrc"
    monkeypatch.setattr(nb, "is_checkout", lambda: False)
    monkeypatch.setattr(nb, "PACKAGED_CSRC", packaged)
    with pytest.raises(nb.NativeProblem) as err:
        nb.source_path(nb.CPU_SOURCE)
    assert err.value.code == "source-missing" and "(package)" in str(err.value) and "pip wheel" in err.value.fix
    (packaged / "cpu").mkdir(parents=True)
    shutil.copy(REPO / "csrc" / nb.CPU_SOURCE, packaged / nb.CPU_SOURCE)
    assert nb.source_path(nb.CPU_SOURCE) == packaged / nb.CPU_SOURCE


def test_prebuilt_used_only_while_it_matches_the_checkout(monkeypatch, tmp_path):
    lib, info = tmp_path / nb.CPU_LIB, tmp_path / "libmooncake_shm.json"
    monkeypatch.setattr(nb, "CPU_PREBUILT", lib)
    monkeypatch.setattr(nb, "CPU_PREBUILT_INFO", info)
    monkeypatch.delenv("MOONCAKE_CSRC", raising=False)
    assert not native._prebuilt_matches()  # none
    lib.write_bytes(b"")
    info.write_text(json.dumps({"source_sha256": nb.sha256_file(REPO / "csrc" / nb.CPU_SOURCE)}))
    assert native._prebuilt_matches()
    info.write_text(json.dumps({"source_sha256": "0" * 64}))  # the C file changed since: compile it instead
    assert not native._prebuilt_matches()
    monkeypatch.setattr(nb, "is_checkout", lambda: False)  # an installed package: the prebuilt is the product
    assert native._prebuilt_matches()


# ------------------------------------------------------------------------------------------ cache


def test_cache_key_covers_source_compiler_and_flags():
    base = nb.cpu_key(b"src", ["cc"], "gcc 12")
    assert nb.cpu_key(b"src", ["cc"], "gcc 12") == base
    assert nb.cpu_key(b"src2", ["cc"], "gcc 12") != base
    assert nb.cpu_key(b"src", ["clang"], "gcc 12") != base
    assert nb.cpu_key(b"src", ["cc"], "gcc 13") != base
    assert nb.cpu_key(b"src", ["cc"], "gcc 12", flags=("-O2",)) != base


def test_first_use_build_into_a_private_cache(monkeypatch, tmp_path):
    if shutil.which(nb.c_compiler()[0]) is None:
        pytest.skip("no C compiler")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOONCAKE_CACHE_DIR", str(cache))
    path = native._compile_cached()
    assert path.parent == cache / "cpu" and path.name.startswith("libmooncake_shm-")
    assert stat.S_IMODE(os.stat(cache / "cpu").st_mode) == 0o700
    mtime = path.stat().st_mtime_ns
    assert native._compile_cached() == path and path.stat().st_mtime_ns == mtime  # cached, not rebuilt
    cdll = ctypes.CDLL(str(path))
    assert cdll.mc_abi() == native._ABI


def test_group_or_world_writable_cache_is_refused(tmp_path):
    d = tmp_path / "c"
    d.mkdir(mode=0o700)
    nb.check_dir(d)
    os.chmod(d, 0o770)
    with pytest.raises(nb.NativeProblem) as err:
        nb.check_dir(d)
    assert err.value.code == "cache-writable-by-others" and "chmod go-w" in err.value.fix
    os.chmod(d, 0o700)
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)  # a parent others can write without the sticky bit: they could swap the cache
    with pytest.raises(nb.NativeProblem) as err:
        nb.secure_dir(parent / "cache")
    assert err.value.code == "cache-writable-by-others" and str(parent) in str(err.value)
    os.chmod(parent, 0o777 | stat.S_ISVTX)  # like /tmp: fine
    assert nb.secure_dir(parent / "cache") == parent / "cache"


def test_cache_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(nb.NativeProblem) as err:
        nb.check_dir(d)
    assert err.value.code == "cache-not-owned" and "MOONCAKE_CACHE_DIR" in err.value.fix
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"")
    os.chmod(lib, 0o666)
    with pytest.raises(nb.NativeProblem) as err:
        nb.check_file(lib)
    assert err.value.code == "library-unsafe"


def test_failing_and_missing_compilers_are_named(tmp_path):
    out = tmp_path / "x.so"
    with pytest.raises(nb.NativeProblem) as err:
        nb.compile_c(REPO / "csrc" / nb.CPU_SOURCE, out, ["/nonexistent/cc"])
    assert err.value.code == "no-compiler"
    with pytest.raises(nb.NativeProblem) as err:
        nb.compiler_version(["/nonexistent/cc"])
    assert err.value.code == "no-compiler" and "CC" in err.value.fix
    if shutil.which("cc") is None:
        return
    with pytest.raises(nb.NativeProblem) as err:
        nb.compile_c(REPO / "csrc" / nb.CPU_SOURCE, out, ["cc", "--no-such-flag-for-mooncake"])
    assert err.value.code == "compiler-failed" and "no-such-flag" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".build-*"))


_PROBE = ("import json; from mooncake.fast.cpu import native; native.load(); "
          "print(json.dumps([native.problem, native.reason, native.fix, native.origin]))")


def _load_in_child(env: dict) -> list:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOONCAKE_")}
    full.update(env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=full, timeout=120,
                          cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_load_names_the_problem_and_falls_back(tmp_path):
    """End to end in fresh processes: an unsafe cache and a missing compiler each give the torch fallbacks
    with their own problem code and fix (a checkout has no prebuilt library, so it compiles)."""
    bad = tmp_path / "shared"
    bad.mkdir()
    os.chmod(bad, 0o777)
    problem, reason, fix, origin = _load_in_child({"MOONCAKE_CACHE_DIR": str(bad / "mc")})
    assert problem == "cache-writable-by-others" and origin is None and str(bad) in reason and "chmod" in fix
    problem, reason, fix, origin = _load_in_child({"MOONCAKE_CACHE_DIR": str(tmp_path / "ok"),
                                                   "CC": "/nonexistent/cc"})
    assert problem == "no-compiler" and "install" in fix


# ------------------------------------------------------------------------------------------ waits


def test_spin_until_ge_sees_a_word_reach_its_target_and_gives_up_on_time():
    """The spin the CUDA plane's host uses for a launch's DONE word: True at once when the word is there
    already, True when another thread stores it meanwhile (the GIL is released while it spins), False
    after its time when nobody does."""
    import threading
    import time
    _lib()
    word = ctypes.c_int64(5)
    addr = ctypes.addressof(word)
    assert native.spin_until_ge(addr, 5, 1.0) is True and native.spin_until_ge(addr, 4, 1.0) is True
    t0 = time.monotonic()
    assert native.spin_until_ge(addr, 6, 0.02) is False
    assert 0.02 <= time.monotonic() - t0 < 1.0
    threading.Timer(0.05, lambda: native.store_fence(addr, 9)).start()
    t0 = time.monotonic()
    assert native.spin_until_ge(addr, 9, 5.0) is True
    assert time.monotonic() - t0 < 2.0 and word.value == 9
