"""``mooncake-run`` (``python -m mooncake.run``): a torchrun-style launcher for fault-tolerant jobs.

    mooncake-run --nproc-per-node 3 --max-replacements 5 train.py --lr 0.1

What it does differently from torchrun (docs/launcher.md has the whole contract):

* it hosts the c10d ``TCPStore`` itself (on node 0; ``--store external`` uses one served elsewhere, e.g. by
  ``mooncake-run --serve-store`` on a host of its own), so the Store outlives every worker: the workers
  connect to it as clients (``TORCHELASTIC_USE_AGENT_STORE=True`` makes torch's ``env://``
  rendezvous do exactly that), and any rank, rank 0 included, may die without taking the group down;
* when a worker dies it starts a **replacement** with the same ``RANK`` / ``LOCAL_RANK`` and
  ``MOONCAKE_REPLACEMENT=1`` (``mooncake.pg.is_replacement()``), up to ``--max-replacements`` in
  all; the surviving workers are never signalled (they go on over the survivors and admit the
  replacement: ``mooncake.pg.elastic``);
* exit status: 0 when every rank's last process exited 0, otherwise the code of the first worker
  failure that was not replaced (a worker killed by signal N counts as 128 + N);
* it gives its workers a job secret (``MOONCAKE_JOB_SECRET``): a fresh random one per job, or the one
  in its own environment (every node of a multi-node job needs the same one; ``--job-secret off``
  runs without).  The secret travels in the workers' environment only (never on a command line, never
  to the Store); with it, only the job's own ranks get in (docs/semantics.md, "Trust model");
* output: every line a worker writes is prefixed ``[rank N]`` (stdout to stdout, stderr to stderr);
* SIGINT / SIGTERM: every worker's process group gets SIGTERM, then SIGKILL after
  ``--term-timeout`` seconds; a second signal kills at once.  Workers run with
  ``PR_SET_PDEATHSIG=SIGKILL``, so a launcher that is itself killed takes its workers with it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

POLL_S = 0.02           # how often the launcher looks at its workers
_PR_SET_PDEATHSIG = 1


def _log(message: str) -> None:
    with _OUT_LOCK:
        sys.stderr.write(f"[mooncake-run] {message}\n")
        sys.stderr.flush()


_OUT_LOCK = threading.Lock()
_READY = b"\x00mooncake-run: standby ready\n"   # a spare's one line before it takes a rank


def _pump(stream, sink, worker) -> None:
    """Copy a worker's pipe to ``sink`` line by line, each line prefixed with its rank."""
    out = sink.buffer if hasattr(sink, "buffer") else sink
    for line in iter(stream.readline, b""):
        if line == _READY:
            _log(f"standby ready (pid {worker.proc.pid})")
            continue
        if not line.endswith(b"\n"):
            line += b"\n"
        with _OUT_LOCK:
            try:
                out.write(worker.prefix + line)
                out.flush()
            except (BrokenPipeError, ValueError):
                pass
    stream.close()


