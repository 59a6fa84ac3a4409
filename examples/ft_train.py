"""Fault-tolerant DDP training on mooncake-cpu: kill any worker, the others go on, a replacement
catches up.

    mooncake-run --nproc-per-node 3 --max-replacements 3 --standby 1 examples/ft_train.py

Then, from another terminal, kill one worker (any rank, rank 0 included) with the pid the launcher
printed ("started worker rank 1 (pid 12345, ...)"):

    kill -9 12345

The survivors finish the step in flight over themselves (gradients averaged over the ranks that are
there), keep training, and at the next step boundary after the replacement asks to join they admit
it and send it the step, the parameters and the optimizer state; from then on all ranks print the
same parameter checksum.
"""

import hashlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import mooncake.pg as pg
from mooncake.pg import elastic

STEPS = int(os.environ.get("FT_TRAIN_STEPS", "300"))


def checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:12]


def main() -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    elastic.init_process_group("mooncake-cpu", timeout=timedelta(seconds=30))  # env:// via mooncake-run
    group = dist.group.WORLD

    torch.manual_seed(0)                   # founders start equal; a replacement is overwritten anyway
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = 0
    if pg.is_replacement():                # started by mooncake-run in place of a worker that died
        step = elastic.join_and_catch_up(group, model, optimizer)
        print(f"replacement: joined, resuming at step {step}", flush=True)
    ddp = elastic.wrap_ddp(model, group)   # averages over the active ranks, not the original world size

    while step < STEPS:
        admitted = elastic.admit_replacements(group, model, optimizer, step)   # [] unless one is waiting
        if admitted:
            print(f"step {step}: admitted rank(s) {admitted}", flush=True)
            ddp = elastic.wrap_ddp(model, group)  # every rank wraps again at this boundary
        gen = torch.Generator().manual_seed(step * 100 + rank)   # this rank's shard of step's data
        x = torch.randn(64, 32, generator=gen)
        y = x.sum(dim=1, keepdim=True)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()                      # bucket all_reduces: re-run over the survivors on a failure
        optimizer.step()
        if step % 10 == 0:
            active = pg.get_active_ranks(group).tolist()
            print(f"step {step}: loss {loss.item():.4f} active {active} params {checksum(model)}", flush=True)
        step += 1
        time.sleep(0.05)                     # stands for a real step's compute: time to kill someone

    elastic.admit_replacements(group, model, optimizer, step, wait=True, timeout=timedelta(seconds=60))
    print(f"done at step {step}: params {checksum(model)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
