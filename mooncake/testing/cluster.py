"""A persistent multi-process torch.distributed cluster for tests.

Starting a process and importing torch costs seconds, so tests keep a group of
worker processes running and send them small jobs::

    with Cluster(world_size=4, backend="gloo") as c:
        sums = c.run(all_reduce_rank)        # all_reduce_rank must be importable

Contract:

* The parent (the test runner) hosts the TCPStore master, so any rank may be
  killed; each worker is a ``spawn`` process connected to it by its own Pipe.
* Jobs are top-level functions, sent by module and qualname; arguments and
  results travel pickled (tensors in results are moved to CPU first).
* Every wait has a deadline: a run that outlives it raises ``ClusterError`` and
  leaves the cluster *broken* (each later run raises at once until
  ``restart()``). Workers exit when the parent dies; ``close()`` (also run at
  interpreter exit) leaves no worker behind.

This module imports torch only inside functions: a worker must be able to set
its environment (``env``) before torch is loaded.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait as wait_any
from typing import Any, Callable

_HOST = "127.0.0.1"
START_ALLOWANCE_S = 60.0  # added to timeout_s while workers start: spawn + `import torch`
FAILURE_GRACE_S = 5.0  # once a rank failed, how long a run still waits for the others
SHUTDOWN_TIMEOUT_S = 10.0  # graceful close: destroy_process_group + exit, all workers together
_DESTROY_TIMEOUT_S = 5.0  # a worker's own limit on dist.destroy_process_group()
_KILL_JOIN_S = 5.0  # wait for a SIGKILLed / terminated worker to be reaped
_ORPHAN_POLL_S = 0.5  # how often a worker checks that its parent is alive


@dataclasses.dataclass(frozen=True)
class RankError:
    """Why one rank did not return a result.

    kind: "raised" (the job raised; ``detail`` is its traceback), "timeout",
    "died" (the process exited), "init_failed" (start-up raised; traceback),
    "not_alive" (the rank was dead or killed before the run).
    ``exc_type`` is the exception's class name for "raised" / "init_failed".
    """

    rank: int
    kind: str
    detail: str
    exc_type: str | None = None

    def format(self) -> str:
        title = f"rank {self.rank}: {self.kind}" + (f" ({self.exc_type})" if self.exc_type else "")
        return f"--- {title} ---\n{self.detail.rstrip()}"


class ClusterError(RuntimeError):
    """A run (or start-up) failed on some ranks.

    ``errors`` maps rank -> RankError; ``results`` holds what the other ranks
    returned (indexed by rank, None where there is none). The message contains
    every RankError, tracebacks included.
    """

    def __init__(
        self, summary: str, errors: dict[int, RankError] | None = None, results: list | None = None
    ):
        self.errors = dict(sorted((errors or {}).items()))
        self.results = results
        super().__init__("\n".join([summary, *(e.format() for e in self.errors.values())]))


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What a job function may ask of the worker it runs in (see worker_context())."""

    rank: int
    world_size: int
    backend: str
    store: Any  # torch.distributed.TCPStore client to the parent's store
    device: str


_context: WorkerContext | None = None


def worker_context() -> WorkerContext:
    """The running worker's rank, world size and store; only valid inside a job."""
    if _context is None:
        raise RuntimeError("worker_context() is only available inside a Cluster worker")
    return _context


# --------------------------------------------------------------------- worker side


@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    rank: int
    world_size: int
    backend: str
    store_port: int
    env: dict
    options: tuple | None
    timeout_s: float
    init: bool
    device: str


def _resolve(module: str, qualname: str) -> Callable:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_ORPHAN_POLL_S)
    os._exit(1)


