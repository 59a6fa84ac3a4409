#!/usr/bin/env python
"""pgbench: nccl-tests-style collective benchmark for torch.distributed backends, several side by side.

Same command line and table as upstream Mooncake's ``mooncake-pg/benchmark/pgbench.py`` (itself
modelled on nccl-tests), so the smoke command of upstream Mooncake's troubleshooting guide runs as
written with our paths::

    python benchmarks/pgbench.py --collective all_reduce --backend mooncake --device cuda -g 2 -b 8 -e 1M -f 2

Additions:

* ``--backend`` takes a comma-separated list (or is repeated); ``mooncake-cpu:fast`` /
  ``mooncake-cpu:ref`` (and ``mooncake:fast`` / ``mooncake:ref``) pin ``MOONCAKE_IMPL`` for that
  group.  All backends run in the same processes, interleaved size by size, so machine noise hits
  them alike.  Example (2 ranks, CPU)::

      python benchmarks/pgbench.py --collective all_reduce -g 2 -b 8 -e 64M -f 4 \\
          --backend mooncake-cpu:fast,mooncake-cpu:ref,gloo -J out.json --plot out.png

* ``--collective`` also takes a list or ``all``; besides upstream's collectives there are
  ``reduce``, ``gather`` and ``scatter``.
* ``-R/--repeats``: time the ``-n`` iterations R times and report the median (``--stat min`` for the
  best); ``--min-time S`` raises ``-n`` per case so a timed loop lasts at least S seconds;
  ``-J/--output_file`` writes JSON (as nccl-tests' ``-J``), ``--plot`` draws busbw and latency
  against size, one line per backend, ``--no-progress`` hides the tqdm bar.
* With one backend the table is exactly upstream's; with several, every row ends with the backend
  and a side-by-side summary follows each collective.
* ``-G/--cudagraph N`` (as nccl-tests' ``-G``): each case's ``-n`` x ``-m`` calls are captured in one CUDA
  graph, which is launched N times per timed round; ``#wrong`` then checks a graph of one call.  Backends
  ``mooncake`` and ``nccl`` only; a case the backend refuses to capture is reported ``N/A`` with its error
  in the JSON (``capture_error``).  ``--mem-pool`` allocates a ``mooncake`` group's buffers from
  ``mooncake.pg.mem_pool()`` (memory the other ranks of the host map: a captured in-place all_reduce of
  1 MiB or more then runs on the ranks' tensors directly).

Measurement (per collective, dtype, size): every backend's out-of-place and in-place case is warmed
up (``-w`` iterations), then ``-R`` rounds time each case once in turn (a barrier on the tested
group, then ``-n`` x ``-m`` calls timed with ``perf_counter`` (CUDA synchronised around
them unless ``-C``)); time is averaged over ranks per ``-a`` (0 rank-local, 1 mean, 2 min, 3 max);
``algbw = bytes / time``, ``busbw = algbw x factor`` (all_reduce 2(n-1)/n; all_gather, reduce_scatter,
alltoall, gather, scatter (n-1)/n; broadcast, reduce, sendrecv 1).  Out-of-place all_reduce copies the
send buffer into the receive buffer first (as upstream).  ``#wrong`` counts mismatching elements
over all ranks after the timing, on values chosen so every backend must be exact.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without `pip install -e .` (spawned ranks too)
    sys.path.append(_REPO)

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_base", "broadcast", "reduce_scatter", "alltoall",
               "sendrecv", "reduce", "gather", "scatter")
BACKENDS = ("mooncake", "mooncake-cpu", "nccl", "gloo")
DTYPE_ORDER = ["int8", "uint8", "int32", "uint32", "int64", "uint64", "half", "float", "double", "bfloat16",
               "f8e4m3", "f8e5m2"]
MOONCAKE_DTYPES = {"int8", "uint8", "int32", "int64", "half", "float", "double", "bfloat16"}
_SIZE_RE = re.compile(r"^(\d+)([KkMmGgTt])?[Bb]?$")


# ------------------------------------------------------------------------------------------ parsing

def parse_size(text) -> int:
    """``8``, ``1K``, ``32M``, ``1G`` (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text).strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 8, 4K, 32M, 1G)")
    scale = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[(m.group(2) or "").lower() or None]
    return int(m.group(1)) * scale


