"""Where a call's host time goes, layer by layer, without a profiler: wrap named functions of this process so
that each call adds its wall time (``time.perf_counter_ns``, about 0.3 µs a wrapper) to its label, and take a
call's own costs (wall, this thread's CPU time, the other threads' CPU time, this thread's context switches).

    timer = LayerTimer([("face: _issue", "mooncake.pg.backend", "MooncakeProcessGroup._issue"), ...])
    timer.install()          # once per process, before the calls to measure
    ...; timer.clear()       # after the warm-up
    with timer.call(): dist.all_reduce(x)
    timer.report(num_calls)  # {"layers_us": mean µs per call by label, "calls": per-call medians}

``thread_cpu_ns`` / ``thread_cpu_since`` tell which of the process's threads (by name) took the CPU.

Layers nest: a label's time includes the layers it calls (indent the labels to show it).  ``EAGER_ALL_REDUCE``
lists the layers of one eager all_reduce of the PG face over the fast CUDA plane (its device path, on a GPU
or emulated), ``QUICK_ALL_REDUCE`` those of one that takes the quick lane."""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import resource
import statistics
import threading
import time


# (label, module, qualified name): the layers of one eager all_reduce, outermost first; "launch" and "event ..."
# run on a GPU only, "emulated kernel" only in the plane's CPU emulation
EAGER_ALL_REDUCE = [
    ("face: _issue", "mooncake.pg.backend", "MooncakeProcessGroup._issue"),
    ("  checks: _check_tensor", "mooncake.pg.backend", "MooncakeProcessGroup._check_tensor"),
    ("  membership.begin", "mooncake.pg.membership", "Membership.begin"),
    ("  membership.poll", "mooncake.pg.membership", "Membership.poll"),
    ("  _post", "mooncake.pg.backend", "MooncakeProcessGroup._post"),
    ("    plane.all_reduce", "mooncake.fast.cuda.pg", "FastCudaGroup.all_reduce"),
    ("      op object", "mooncake.fast.cuda.pg", "_AllReduce.__init__"),
    ("        stream_for", "mooncake.fast.cuda.pg", "CudaGroup.stream_for"),
    ("      enqueue", "mooncake.fast.cuda.pg", "CudaGroup.enqueue"),
    ("        eager_ok", "mooncake.fast.cuda.pg", "_DevicePath.eager_ok"),
    ("        device path post", "mooncake.fast.cuda.pg", "_DevicePath.post"),
    ("          launch", "mooncake.fast.cuda.pg", "_DevicePath._launch"),
    ("          event record", "mooncake.fast.cuda.pg", "_CudaMemory.record"),
    ("          emulated kernel", "mooncake.fast.cuda.pg", "_DevicePath._emulate"),
    ("  Work object", "mooncake.pg.work", "MooncakeWork.__init__"),
    ("face: Work.wait", "mooncake.pg.work", "MooncakeWork.wait"),
    ("  plane wait", "mooncake.fast.cuda.pg", "CudaGroup.wait"),
    ("    pump", "mooncake.fast.cuda.pg", "CudaGroup.pump"),
    ("      try_device_done", "mooncake.fast.cuda.pg", "_Op.try_device_done"),
    ("    device_landed", "mooncake.fast.cuda.pg", "_Op.device_landed"),
    ("    event sync (gave up spinning)", "mooncake.fast.cuda.pg", "_CudaMemory.sync"),
    ("  commit (membership)", "mooncake.pg.membership", "Membership.try_commit"),
    ("  finish", "mooncake.pg.work", "MooncakeWork._finish_op"),
]


