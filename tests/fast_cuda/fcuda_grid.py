"""Run the CUDA fast-path EP grid on R ranks of one GPU and compare every output bitwise with the model.

    python tests/fast_cuda/fcuda_grid.py --ranks 2,4,8 --out DIR [--fail]

Workers (fcuda_worker.py) run the kernels; this process rebuilds every rank's inputs and evaluates
``mooncake.model.ep`` meanwhile, then compares the saved outputs.  Exit status 0 iff everything matches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from fcuda_cases import compare, failure_case, grid, model_outputs  # noqa: E402


def start_ranks(R: int, cases: list[dict], out_dir: str, tag: str, via_buffer: bool = False):
    os.makedirs(out_dir, exist_ok=True)
    store = os.path.join(out_dir, f"store-{tag}")
    if os.path.exists(store):
        os.remove(store)
    cases_file = os.path.join(out_dir, f"cases-{tag}.json")
    with open(cases_file, "w") as f:
        json.dump(cases, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for r in range(R):
        log = open(os.path.join(out_dir, f"{tag}-rank{r}.log"), "w")
        cmd = [sys.executable, os.path.join(HERE, "fcuda_worker.py"), "--rank", str(r), "--world", str(R),
               "--store", store, "--cases", cases_file, "--out", out_dir] + (["--via-buffer"] if via_buffer else [])
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    return procs


def wait_ranks(procs, timeout_s: float) -> list[int | None]:
    deadline = time.monotonic() + timeout_s
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
        log.close()
    return codes


def run(R: int, out_dir: str, fail: bool, timeout_s: float = 240, log=print, via_buffer: bool = False,
        fail_timeout_us: int = 2_000_000) -> bool:
    tag = f"R{R}-{'fail' if fail else 'grid'}{'-buffer' if via_buffer else ''}"
    if fail:
        tag += "-nodeadline" if fail_timeout_us == -1 else ""
    cases = [failure_case(R, timeout_us=fail_timeout_us)] if fail else grid(R)
    if via_buffer:  # Buffer's checks synchronise with the host: no graph capture through it
        cases = [c for c in cases if not c.get("graph")]
    t0 = time.monotonic()
    procs = start_ranks(R, cases, out_dir, tag, via_buffer)
    models = {c["name"]: model_outputs(c) for c in cases}  # overlaps with the workers
    codes = wait_ranks(procs, timeout_s)
    wall = time.monotonic() - t0
    ok = True
    bad_exit = [r for r, c in enumerate(codes) if c != 0]
    if bad_exit:
        ok = False
        log(f"[{tag}] ranks {bad_exit} exited with {[codes[r] for r in bad_exit]} (None = killed at {timeout_s:.0f} s); "
            f"see {out_dir}/{tag}-rank*.log")
    for case in cases:
        want_valid, want_combined, want_active = models[case["name"]]
        ranks = [r for r in range(R) if r != case.get("dead", case.get("reject"))]
        for r in ranks:
            path = os.path.join(out_dir, f"{case['name']}_r{r}.pt")
            if not os.path.exists(path):
                ok = False
                log(f"[{tag}] {case['name']} rank {r}: no output")
                continue
            got = torch.load(path, weights_only=True)
            errs = compare(case, r, got, want_valid[r], want_combined[r], want_active)
            if case.get("dead") is not None:
                limit = max(case["timeout_us"], 0) * 1e-6 + 1.0
                if got["t_dispatch"] > limit:
                    errs.append(f"dispatch took {got['t_dispatch']:.3f} s > timeout + 1 s")
            status = "OK (bitwise)" if not errs else "FAIL: " + "; ".join(errs)
            ok = ok and not errs
            log(f"[{tag}] {case['name']:<24} rank {r}: {status}  dispatch {got['t_dispatch'] * 1e3:.1f} ms, "
                f"combine {got['t_combine'] * 1e3:.1f} ms")
    log(f"[{tag}] {'PASS' if ok else 'FAIL'} in {wall:.1f} s")
    return ok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--out", default="fcuda-out")
    p.add_argument("--fail", action="store_true", help="run the failure case (one rank exits before dispatch)")
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--via-buffer", action="store_true", help="through mooncake.ep.Buffer")
    args = p.parse_args()
    ok = True
    for R in [int(r) for r in args.ranks.split(",") if r]:
        for fail_timeout_us in ((2_000_000, -1) if args.fail else (2_000_000,)):
            ok = run(R, args.out, args.fail, args.timeout, log=lambda s: print(s, flush=True),
                     via_buffer=args.via_buffer, fail_timeout_us=fail_timeout_us) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
