"""Where mooncake's C / CUDA sources are, how they are compiled, and the cache that holds the results.

Standard library only: ``setup.py`` loads this file at wheel-build time (before torch or mooncake can
be imported), and ``mooncake.fast.cpu.native`` / ``mooncake.fast.cuda.build`` use it at run time.

Sources (``csrc_root``): ``$MOONCAKE_CSRC`` when set (an override), else the ``csrc/`` of the source
checkout this package sits in (editable installs, ``PYTHONPATH``), else the copy packaged in the wheel
(``mooncake/_csrc``).

Cache (``cache_dir``): ``$MOONCAKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mooncake``, else
``~/.cache/mooncake``, one sub-directory per kind (``cpu``, ``cuda``).  A compiled library is loaded
into the process, so the cache must be the user's own: ``secure_dir`` creates it ``0700`` and refuses
a directory owned by someone else or writable by group / others, and a parent directory that another
user could rename it from under us (writable by others without the sticky bit, or owned by another
user).  ``check_file`` refuses a library file with the same flaws.  Every refusal is a
``NativeProblem`` with a stable ``code``, a message naming the path, and a ``fix``; the doctor shows
them as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: the csrc/ of a source checkout (the package's parent holds pyproject.toml and csrc/)
CHECKOUT_CSRC = PACKAGE_DIR.parent / "csrc"
#: the copy of csrc/ that the wheel ships as package data
PACKAGED_CSRC = PACKAGE_DIR / "_csrc"

#: the CPU helper: its source (relative to csrc/), its library name and where a wheel ships it
CPU_SOURCE = "cpu/mooncake_shm.c"
CPU_LIB = "libmooncake_shm.so"
CPU_PREBUILT = PACKAGE_DIR / "fast" / "cpu" / CPU_LIB
CPU_PREBUILT_INFO = PACKAGE_DIR / "fast" / "cpu" / "libmooncake_shm.json"
#: portable flags: no -march=native (a library built on one CPU model must not SIGILL on another;
#: the C file picks wider vector paths at run time where the CPU has them), no FP contraction or
#: fast-math (the folds must give the model's bits)
CPU_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")

#: the CUDA sources (relative to csrc/) and headers that take part in the build
CUDA_SOURCES = ("mooncake_ep_cuda.cu", "mooncake_pg_cuda.cu")

#: every file the wheel copies into mooncake/_csrc
PACKAGED_FILES = (CPU_SOURCE, *CUDA_SOURCES)


class NativeProblem(RuntimeError):
    """Why a compiled helper cannot be built or loaded.

    ``code``: one of ``source-missing``, ``cache-not-owned``, ``cache-writable-by-others``,
    ``cache-not-writable``, ``no-compiler``, ``compiler-failed``, ``library-unsafe``;
    ``fix``: what to do about it.
    """

    def __init__(self, code: str, message: str, fix: str):
        super().__init__(message)
        self.code, self.fix = code, fix


# ------------------------------------------------------------------------------------------ sources


def is_checkout() -> bool:
    """Whether this package sits in a source checkout (editable install or on PYTHONPATH)."""
    return (PACKAGE_DIR.parent / "pyproject.toml").is_file() and CHECKOUT_CSRC.is_dir()


def csrc_root() -> tuple[Path, str]:
    """``(directory, origin)``: origin is ``MOONCAKE_CSRC``, ``checkout`` or ``package``."""
    env = os.environ.get("MOONCAKE_CSRC")
    if env:
        return Path(env), "MOONCAKE_CSRC"
    if is_checkout():
        return CHECKOUT_CSRC, "checkout"
    return PACKAGED_CSRC, "package"


def source_path(rel: str) -> Path:
    """The file ``rel`` (e.g. ``cpu/mooncake_shm.c``) of ``csrc_root()``; NativeProblem if it is missing."""
    root, origin = csrc_root()
    path = root / rel
    if path.is_file():
        return path
    if origin == "MOONCAKE_CSRC":
        fix = f"point MOONCAKE_CSRC at a directory holding {rel} (the csrc/ of a mooncake checkout), or unset it"
    elif origin == "package":
        fix = ("reinstall the package from a wheel built by `pip wheel .` (it ships csrc/ as mooncake/_csrc), "
               "or set MOONCAKE_CSRC to the csrc/ of a mooncake checkout")
    else:
        fix = f"restore {rel} in the checkout (git checkout -- csrc/{rel})"
    raise NativeProblem("source-missing", f"source {path} not found ({origin})", fix)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ cache


def cache_base() -> Path:
    env = os.environ.get("MOONCAKE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "mooncake" if xdg else Path(os.path.expanduser("~")) / ".cache" / "mooncake"


def cache_dir(kind: str) -> Path:
    return cache_base() / kind


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


_OTHER_DIR_FIX = "set MOONCAKE_CACHE_DIR to a directory of your own (e.g. ~/.cache/mooncake)"


def check_dir(path: Path) -> None:
    """Raise NativeProblem unless ``path`` (an existing directory) and its parents are safe to load from."""
    me = os.geteuid()
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NativeProblem("cache-not-writable", f"cache path {path} is not a directory",
                            f"remove {path} or {_OTHER_DIR_FIX}")
    if st.st_uid != me:
        raise NativeProblem("cache-not-owned", f"cache directory {path} belongs to {_user(st.st_uid)}, not to "
                            f"you ({_user(me)}): a library another user can replace would run as you",
                            _OTHER_DIR_FIX)
    if st.st_mode & 0o022:
        raise NativeProblem("cache-writable-by-others", f"cache directory {path} is writable by "
                            f"{'group and others' if st.st_mode & 0o022 == 0o022 else 'group' if st.st_mode & 0o020 else 'others'}"
                            f" (mode {stat.S_IMODE(st.st_mode):04o}): another user could plant a library in it",
                            f"chmod go-w {path}, or {_OTHER_DIR_FIX}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise NativeProblem("cache-not-writable", f"cache directory {path} is not writable by you "
                            f"(mode {stat.S_IMODE(st.st_mode):04o})", f"chmod u+rwx {path}, or {_OTHER_DIR_FIX}")
    parent = Path(path).resolve().parent
    while True:
        pst = os.stat(parent)
        sticky = bool(pst.st_mode & stat.S_ISVTX)
        if pst.st_uid not in (0, me) and not sticky:
            raise NativeProblem("cache-not-owned", f"cache directory {path} lies under {parent}, which belongs to "
                                f"{_user(pst.st_uid)}: its owner could swap the cache", _OTHER_DIR_FIX)
        if pst.st_mode & 0o022 and not sticky:
            raise NativeProblem("cache-writable-by-others", f"cache directory {path} lies under {parent}, which is "
                                f"writable by others (mode {stat.S_IMODE(pst.st_mode):04o}, no sticky bit): they "
                                "could swap the cache", f"chmod go-w {parent}, or {_OTHER_DIR_FIX}")
        if parent.parent == parent:
            return
        parent = parent.parent


def secure_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and check it with ``check_dir``; returns it."""
    path = Path(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise NativeProblem("cache-not-writable", f"cannot create cache directory {path}: {exc.strerror}",
                            f"make its parent writable, or {_OTHER_DIR_FIX}") from None
    check_dir(path)
    return path


def check_file(path: Path, allow_root: bool = False) -> None:
    """Raise NativeProblem unless ``path`` is a file owned by you (or root, for installed packages) that
    nobody else can write."""
    st = os.stat(path)
    owners = (os.geteuid(), 0) if allow_root else (os.geteuid(),)
    if st.st_uid not in owners or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
        raise NativeProblem("library-unsafe", f"{path} is owned by {_user(st.st_uid)} with mode "
                            f"{stat.S_IMODE(st.st_mode):04o}: refusing to load a library someone else can write",
                            f"remove {path} (it is rebuilt), or {_OTHER_DIR_FIX}")


# ------------------------------------------------------------------------------------------ the C helper


def c_compiler() -> list[str]:
    """``$CC`` (may carry arguments) or ``cc``."""
    return shlex.split(os.environ.get("CC") or "cc")


def compiler_version(cc: list[str]) -> str:
    """First line of ``cc --version`` (part of the cache key); NativeProblem if there is no such compiler."""
    if shutil.which(cc[0]) is None:
        raise NativeProblem("no-compiler", f"no C compiler: `{cc[0]}` is not on PATH",
                            "install one (e.g. `apt-get install gcc`) or set CC; or install mooncake from a wheel, "
                            "which ships the helper prebuilt")
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeProblem("no-compiler", f"`{' '.join(cc)} --version` failed: {exc}",
                            "fix the compiler or set CC to a working one") from None
    return (out.stdout.strip().splitlines() or [""])[0]


def cpu_key(source: bytes, cc: list[str], version: str, flags=CPU_FLAGS) -> str:
    """Cache key of the CPU helper: source, compiler (name and version), flags, machine."""
    h = hashlib.sha256(source)
    h.update(json.dumps([cc, version, list(flags), os.uname().machine]).encode())
    return h.hexdigest()[:20]


def compile_c(source: Path, out: Path, cc: list[str] | None = None, flags=CPU_FLAGS) -> None:
    """Compile ``source`` into the shared library ``out`` (atomically: a temporary file renamed into place)."""
    cc = cc or c_compiler()
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([*cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True,
                                  timeout=300)
        except FileNotFoundError:
            raise NativeProblem("no-compiler", f"no C compiler: `{cc[0]}` not found",
                                "install one (e.g. `apt-get install gcc`) or set CC") from None
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            raise NativeProblem("compiler-failed", f"`{' '.join([*cc, *flags])} {source}` failed "
                                f"(exit {proc.returncode}): {err[-600:]}",
                                "fix the compiler (try the command by hand) or set CC to a working one; "
                                "MOONCAKE_FAST_CPU_NATIVE=0 silences this and keeps the torch fallbacks")
        os.chmod(tmp, 0o755 & ~0o022)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_build_info(lib: Path, source: Path, cc: list[str], version: str, flags=CPU_FLAGS) -> Path:
    """The JSON next to a prebuilt library: which source (sha256), compiler and flags made it."""
    info = Path(lib).with_suffix(".json")
    info.write_text(json.dumps({"source": CPU_SOURCE, "source_sha256": sha256_file(source), "compiler": cc,
                                "compiler_version": version, "flags": list(flags),
                                "machine": os.uname().machine}, indent=1) + "\n")
    return info