def _worker_exit(code: int) -> None:
    """Leave without running torch / backend destructors, which may block on dead peers."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        items = [_to_cpu(v) for v in value]
        return type(value)._make(items) if hasattr(value, "_fields") else tuple(items)
    return value


def _init_worker(spec: _WorkerSpec) -> WorkerContext:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if spec.backend.startswith("mooncake"):
        importlib.import_module("mooncake.pg")  # registers the mooncake backends
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(spec.rank % torch.cuda.device_count())
    timeout = timedelta(seconds=spec.timeout_s)
    store = dist.TCPStore(_HOST, spec.store_port, None, False, timeout=timeout)
    if spec.init:
        pg_options = None
        if spec.options is not None:
            factory_name, args, kwargs = spec.options
            module, _, name = factory_name.rpartition(".")
            factory = getattr(importlib.import_module(module), name)
            pg_options = factory(spec.rank, spec.world_size, *args, **kwargs)
        dist.init_process_group(
            spec.backend,
            store=store,
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=timeout,
            pg_options=pg_options,
        )
    return WorkerContext(spec.rank, spec.world_size, spec.backend, store, spec.device)


def _shutdown_worker() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        destroyer = threading.Thread(target=dist.destroy_process_group, daemon=True)
        destroyer.start()
        destroyer.join(_DESTROY_TIMEOUT_S)
    _worker_exit(0)


def _worker_main(spec: _WorkerSpec, conn, parent_pid: int) -> None:
    """Entry point of a worker process: start up, report "ready", then serve jobs.

    Replies: ("ready",) | ("init_failed", exc_type, tb) | ("ok", job_id, result)
    | ("raised", job_id, exc_type, tb). Requests: ("job", job_id, module,
    qualname, args, kwargs) | ("shutdown",).
    """
    global _context
    os.environ.update(spec.env)
    os.environ["RANK"] = str(spec.rank)  # as torchrun does (MOONCAKE_FAST_CPU_HOST_ID=rank-mod-N reads it)
    os.dup2(2, 1)  # worker stdout goes to the parent's stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        _context = _init_worker(spec)
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("init_failed", type(exc).__name__, traceback.format_exc())))
        _worker_exit(1)
    conn.send_bytes(pickle.dumps(("ready",)))
    while True:
        try:
            request = pickle.loads(conn.recv_bytes())  # idle wait; EOF or the orphan check ends it
        except EOFError:
            _worker_exit(0)
        if request[0] == "shutdown":
            _shutdown_worker()
        _, job_id, module, qualname, args, kwargs = request
        try:
            result = _to_cpu(_resolve(module, qualname)(*args, **kwargs))
            reply = pickle.dumps(("ok", job_id, result), pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:
            reply = pickle.dumps(("raised", job_id, type(exc).__name__, traceback.format_exc()))
        conn.send_bytes(reply)


# --------------------------------------------------------------------- parent side


@dataclasses.dataclass
class _Worker:
    process: Any  # multiprocessing SpawnProcess
    conn: Any  # parent end of the Pipe
    original: bool  # started by the last start/restart (not by spawn())
    ready: bool = False
    dead: bool = False  # killed, exited, or failed start-up


@dataclasses.dataclass(frozen=True)
class _Reply:
    value: Any


class Cluster:
    """world_size worker processes in one torch.distributed group, reused across jobs.

    options: None or (dotted_factory_name, args, kwargs); each worker builds its
    pg_options as factory(rank, world_size, *args, **kwargs). env: extra
    environment set in workers before torch is imported (OMP_NUM_THREADS=1 is
    always set). init=False starts workers without init_process_group.
    timeout_s is the default run deadline and the store / process-group timeout;
    start-up may take START_ALLOWANCE_S longer. Raises ClusterError if a worker
    fails to start.
    """

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        *,
        options: tuple | None = None,
        timeout_s: float = 60.0,
        env: dict | None = None,
        store: str = "external",
        device: str = "cpu",
        init: bool = True,
    ):
        if store != "external":
            raise ValueError(f"store={store!r}: only 'external' (parent-hosted) is supported")
        self.world_size = world_size
        self.backend = backend
        self.options = options
        self.timeout_s = timeout_s
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self.device = device
        self.init = init
        self._mp = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._store = None
        self._job_id = 0
        self._broken: str | None = None
        self._closed = False
        atexit.register(self.close)
        self._start()

    # ----- state

    @property
    def store(self):
        """The parent's TCPStore master (replaced by restart())."""
        return self._store

    @property
    def pids(self) -> list[int]:
        """Process id of each rank slot's latest worker."""
        return [w.process.pid for w in self._workers]

    def alive(self, rank: int) -> bool:
        """Whether rank's worker is running and usable (not killed, not exited)."""
        w = self._workers[rank]
        return not w.dead and w.process.is_alive()

    @property
    def broken(self) -> bool:
        """True after a run timed out: every run raises until restart()."""
        return self._broken is not None

    @property
    def intact(self) -> bool:
        """Not broken, not closed, and every rank is the live worker of the last (re)start."""
        return (
            not self._closed
            and not self.broken
            and len(self._workers) == self.world_size
            and all(w.original and self.alive(r) for r, w in enumerate(self._workers))
        )

    # ----- jobs

    def run(
        self, fn: Callable, *args, ranks=None, timeout_s: float | None = None, **kwargs
    ) -> list:
        """Call fn(*args, **kwargs) on each of ranks (default: all) concurrently.

        Returns results indexed by rank (None for ranks not selected). Raises
        ClusterError if any rank raised, died or missed the deadline
        (timeout_s, default the cluster's); a missed deadline breaks the cluster.
        Once one rank failed, the others get at most FAILURE_GRACE_S more (a
        rank that raised usually leaves its peers blocked in a collective).
        """
        ranks = range(len(self._workers)) if ranks is None else ranks
        return self.run_each({r: (fn, args, kwargs) for r in ranks}, timeout_s=timeout_s)

    def run_each(self, calls: dict[int, tuple], timeout_s: float | None = None) -> list:
        """Like run(), with a different (fn, args, kwargs) per rank."""
        self._check_usable()
        not_alive = {
            r: RankError(r, "not_alive", "worker is dead or was killed")
            for r in calls
            if not self.alive(r)
        }
        if not_alive:
            raise ClusterError(f"ranks {sorted(not_alive)} are not alive", not_alive)
        self._job_id += 1
        requests = {
            r: pickle.dumps(("job", self._job_id, *_job_name(fn), args, kwargs))
            for r, (fn, args, kwargs) in calls.items()
        }
        names = sorted({".".join(_job_name(fn)) for fn, _, _ in calls.values()})
        errors = {}
        for r, request in requests.items():
            try:
                self._workers[r].conn.send_bytes(request)
            except OSError as exc:
                self._workers[r].dead = True
                errors[r] = RankError(r, "died", f"could not send the job: {exc!r}")
        pending = [r for r in calls if r not in errors]
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        results, more_errors = self._collect(pending, self._job_id, timeout_s)
        errors.update(more_errors)
        if errors:
            summary = f"{', '.join(names)} failed on ranks {sorted(errors)} of {sorted(calls)}"
            raise ClusterError(summary, errors, results)
        return results

    def _check_usable(self) -> None:
        if self._closed:
            raise ClusterError("cluster is closed")
        if self._broken is not None:
            raise ClusterError(f"cluster is broken ({self._broken}); call restart()")

    def _collect(
        self, ranks, job_id: int | None, timeout_s: float
    ) -> tuple[list, dict[int, RankError]]:
        """Wait until each of ranks answered job_id (None: reported ready), or the deadline."""
        results: list = [None] * len(self._workers)
        errors: dict[int, RankError] = {}
        pending = set(ranks)
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            handles = {}
            for r in pending:
                handles[self._workers[r].conn] = r
                handles[self._workers[r].process.sentinel] = r
            for handle in wait_any(list(handles), remaining):
                r = handles[handle]
                if r not in pending:  # its pipe and its sentinel both fired
                    continue
                outcome = self._read_reply(r, job_id)
                if isinstance(outcome, _Reply):
                    results[r] = outcome.value
                    pending.discard(r)
                elif isinstance(outcome, RankError):
                    errors[r] = outcome
                    pending.discard(r)
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        if pending:
            for r in pending:
                pid = self._workers[r].process.pid
                errors[r] = RankError(r, "timeout", f"no answer within {timeout_s:g} s (pid {pid})")
            self._broken = f"ranks {sorted(pending)} did not answer in time"
        return results, errors

    def _read_reply(self, rank: int, job_id: int | None) -> _Reply | RankError | None:
        """Consume one message (or the exit) of rank; None: keep waiting."""
        w = self._workers[rank]
        try:
            if not w.conn.poll(0):  # only the sentinel fired
                raise EOFError
            message = pickle.loads(w.conn.recv_bytes())
        except (EOFError, OSError):
            w.process.join(_KILL_JOIN_S)
            w.dead = True
            detail = f"worker pid {w.process.pid} exited with code {w.process.exitcode}"
            return RankError(rank, "died", detail)
        except Exception as exc:
            detail = f"could not unpickle the reply:\n{traceback.format_exc()}"
            return RankError(rank, "raised", detail, type(exc).__name__)
        kind = message[0]
        if kind == "ready":
            w.ready = True
            return _Reply(None) if job_id is None else None
        if kind == "init_failed":
            w.dead = True
            return RankError(rank, "init_failed", message[2], message[1])
        if message[1] != job_id:  # answer to an abandoned job
            return None
        if kind == "ok":
            return _Reply(message[2])
        return RankError(rank, "raised", message[3], message[2])

    # ----- process management

    def _start_worker(
        self, rank: int, *, world_size: int, options, env: dict, init: bool, original: bool
    ) -> _Worker:
        spec = _WorkerSpec(
            rank, world_size, self.backend, self._store.port, env, options, self.timeout_s, init,
            self.device,
        )
        parent_conn, child_conn = self._mp.Pipe()
        process = self._mp.Process(
            target=_worker_main,
            args=(spec, child_conn, os.getpid()),
            name=f"cluster-rank{rank}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn, original)

    def _start(self) -> None:
        """Create the store and world_size workers; wait until all are ready."""
        import torch.distributed as dist

        timeout = timedelta(seconds=self.timeout_s)
        self._store = dist.TCPStore(_HOST, 0, None, True, timeout=timeout, wait_for_workers=False)
        self._workers = [
            self._start_worker(
                r, world_size=self.world_size, options=self.options, env=self.env, init=self.init,
                original=True,
            )
            for r in range(self.world_size)
        ]
        self._broken = None
        _, errors = self._collect(range(self.world_size), None, self.timeout_s + START_ALLOWANCE_S)
        if errors:
            self._teardown(graceful=False)
            summary = f"cluster of {self.world_size} x {self.backend} failed to start"
            raise ClusterError(summary, errors)

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Send sig to rank's worker and mark it dead (runs on it raise until spawn())."""
        w = self._workers[rank]
        w.dead = True
        if w.process.is_alive():
            os.kill(w.process.pid, sig)
        if sig == signal.SIGKILL:
            w.process.join(_KILL_JOIN_S)

    def spawn(
        self,
        rank: int,
        *,
        world_size: int | None = None,
        options=None,
        env: dict | None = None,
        init: bool = True,
    ) -> None:
        """Start a fresh worker in rank's slot (a replacement), or at rank == len(pids) (a joiner).

        It connects to the same store; world_size / options default to the
        cluster's, env is added to the cluster's. Does not wait: the next run on
        that rank waits for its start-up and reports an init failure as a
        RankError. The slot must not hold a live worker.
        """
        self._check_usable()
        if rank > len(self._workers):
            raise ValueError(f"rank {rank}: slots are 0..{len(self._workers)}")
        if rank < len(self._workers) and self.alive(rank):
            raise ClusterError(f"rank {rank} is still alive; kill it first")
        worker = self._start_worker(
            rank,
            world_size=self.world_size if world_size is None else world_size,
            options=self.options if options is None else options,
            env={**self.env, **(env or {})},
            init=init,
            original=False,
        )
        if rank == len(self._workers):
            self._workers.append(worker)
        else:
            self._release(self._workers[rank])
            self._workers[rank] = worker

    def restart(self) -> None:
        """Stop every worker and the store, then start a fresh cluster with the same arguments."""
        if self._closed:
            raise ClusterError("cluster is closed")
        self._teardown(graceful=not self.broken)
        self._start()

    def close(self) -> None:
        """Shut the workers down (gracefully unless broken) and drop the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._teardown(graceful=not self.broken)

    def _teardown(self, graceful: bool) -> None:
        """Stop every worker: shutdown job (if graceful), SIGTERM, SIGKILL; drop pipes and store."""
        workers, self._workers = self._workers, []
        live = [w for w in workers if w.process.is_alive()]
        if graceful:
            for w in live:
                try:
                    w.conn.send_bytes(pickle.dumps(("shutdown",)))
                except OSError:
                    pass
            deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
            for w in live:
                w.process.join(max(0.0, deadline - time.monotonic()))
        stragglers = [w for w in live if w.process.is_alive()]
        for w in stragglers:
            w.process.terminate()
        for w in stragglers:
            w.process.join(_KILL_JOIN_S)
        for w in workers:  # SIGKILLs whatever is still running
            self._release(w)
        self._store = None

    @staticmethod
    def _release(worker: _Worker) -> None:
        """Make sure worker's process is gone (SIGKILL if needed) and free its resources."""
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(_KILL_JOIN_S)
        worker.conn.close()
        if not worker.process.is_alive():
            worker.process.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _job_name(fn: Callable) -> tuple[str, str]:
    """(module, qualname) by which a worker imports fn; fn must be importable at top level."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or module == "__main__":
        raise ValueError(f"{fn!r} is not an importable top-level function")
    return module, qualname
