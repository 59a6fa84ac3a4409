"""NVSHMEM probe for docs/design/internode.md: bootstrap through our Store, put-with-signal keys, deadlines.

Ran on one H100 with R = 2 (benchmarks/results/internode/nvshmem-h100-run1).
For the GPU machine, one GPU, R processes under MPS (docs/design/internode.md §10 item 3)::

    python benchmarks/internode/nvshmem_probe.py --ranks 2 --mps --out /tmp/probe
    python benchmarks/internode/nvshmem_probe.py --ranks 4 --mps --remote-ucx --out /tmp/probe-ucx
    python benchmarks/internode/nvshmem_probe.py --compile-only --out /tmp/probe   # no GPU needed

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
import sys
import time
from pathlib import Path

from nvshmem_common import (
    RankRecord,
    add_common_args,
    bootstrap,
    driver_start,
    die_with_parent,
    launch,
    read_rank_outputs,
    store_barrier,
)

SOURCE = Path(__file__).resolve().parent / "nvshmem_probe.cu"


def child(args) -> None:
    import torch

    die_with_parent()
    rank, R = args.child, args.ranks
    rec = RankRecord(Path(args.out), rank)
    lib, store, status = bootstrap(args, rec)
    if status != 0:
        return
    lib.mc_nvs_ring.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int)]
    nbytes = args.bytes
    base = lib.mc_nvs_malloc(16 * R + 2 * R * nbytes)
    rec["malloc_ok"] = base != 0
    rec["direct_to_next"] = lib.mc_nvs_ptr(base, (rank + 1) % R) != 0
    store_barrier(store, "malloc", rank, R)  # every PE has zeroed its region before anyone sends
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    status_words = (ctypes.c_int * 2)()
    seq = 0
    timeout_ns = args.timeout_us * 1000

    def ring(force_put, silent=False):
        nonlocal seq
        seq += 1
        key = (1 << 48) | (seq << 16)
        t0 = time.perf_counter()
        err = lib.mc_nvs_ring(base, R, nbytes, key, force_put, int(silent), timeout_ns, active.data_ptr(),
                              status_words)
        return err, status_words[0], status_words[1], time.perf_counter() - t0

    for mode, force in (("direct", 0), ("put", 1)):
        rows = [ring(force) for _ in range(args.rounds)]
        bad = [r for r in rows if r[0] != 0 or r[1] != 0]
        times = sorted(r[3] for r in rows)
        rec[mode] = {"rounds": len(rows), "bad": bad[:5], "used_direct": rows[-1][2] if rows else None,
                     "median_us": times[len(times) // 2] * 1e6 if times else None}
        store_barrier(store, mode, rank, R)
    # the last PE stays silent for one round: its next PE times out and clears active[last]
    err, st, _, _ = ring(1, silent=rank == R - 1)
    rec["silent_round"] = {"err": err, "status": st, "active": active.tolist()}
    active.fill_(1)
    store_barrier(store, "silent", rank, R)
    err, st, _, _ = ring(1)
    rec["after_silent"] = {"err": err, "status": st}
    t = time.perf_counter()
    lib.mc_nvs_finalize()
    rec["finalize_s"] = time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, "nvshmem-probe")
    p.add_argument("--bytes", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--timeout-us", type=int, default=200_000)
    p.add_argument("--remote-ucx", action="store_true")
    args = p.parse_args()
    if args.child is not None:
        child(args)
        return 0
    started = driver_start(args, SOURCE)
    if started is None:
        return 0
    out, lib = started
    extra_env = {"NVSHMEM_SYMMETRIC_SIZE": "256M"}
    if args.remote_ucx:
        extra_env.update(NVSHMEM_REMOTE_TRANSPORT="ucx", NVSHMEM_DISABLE_P2P="1", UCX_TLS="tcp,self")
    codes = launch(args, lib, lambda r: ["--bytes", str(args.bytes), "--rounds", str(args.rounds),
                                         "--timeout-us", str(args.timeout_us)], extra_env)
    ranks = read_rank_outputs(out, args.ranks)
    summary = {"ranks": args.ranks, "remote_ucx": args.remote_ucx, "exit": codes, "per_rank": ranks}
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

    ok = all(good(r, o) for r, o in ranks.items()) and all(c == 0 for c in codes)
    print("probe", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
