"""Two launchers for test_conformance.py::TestLaunchersCPU.

* ``python -m torch.distributed.run --nproc-per-node 2 --master-port P launch_allreduce.py``:
  each rank initialises with env:// and runs one all_reduce.
* ``python launch_allreduce.py --spawn PORT``: ``torch.multiprocessing.spawn`` starts 2 ranks;
  rank 0 hosts the TCPStore (the env:// default).

Every rank prints ``OK rank=<r> world=<n> value=<v> impl=<impl>``.
"""

import os
import sys

import torch
import torch.distributed as dist


def body(rank: int, world: int) -> None:
    import mooncake.pg as pg
    torch.set_num_threads(1)
    dist.init_process_group("mooncake-cpu", init_method="env://", rank=rank, world_size=world)
    t = torch.tensor([float(rank + 1)] * 3)
    dist.all_reduce(t)
    expected = float(world * (world + 1) // 2)
    assert torch.equal(t, torch.full((3,), expected)), t
    impl = pg.get_implementation(None)[0]
    print(f"OK rank={rank} world={world} value={t[0].item():g} impl={impl}", flush=True)
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    body(rank, world)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--spawn":
        import torch.multiprocessing as mp
        mp.spawn(_spawned, args=(2, int(sys.argv[2])), nprocs=2, join=True)
    else:
        body(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