# the layers of one eager all_reduce that takes the quick lane (mooncake.pg.quick): "launch + event" and "spin on
# DONE" on a GPU only, "emulated kernel" in the plane's CPU emulation only
QUICK_ALL_REDUCE = [
    ("face: allreduce", "mooncake.pg.backend", "MooncakeProcessGroup.allreduce"),
    ("  quick: all_reduce", "mooncake.pg.quick", "QuickLane.all_reduce"),
    ("    membership.poll", "mooncake.pg.membership", "Membership.poll"),
    ("    quick_entry", "mooncake.fast.cuda.pg", "FastCudaGroup.quick_entry"),
    ("    membership.begin", "mooncake.pg.membership", "Membership.begin"),
    ("    quick_post", "mooncake.fast.cuda.pg", "_DevicePath.quick_post"),
    ("      launch + event", "mooncake.fast.cuda.pg", "_CudaMemory.quick_post"),
    ("      emulated kernel", "mooncake.fast.cuda.pg", "_DevicePath._emulate"),
    ("    Work object", "mooncake.pg.quick", "QuickWork.__init__"),
    ("face: Work.wait", "mooncake.pg.quick", "QuickWork.wait"),
    ("  quick: finish", "mooncake.pg.quick", "QuickLane.finish"),
    ("    spin on DONE", "mooncake.fast.cuda.pg", "_CudaMemory.quick_wait"),
    ("    commit (membership)", "mooncake.pg.membership", "Membership.try_commit"),
    ("    quick_finish", "mooncake.fast.cuda.pg", "_DevicePath.quick_finish"),
]


def eager_layers(pg) -> list:
    """The layers an eager all_reduce of group ``pg`` (the PG face over the fast CUDA plane) goes through: the
    quick lane's while its plane has the lane on, else the usual path's."""
    dev = pg._plane.g.dev
    return QUICK_ALL_REDUCE if dev is not None and dev.quick_on else EAGER_ALL_REDUCE


def thread_cpu_ns() -> dict[str, int]:
    """CPU time (ns) each thread of this process has run so far, summed by thread name (Linux schedstat): the
    Python name of a Python thread, else the OS one (CUDA's and UCX's own threads)."""
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, int] = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            name = python_names.get(int(tid))
            if name is None:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = "os:" + f.read().strip()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[name] += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return dict(out)


def thread_cpu_since(before: dict[str, int], num_calls: int) -> dict[str, float]:
    """Mean µs of CPU per call each thread name took since ``before`` (``thread_cpu_ns()``), busiest first."""
    now = thread_cpu_ns()
    per = {k: (v - before.get(k, 0)) / max(num_calls, 1) / 1e3 for k, v in now.items()}
    return dict(sorted(((k, round(v, 2)) for k, v in per.items() if v > 0), key=lambda kv: -kv[1]))


class LayerTimer:
    def __init__(self, layers: list[tuple[str, str, str]]):
        """``layers``: (label, module, qualified name ``Class.method`` or ``function``)."""
        self.layers = layers
        self.spent: collections.Counter = collections.Counter()
        self.costs: dict[str, list[float]] = collections.defaultdict(list)

    def install(self) -> None:
        for label, module, qualname in self.layers:
            owner_name, _, attr = qualname.rpartition(".")
            owner = importlib.import_module(module)
            if owner_name:
                owner = getattr(owner, owner_name)
            inner = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            if isinstance(inner, staticmethod):
                inner = inner.__func__
                setattr(owner, attr, staticmethod(self._timed(label, inner)))
            else:
                setattr(owner, attr, self._timed(label, inner))

    def _timed(self, label, inner):
        spent = self.spent

        def timed(*args, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter_ns() - t0
        return timed

    def clear(self) -> None:
        self.spent.clear()
        self.costs.clear()

    @contextlib.contextmanager
    def call(self):
        """Time one call: wall, this thread's CPU, the other threads' CPU (µs), context switches."""
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        p0, c0, t0 = time.process_time_ns(), time.thread_time_ns(), time.perf_counter_ns()
        yield
        t1, c1, p1 = time.perf_counter_ns(), time.thread_time_ns(), time.process_time_ns()
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        self.costs["wall_us"].append((t1 - t0) / 1e3)
        self.costs["thread_cpu_us"].append((c1 - c0) / 1e3)
        self.costs["other_threads_cpu_us"].append(((p1 - p0) - (c1 - c0)) / 1e3)
        self.costs["voluntary_switches"].append(r1.ru_nvcsw - r0.ru_nvcsw)
        self.costs["involuntary_switches"].append(r1.ru_nivcsw - r0.ru_nivcsw)

    def report(self, num_calls: int) -> dict:
        """Mean µs per call of each layer over ``num_calls`` calls; the median and mean of each call cost."""
        return {"layers_us": {label: self.spent.get(label, 0) / max(num_calls, 1) / 1e3 for label, _, _ in self.layers},
                "calls": {k: {"median": statistics.median(v), "mean": statistics.fmean(v)}
                          for k, v in self.costs.items() if v}}
