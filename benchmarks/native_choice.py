"""Copy and SUM bandwidth of the CPU plane's hot loops, side by side, to choose how they ship.

    python benchmarks/native_choice.py [--sizes 64K,1M,16M,64M] [--repeats 30] [--json out.json]

Variants (each one built or jitted here, in a temporary directory; no cache is touched):

* ``before`` (with ``--baseline FILE``): an older ``mooncake_shm.c`` (e.g. ``git show
  5856bf2:csrc/cpu/mooncake_shm.c``) with the flags the first-use build used then (``-march=native``);
* ``march-native``: today's ``csrc/cpu/mooncake_shm.c`` with ``-O3 -march=native``: what a first-use
  compile tuned to this very CPU gives;
* ``portable <isa>``: the same file with the flags a wheel is built with (``mooncake._nativebuild.CPU_FLAGS``:
  no ``-march``), its folds held to one vector width (``sse2``, the x86-64 baseline a plain portable build
  would have; ``avx``; ``avx512f``) where the CPU has it; by default the file picks the widest;
* ``in-use``: the library ``mooncake.fast.cpu.native`` loads in this environment (prebuilt from the
  wheel, or the cached first-use build), when there is one;
* ``numba``: the same loops as numba kernels (``@njit``; needs numba, skipped without it);
* ``torch``: the fallbacks (``Tensor.copy_``, ``torch.add(..., out=)``).

Bandwidth is bytes written per second (the output's size over the time of one call), the best of
``--repeats`` calls after a warm-up; single-threaded, as each rank runs the loops.  ``copy`` uses
plain stores below 1 MiB and non-temporal ones from there on, like the plane; ``sum2`` / ``sum4``
fold 2 / 4 float32 inputs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mooncake import _nativebuild as nb  # noqa: E402

OLD_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")
NT_MIN = 1 << 20


def parse_size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1].upper()] if text[-1].upper() in mult else int(text)


class CLib:
    def __init__(self, path: str, isa: int | None = None):
        self.lib = ctypes.CDLL(path)
        if isa is not None:  # a private copy per width: the width is a per-library setting
            self.lib.mc_isa_limit.argtypes = [ctypes.c_int]
            self.lib.mc_isa_limit(isa)
        self.lib.mc_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.lib.mc_sum_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_int]

    def copy(self, dst, src):
        n = dst.numel() * dst.element_size()
        self.lib.mc_copy(dst.data_ptr(), src.data_ptr(), n, 1 if n >= NT_MIN else 0)

    def sum(self, out, ins):
        ptrs = (ctypes.c_void_p * len(ins))(*[x.data_ptr() for x in ins])
        n = out.numel() * 4
        self.lib.mc_sum_f32(out.data_ptr(), ptrs, len(ins), out.numel(), 1 if n >= NT_MIN else 0)


class Torch:
    def copy(self, dst, src):
        dst.copy_(src)

    def sum(self, out, ins):
        torch.add(ins[0], ins[1], out=out)
        for x in ins[2:]:
            torch.add(out, x, out=out)


class Numba:
    def __init__(self):
        import numba

        @numba.njit(nogil=True, cache=False)
        def copy(dst, src):
            for i in range(dst.shape[0]):
                dst[i] = src[i]

        @numba.njit(nogil=True, cache=False)
        def sum2(out, a, b):
            for i in range(out.shape[0]):
                out[i] = a[i] + b[i]

        @numba.njit(nogil=True, cache=False)
        def sumk(out, ins):
            k = len(ins)
            for i in range(out.shape[0]):
                acc = ins[0][i]
                for j in range(1, k):
                    acc = acc + ins[j][i]
                out[i] = acc

        self._copy, self._sum2, self._sumk = copy, sum2, sumk

    def copy(self, dst, src):
        self._copy(dst.view(torch.int64).numpy(), src.view(torch.int64).numpy())

    def sum(self, out, ins):
        if len(ins) == 2:
            self._sum2(out.numpy(), ins[0].numpy(), ins[1].numpy())
        else:
            self._sumk(out.numpy(), tuple(x.numpy() for x in ins))


def build(flags, tmp: Path, name: str, source: Path | None = None) -> str:
    out = tmp / f"{name}.so"
    nb.compile_c(source or REPO / "csrc" / nb.CPU_SOURCE, out, flags=flags)
    return str(out)


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def check_equal(variants, n=4099):
    g = torch.Generator().manual_seed(0)
    ins = [torch.randn(n, generator=g) * 1e3 for _ in range(4)]
    ins[0][::97] = float("nan")
    want = ((ins[0] + ins[1]) + ins[2]) + ins[3]
    for name, v in variants.items():
        out = torch.empty(n)
        v.sum(out, ins)
        assert torch.equal(out.view(torch.int32), want.view(torch.int32)), f"{name}: sum4 bits differ"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64K,1M,16M,64M")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", default=None)
    p.add_argument("--baseline", default=None, help="an older mooncake_shm.c to build with -march=native as 'before'")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    variants: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            variants["before"] = CLib(build(OLD_FLAGS, Path(tmp), "before", Path(args.baseline)))
        variants["march-native"] = CLib(build(OLD_FLAGS, Path(tmp), "native"))
        for level, isa in enumerate(("sse2", "avx", "avx512f")):
            lib = CLib(build(nb.CPU_FLAGS, Path(tmp), f"portable-{isa}"), level)
            lib.lib.mc_isa.restype = ctypes.c_char_p
            if lib.lib.mc_isa().decode() == isa:
                variants[f"portable {isa}"] = lib
        from mooncake.fast.cpu import native

        if native.load() is not None:
            variants["in-use"] = CLib(native.lib._name)
        try:
            variants["numba"] = Numba()
        except ImportError:
            print("numba not installed: no numba column", file=sys.stderr)
        variants["torch"] = Torch()
        check_equal(variants)
        rows = []
        for size in sizes:
            n = size // 4
            src = [torch.randn(n) for _ in range(4)]
            dst = torch.empty(n)
            for op in ("copy", "sum2", "sum4"):
                row = {"op": op, "bytes": size}
                for name, v in variants.items():
                    if op == "copy":
                        t = best(lambda: v.copy(dst, src[0]), args.repeats)
                    else:
                        k = 2 if op == "sum2" else 4
                        t = best(lambda: v.sum(dst, src[:k]), args.repeats)
                    row[name] = size / t / 1e9
                rows.append(row)
                print(f"{op:5} {size >> 10:>7} KiB  " + "  ".join(f"{k} {row[k]:6.2f}" for k in variants),
                      flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    meta = {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "cc": subprocess.run([*nb.c_compiler(), "--version"], capture_output=True, text=True).stdout.splitlines()[0],
            "variants": list(variants), "unit": "GB/s (output bytes / time of one call, best of repeats)"}
    print("\n| op | size | " + " | ".join(variants) + " |")
    print("|---|---:|" + "---:|" * len(variants))
    for r in rows:
        size = f"{r['bytes'] >> 20} MiB" if r["bytes"] >= 1 << 20 else f"{r['bytes'] >> 10} KiB"
        print(f"| {r['op']} | {size} | " + " | ".join(f"{r[k]:.2f}" for k in variants) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
