"""Soak: one DDP training job under ``mooncake-run`` while this script SIGKILLs a random worker,
again and again; each time the launcher starts a replacement that joins and catches up.

    python benchmarks/ft_train_soak.py --cycles 50 --out benchmarks/results/ft-train

Each cycle waits until all ranks train together again (and, with ``--standby``, the launcher's spare
process is ready), waits a random 0.2-1.0 s, and SIGKILLs
a random rank (rank 0 included: the Store lives in the launcher), from outside, wherever it is:
in a step's forward, backward, optimizer step or between steps.  Measured and checked:

* recovery = from the kill to the end of the replacement's first training step (this script's
  clock and the workers' are the same machine's ``time.time()``), p50 / p99;
* hangs: a cycle whose replacement does not train within ``--cycle-timeout`` seconds;
* divergence: every rank prints a hash of its parameters after every step; any step whose ranks
  print different hashes counts, and so does a final hash that differs;
* lost steps: each surviving process must print every step number once, in order (the survivors
  never wait for the replacement: they go on training and admit it when it is ready).

Writes ``summary.json`` (and the per-cycle list) under ``--out``.  ``--worker`` is the training
side (run by mooncake-run, not by hand).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the training side ----------------------------------------------------------------------------
def worker(args) -> int:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import mooncake.pg as pg
    from mooncake.pg import elastic

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    t_start = time.time()
    elastic.init_process_group("mooncake-cpu", timeout=timedelta(seconds=args.group_timeout))
    t_init = time.time()
    group = dist.group.WORLD
    torch.manual_seed(0 if not elastic.is_replacement() else os.getpid())
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = 0
    if elastic.is_replacement():
        pg.join_group(group)
        t_join = time.time()
        step = elastic._catch_up(group, model, optimizer, None, joining=True)   # join_and_catch_up, timed
        print(f"RESUME {step} pid={os.getpid()} t={time.time():.6f} start={t_start:.6f} init={t_init:.6f} "
              f"join={t_join:.6f}", flush=True)
    ddp = elastic.wrap_ddp(model, group)

    def digest() -> str:
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.detach().numpy().tobytes())
        return h.hexdigest()[:16]

    while True:
        if elastic.admit_replacements(group, model, optimizer, step):
            ddp = elastic.wrap_ddp(model, group)
        stop = torch.tensor([1 if os.path.exists(args.stop_file) else 0], dtype=torch.int32)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=group)
        if stop.item():
            break
        gen = torch.Generator().manual_seed(step * 1000 + rank)
        x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        active = int(pg.get_active_ranks(group).sum())
        print(f"STEP {step} pid={os.getpid()} t={time.time():.6f} n={active} hash={digest()}", flush=True)
        step += 1
        if args.step_sleep:
            time.sleep(args.step_sleep)   # stands for the rest of a real step's work
    elastic.admit_replacements(group, model, optimizer, step, wait=True, timeout=timedelta(seconds=120))
    print(f"FINAL {step} pid={os.getpid()} hash={digest()}", flush=True)
    dist.destroy_process_group()
    return 0


# -- the driver -------------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Watch:
    """Reads the launcher's output: per rank its current pid, steps per pid, hashes per step."""

    LINE = re.compile(r"\[rank (\d+)\] (STEP|RESUME|FINAL) (\d+) (.*)")

    def __init__(self, proc, log):
        self.proc, self.log = proc, log
        self.cond = threading.Condition()
        self.pid: dict[int, int] = {}
        self.first_step: dict[int, tuple[int, float]] = {}     # pid -> (step, t) of its first step
        self.steps: dict[int, list[int]] = {}                  # pid -> steps it printed
        self.hashes: dict[int, dict[int, str]] = {}            # step -> rank -> hash
        self.active: dict[int, int] = {}                       # rank -> active count of its last step
        self.final: dict[int, tuple[int, str]] = {}
        self.spares_ready = 0
        self.resumed: dict[int, dict] = {}                     # pid -> when its phases ended
        threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            if line.startswith("[mooncake-run] standby ready"):
                with self.cond:
                    self.spares_ready += 1
                    self.cond.notify_all()
            elif "from standby)" in line:
                with self.cond:
                    self.spares_ready -= 1
            m = self.LINE.match(line)
            if not m:
                continue
            rank, kind, step = int(m[1]), m[2], int(m[3])
            fields = dict(re.findall(r"(\w+)=(\S+)", m[4]))
            pid = int(fields["pid"])
            with self.cond:
                if kind == "STEP":
                    self.pid[rank] = pid
                    self.first_step.setdefault(pid, (step, float(fields["t"])))
                    self.steps.setdefault(pid, []).append(step)
                    self.hashes.setdefault(step, {})[rank] = fields["hash"]
                    self.active[rank] = int(fields["n"])
                elif kind == "RESUME":
                    self.resumed[pid] = {"script_start": float(fields["start"]), "init_done": float(fields["init"]),
                                         "join_done": float(fields["join"]), "catch_up_done": float(fields["t"])}
                else:
                    self.final[rank] = (step, fields["hash"])
                self.cond.notify_all()

    def wait(self, predicate, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


def session_pids(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                        pids.append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def driver(args) -> int:
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="ft-train-soak-")
    stop_file = os.path.join(tmp, "stop")
    log = open(os.path.join(tmp, "job.log"), "w")
    cmd = [sys.executable, "-m", "mooncake.run", "--nproc-per-node", str(args.ranks), "--master-port", "0",
           "--max-replacements", str(args.cycles + 5), "--standby", str(args.standby),
           os.path.abspath(__file__), "--worker", "--stop-file", stop_file, "--step-sleep", str(args.step_sleep),
           "--group-timeout", str(args.group_timeout)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watch = Watch(proc, log)
    cycles, hangs = [], 0
    started = time.monotonic()
    print(f"log: {log.name}", flush=True)
    try:
        full = lambda: len(watch.pid) == args.ranks and all(n == args.ranks for n in watch.active.values())  # noqa: E731
        if not watch.wait(full, 300):
            raise RuntimeError("the job never started training")
        for cycle in range(args.cycles):
            # every rank trains in the full group, and each has done a few steps since (re)joining
            if not watch.wait(lambda: full() and (watch.spares_ready > 0 or not args.standby) and all(len(watch.steps.get(watch.pid[r], [])) >= 3
                                                     for r in range(args.ranks)), args.cycle_timeout):
                hangs += 1
                print(f"cycle {cycle}: the group did not come back together", flush=True)
                break
            time.sleep(rng.uniform(0.2, 1.0))
            victim = rng.randrange(args.ranks)
            with watch.cond:
                pid = watch.pid[victim]
                survivors = {r: watch.pid[r] for r in range(args.ranks) if r != victim}
                survivor_steps = {r: len(watch.steps[p]) for r, p in survivors.items()}
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            back = lambda: watch.pid.get(victim) not in (None, pid)  # noqa: E731
            if not watch.wait(back, args.cycle_timeout):
                hangs += 1
                print(f"cycle {cycle}: rank {victim} not back within {args.cycle_timeout} s", flush=True)
                break
            with watch.cond:
                new = watch.pid[victim]
                first_step, t_first = watch.first_step[new]
                trained = {r: len(watch.steps[p]) - survivor_steps[r] for r, p in survivors.items()}
                phases = watch.resumed.get(new, {})
            record = {"cycle": cycle, "victim": victim, "recovery_s": t_first - t_kill,
                      **{f"{k}_s": v - t_kill for k, v in phases.items()}, "resumed_at_step": first_step,
                      "survivor_steps_meanwhile": min(trained.values())}
            cycles.append(record)
            print(f"cycle {cycle + 1:3d}: killed rank {victim}; replacement trained step {first_step} "
                  f"{record['recovery_s']:.2f} s after the kill; survivors trained "
                  f"{record['survivor_steps_meanwhile']}+ steps meanwhile", flush=True)
        open(stop_file, "w").close()
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            hangs += 1
            code = None
        watch.wait(lambda: False, 1.0)   # let the reader drain
    finally:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        log.close()

    divergent_steps = sum(len(set(h.values())) > 1 for h in watch.hashes.values())
    final_hashes = {h for _, h in watch.final.values()}
    final_steps = {s for s, _ in watch.final.values()}
    lost = 0
    for pid, steps in watch.steps.items():     # every process: contiguous steps, none repeated
        lost += sum(b != a + 1 for a, b in zip(steps, steps[1:]))
    recovery = [c["recovery_s"] for c in cycles]
    phases = {f"{k}_p50": quantile([c[k] for c in cycles if k in c], 0.5)
              for k in ("script_start_s", "init_done_s", "join_done_s", "catch_up_done_s")}
    summary = {
        "cycles": len(cycles), "ranks": args.ranks, "standby": args.standby, "step_sleep_s": args.step_sleep,
        "recovery_s_p50": quantile(recovery, 0.5), "recovery_s_p99": quantile(recovery, 0.99),
        "recovery_s_max": max(recovery, default=float("nan")),
        "recovery_s_mean": statistics.fmean(recovery) if recovery else float("nan"),
        **{f"{k}_after_kill": v for k, v in phases.items()},
        "hangs": hangs, "divergent_steps": divergent_steps,
        "divergent_final": int(len(final_hashes) != 1 or len(watch.final) != args.ranks),
        "steps_lost_or_repeated": lost, "final_step": max(final_steps, default=None),
        "launcher_exit": code, "minutes": (time.monotonic() - started) / 60,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
                   f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
    }
    print("\nsoak summary")
    for key, value in summary.items():
        print(f"  {key:26s} {value:.3f}" if isinstance(value, float) else f"  {key:26s} {value}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({**summary, "per_cycle": cycles}, f, indent=2)
    ok = (hangs == 0 and divergent_steps == 0 and not summary["divergent_final"] and lost == 0 and code == 0
          and len(cycles) == args.cycles)
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=50, help="kill / replace cycles (default 50)")
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--standby", type=int, default=1, help="mooncake-run --standby (0: every replacement "
                   "is a fresh interpreter)")
    p.add_argument("--step-sleep", type=float, default=0.02, help="seconds of 'other work' per step")
    p.add_argument("--group-timeout", type=float, default=30.0)
    p.add_argument("--cycle-timeout", type=float, default=60.0, help="a cycle not done by then is a hang")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for summary.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    return worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    sys.exit(main())
