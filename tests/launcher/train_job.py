"""A small DDP training job for the launcher tests, run under ``mooncake-run``; it kills itself where
it is told to, and prints what the tests check.

    mooncake-run --nproc-per-node 3 --master-port 0 tests/launcher/train_job.py --steps 12 \
        --kill 2:0:mid:4 --kill 2:1:between:2

``--kill RANK:INCARNATION:WHERE:STEP`` (repeatable): the process of rank RANK in its INCARNATION-th
life (0 = the founder, 1 = its first replacement, ...) SIGKILLs itself

* ``mid`` / ``mid1``: in step STEP's backward, as it posts its first / second gradient all_reduce
  (a fault point: nothing of that op leaves the process);
* ``between``: right after step STEP (its optimizer step done), before the next one;
* ``catchup``: during the catch-up after it joined (a replacement only; STEP is ignored).

For a replacement, STEP counts from the step it resumed at.  The survivors wait at each step
boundary until a missing rank is back (``admit_replacements(wait=True)``), so the run is the same
every time.  Printed lines (the launcher prefixes ``[rank N]``):

    STEP <step> pid=<pid> probe=<probe grad, repr> mask=<mask after the step>
    RESUME <step> pid=<pid>                      (a replacement, once caught up)
    ADMIT <step> ranks=<list>                    (the survivors, after admitting)
    FINAL <steps> pid=<pid> hash=<sha256 of every parameter and optimizer-state byte>

Every rank's loss has a term ``probe * (rank + 1) ** 2``, so the probe's averaged gradient tells
which ranks it was averaged over: 14/3 over all three, 2.5 over {0, 1}, 5 over {0, 2}, 6.5 over
{1, 2} — and 5/3, 10/3 or 13/3 if the sum were divided by the world size instead.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import mooncake.pg as pg
from mooncake.control import faults
from mooncake.pg import elastic


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                                          torch.nn.Tanh(), torch.nn.Linear(32, 4))
        self.probe = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.layers(x)


def batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)


def digest(model, optimizer) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()

    rank = int(os.environ["RANK"])
    incarnation = int(os.environ.get("MOONCAKE_RESTART_COUNT", "0"))
    kills = {}
    for spec in args.kill:
        r, inc, where, at = spec.split(":")
        if int(r) == rank and int(inc) == incarnation:
            kills[where] = int(at)

    torch.set_num_threads(1)
    elastic.init_process_group("mooncake-cpu", timeout=timedelta(seconds=args.timeout))
    group = dist.group.WORLD
    torch.manual_seed(os.getpid() if elastic.is_replacement() else 0)   # a replacement starts off wrong
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = 0
    if elastic.is_replacement():
        if "catchup" in kills:
            faults.arm("before_send", "kill", 1)   # its second op: the first broadcast of the state
        step = elastic.join_and_catch_up(group, model, optimizer)
        print(f"RESUME {step} pid={os.getpid()}", flush=True)
    resumed = step
    ddp = elastic.wrap_ddp(model, group, bucket_cap_mb=0.001)

    while step < args.steps:
        admitted = elastic.admit_replacements(group, model, optimizer, step, wait=True,
                                              timeout=timedelta(seconds=4 * args.timeout))
        if admitted:
            print(f"ADMIT {step} ranks={admitted}", flush=True)
            ddp = elastic.wrap_ddp(model, group, bucket_cap_mb=0.001)
        x, y = batch(step, rank)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y) + model.probe * (rank + 1) ** 2
        if kills.get("mid") == step - resumed:
            faults.arm("before_send", "kill", 0)   # this backward's first gradient all_reduce
        if kills.get("mid1") == step - resumed:
            faults.arm("before_send", "kill", 1)   # its second one (the first may commit everywhere)
        loss.backward()
        optimizer.step()
        mask = pg.get_active_ranks(group).tolist()
        print(f"STEP {step} pid={os.getpid()} probe={model.probe.grad.item()!r} mask={mask}", flush=True)
        if kills.get("between") == step - resumed:
            os.kill(os.getpid(), signal.SIGKILL)
        step += 1

    elastic.admit_replacements(group, model, optimizer, step, wait=True, timeout=timedelta(seconds=4 * args.timeout))
    print(f"FINAL {step} pid={os.getpid()} hash={digest(model, optimizer)}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
