"""The CUDA build's CPU-side logic, without a GPU: architectures from the devices present, the cache key
(sources, archs, CUDA and torch versions), sources from the package, and the cache's safety checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mooncake import _nativebuild as nb
from mooncake.fast.cuda import build

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    for name in ("MOONCAKE_CSRC", "MOONCAKE_CUDA_ARCHS", "MOONCAKE_CUDA_LIB", "MOONCAKE_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOONCAKE_CUDA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "device_archs", lambda: ["90"])
    return tmp_path


def test_archs_follow_the_devices(monkeypatch):
    assert build.archs() == ["90"]
    monkeypatch.setattr(build, "device_archs", lambda: ["80", "90"])
    assert build.archs() == ["80", "90"]
    flags = build.arch_flags()
    assert "arch=compute_80,code=sm_80" in flags and "arch=compute_90,code=compute_90" in flags
    monkeypatch.setattr(build, "device_archs", lambda: [])
    assert build.archs() == list(build.DEFAULT_ARCHS)  # no GPU: an ahead-of-time default
    monkeypatch.setenv("MOONCAKE_CUDA_ARCHS", "sm_100;90")
    assert build.archs() == ["90", "100"]  # the override wins


def test_older_than_sm80_is_refused(monkeypatch):
    monkeypatch.setattr(build, "device_archs", lambda: ["75"])
    with pytest.raises(build.BuildError) as err:
        build.archs()
    assert err.value.code == "arch" and "sm_75" in str(err.value)
    monkeypatch.setenv("MOONCAKE_CUDA_ARCHS", "nonsense!")
    with pytest.raises(build.BuildError, match="expected compute capabilities"):
        build.archs()


def test_key_covers_sources_arch_cuda_and_torch(monkeypatch):
    base = build.source_hash()
    monkeypatch.setattr(build, "device_archs", lambda: ["80"])
    assert build.source_hash() != base
    monkeypatch.setattr(build, "device_archs", lambda: ["90"])
    assert build.source_hash() == base
    monkeypatch.setattr(build, "torch_versions", lambda: ("2.99.0", "12.8"))
    other_torch = build.source_hash()
    assert other_torch != base
    assert build._tag("13.0", other_torch) == f"cuda13.0-sm90-torch2.99.0-{other_torch}"
    monkeypatch.setattr(build, "torch_versions", lambda: ("2.99.0", "13.0"))
    assert build.source_hash() != other_torch  # torch's CUDA version


def test_sources_from_the_package(monkeypatch, tmp_path):
    checkout = build.source_hash()
    packaged = tmp_path / "_csrc"
    packaged.mkdir()
    monkeypatch.setattr(nb, "is_checkout", lambda: False)
    monkeypatch.setattr(nb, "PACKAGED_CSRC", packaged)
    with pytest.raises(build.BuildError) as err:
        build.source_hash()
    assert err.value.code == "source-missing" and "(package)" in str(err.value) and "MOONCAKE_CSRC" in err.value.fix
    for name in [*build.SOURCES, *(h.name for h in (REPO / "csrc").glob("*.cuh"))]:  # as setup.py packages them
        shutil.copy(REPO / "csrc" / name, packaged / name)
    assert build.csrc_dir() == packaged
    assert build.source_hash() == checkout  # same files, same key
    monkeypatch.setenv("MOONCAKE_CSRC", str(REPO / "csrc"))  # the override wins over the package
    assert build.csrc_dir() == REPO / "csrc"


def _fake_cached(tmp_path) -> Path:
    digest = build.source_hash()
    lib = build.cache_root() / build._tag("13.0", digest) / build.LIB_NAME
    lib.parent.mkdir(parents=True, mode=0o700)
    os.chmod(build.cache_root(), 0o700)
    lib.write_bytes(b"not really a library")
    os.chmod(lib, 0o755)
    return lib


def test_cached_library_without_nvcc(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "nvcc_path", lambda: None)
    with pytest.raises(build.BuildError) as err:
        build.build()
    assert err.value.code == "no-nvcc" and "CUDA_HOME" in err.value.fix
    lib = _fake_cached(tmp_path)
    assert build.build() == lib
    os.chmod(lib, 0o666)
    with pytest.raises(build.BuildError) as err:
        build.build()
    assert err.value.code == "library-unsafe"


def test_cache_writable_by_others_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "nvcc_path", lambda: "/fake/nvcc")
    monkeypatch.setattr(build, "nvcc_release", lambda nvcc: "13.0")
    cache = build.cache_root()
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    with pytest.raises(build.BuildError) as err:
        build.build()
    assert err.value.code == "cache-writable-by-others" and f"chmod go-w {cache}" in err.value.fix
    assert "MOONCAKE_CUDA_CACHE" in err.value.fix
    os.chmod(cache, 0o700)
    lib = _fake_cached(tmp_path)
    assert build.build() == lib  # already built for this key: no nvcc run
