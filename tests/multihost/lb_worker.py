"""One rank of the loopback-guard case: init a 2-rank mooncake-cpu group (argv: rank port outfile) and
write what init did: "ok", or the exception's class and message."""

import json
import sys
from datetime import timedelta

import torch.distributed as dist

import mooncake.pg  # noqa: F401 - registers the backends

rank, port, outfile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    store = dist.TCPStore("10.77.0.1", int(port), 2, rank == 0, timeout=timedelta(seconds=20))
    dist.init_process_group("mooncake-cpu", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=8))
    result = ["ok", ""]
except Exception as exc:  # noqa: BLE001 - the outcome is the result
    result = [type(exc).__name__, str(exc)]
with open(outfile, "w") as f:
    json.dump(result, f)
