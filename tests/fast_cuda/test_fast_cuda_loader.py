"""CUDA fast path, parts that run anywhere: import without a GPU, the loader's reasons, the C ABI mirror."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_without_gpu_or_compiler():
    import mooncake
    import mooncake.fast.cuda as fc

    lib, reason = fc.load()
    assert (lib is None) != (reason is None)
    assert fc.unavailable_reason() == reason
    if reason is not None:
        assert isinstance(reason, str) and reason
    assert mooncake.__version__


def test_reason_names_cpu_only_torch():
    import torch

    from mooncake.fast.cuda import load

    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA")
    lib, reason = load()
    assert lib is None and "CPU-only" in reason and torch.__version__ in reason


def test_args_struct_matches_csrc():
    from mooncake.fast.cuda.lib import EP_ARG_FIELDS, McEpArgs

    src = (ROOT / "csrc" / "mooncake_ep_cuda.cu").read_text()
    body = re.search(r"struct McEpArgs \{(.*?)\};", src, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if decl:
            assert decl.startswith("int64_t "), decl
            names += [n.strip() for n in decl[len("int64_t "):].split(",")]
    assert tuple(names) == EP_ARG_FIELDS
    assert ctypes.sizeof(McEpArgs) == 8 * len(names)


def test_build_without_nvcc_says_so(monkeypatch, tmp_path):
    from mooncake.fast.cuda import build

    monkeypatch.setenv("MOONCAKE_CUDA_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "nvcc_path", lambda: None)
    with pytest.raises(build.BuildError, match="no nvcc"):
        build.build()


def test_missing_sources_are_named(monkeypatch, tmp_path):
    from mooncake.fast.cuda import build

    monkeypatch.setenv("MOONCAKE_CSRC", str(tmp_path))
    with pytest.raises(build.BuildError, match="not found"):
        build.source_hash()


def test_compiles_and_exports_the_abi(monkeypatch, tmp_path):
    """With nvcc on the machine (no GPU needed): the library builds, loads and agrees on the struct size."""
    from mooncake.fast.cuda import build
    from mooncake.fast.cuda.lib import ABI_VERSION, McEpArgs, McPgDevArgs, _declare

    if build.nvcc_path() is None:
        pytest.skip("no nvcc")
    monkeypatch.setenv("MOONCAKE_CUDA_CACHE", str(tmp_path))
    path = build.build()
    assert path.is_file() and build.find_cached() == path
    assert build.build() == path  # cached: no rebuild
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    assert lib.mc_abi_version() == ABI_VERSION
    assert lib.mc_ep_args_size() == ctypes.sizeof(McEpArgs)
    assert lib.mc_pg_dev_args_size() == ctypes.sizeof(McPgDevArgs)
    assert lib.mc_cudart_version() >= 12000