def _dtype(name: str) -> torch.dtype | None:
    return {"int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32, "uint32": getattr(torch, "uint32", None),
            "int64": torch.int64, "uint64": getattr(torch, "uint64", None), "half": torch.float16,
            "float": torch.float32, "double": torch.float64, "bfloat16": torch.bfloat16,
            "f8e4m3": getattr(torch, "float8_e4m3fn", None), "f8e5m2": getattr(torch, "float8_e5m2", None)}.get(name)


def _split_list(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collective", action="append", required=True,
                   help=f"one or more of {', '.join(COLLECTIVES)} (comma-separated or repeated), or all")
    p.add_argument("--backend", action="append",
                   help="one or more of mooncake, mooncake-cpu, nccl, gloo; mooncake[-cpu]:fast|ref pins "
                        "MOONCAKE_IMPL (default: mooncake on cuda, mooncake-cpu on cpu)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("32M"))
    p.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("32M"))
    p.add_argument("-i", "--stepbytes", type=parse_size, default=parse_size("1M"))
    p.add_argument("-f", "--stepfactor", type=int, default=1)
    p.add_argument("-n", "--iters", type=int, default=20)
    p.add_argument("-w", "--warmup_iters", type=int, default=1)
    p.add_argument("-m", "--agg_iters", type=int, default=1)
    p.add_argument("-c", "--check", type=int, default=1)
    p.add_argument("-a", "--average", type=int, choices=[0, 1, 2, 3], default=1)
    p.add_argument("-d", "--datatype", default="float", help=f"{', '.join(DTYPE_ORDER)} or all")
    p.add_argument("-o", "--op", default="sum", choices=["sum", "prod", "max", "min", "avg"])
    p.add_argument("-r", "--root", type=int, default=0)
    p.add_argument("-C", "--report_cputime", action="store_true")
    p.add_argument("-S", "--report_timestamps", action="store_true")
    p.add_argument("-t", "--nthreads", type=int, default=1)
    p.add_argument("-g", "--ngpus", type=int, default=1, help="ranks (processes) to spawn without torchrun")
    p.add_argument("-J", "--output_file", "--json", dest="output_file", default=None, help="write results as JSON")
    p.add_argument("-R", "--repeats", type=int, default=1, help="time the -n iterations this many times")
    p.add_argument("--stat", choices=["median", "min"], default="median", help="how repeats are combined")
    p.add_argument("--min-time", type=float, default=0.0,
                   help="raise -n per case so one timed loop lasts at least this many seconds (all ranks agree)")
    p.add_argument("-G", "--cudagraph", type=int, default=0,
                   help="capture -n x -m calls per case in a CUDA graph and launch it this many times per round")
    p.add_argument("--mem-pool", action="store_true",
                   help="allocate the mooncake backends' buffers from mooncake.pg.mem_pool() (CUDA)")
    p.add_argument("--plot", default=None, help="write busbw / latency plots (PNG) to this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank (CPU)")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="process group timeout (s)")
    args = p.parse_args(argv)
    cols = _split_list(args.collective)
    if cols == ["all"]:
        cols = list(COLLECTIVES)
    bad = [c for c in cols if c not in COLLECTIVES]
    if bad:
        p.error(f"unknown collective(s) {bad}; choose from {', '.join(COLLECTIVES)} or all")
    args.collectives = cols
    specs = _split_list(args.backend)
    for spec in specs:
        name, _, impl = spec.partition(":")
        if name not in BACKENDS or (impl and (impl not in ("fast", "ref", "auto") or not name.startswith("mooncake"))):
            p.error(f"unknown backend {spec!r}; choose from {', '.join(BACKENDS)}, "
                    "mooncake[-cpu]:fast, mooncake[-cpu]:ref")
    if args.device is None:
        if specs:
            args.device = "cuda" if any(s.partition(":")[0] in ("mooncake", "nccl") for s in specs) else "cpu"
        else:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not specs:
        specs = ["mooncake" if args.device == "cuda" else "mooncake-cpu"]
    for spec in specs:
        name = spec.partition(":")[0]
        if args.device == "cuda" and name not in ("mooncake", "nccl", "gloo"):
            p.error(f"--device=cuda requires --backend mooncake, nccl or gloo (got {spec})")
        if args.device == "cpu" and name not in ("mooncake-cpu", "gloo"):
            p.error(f"--device=cpu requires --backend mooncake-cpu or gloo (got {spec})")
    args.backends = specs
    if args.nthreads != 1:
        p.error("-t/--nthreads must be 1")
    if args.cudagraph < 0:
        p.error(f"-G/--cudagraph must be >= 0 graph launches (got {args.cudagraph})")
    if args.cudagraph and args.device != "cuda":
        p.error("-G/--cudagraph needs --device cuda")
    if args.cudagraph and any(s.partition(":")[0] not in ("mooncake", "nccl") for s in specs):
        p.error(f"-G/--cudagraph needs backends that capture in CUDA graphs: mooncake or nccl (got {','.join(specs)})")
    if args.mem_pool and args.device != "cuda":
        p.error("--mem-pool needs --device cuda")
    if args.stepfactor <= 1 and args.stepbytes <= 0:
        p.error("--stepbytes must be > 0 when --stepfactor <= 1")
    if args.datatype != "all" and _dtype(args.datatype) is None:
        p.error(f"datatype {args.datatype!r} is not available (choose from {', '.join(DTYPE_ORDER)} or all)")
    return args


