"""Shared driver code of the NVSHMEM probes (nvshmem_probe.py, nvshmem_ep.py): build, launch, bootstrap.

Parent side: ``build`` compiles a ``.cu`` that includes ``nvshmem_common.cuh`` against the
nvidia-nvshmem-cu13 wheel (cached by content hash); ``launch`` spawns R child processes on one GPU
(optionally under a private CUDA MPS daemon), gives every child a deadline, kills whatever is left on exit
and stops the daemon.  Child side: ``bootstrap`` moves the 128-byte NVSHMEM unique ID through a TCPStore
and initialises NVSHMEM through the shim (a failed init is a status, not an exit); ``store_barrier`` waits
for every rank with a deadline.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
COMMON_HEADER = HERE / "nvshmem_common.cuh"
CSRC = HERE.parent.parent / "csrc"  # mc_device_sync.cuh, shared with the library's kernels
STORE_TIMEOUT_S = 60


def nvshmem_root(override: str | None = None) -> Path:
    """The wheel's ``nvidia/nvshmem`` folder (holding ``include/`` and ``lib/``), or ``override``."""
    if override:
        return Path(override)
    try:
        import nvidia.nvshmem  # the nvidia-nvshmem-cu13 wheel (a namespace package)
    except ImportError as exc:
        raise SystemExit(
            "nvidia-nvshmem-cu13 is not importable: pip install it, or pass --nvshmem-root DIR "
            "(the wheel's nvidia/nvshmem folder)"
        ) from exc
    return Path(list(nvidia.nvshmem.__path__)[0])


def detect_arch(arch: str | None) -> str:
    """``arch`` if given, else the first GPU's compute capability as ``"90"``, else ``"90"`` (H100)."""
    if arch:
        return arch
    import torch

    major, minor = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0)
    return f"{major}{minor}"


def build(source: Path, build_dir: Path, arch: str, root: Path) -> Path:
    """Compile and link ``source`` into a shared library in ``build_dir``; reuse it if the inputs are unchanged.

    The name carries a hash of the source, the common headers, ``arch`` and ``root``.
    """
    digest = hashlib.sha256()
    for part in (source.read_bytes(), COMMON_HEADER.read_bytes(), (CSRC / "mc_device_sync.cuh").read_bytes(),
                 arch.encode(), str(root).encode()):
        digest.update(part)
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"lib{source.stem}-{digest.hexdigest()[:12]}.so"
    if lib.exists():
        return lib
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["nvcc", "-O2", "-std=c++17", "-rdc=true", f"-arch=sm_{arch}", "-Xcompiler", "-fPIC", "-shared",
           f"-I{HERE}", f"-I{CSRC}", str(source), str(root / "lib" / "libnvshmem_device.a"), f"-I{root / 'include'}",
           f"-L{root / 'lib'}", "-l:libnvshmem_host.so.3", "-Xlinker", "-rpath", "-Xlinker", str(root / "lib"),
           "-o", str(tmp)]
    subprocess.run(cmd, check=True)
    tmp.rename(lib)
    return lib


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_common_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """Options every driver has, plus the hidden ones that ``launch`` passes to its children."""
    p.add_argument("--ranks", type=int, default=2, help="processes (NVSHMEM PEs), all on GPU 0")
    p.add_argument("--mps", action="store_true", help="start a private CUDA MPS daemon for the run (and stop it)")
    p.add_argument("--arch", default=None, help="sm_XX to compile for (default: GPU 0's, else 90)")
    p.add_argument("--out", default=default_out, help="output folder (rank<r>.json, rank<r>.log, summary.json)")
    p.add_argument("--build-dir", default=None, help="where compiled libraries are cached (default: OUT/build)")
    p.add_argument("--nvshmem-root", default=None, help="the wheel's nvidia/nvshmem folder (default: import it)")
    p.add_argument("--limit-s", type=float, default=120,
                   help="wall-clock limit of the whole run; children still running then are killed")
    p.add_argument("--compile-only", action="store_true", help="build the library and exit")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lib", default=None, help=argparse.SUPPRESS)


def compile_for(args, source: Path) -> Path:
    """Build ``source`` as the command line asks (``--arch``, ``--build-dir``, ``--nvshmem-root``)."""
    out = Path(args.out)
    build_dir = Path(args.build_dir) if args.build_dir else out / "build"
    return build(source, build_dir, detect_arch(args.arch), nvshmem_root(args.nvshmem_root))