def _exit_code(returncode: int) -> int:
    """Popen's returncode as a shell exit status (-N for signal N becomes 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class Worker:
    def __init__(self, rank: int, local_rank: int, incarnation: int, proc: subprocess.Popen):
        self.rank, self.local_rank, self.incarnation, self.proc = rank, local_rank, incarnation, proc
        self.pumps: list[threading.Thread] = []
        self.code: int | None = None   # exit status once it has exited
        self.prefix = f"[rank {rank}] ".encode() if rank >= 0 else b"[standby] "

    def pump(self) -> None:
        for stream, sink in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, sink, self), daemon=True)
            t.start()
            self.pumps.append(t)


class Launcher:
    def __init__(self, args, command: list[str]):
        self.args = args
        self.command = command
        self.workers: dict[int, Worker] = {}     # local rank -> its current process
        self.finished: dict[int, int] = {}       # local rank -> final exit status
        self.replacements = 0
        self.first_failure: int | None = None
        self.signalled: int | None = None
        self.store = None
        self.port = args.master_port
        self.spawned_pgids: list[int] = []
        self.spares: list[Worker] = []
        self.secret = job_secret(args)

    def top_up_standby(self) -> None:
        if self.command[0] != sys.executable:   # --no-python: nothing to preload
            return
        budget = self.args.max_replacements - self.replacements
        while len(self.spares) < min(self.args.standby, budget):
            self.start_standby()

    # -- the Store ---------------------------------------------------------------------------
    def host_store(self) -> None:
        if self.args.node_rank != 0 or self.args.store == "external":
            return
        from datetime import timedelta

        import torch.distributed as dist
        self.store = dist.TCPStore(self.args.master_addr, self.args.master_port, None, True,
                                   timeout=timedelta(seconds=self.args.store_timeout),
                                   wait_for_workers=False)
        self.port = self.store.port
        _log(f"Store at {self.args.master_addr}:{self.port} (hosted by this launcher, pid {os.getpid()})")

    # -- workers -----------------------------------------------------------------------------
    def env_of(self, local_rank: int, incarnation: int, replacement: bool) -> dict[str, str]:
        a = self.args
        env = dict(os.environ)
        env.update({
            "RANK": str(a.node_rank * a.nproc_per_node + local_rank),
            "LOCAL_RANK": str(local_rank),
            "GROUP_RANK": str(a.node_rank),
            "WORLD_SIZE": str(a.nnodes * a.nproc_per_node),
            "LOCAL_WORLD_SIZE": str(a.nproc_per_node),
            "MASTER_ADDR": a.master_addr,
            "MASTER_PORT": str(self.port),
            # torch's env:// rendezvous then connects to our Store as a client instead of having
            # rank 0 host one (which would take the Store down with rank 0)
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "MOONCAKE_REPLACEMENT": "1" if replacement or a.rejoin else "0",
            "MOONCAKE_RESTART_COUNT": str(incarnation),
            "MOONCAKE_LAUNCHER_PID": str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        })
        if self.secret is not None:
            env["MOONCAKE_JOB_SECRET"] = self.secret
        else:
            env.pop("MOONCAKE_JOB_SECRET", None)
        if "OMP_NUM_THREADS" not in os.environ and a.nproc_per_node > 1:
            env["OMP_NUM_THREADS"] = "1"   # as torchrun does
        return env

    def start_standby(self) -> None:
        """A spare process that has imported torch and mooncake.pg already and waits to become a
        replacement (``--standby``): a replacement then skips the interpreter's and torch's start."""
        argv = [sys.executable, "-m", "mooncake.run", "--_standby", str(os.getpid()), ",".join(self.args.preload)]
        env = self.env_of(0, 0, True)
        for key in ("RANK", "LOCAL_RANK", "MOONCAKE_RESTART_COUNT"):
            env.pop(key)
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, process_group=0)
        self.spawned_pgids.append(proc.pid)
        spare = Worker(-1, -1, 0, proc)
        spare.pump()
        self.spares.append(spare)

    def _take_standby(self, local_rank: int, incarnation: int) -> Worker | None:
        while self.spares:
            spare = self.spares.pop(0)
            if spare.proc.poll() is not None:
                continue
            job = {"env": self.env_of(local_rank, incarnation, True), "command": self.command}
            try:
                spare.proc.stdin.write((json.dumps(job) + "\n").encode())
                spare.proc.stdin.close()
            except OSError:
                continue
            spare.rank = self.args.node_rank * self.args.nproc_per_node + local_rank
            spare.local_rank, spare.incarnation = local_rank, incarnation
            spare.prefix = f"[rank {spare.rank}] ".encode()
            return spare
        return None

    def start(self, local_rank: int, incarnation: int, replacement: bool) -> Worker:
        rank = self.args.node_rank * self.args.nproc_per_node + local_rank
        if replacement and self.args.standby:
            spare = self._take_standby(local_rank, incarnation)
            if spare is not None:
                self.workers[local_rank] = spare
                _log(f"started replacement rank {rank} (pid {spare.proc.pid}, incarnation {incarnation}, "
                     "from standby)")
                self.top_up_standby()
                return spare
        # the child first sets PR_SET_PDEATHSIG (so it dies with this launcher), then execs the
        # command: no preexec_fn (unsafe with the output threads), and the setting survives exec
        argv = [sys.executable, "-m", "mooncake.run", "--_exec", str(os.getpid()), "--", *self.command]
        proc = subprocess.Popen(argv, env=self.env_of(local_rank, incarnation, replacement),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                process_group=0)  # own process group: signals reach its children too
        self.spawned_pgids.append(proc.pid)
        worker = Worker(rank, local_rank, incarnation, proc)
        worker.pump()
        self.workers[local_rank] = worker
        what = "replacement" if replacement else "worker"
        _log(f"started {what} rank {rank} (pid {proc.pid}, incarnation {incarnation})")
        return worker

    def reap(self) -> None:
        """Look at every worker once: record exits, start replacements."""
        for local_rank, worker in list(self.workers.items()):
            rc = worker.proc.poll()
            if rc is None:
                continue
            del self.workers[local_rank]
            self._end_group(worker)
            for t in worker.pumps:
                t.join(timeout=1.0)
            code = worker.code = _exit_code(rc)
            if code == 0:
                _log(f"rank {worker.rank} (pid {worker.proc.pid}) exited 0")
                self.finished[local_rank] = 0
                continue
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited {code}"
            # on one node, a rank whose peers are all gone has nobody to admit its replacement
            alone = self.args.nnodes == 1 and not self.workers
            if self.signalled is None and self.replacements < self.args.max_replacements and not alone:
                self.replacements += 1
                _log(f"rank {worker.rank} (pid {worker.proc.pid}) {how}; starting replacement "
                     f"{self.replacements}/{self.args.max_replacements}")
                self.start(local_rank, worker.incarnation + 1, replacement=True)
            else:
                why = "no other rank is left to admit a replacement" if alone else "no replacement left"
                _log(f"rank {worker.rank} (pid {worker.proc.pid}) {how}; {why}")
                self.finished[local_rank] = code
                if self.first_failure is None:
                    self.first_failure = code

    # -- shutdown ----------------------------------------------------------------------------
    def _end_group(self, worker: Worker) -> None:
        """A worker exited: end what it left in its process group (nothing outlives its worker)."""
        try:
            os.killpg(worker.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if worker.proc.pid in self.spawned_pgids:
            self.spawned_pgids.remove(worker.proc.pid)

    def _killpg(self, sig: int) -> None:
        for pgid in self.spawned_pgids:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def terminate(self) -> None:
        """SIGTERM every worker's process group, SIGKILL what is left after the grace period."""
        if self.workers:
            _log(f"stopping {len(self.workers)} worker(s)")
        self._killpg(signal.SIGTERM)
        deadline = time.monotonic() + self.args.term_timeout
        while self.workers and time.monotonic() < deadline and self.signalled != -1:
            for local_rank, worker in list(self.workers.items()):
                if worker.proc.poll() is not None:
                    del self.workers[local_rank]
            time.sleep(POLL_S)
        self._killpg(signal.SIGKILL)
        for worker in self.workers.values():
            worker.proc.wait()
        self.workers.clear()

    def on_signal(self, signum, _frame) -> None:
        if self.signalled is not None:
            self.signalled = -1          # a second signal: no more grace
            self._killpg(signal.SIGKILL)
            return
        self.signalled = signum

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        try:
            self.host_store()
            for local_rank in range(self.args.nproc_per_node):
                self.start(local_rank, 0, replacement=False)
            self.top_up_standby()
            while self.workers and self.signalled is None:
                self.reap()
                time.sleep(POLL_S)
            if self.signalled is not None:
                signum = self.signalled
                _log(f"got {signal.Signals(signum).name if signum > 0 else 'a second signal'}")
                self.terminate()
                return 128 + (signum if signum > 0 else signal.SIGKILL)
            self._killpg(signal.SIGKILL)   # whatever a finished worker left behind in its group
            status = self.first_failure or 0
            _log(f"all workers done; exit status {status} ({self.replacements} replacement(s))")
            return status
        finally:
            if self.workers:
                self.signalled = self.signalled or signal.SIGTERM
                self.terminate()


