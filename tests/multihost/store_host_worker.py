"""One rank of the lost-Store-host test (tests/multihost/test_store_host_lost.py), started in a namespace.

argv: rank world port outdir timeout_s.  Ranks 0, 1 on host A (rank 0 hosts the TCPStore), 2, 3 on host B.
Every rank runs all_reduces in a loop, writing ``outdir/rank<r>.json`` after each; the test takes host A
away meanwhile.  A survivor records how its loop ended: the error's type and message, and how long the
failing call took, then how long ``destroy_process_group`` took.
"""

import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

import mooncake.pg  # noqa: F401 - registers the backends

rank, world, port, outdir, timeout_s = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                        float(sys.argv[5]))
torch.set_num_threads(1)
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test dumps a stuck rank's stacks
out = {"rank": rank, "ops": 0, "error": None}


def put():
    tmp = os.path.join(outdir, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, os.path.join(outdir, f"rank{rank}.json"))


dist.init_process_group("mooncake-cpu", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
t = torch.ones(1000)
while True:
    t.fill_(1.0)
    began = time.monotonic()
    try:
        dist.all_reduce(t)
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        out["error"] = [type(exc).__name__, str(exc)[:2000]]
        out["error_after_s"] = round(time.monotonic() - began, 3)
        out["trace"] = traceback.format_exc()[-3000:]
        break
    out["ops"] += 1
    out["value"] = float(t[0])
    if out["ops"] % 20 == 0:
        put()
    time.sleep(0.005)
put()
began = time.monotonic()
try:
    dist.destroy_process_group()
    out["destroy"] = "ok"
except Exception as exc:  # noqa: BLE001
    out["destroy"] = f"{type(exc).__name__}: {exc}"[:500]
out["destroy_s"] = round(time.monotonic() - began, 3)
put()
