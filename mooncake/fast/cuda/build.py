"""Build ``csrc/`` into ``libmooncake_ep_cuda.so`` with nvcc, ahead of time or on first use.

The library has a plain C ABI (loaded with ctypes), so it does not depend on torch's C++ ABI: only on
the CUDA driver being new enough for the runtime it was built with (``lib.py`` checks that).

Cache: ``$MOONCAKE_CUDA_CACHE`` (default ``$XDG_CACHE_HOME/mooncake/cuda`` or ``~/.cache/mooncake/cuda``),
one directory per ``cuda<nvcc release>-<archs>-<hash of sources and flags>``; builds are atomic
(compile to a temporary name, then rename) and serialised by a file lock, so R ranks starting at once
compile once.  Without nvcc a library already in the cache for the same sources is used.

Ahead of time: ``python -m mooncake.fast.cuda.build`` (prints the library's path).
Environment: ``MOONCAKE_CSRC`` (sources dir), ``MOONCAKE_CUDA_ARCHS`` (default ``90``; e.g. ``90;100``:
SASS for each, plus PTX of the last as a fallback for newer GPUs), ``CUDA_HOME`` / ``PATH`` for nvcc.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

LIB_NAME = "libmooncake_ep_cuda.so"
SOURCES = ("mooncake_ep_cuda.cu", "mooncake_pg_cuda.cu")
BASE_FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", "-lineinfo")


class BuildError(RuntimeError):
    """The library cannot be built or found; the message says what is missing."""


def csrc_dir() -> Path:
    env = os.environ.get("MOONCAKE_CSRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "csrc"


def archs() -> list[str]:
    raw = os.environ.get("MOONCAKE_CUDA_ARCHS", "90")
    out = [a.strip().replace("sm_", "").replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    if not out or not all(a.isdigit() for a in out):
        raise BuildError(f"MOONCAKE_CUDA_ARCHS={raw!r}: expected compute capabilities like '90' or '90;100'")
    return out


def arch_flags() -> list[str]:
    flags = []
    for a in archs():
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    last = archs()[-1]
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX fallback (JIT on newer GPUs)
    return flags


def source_hash() -> str:
    root = csrc_dir()
    h = hashlib.sha256()
    h.update(" ".join(BASE_FLAGS + tuple(arch_flags())).encode())
    for name in SOURCES:
        path = root / name
        if not path.is_file():
            raise BuildError(f"CUDA source {path} not found (a non-editable install lacks csrc/; "
                             "set MOONCAKE_CSRC or MOONCAKE_CUDA_LIB)")
        h.update(name.encode() + b"\0" + path.read_bytes())
    for hdr in sorted(root.glob("*.cuh")):
        h.update(hdr.name.encode() + b"\0" + hdr.read_bytes())
    return h.hexdigest()[:16]


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)


def nvcc_release(nvcc: str) -> str:
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"{nvcc} --version failed: {exc}") from None
    m = re.search(r"release (\d+\.\d+)", text)
    if not m:
        raise BuildError(f"cannot read the CUDA release from `{nvcc} --version`: {text.strip()[:200]}")
    return m.group(1)


def cache_root() -> Path:
    env = os.environ.get("MOONCAKE_CUDA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mooncake" / "cuda"


def _tag(release: str, digest: str) -> str:
    return f"cuda{release}-sm{'_'.join(archs())}-{digest}"


def find_cached(digest: str | None = None) -> Path | None:
    """A library in the cache built from these sources (any CUDA release), newest first."""
    digest = digest or source_hash()
    hits = sorted(glob.glob(str(cache_root() / f"cuda*-sm{'_'.join(archs())}-{digest}" / LIB_NAME)),
                  key=os.path.getmtime, reverse=True)
    return Path(hits[0]) if hits else None


def build(force: bool = False, verbose: bool = False) -> Path:
    """Return the path of a library built from the current sources; compile it if needed."""
    digest = source_hash()
    nvcc = nvcc_path()
    if nvcc is None:
        cached = find_cached(digest)
        if cached is not None and not force:
            return cached
        raise BuildError("no nvcc found (set CUDA_HOME or put nvcc on PATH) and no library built from these "
                         f"sources in {cache_root()} (build one with `python -m mooncake.fast.cuda.build`)")
    release = nvcc_release(nvcc)
    out_dir = cache_root() / _tag(release, digest)
    lib = out_dir / LIB_NAME
    if lib.is_file() and not force:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if lib.is_file() and not force:
                return lib
            tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
            cmd = [nvcc, *BASE_FLAGS, *arch_flags(), "-o", str(tmp),
                   *[str(csrc_dir() / s) for s in SOURCES]]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise BuildError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
            os.replace(tmp, lib)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return lib


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build mooncake's CUDA library (csrc/) into the cache.")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    args = parser.parse_args(argv)
    try:
        print(build(force=args.force, verbose=True))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
