"""NVSHMEM probe for docs/design/internode.md: bootstrap through our Store, put-with-signal keys, deadlines.

NOT RUN YET (written without a GPU; the .cu compiles and links against the nvidia-nvshmem-cu13 3.4.5 wheel).
For the GPU machine, one GPU, R processes under MPS (feasibility.md, Experiment 6)::

    python benchmarks/internode/nvshmem_probe.py --ranks 2 --mps --out /tmp/probe
    python benchmarks/internode/nvshmem_probe.py --ranks 4 --mps --remote-ucx --out /tmp/probe-ucx

Each rank: takes the 128-byte NVSHMEM unique ID from a TCPStore (rank 0 writes it), initialises through the
shim (a failed init returns a status instead of exiting), checks its PE number, allocates one symmetric
region (the only NVSHMEM collective after init), then runs ring rounds: every PE sends ``--bytes`` to the
next with one put-with-signal carrying ``epoch << 48 | seq << 16 | count`` and waits for the previous PE's
key with a deadline that clears ``active[prev]`` -- first through ``nvshmem_ptr`` (direct), then with
``force_put`` (the remote code path over whatever transport NVSHMEM chose).  One round has the last PE
silent: its next PE must time out and clear its bit, the others must not; the round after must succeed
again (keys, not flags).  Then ``nvshmem_finalize`` (every PE alive).  ``--remote-ucx`` sets
``NVSHMEM_REMOTE_TRANSPORT=ucx`` and ``NVSHMEM_DISABLE_P2P=1`` (design §10 item 4: a proxy-driven remote path
without a NIC; whether NVSHMEM accepts that on one GPU is what it finds out).

Output: ``OUT/rank<r>.json`` and ``OUT/summary.json`` (per rank: init status, PE, timings per mode, the
silent round's outcome, finalize), and a table on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "nvshmem_probe.cu"


def nvshmem_root() -> Path:
    import nvidia.nvshmem  # the nvidia-nvshmem-cu13 wheel (a namespace package)
    return Path(list(nvidia.nvshmem.__path__)[0])


def build(out_dir: Path, arch: str) -> Path:
    root = nvshmem_root()
    lib = out_dir / "libmc_nvshmem_probe.so"
    cmd = ["nvcc", "-O2", "-std=c++17", "-rdc=true", f"-arch=sm_{arch}", "-Xcompiler", "-fPIC", "-shared",
           str(SOURCE), str(root / "lib" / "libnvshmem_device.a"), f"-I{root / 'include'}",
           f"-L{root / 'lib'}", "-l:libnvshmem_host.so.3", "-Xlinker", "-rpath", "-Xlinker", str(root / "lib"),
           "-o", str(lib)]
    subprocess.run(cmd, check=True)
    return lib


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(args) -> None:
    import torch
    import torch.distributed as dist

    rank, R = args.child, args.ranks
    out = {"rank": rank, "pid": os.getpid()}
    path = Path(args.out) / f"rank{rank}.json"

    def put():
        path.write_text(json.dumps(out, indent=1))

    torch.cuda.set_device(0)
    torch.cuda.init()
    lib = ctypes.CDLL(args.lib)
    lib.mc_nvs_malloc.restype = ctypes.c_int64
    lib.mc_nvs_ptr.restype = ctypes.c_int64
    lib.mc_nvs_ptr.argtypes = [ctypes.c_int64, ctypes.c_int]
    lib.mc_nvs_ring.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int)]
    store = dist.TCPStore("127.0.0.1", args.port, None, False, timeout=timedelta(seconds=60))
    size = lib.mc_nvs_uid_size()
    out["uid_bytes"] = size
    uid = (ctypes.c_uint8 * size)()
    if rank == 0:
        out["get_uid"] = lib.mc_nvs_get_uid(uid)
        store.set("nvshmem/uid", bytes(uid))
    raw = store.get("nvshmem/uid")
    if len(raw) != size:
        out["error"] = f"the Store's UID has {len(raw)} bytes, expected {size}"
        put()
        return
    ctypes.memmove(uid, raw, size)
    t = time.perf_counter()
    out["init_status"] = lib.mc_nvs_init(uid, rank, R)
    out["init_s"] = time.perf_counter() - t
    put()
    if out["init_status"] != 0:
        return
    out["pe"], out["npes"] = lib.mc_nvs_my_pe(), lib.mc_nvs_n_pes()
    nbytes = args.bytes
    base = lib.mc_nvs_malloc(16 * R + 2 * R * nbytes)
    out["malloc_ok"] = base != 0
    out["direct_to_next"] = lib.mc_nvs_ptr(base, (rank + 1) % R) != 0
    put()
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    status = (ctypes.c_int * 2)()
    seq = 0
    timeout_ns = args.timeout_us * 1000

    def ring(force_put, silent=False):
        nonlocal seq
        seq += 1
        key = (1 << 48) | (seq << 16)
        t0 = time.perf_counter()
        err = lib.mc_nvs_ring(base, R, nbytes, key, force_put, int(silent), timeout_ns, active.data_ptr(), status)
        return err, status[0], status[1], time.perf_counter() - t0

    for mode, force in (("direct", 0), ("put", 1)):
        rows = [ring(force) for _ in range(args.rounds)]
        bad = [r for r in rows if r[0] != 0 or r[1] != 0]
        times = sorted(r[3] for r in rows)
        out[mode] = {"rounds": len(rows), "bad": bad[:5], "used_direct": rows[-1][2] if rows else None,
                     "median_us": times[len(times) // 2] * 1e6 if times else None}
        put()
        store.set(f"done/{mode}/{rank}", b"1")
        store.wait([f"done/{mode}/{r}" for r in range(R)], timedelta(seconds=60))
    # the last PE stays silent for one round: its next PE times out and clears active[last]
    err, st, _, _ = ring(1, silent=rank == R - 1)
    out["silent_round"] = {"err": err, "status": st, "active": active.tolist()}
    active.fill_(1)
    store.set(f"done/silent/{rank}", b"1")
    store.wait([f"done/silent/{r}" for r in range(R)], timedelta(seconds=60))
    err, st, _, _ = ring(1)
    out["after_silent"] = {"err": err, "status": st}
    put()
    t = time.perf_counter()
    lib.mc_nvs_finalize()
    out["finalize_s"] = time.perf_counter() - t
    put()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--bytes", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--timeout-us", type=int, default=200_000)
    p.add_argument("--mps", action="store_true", help="start the CUDA MPS daemon for the run (and stop it)")
    p.add_argument("--remote-ucx", action="store_true")
    p.add_argument("--arch", default=None)
    p.add_argument("--out", default="nvshmem-probe")
    p.add_argument("--limit-s", type=float, default=240)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lib", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = args.arch
    if arch is None:
        import torch
        major, minor = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0)
        arch = f"{major}{minor}"
    lib = build(out, arch)
    import torch.distributed as dist
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=timedelta(seconds=60), wait_for_workers=False)
    env = dict(os.environ)
    root = nvshmem_root()
    env["LD_LIBRARY_PATH"] = f"{root / 'lib'}:" + env.get("LD_LIBRARY_PATH", "")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("NVSHMEM_SYMMETRIC_SIZE", "256M")
    env.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
    env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, 100 // args.ranks))
    if args.remote_ucx:
        env.update(NVSHMEM_REMOTE_TRANSPORT="ucx", NVSHMEM_DISABLE_P2P="1", UCX_TLS="tcp,self")
    mps_dirs = None
    if args.mps:
        mps_dirs = (tempfile.mkdtemp(), tempfile.mkdtemp())
        env.update(CUDA_MPS_PIPE_DIRECTORY=mps_dirs[0], CUDA_MPS_LOG_DIRECTORY=mps_dirs[1])
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True)
    procs = []
    try:
        for r in range(args.ranks):
            argv = [sys.executable, __file__, "--child", str(r), "--ranks", str(args.ranks), "--bytes",
                    str(args.bytes), "--rounds", str(args.rounds), "--timeout-us", str(args.timeout_us),
                    "--out", str(out), "--port", str(port), "--lib", str(lib)]
            log = open(out / f"rank{r}.log", "w")
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + args.limit_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        if mps_dirs:
            subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env)
            for d in mps_dirs:
                shutil.rmtree(d, ignore_errors=True)
        del store
    ranks = {}
    for r in range(args.ranks):
        f = out / f"rank{r}.json"
        ranks[r] = json.loads(f.read_text()) if f.exists() else None
    summary = {"ranks": args.ranks, "remote_ucx": args.remote_ucx, "exit": [p.returncode for p in procs],
               "per_rank": ranks}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for r, o in ranks.items():
        if o is None:
            print(f"rank {r}: no output (see {out}/rank{r}.log)")
            continue
        print(f"rank {r}: init {o.get('init_status')} pe {o.get('pe')}/{o.get('npes')} direct->next "
              f"{o.get('direct_to_next')} | direct {o.get('direct', {}).get('median_us')} us "
              f"bad {len(o.get('direct', {}).get('bad', []))} | put {o.get('put', {}).get('median_us')} us "
              f"bad {len(o.get('put', {}).get('bad', []))} | silent {o.get('silent_round')} | "
              f"after {o.get('after_silent')} | finalize {o.get('finalize_s')}")
    def good(r, o):
        try:
            return (o["init_status"] == 0 and not o["direct"]["bad"] and not o["put"]["bad"]
                    and o["silent_round"]["status"] == (1 if r == 0 else 0) and o["after_silent"]["status"] == 0)
        except (KeyError, TypeError):
            return False

    ok = all(good(r, o) for r, o in ranks.items())
    print("probe", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
