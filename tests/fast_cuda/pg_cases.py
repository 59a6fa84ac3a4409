"""Cases for the CUDA PG plane and their expected outputs from ``mooncake.model`` (computed on the CPU,
in the test process, from the same seeds the workers use).  Shared by test_fast_cuda_pg.py and
pg_check.py (scripts/gpu_pg_check.sh)."""

from __future__ import annotations

import itertools
import zlib

from mooncake.model import collectives as M
from mooncake.model.reduce import ReduceOp, check_reducible
from mooncake.testing.compare import bitwise_equal

import pg_harness as H

ALL_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]


def prefix(name: str) -> str:
    return f"t/{name}/{zlib.crc32(name.encode())}"


def case(op, dtype, numel, *, red=None, root=None, k=None, salt="", specials=True):
    cid = f"{op}-{dtype}-{numel}-{red}-{root}-{k}-{salt}"
    return {"id": cid, "op": op, "dtype": dtype, "numel": numel, "red": red, "root": root, "k": k,
            "seed": zlib.crc32(cid.encode()), "specials": specials}


def grid(active: list[int], capacity: int, dtypes, numels) -> list[dict]:
    """Every collective, every reduce op valid for the dtype, slot counts size and capacity."""
    size = active[-1] + 1
    ks = sorted({size, capacity})
    out = []
    for dtype, numel in itertools.product(dtypes, numels):
        for red in ReduceOp:
            if check_reducible(red, H.DTYPES[dtype]):
                continue
            out.append(case("all_reduce", dtype, numel, red=red.name))
        out.append(case("reduce", dtype, numel, red="MIN" if dtype != "bool" else "SUM", root=active[-1]))
        out.append(case("broadcast", dtype, numel, root=active[0]))
        for k in ks:
            out.append(case("all_gather", dtype, numel, k=k))
            out.append(case("gather", dtype, numel, root=active[-1], k=k))
            out.append(case("scatter", dtype, numel, root=active[0], k=k))
            out.append(case("reduce_scatter", dtype, numel, red="MAX" if dtype == "bool" else "SUM", k=k))
            out.append(case("all_to_all", dtype, numel, k=k))
        out.append(case("barrier", dtype, 0))
    return out


def expected(c: dict, active: list[int], capacity: int):
    """Every rank's expected outputs (None for inactive ranks)."""
    mask = [1 if r in active else 0 for r in range(capacity)]
    inputs = [H.case_inputs(c, r) if r in active else None for r in range(capacity)]
    op, k = c["op"], c["k"]
    red = ReduceOp[c["red"]] if c["red"] else None
    if op == "all_reduce":
        return M.all_reduce(inputs, red, mask)
    if op == "reduce":
        return M.reduce(inputs, red, c["root"], mask)
    if op == "broadcast":
        return M.broadcast(inputs, c["root"], mask)
    if op == "all_gather":
        return M.all_gather(inputs, mask, num_slots=k)
    if op == "gather":
        return M.gather(inputs, c["root"], mask, num_slots=k)
    if op == "scatter":
        return M.scatter(inputs[c["root"]], c["root"], mask, num_slots=k)
    if op == "reduce_scatter":
        return M.reduce_scatter(inputs, red, mask, num_slots=k)
    if op == "all_to_all":
        return M.all_to_all(inputs, mask, num_slots=k)
    return [None] * capacity


def same(got, want) -> bool:
    if want is None:
        return got is None
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    return bitwise_equal(got, want)


def mismatches(cases, results, active, capacity) -> list[str]:
    """Case ids (and ranks) whose outputs differ from the model; [] when every bit matches."""
    bad = []
    for i, c in enumerate(cases):
        want = expected(c, active, capacity)
        for r in active:
            if c["op"] == "gather" and r != c["root"]:
                continue
            if not same(results[r][i], want[r]):
                bad.append(f"{c['id']} rank {r}")
    return bad