def driver_start(args, source: Path) -> tuple[Path, Path] | None:
    """The driver's first steps: make ``--out``, build ``source`` (printing the library); None when
    ``--compile-only`` asked for nothing more, else (out, library)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lib = compile_for(args, source)
    print(f"built {lib}")
    return None if args.compile_only else (out, lib)


def launch(args, lib: Path, child_argv: Callable[[int], list[str]], extra_env: dict[str, str]) -> list[int | None]:
    """Run ``args.ranks`` children ``python <script> --child r ... <child_argv(r)>`` on GPU 0; returns exit codes.

    Children share a TCPStore hosted here (port passed as ``--port``), have ``LD_LIBRARY_PATH`` on the
    wheel, ``NVSHMEM_DISABLE_NVLS=1``, ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100/R`` and ``extra_env``; with
    ``--mps`` a daemon with private pipe and log folders runs for the duration.  Every child is killed
    (its whole session) once ``args.limit_s`` has passed or on any exit from here, SIGTERM included (a
    child that calls ``die_with_parent`` also goes if this process is SIGKILLed); exit code None = killed.
    """
    import torch.distributed as dist

    out = Path(args.out)
    script = Path(sys.argv[0]).resolve()
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=timedelta(seconds=STORE_TIMEOUT_S),
                          wait_for_workers=False)
    root = nvshmem_root(args.nvshmem_root)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{root / 'lib'}:" + env.get("LD_LIBRARY_PATH", "")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
    env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, 100 // args.ranks))
    env.update(extra_env)
    mps_dirs = None
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the cleanup below
    try:
        if args.mps:
            mps_dirs = (tempfile.mkdtemp(prefix="mps-pipe-"), tempfile.mkdtemp(prefix="mps-log-"))
            env.update(CUDA_MPS_PIPE_DIRECTORY=mps_dirs[0], CUDA_MPS_LOG_DIRECTORY=mps_dirs[1])
            subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True, timeout=30)
        for r in range(args.ranks):
            argv = [sys.executable, str(script), "--child", str(r), "--ranks", str(args.ranks), "--out", str(out),
                    "--port", str(port), "--lib", str(lib), *child_argv(r)]
            with open(out / f"rank{r}.log", "w") as log:
                procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + args.limit_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        codes = []
        for proc in procs:
            killed = proc.poll() is None
            if killed:
                os.killpg(proc.pid, 9)
                proc.wait(10)
            codes.append(None if killed else proc.returncode)
        if mps_dirs:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env, timeout=30)
            for d in mps_dirs:
                shutil.rmtree(d, ignore_errors=True)
        del store
    return codes


def die_with_parent() -> None:
    """Child side, first thing: get SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG; Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def read_rank_outputs(out: Path, ranks: int) -> dict[int, dict | None]:
    """``OUT/rank<r>.json`` of every rank, None where a rank wrote nothing."""
    result = {}
    for r in range(ranks):
        f = out / f"rank{r}.json"
        result[r] = json.loads(f.read_text()) if f.exists() else None
    return result


class RankRecord:
    """A child's ``OUT/rank<r>.json``, rewritten after every step so that a killed rank leaves its progress."""

    def __init__(self, out: Path, rank: int):
        self.path = out / f"rank{rank}.json"
        self.data: dict = {"rank": rank, "pid": os.getpid()}

    def __setitem__(self, key, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))


def store_barrier(store, name: str, rank: int, ranks: int, timeout_s: float = STORE_TIMEOUT_S) -> None:
    """Every rank sets ``barrier/<name>/<rank>`` and waits for all of them (raises after ``timeout_s``)."""
    store.set(f"barrier/{name}/{rank}", b"1")
    store.wait([f"barrier/{name}/{r}" for r in range(ranks)], timedelta(seconds=timeout_s))


def bootstrap(args, record: RankRecord):
    """Child side: load the shim and initialise NVSHMEM from the unique ID that rank 0 puts in the Store.

    Returns ``(lib, store, status)``: status 0 = initialised (``pe``, ``npes`` recorded), else the shim's
    status or -1 for a malformed ID (recorded as ``init_status`` / ``error``; NVSHMEM must not be used then).
    """
    import torch
    import torch.distributed as dist

    rank, ranks = args.child, args.ranks
    torch.cuda.set_device(0)
    torch.cuda.init()
    lib = ctypes.CDLL(args.lib)
    lib.mc_nvs_malloc.restype = ctypes.c_int64
    lib.mc_nvs_malloc.argtypes = [ctypes.c_int64]
    lib.mc_nvs_free.argtypes = [ctypes.c_int64]
    lib.mc_nvs_ptr.restype = ctypes.c_int64
    lib.mc_nvs_ptr.argtypes = [ctypes.c_int64, ctypes.c_int]
    store = dist.TCPStore("127.0.0.1", args.port, None, False, timeout=timedelta(seconds=STORE_TIMEOUT_S))
    size = lib.mc_nvs_uid_size()
    record["uid_bytes"] = size
    uid = (ctypes.c_uint8 * size)()
    if rank == 0:
        record["get_uid"] = lib.mc_nvs_get_uid(uid)
        store.set("nvshmem/uid", bytes(uid))
    raw = store.get("nvshmem/uid")
    if len(raw) != size:
        record["error"] = f"the Store's UID has {len(raw)} bytes, expected {size}"
        return lib, store, -1
    ctypes.memmove(uid, raw, size)
    t = time.perf_counter()
    status = lib.mc_nvs_init(uid, rank, ranks)
    record["init_s"] = time.perf_counter() - t
    record["init_status"] = status
    if status == 0:
        record["pe"] = lib.mc_nvs_my_pe()
        record["npes"] = lib.mc_nvs_n_pes()
    return lib, store, status