def _standby(argv: list[str]) -> None:
    """Inside a spare: die with the launcher, import the heavy modules, wait for a rank to take over
    (one JSON line on stdin: the environment and the command), then run the command in-process."""
    launcher, preload = int(argv[0]), [m for m in (argv[1] if len(argv) > 1 else "").split(",") if m]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != launcher:
        os._exit(128 + signal.SIGKILL)
    import importlib
    # torch._dynamo: the first optimizer a process builds imports it (a second or more)
    for name in ("torch", "torch.distributed", "torch._dynamo", "torch.nn.parallel", "mooncake.pg", *preload):
        importlib.import_module(name)
    sys.stdout.buffer.write(_READY)
    sys.stdout.flush()
    line = sys.stdin.buffer.readline()
    if not line:
        os._exit(0)
    job = json.loads(line)
    os.environ.clear()
    os.environ.update(job["env"])
    sys.stdin = open(os.devnull)
    command = job["command"][1:]
    while command and command[0] == "-u":
        command = command[1:]
    import runpy
    if command[0] == "-m":
        sys.argv = command[1:]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        sys.path[0] = os.path.dirname(os.path.abspath(command[0]))
        runpy.run_path(command[0], run_name="__main__")
    sys.exit(0)


def _exec_worker(argv: list[str]) -> None:
    """Inside the child: die with the launcher, then become the worker command."""
    launcher = int(argv[0])
    command = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != launcher:   # the launcher died before prctl took effect
        os._exit(128 + signal.SIGKILL)
    os.execv(command[0], command)