def sizes_of(args) -> list[int]:
    out, size = [], args.minbytes
    while size <= args.maxbytes:
        out.append(size)
        size = size * args.stepfactor if args.stepfactor > 1 else size + args.stepbytes
    return out


def counts(collective: str, size: int, elt: int, n: int) -> tuple[int, int, int]:
    """(send count, recv count, count shown) per rank, as upstream / nccl-tests."""
    elems = size // elt
    if collective in ("all_reduce", "broadcast", "sendrecv", "reduce"):
        return elems, elems, elems
    base = (elems // n) & -max(1, 16 // elt)  # per-rank block, 16-byte aligned
    if collective in ("all_gather", "all_gather_base", "gather"):
        return base, base * n, base
    if collective in ("reduce_scatter", "scatter"):
        return base * n, base, base
    if collective == "alltoall":
        return base * n, base * n, base
    raise ValueError(collective)


def busbw_factor(collective: str, n: int) -> float:
    if collective == "all_reduce":
        return 2.0 * (n - 1) / n
    if collective in ("reduce_scatter", "all_gather", "all_gather_base", "alltoall", "gather", "scatter"):
        return (n - 1) / n
    return 1.0


# ------------------------------------------------------------------------------------------ formatting

def _fmt(value: float, width: int) -> str:
    power, val = 0, 1.0
    while value >= val:
        power += 1
        val *= 10.0
    if power < width - 2:
        return f"{value:>{width}.2f}"
    if power < width - 1:
        return f"{value:>{width}.1f}"
    if power < width + 1:
        return f"{value:>{width}.0f}"
    return f"{value:>{width}.1e}"


def humanize(value: int) -> str:
    suffixes = ["", "K", "M", "G", "T", "P"]
    val, i = float(value), 0
    while i < len(suffixes) - 1 and val >= 1024.0:
        val /= 1024.0
        i += 1
    if i == 0:
        return f"{int(val)}"
    return f"{val:.1f}{suffixes[i]}" if val < 10 else f"{val:.0f}{suffixes[i]}"


def header(args) -> str:
    t = "cputime" if args.report_cputime else "time"
    ts = ("timestamp", 19, "%Y-%m-%d %H:%M:%S") if args.report_timestamps else ("", 0, "")
    return "\n".join([
        "#",
        f"# {'':10s}  {'':12s}  {'':8s}  {'':6s}  {'':6s}           out-of-place                       in-place          ",
        f"# {'size':10s}  {'count':12s}  {'type':8s}  {'redop':6s}  {'root':6s}  {t:>7s}  {'algbw':6s}  {'busbw':6s}  "
        f"{'#wrong':6s}  {t:>7s}  {'algbw':6s}  {'busbw':6s}  {'#wrong':6s} {ts[0]:>{ts[1]}s}",
        f"# {'(B)':10s}  {'(elements)':12s}  {'':8s}  {'':6s}  {'':6s}  {'(us)':>7s}  {'(GB/s)':6s}  {'(GB/s)':6s}  "
        f"{'':6s}  {'(us)':>7s}  {'(GB/s)':6s}  {'(GB/s)':6s}  {'':6s} {ts[2]:>{ts[1]}s}",
    ])


def row(rec: dict, args, label: str | None) -> str:
    line = (f"{humanize(rec['size_bytes']):>12s}  {humanize(rec['count']):>12s}  {rec['dtype']:8s}  "
            f"{rec['redop']:6s}  {rec['root']:6d}")
    for mode in ("out_of_place", "in_place"):
        m = rec[mode]
        if m is None:
            line += f"  {'N/A':>7s}  {'N/A':>6s}  {'N/A':>6s}  {'N/A':>6s}"
            continue
        wrong = f"{m['wrong']:6g}" if m["wrong"] >= 0 else f"{'N/A':>6s}"
        line += f"  {_fmt(m['time_us'], 7)}  {_fmt(m['algbw'], 6)}  {_fmt(m['busbw'], 6)}  {wrong}"
    if args.report_timestamps:
        line += f" {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S'):>19s}"
    if label:
        line += f"  {label}"
    return line


def summary(records: list[dict], backends: list[str], collective: str) -> str:
    """Side by side: per size, each backend's in-place time and busbw, and the ratio to gloo."""
    base = next((b for b in backends if b.startswith("gloo")), None)
    lines = [f"# side by side: {collective} (in-place; x = busbw / {base}'s)" if base else
             f"# side by side: {collective} (in-place)"]
    head = f"# {'size':>8s}" + "".join(f"  {b[:22]:>22s}" for b in backends)
    lines.append(head)
    lines.append(f"# {'':>8s}" + "".join(f"  {'time(us) busbw  x':>22s}" for _ in backends))
    by = {}
    for r in records:
        if r["collective"] == collective:
            by.setdefault((r["size_bytes"], r["dtype"]), {})[r["backend"]] = r
    for (size, _), recs in sorted(by.items()):
        cells = []
        ref = recs.get(base, {}).get("in_place") if base else None
        for b in backends:
            m = (recs.get(b) or {}).get("in_place")
            if m is None:
                cells.append(f"  {'N/A':>22s}")
                continue
            x = (m["busbw"] / ref["busbw"]) if ref and ref["busbw"] > 0 and m["busbw"] > 0 else float("nan")
            if ref and ref["busbw"] == 0:  # busbw 0 (one rank): compare latency instead
                x = ref["time_us"] / m["time_us"] if m["time_us"] else float("nan")
            cells.append(f"  {_fmt(m['time_us'], 8)} {_fmt(m['busbw'], 6)} {x:5.2f}")
        lines.append(f"  {humanize(size):>8s}" + "".join(cells))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ ops

class Case:
    """Buffers and the call of one (collective, dtype, count, mode) on one group."""

    def __init__(self, collective, group, n, rank, dtype, sendcount, recvcount, in_place, args, device):
        self.c, self.g, self.n, self.rank, self.dtype = collective, group, n, rank, dtype
        self.in_place, self.args, self.device = in_place, args, device
        self.op = {"sum": dist.ReduceOp.SUM, "prod": dist.ReduceOp.PRODUCT, "max": dist.ReduceOp.MAX,
                   "min": dist.ReduceOp.MIN, "avg": dist.ReduceOp.SUM}[args.op]
        self.avg = args.op == "avg"
        self.root = args.root
        empty = lambda k: torch.zeros(k, dtype=dtype, device=device)  # noqa: E731
        c = collective
        if c in ("all_reduce", "broadcast", "reduce"):
            self.send = empty(sendcount)
            self.recv = self.send if in_place else empty(recvcount)
        elif c in ("all_gather", "all_gather_base", "gather"):
            self.recv = empty(recvcount)
            self.send = self.recv[rank * sendcount:(rank + 1) * sendcount] if in_place else empty(sendcount)
            self.slots = list(self.recv.split(sendcount)) if sendcount else [self.recv[:0]] * n
        elif c in ("reduce_scatter", "scatter"):
            self.send = empty(sendcount)
            self.recv = self.send[rank * recvcount:(rank + 1) * recvcount] if in_place else empty(recvcount)
            self.slots = list(self.send.split(recvcount)) if recvcount else [self.send[:0]] * n
        elif c == "alltoall":
            self.send = empty(sendcount)
            self.recv = self.send if in_place else empty(recvcount)
        elif c == "sendrecv":
            self.send = empty(sendcount)
            self.recv = self.send if in_place else empty(recvcount)
        self.fill()

    # values that every backend must reproduce exactly (small integers)
    def fill(self) -> None:
        c, r, n = self.c, self.rank, self.n
        if c in ("all_reduce", "reduce_scatter", "reduce"):
            self.send.fill_(1 if self.args.op == "prod" else r + 1)
        elif c in ("broadcast", "scatter"):
            self.send.fill_(7 if r == self.root else 0)
            if c == "scatter" and r == self.root and self.slots[0].numel():
                for p, s in enumerate(self.slots):
                    s.fill_(p + 1)
        elif c in ("all_gather", "all_gather_base", "gather", "sendrecv"):
            self.send.fill_(r + 1)
        elif c == "alltoall":
            if self.send.numel():
                v = self.send.view(n, -1)
                for p in range(n):
                    v[p].fill_((r * 16 + p) % 100)

    def run(self) -> None:
        c, g = self.c, self.g
        if c == "all_reduce":
            if self.send is not self.recv:
                self.recv.copy_(self.send)
            dist.all_reduce(self.recv, op=self.op, group=g)
            if self.avg:
                self.recv.div_(self.n)
        elif c == "broadcast":
            dist.broadcast(self.send if self.in_place else self.recv, src=self.root, group=g)
        elif c == "reduce":
            if self.send is not self.recv:
                self.recv.copy_(self.send)
            dist.reduce(self.recv, dst=self.root, op=self.op, group=g)
        elif c == "all_gather":
            dist.all_gather(self.slots, self.send, group=g)
        elif c == "all_gather_base":
            dist.all_gather_into_tensor(self.recv, self.send, group=g)
        elif c == "gather":
            dist.gather(self.send, self.slots if self.rank == self.root else None, dst=self.root, group=g)
        elif c == "reduce_scatter":
            dist.reduce_scatter_tensor(self.recv, self.send, op=self.op, group=g)
            if self.avg:
                self.recv.div_(self.n)
        elif c == "scatter":
            dist.scatter(self.recv, self.slots if self.rank == self.root else None, src=self.root, group=g)
        elif c == "alltoall":
            dist.all_to_all_single(self.recv, self.send, group=g)
        elif c == "sendrecv":
            n, r = self.n, self.rank
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, self.send, (r + 1) % n, group=g),
                                           dist.P2POp(dist.irecv, self.recv, (r - 1) % n, group=g)])
            for q in reqs:
                q.wait()

    def checkable(self) -> bool:
        return not (self.in_place and self.c in ("alltoall", "sendrecv"))

    def capture(self, calls: int) -> "torch.cuda.CUDAGraph":
        """A CUDA graph of ``calls`` calls of this case (every rank captures the same ones)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                self.run()
        return graph

    def wrong(self, run=None) -> int:
        """Run once (``run``: default one eager call; graph mode: a graph of one call) on fresh values and
        count wrong output elements on this rank."""
        self.fill()
        if self.c == "broadcast" and not self.in_place:
            self.recv.fill_(7 if self.rank == self.root else 0)
        (run or self.run)()
        _sync(self.device)
        c, r, n = self.c, self.rank, self.n
        out = self.recv
        if c == "all_reduce" or (c == "reduce" and r == self.root) or c == "reduce_scatter":
            tot = {"sum": n * (n + 1) // 2, "prod": 1, "max": n, "min": 1, "avg": (n + 1) / 2}[self.args.op]
            want = torch.full_like(out, tot)
        elif c == "reduce":
            return 0
        elif c == "broadcast":
            out = self.send if self.in_place else self.recv
            want = torch.full_like(out, 7)
        elif c in ("all_gather", "all_gather_base") or (c == "gather" and r == self.root):
            want = torch.cat([torch.full_like(s, p + 1) for p, s in enumerate(self.slots)]) if out.numel() else out
        elif c == "gather":
            return 0
        elif c == "scatter":
            want = torch.full_like(out, r + 1)
        elif c == "alltoall":
            want = torch.cat([torch.full_like(b, (p * 16 + r) % 100) for p, b in enumerate(out.view(n, -1))]) \
                if out.numel() else out
        elif c == "sendrecv":
            want = torch.full_like(out, (r - 1) % n + 1)
        else:
            return 0
        if out.numel() == 0:
            return 0
        if out.is_floating_point():
            return int((~torch.isclose(out.double(), want.double(), rtol=1e-3, atol=1e-3)).sum().item())
        return int((out != want).sum().item())


# ------------------------------------------------------------------------------------------ worker

def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocating(pool):
    """Where a case's buffers come from: ``pool`` (a ``torch.cuda.MemPool``), or torch's default."""
    return torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext()


def _make_group(spec: str):
    """A process group for ``spec`` over all ranks (every rank calls this in the same order)."""
    name, _, impl = spec.partition(":")
    if name.startswith("mooncake"):
        import mooncake.impl
        import mooncake.pg as pg
        filters = os.environ.get("MOONCAKE_PGTEST_DEVICE_FILTERS")
        if filters and not pg.get_device_filter():
            pg.set_device_filter([f for f in filters.split(",") if f])
        saved = os.environ.get("MOONCAKE_IMPL")
        if impl:
            os.environ["MOONCAKE_IMPL"] = impl
        mooncake.impl.select.cache_clear()
        try:
            group = dist.new_group(backend=name)
        finally:
            if saved is None:
                os.environ.pop("MOONCAKE_IMPL", None)
            else:
                os.environ["MOONCAKE_IMPL"] = saved
            mooncake.impl.select.cache_clear()
        return group, "/".join(pg.get_implementation(group))
    return dist.new_group(backend=name), name


def _aggregate(args, value: float) -> float:
    if args.average == 0:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    op = {1: dist.ReduceOp.SUM, 2: dist.ReduceOp.MIN, 3: dist.ReduceOp.MAX}[args.average]
    dist.all_reduce(t, op=op)  # the default (gloo) group: the same coordination for every backend
    return t.item() / (dist.get_world_size() if args.average == 1 else 1)


def _iterations(case: Case, args, device) -> int:
    """``-n``, or more with ``--min-time`` (estimated from 3 timed calls, agreed by MAX over ranks)."""
    if args.min_time <= 0:
        return args.iters
    dist.barrier(group=case.g)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        case.run()
    _sync(device)
    per_call = (time.perf_counter() - t0) / 3
    want = torch.tensor([min(100_000, max(args.iters, int(args.min_time / max(per_call, 1e-7))))],
                        dtype=torch.int64)
    dist.all_reduce(want, op=dist.ReduceOp.MAX)
    return int(want.item())


def _timed(case: Case, iters: int, args, device, graph=None) -> float:
    """One timed loop (eager calls, or ``-G`` launches of ``graph``, which holds ``iters`` x ``-m`` calls):
    seconds per call."""
    calls = iters * args.agg_iters
    dist.barrier(group=case.g)
    if not args.report_cputime:
        _sync(device)
    t0 = time.perf_counter()
    if graph is None:
        for _ in range(calls):
            case.run()
    else:
        for _ in range(args.cudagraph):
            graph.replay()
        calls *= args.cudagraph
    if not args.report_cputime:
        _sync(device)
    return (time.perf_counter() - t0) / max(1, calls)


def _captured(cases: dict, iters: dict, args, device) -> tuple[dict, dict]:
    """Graph mode: per case, (a graph of its timed calls, a graph of one call for ``#wrong``), or the
    capture's error (a collective the backend does not capture; every rank of a group gets the same)."""
    graphs, errors = {}, {}
    for key, case in cases.items():
        try:
            graphs[key] = (case.capture(iters[key] * args.agg_iters), case.capture(1))
        except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON, the run goes on
            errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            _sync(device)
    return graphs, errors


def measure_all(cases: dict, args, device) -> dict:
    """Time every (backend, mode) case of one size: warm-up each (eager calls), then, in graph mode,
    capture each; then ``-R`` rounds, each round timing every case once in turn (so noise spreads over the
    backends alike); then ``#wrong``."""
    iters = {}
    for key, case in cases.items():
        for _ in range(args.warmup_iters * args.agg_iters):
            case.run()
        iters[key] = _iterations(case, args, device)
    graphs, errors = _captured(cases, iters, args, device) if args.cudagraph else ({}, {})
    timed = [key for key in cases if key not in errors]
    samples = {key: [] for key in timed}
    for _ in range(max(1, args.repeats)):
        for key in timed:
            samples[key].append(_timed(cases[key], iters[key], args, device, graphs.get(key, (None,))[0]))
    out = {key: {"capture_error": error} for key, error in errors.items()}
    for key in timed:
        case, got = cases[key], samples[key]
        local = min(got) if args.stat == "min" else statistics.median(got)
        wrong = -1
        if args.check > 0 and case.checkable():
            run = graphs[key][1].replay if key in graphs else None
            wrong = sum(case.wrong(run) for _ in range(args.check))
            t = torch.tensor([wrong], dtype=torch.int64)
            dist.all_reduce(t)
            wrong = int(t.item())
        out[key] = {"time_s": local, "samples_s": got, "wrong": wrong, "iters": iters[key]}
    graphs.clear()
    return out


def _exit_with_parent() -> None:
    """Spawned ranks end when the launcher dies (mp.spawn leaves orphans running otherwise)."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="pgbench-orphan-watch", daemon=True).start()


def worker(local_rank: int, args) -> None:
    _exit_with_parent()
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", local_rank))
    else:
        rank, world = local_rank, args.ngpus
        os.environ["RANK"] = str(rank)  # as torchrun does (MOONCAKE_FAST_CPU_HOST_ID=rank-mod-N reads it)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("pgbench: --device cuda but CUDA is not available here; use --device cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=args.timeout)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    groups = {}
    impls = {}
    for spec in args.backends:
        groups[spec], impls[spec] = _make_group(spec)
    pools = {}
    if args.mem_pool:
        import mooncake.pg
        pools = {spec: mooncake.pg.mem_pool() for spec in args.backends if spec.startswith("mooncake")}
    if args.datatype == "all":
        dtypes = [d for d in DTYPE_ORDER if _dtype(d) is not None]
    else:
        dtypes = [args.datatype]
    sizes = sizes_of(args)
    label = len(args.backends) > 1
    records: list[dict] = []
    load_at_start = os.getloadavg()
    bar = None
    if rank == 0:
        print(f"# pgbench: {world} ranks, device {args.device}, backends: "
              + ", ".join(f"{s} ({impls[s]})" for s in args.backends)
              + (f"; CUDA graphs: {args.cudagraph} launches of -n x -m calls" if args.cudagraph else "")
              + ("; mooncake buffers from mooncake.pg.mem_pool()" if pools else ""), flush=True)
        if not args.no_progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=len(args.collectives) * len(dtypes) * len(sizes) * len(args.backends),
                           unit="case", file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                bar = None
    out = (bar.write if bar is not None else (lambda s: print(s, flush=True))) if rank == 0 else (lambda s: None)
    for collective in args.collectives:
        out(f"# collective {collective}")
        out(header(args))
        for dname in dtypes:
            dtype = _dtype(dname)
            elt = torch.empty(0, dtype=dtype).element_size()
            for size in sizes:
                sendcount, recvcount, count = counts(collective, size, elt, world)
                size_bytes = max(sendcount, recvcount) * elt
                if sendcount == 0 and recvcount == 0:
                    if bar is not None:
                        bar.update(len(args.backends))
                    continue
                cases, recs = {}, {}
                for spec in args.backends:
                    name = spec.partition(":")[0]
                    recs[spec] = {"collective": collective, "backend": spec, "implementation": impls[spec],
                                  "dtype": dname, "size_bytes": size_bytes, "count": count,
                                  "redop": args.op if collective in ("all_reduce", "reduce_scatter", "reduce") else "none",
                                  "root": args.root if collective in ("broadcast", "reduce", "gather", "scatter") else -1,
                                  "out_of_place": None, "in_place": None}
                    if name.startswith("mooncake") and dname not in MOONCAKE_DTYPES:
                        continue
                    with _allocating(pools.get(spec)):
                        for mode in ("out_of_place", "in_place"):
                            cases[(spec, mode)] = Case(collective, groups[spec], world, rank, dtype, sendcount,
                                                       recvcount, mode == "in_place", args, device)
                measured = measure_all(cases, args, device)
                del cases
                for (spec, mode), m in measured.items():
                    if "capture_error" in m:
                        recs[spec].setdefault("capture_error", {})[mode] = m["capture_error"]
                        continue
                    t = _aggregate(args, m["time_s"])
                    algbw = size_bytes / 1e9 / t if t > 0 else 0.0
                    recs[spec][mode] = {"time_us": t * 1e6, "algbw": algbw,
                                        "busbw": algbw * busbw_factor(collective, world), "wrong": m["wrong"],
                                        "samples_us": [x * 1e6 for x in m["samples_s"]], "iters": m["iters"]}
                for spec in args.backends:
                    records.append(recs[spec])
                    out(row(recs[spec], args, spec if label else None))
                    if bar is not None:
                        bar.set_postfix_str(f"{collective} {humanize(size_bytes)}B {spec}")
                        bar.update(1)
        if label:
            out(summary(records, args.backends, collective))
    if bar is not None:
        bar.close()
    if rank == 0:
        meta = {"argv": sys.argv, "world_size": world, "device": args.device, "backends": args.backends,
                "implementations": impls, "host": socket.gethostname(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "python": platform.python_version(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "iters": args.iters, "warmup_iters": args.warmup_iters, "agg_iters": args.agg_iters,
                "repeats": args.repeats, "stat": args.stat, "average": args.average, "threads": args.threads,
                "cudagraph": args.cudagraph, "mem_pool": args.mem_pool,
                "load_average_start": load_at_start, "load_average_end": os.getloadavg()}
        if args.output_file:
            with open(args.output_file, "w") as f:
                json.dump({"meta": meta, "results": records}, f, indent=1)
            print(f"# wrote {args.output_file}", flush=True)
        if args.plot:
            plot(records, meta, args.plot)
            print(f"# wrote {args.plot}", flush=True)
    pools.clear()
    for g in groups.values():
        dist.destroy_process_group(g)
    dist.destroy_process_group()


def plot(records: list[dict], meta: dict, path: str) -> None:
    """busbw and latency against size per collective, one line per backend (in-place solid,
    out-of-place dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collectives = list(dict.fromkeys(r["collective"] for r in records))
    fig, axes = plt.subplots(len(collectives), 2, figsize=(12, 3.6 * len(collectives)), squeeze=False)
    for i, c in enumerate(collectives):
        ax_bw, ax_t = axes[i]
        for j, b in enumerate(meta["backends"]):
            rs = sorted((r for r in records if r["collective"] == c and r["backend"] == b),
                        key=lambda r: r["size_bytes"])
            color = f"C{j}"
            for mode, style in (("in_place", "-"), ("out_of_place", "--")):
                pts = [(r["size_bytes"], r[mode]) for r in rs if r[mode] is not None]
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ax_bw.plot(xs, [p[1]["busbw"] for p in pts], style, color=color, marker="o", ms=3,
                           label=f"{b}" + (" (out-of-place)" if mode == "out_of_place" else ""),
                           lw=1.6 if mode == "in_place" else 0.9)
                ax_t.plot(xs, [p[1]["time_us"] for p in pts], style, color=color, marker="o", ms=3,
                          lw=1.6 if mode == "in_place" else 0.9)
        for ax in (ax_bw, ax_t):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("size (bytes)")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_yscale("log")
        ax_bw.set_yscale("log")
        ax_bw.set_ylabel("busbw (GB/s)")
        ax_t.set_ylabel("time (us)")
        ax_bw.set_title(f"{c}: bus bandwidth")
        ax_t.set_title(f"{c}: latency")
        ax_bw.legend(fontsize=7)
    fig.suptitle(f"pgbench, {meta['world_size']} ranks, {meta['device']}, {meta['cpus']} CPUs, "
                 f"{meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:
        worker(int(os.environ.get("LOCAL_RANK", "0")), args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pgbench: --device cuda but CUDA is not available on this machine; "
                         "use --device cpu (backends mooncake-cpu, gloo)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if args.master_port is not None:
        os.environ["MASTER_PORT"] = str(args.master_port)
    else:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(args,), nprocs=args.ngpus, join=True)


if __name__ == "__main__":
    main()
