"""Build the CUDA sources into ``libmooncake_ep_cuda.so`` with nvcc, on first use (or ahead of time).

The library has a plain C ABI (loaded with ctypes), so it does not depend on torch's C++ ABI: only on
the CUDA driver being new enough for the runtime it was built with (``lib.py`` checks that).

Sources: the package ships them (``mooncake/_csrc``, from ``csrc/`` at wheel-build time); a source
checkout uses its ``csrc/``; ``MOONCAKE_CSRC`` overrides both (``mooncake._nativebuild.csrc_root``).

Architectures: the compute capabilities of the GPUs this process sees (sm_80 and newer; e.g. ``90``
on an H100), SASS for each plus PTX of the newest as a fallback; ``MOONCAKE_CUDA_ARCHS`` (e.g.
``90;100``) overrides, and a machine without a visible GPU builds for ``90``.

Cache: ``$MOONCAKE_CUDA_CACHE``, else the ``cuda`` directory of mooncake's cache (``$MOONCAKE_CACHE_DIR``,
``$XDG_CACHE_HOME/mooncake`` or ``~/.cache/mooncake``), which must be the user's own (created 0700;
one owned by someone else or writable by others is refused, ``_nativebuild.secure_dir``).  One directory
per ``cuda<nvcc release>-sm<archs>-torch<version>-<hash>``, the hash covering the sources, headers,
flags, architectures and torch's CUDA version; builds are atomic (compile to a temporary name, then
rename) and serialised by a file lock, so R ranks starting at once compile once.  Without nvcc a
library already in the cache for the same key (any nvcc release) is used.

Why nvcc and not NVRTC: the library holds host code too (IPC handles, allocations, launches with
their stream and grid logic); NVRTC compiles device code only, so using it would move all of that to
Python over the driver API.  nvcc comes with any CUDA toolkit (``CUDA_HOME``, ``PATH``,
``/usr/local/cuda``); the doctor's ``native.cuda`` line says what is missing.

Ahead of time: ``python -m mooncake.fast.cuda.build [--arch 90]`` (prints the library's path).
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

from ... import _nativebuild as nb

LIB_NAME = "libmooncake_ep_cuda.so"
SOURCES = nb.CUDA_SOURCES
BASE_FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", "-lineinfo")
#: the oldest compute capability the kernels are written for (acquire/release PTX, BF16, FP8 conversions)
MIN_ARCH = 80
DEFAULT_ARCHS = ("90",)


class BuildError(RuntimeError):
    """The library cannot be built or found; the message says what is missing (``code``: a
    ``_nativebuild.NativeProblem`` code, ``no-nvcc``, ``nvcc-failed`` or ``arch``; ``fix``: what to do)."""

    def __init__(self, message: str, code: str = "build", fix: str | None = None):
        super().__init__(message)
        self.code, self.fix = code, fix


def csrc_dir() -> Path:
    return nb.csrc_root()[0]


def device_archs() -> list[str]:
    """Compute capabilities of the GPUs torch sees (``["90"]`` on an H100), sorted; [] without any."""
    try:
        import torch

        if not torch.version.cuda or not torch.cuda.is_available():
            return []
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # noqa: BLE001 - no torch / no driver: nothing detected
        return []
    return [f"{major}{minor}" for major, minor in sorted(caps)]


def archs() -> list[str]:
    raw = os.environ.get("MOONCAKE_CUDA_ARCHS")
    if raw:
        out = [a.strip().replace("sm_", "").replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
        if not out or not all(a.isdigit() for a in out):
            raise BuildError(f"MOONCAKE_CUDA_ARCHS={raw!r}: expected compute capabilities like '90' or '90;100'",
                             "arch", "set MOONCAKE_CUDA_ARCHS like '90' or '80;90', or unset it")
    else:
        out = device_archs() or list(DEFAULT_ARCHS)
    old = [a for a in out if int(a) < MIN_ARCH]
    if old:
        raise BuildError(f"compute capability {', '.join('sm_' + a for a in old)} is older than sm_{MIN_ARCH}, "
                         "which mooncake's CUDA kernels need", "arch",
                         f"use GPUs of sm_{MIN_ARCH} or newer (A100, H100, ...); mooncake-cpu and the ref plane "
                         "still work")
    return sorted(set(out), key=int)


def arch_flags() -> list[str]:
    flags = []
    for a in archs():
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    last = archs()[-1]
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX fallback (JIT on newer GPUs)
    return flags


def torch_versions() -> tuple[str, str]:
    """``(torch version, torch's CUDA version)``, part of the cache key."""
    try:
        import torch

        return torch.__version__, str(torch.version.cuda)
    except ImportError:  # pragma: no cover - torch is a dependency
        return "none", "none"


def source_hash() -> str:
    root, origin = nb.csrc_root()
    h = hashlib.sha256()
    h.update(" ".join(BASE_FLAGS + tuple(arch_flags())).encode())
    h.update(" ".join(torch_versions()).encode())
    for name in SOURCES:
        path = root / name
        if not path.is_file():
            raise BuildError(f"CUDA source {path} not found ({origin})", "source-missing",
                             "reinstall mooncake from a wheel built by `pip wheel .` (it ships the sources as "
                             "mooncake/_csrc), or set MOONCAKE_CSRC to the csrc/ of a checkout, or MOONCAKE_CUDA_LIB "
                             "to a built library")
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
    return Path(env).expanduser() if env else nb.cache_dir("cuda")


def _torch_tag() -> str:
    return "torch" + re.sub(r"[^0-9A-Za-z.]+", "_", torch_versions()[0])


def _tag(release: str, digest: str) -> str:
    return f"cuda{release}-sm{'_'.join(archs())}-{_torch_tag()}-{digest}"


def _secure_root() -> Path:
    try:
        return nb.secure_dir(cache_root())
    except nb.NativeProblem as exc:
        raise BuildError(str(exc).replace("MOONCAKE_CACHE_DIR", "MOONCAKE_CUDA_CACHE"), exc.code,
                         exc.fix.replace("MOONCAKE_CACHE_DIR", "MOONCAKE_CUDA_CACHE (or MOONCAKE_CACHE_DIR)")) from None


def _checked(lib: Path) -> Path:
    try:
        nb.check_dir(lib.parent)
        nb.check_file(lib)
    except nb.NativeProblem as exc:
        raise BuildError(str(exc), exc.code, exc.fix) from None
    return lib


def find_cached(digest: str | None = None) -> Path | None:
    """A library in the cache built from these sources for these archs and torch (any nvcc), newest first."""
    digest = digest or source_hash()
    hits = sorted(glob.glob(str(cache_root() / f"cuda*-sm{'_'.join(archs())}-{_torch_tag()}-{digest}" / LIB_NAME)),
                  key=os.path.getmtime, reverse=True)
    return Path(hits[0]) if hits else None


def build(force: bool = False, verbose: bool = False) -> Path:
    """Return the path of a library built from the current sources; compile it if needed."""
    digest = source_hash()
    nvcc = nvcc_path()
    if nvcc is None:
        cached = find_cached(digest)
        if cached is not None and not force:
            return _checked(cached)
        raise BuildError("no nvcc found (set CUDA_HOME or put nvcc on PATH) and no library built from these "
                         f"sources for sm_{'/'.join(archs())} and torch {torch_versions()[0]} in {cache_root()}",
                         "no-nvcc", "install a CUDA toolkit whose release the driver supports (torch has CUDA "
                         f"{torch_versions()[1]}) and set CUDA_HOME or put nvcc on PATH; or build once where nvcc "
                         "exists (`python -m mooncake.fast.cuda.build`) into the same MOONCAKE_CUDA_CACHE")
    release = nvcc_release(nvcc)
    out_dir = _secure_root() / _tag(release, digest)
    lib = out_dir / LIB_NAME
    if lib.is_file() and not force:
        return _checked(lib)
    out_dir.mkdir(mode=0o700, exist_ok=True)
    try:
        nb.check_dir(out_dir)
    except nb.NativeProblem as exc:
        raise BuildError(str(exc), exc.code, exc.fix) from None
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if lib.is_file() and not force:
                return _checked(lib)
            tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
            cmd = [nvcc, *BASE_FLAGS, *arch_flags(), "-o", str(tmp),
                   *[str(csrc_dir() / s) for s in SOURCES]]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise BuildError(f"nvcc failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}",
                                 "nvcc-failed", "check the nvcc release against the sources (CUDA 12.x or 13.x) "
                                 "and the architectures (MOONCAKE_CUDA_ARCHS); run the command above by hand")
            os.chmod(tmp, 0o755)
            os.replace(tmp, lib)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _checked(lib)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build mooncake's CUDA library (csrc/) into the cache.")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    parser.add_argument("--arch", default=None, help="compute capabilities, e.g. 90 or '80;90' (default: "
                        "MOONCAKE_CUDA_ARCHS, else the GPUs present, else 90)")
    args = parser.parse_args(argv)
    if args.arch:
        os.environ["MOONCAKE_CUDA_ARCHS"] = args.arch
    try:
        print(build(force=args.force, verbose=True))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