def job_secret(args) -> str | None:
    """The secret the workers get: the launcher's own ``MOONCAKE_JOB_SECRET`` (checked), else a new one on
    a single node; None with ``--job-secret off`` or on several nodes without one (they must share it)."""
    from .control import auth
    if args.job_secret == "off":
        _log("no job secret (--job-secret off): the job trusts every process that can reach its ports and Store")
        return None
    given = os.environ.get(auth.ENV)
    if given:
        auth.parse_secret(given, auth.ENV)  # a malformed one fails here, before any worker starts
        _log("job secret: from MOONCAKE_JOB_SECRET")
        return given.strip()
    if args.nnodes > 1:
        _log("no job secret: a multi-node job needs the same MOONCAKE_JOB_SECRET on every node's launcher; "
             "the job trusts every process that can reach its ports and Store")
        return None
    _log("job secret: generated for this job (only its workers get it)")
    return auth.generate_secret()


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        prog="mooncake-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=int, default=1,
                   help="workers on this node (default 1)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes (a fixed number; default 1)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=0,
                   help="this node's rank; node 0 hosts the Store (default 0)")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default="127.0.0.1",
                   help="address of node 0, where the Store listens (default 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", dest="master_port", type=int, default=29500,
                   help="the Store's port; 0 picks a free one (single node only; default 29500)")
    p.add_argument("--max-replacements", "--max_replacements", dest="max_replacements", type=int, default=3,
                   help="replacements this launcher starts in all, for workers that die (default 3)")
    p.add_argument("--rejoin", action="store_true",
                   help="start every worker of this node as a replacement (MOONCAKE_REPLACEMENT=1): "
                        "a node that comes back to a running job")
    p.add_argument("--standby", type=int, default=0,
                   help="spare processes kept ready (torch and mooncake.pg imported) to become replacements "
                        "at once; the script then runs in-process through runpy (default 0)")
    p.add_argument("--preload", action="append", default=[],
                   help="a module a standby process imports ahead (repeatable)")
    p.add_argument("--term-timeout", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the workers (default 10)")
    p.add_argument("--store-timeout", type=float, default=300.0, help="the Store's timeout, seconds")
    p.add_argument("--job-secret", choices=("auto", "off"), default="auto",
                   help="auto (default): give the workers MOONCAKE_JOB_SECRET -- this launcher's own, else a "
                        "new random one (single node); off: no secret (docs/semantics.md, \"Trust model\")")
    p.add_argument("-m", "--module", action="store_true", help="run the script as a module (python -m)")
    p.add_argument("--no-python", action="store_true", help="run the script as an executable, not with python")
    p.add_argument("--store", choices=("launcher", "external"), default="launcher",
                   help="launcher (default): node 0's launcher hosts the Store; external: a Store already "
                        "listens at --master-addr:--master-port (e.g. `mooncake-run --serve-store` on a host "
                        "of its own, so that the job survives losing node 0)")
    p.add_argument("--serve-store", action="store_true",
                   help="host only the Store at --master-addr:--master-port until SIGINT / SIGTERM (no script)")
    p.add_argument("script", nargs="?", help="the training script (or module with -m, executable with --no-python)")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.serve_store:
        if args.script is not None:
            p.error("--serve-store runs no script")
        if args.master_port == 0:
            p.error("--serve-store needs --master-port: the job's launchers must know it")
        return args
    if args.script is None:
        p.error("the script to run is missing")
    if args.store == "external" and args.master_port == 0:
        p.error("--store external needs --master-port: the port the Store listens on")
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        p.error("need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes")
    if args.master_port == 0 and args.nnodes > 1:
        p.error("--master-port 0 (a free port) works on one node only: the other nodes need the port")
    if args.max_replacements < 0:
        p.error("--max-replacements must be >= 0")
    return args


def command_of(args) -> list[str]:
    if args.no_python:
        import shutil
        exe = shutil.which(args.script) or args.script
        return [exe, *args.script_args]
    if args.module:
        return [sys.executable, "-u", "-m", args.script, *args.script_args]
    return [sys.executable, "-u", args.script, *args.script_args]


def serve_store(args) -> int:
    """Host the job's Store alone (``--serve-store``) until SIGINT / SIGTERM; exit status 0."""
    from datetime import timedelta

    import torch.distributed as dist
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    store = dist.TCPStore(args.master_addr, args.master_port, None, True,
                          timeout=timedelta(seconds=args.store_timeout), wait_for_workers=False)
    _log(f"Store at {args.master_addr}:{store.port} (serving only, pid {os.getpid()})")
    while not stop.wait(0.5):
        pass
    _log("Store stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_exec"]:
        _exec_worker(argv[1:])
    if argv[:1] == ["--_standby"]:
        _standby(argv[1:])
    args = parse_args(argv)
    if args.serve_store:
        return serve_store(args)
    from .control.errors import ArgumentError
    try:
        launcher = Launcher(args, command_of(args))
    except ArgumentError as exc:  # a malformed MOONCAKE_JOB_SECRET: nothing started yet
        print(f"mooncake-run: error: {exc}", file=sys.stderr)
        return 2
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
