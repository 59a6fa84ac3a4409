"""``python -m mooncake.doctor``: what this machine gives mooncake, one line per fact, each with a verdict.

    python -m mooncake.doctor [--store HOST:PORT] [--json] [--timeout S]
    mooncake-doctor ...                      (the same, as a console script)

Checks, in order: Python, the mooncake package (version, location, git commit), torch and its CUDA build,
the native extension (built for this torch/CUDA or not), the shared-memory plane's compiled helpers
(prebuilt in the wheel or built on first use; the cache's ownership; the compiler), the CUDA kernels' build
(sources, architectures, cache, nvcc; with a GPU), ``import mooncake.pg`` (backend registration), the
implementation ``MOONCAKE_IMPL`` / ``auto`` picks per device and why, UCX (version, transports, CUDA support,
bounded in time), whether CUDA tensors go to UCX in device memory or are staged through host memory and why
(with a GPU, or ``MOONCAKE_UCX_CUDA`` set), the host address and network-device filter, RDMA devices, CUDA devices, peer access,
CUDA IPC and MPS (when CUDA exists), and the c10d Store given with ``--store`` (bounded in time).

Every line has a verdict: ``ok``, ``warn`` (works, but probably not as you want) or ``fail`` (something
mooncake needs is broken; the line says how to fix it).  The exit status is 1 if any line failed, else 0.
``--json`` prints one JSON object (schema ``SCHEMA``) instead of text.  Probes that can hang (UCX start-up,
CUDA IPC, Store connection) run in a child process with a deadline.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

SCHEMA = "mooncake-doctor/1"
VERDICTS = ("ok", "warn", "fail")
DEFAULT_TIMEOUT_S = 20.0  # per child-process probe (UCX, CUDA IPC)
DEFAULT_STORE_TIMEOUT_S = 3.0
_CHILD_IMPORT_ALLOWANCE_S = 30.0  # added to a probe's own timeout: a child process has to import torch
MIN_TORCH = (2, 11)

_RDMA_TRANSPORTS = ("rc", "ud", "dc", "ib")  # rc_verbs, rc_mlx5, ud_verbs, ud_mlx5, dc_mlx5, ...
_SHM_TRANSPORTS = ("sysv", "posix", "cma", "xpmem", "knem")
_CUDA_TRANSPORTS = ("cuda_copy", "cuda_ipc", "gdr_copy")


@dataclasses.dataclass
class Check:
    """One line of the report.

    name: a stable identifier (``torch``, ``ucx``, ``store``...); summary: one line for humans;
    verdict: ``ok`` | ``warn`` | ``fail``; fix: what to do (set for every warn and fail);
    details: machine-readable facts behind the summary.
    """

    name: str
    verdict: str
    summary: str
    fix: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


# ------------------------------------------------------------------------------------------ helpers


def _probe(code: str, timeout_s: float, env: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """Run ``code`` in a child Python (this interpreter) that prints one JSON object as its last stdout line.

    Returns ``(result, "")`` or ``(None, why)``; never waits longer than ``timeout_s``.
    """
    child_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **(env or {}))
    root = str(Path(__file__).resolve().parent.parent)  # import this mooncake, installed or not
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s,
                              env=child_env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout_s:g} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), ""
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    last = next((line for line in reversed(tail) if re.match(r"^\w*(Error|Exception)\b", line)),
                tail[-1] if tail else "")
    return None, f"exit code {proc.returncode}: {last.strip()[:300]}"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:2])


def _safe(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run one check; an unexpected exception becomes a ``fail`` line instead of a crash."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - the doctor reports, it does not crash
        return [Check(name, "fail", f"the check itself raised {type(exc).__name__}: {exc}",
                      fix="report this with the output of `python -m mooncake.doctor --json`")]
    return result if isinstance(result, list) else [result]


# ------------------------------------------------------------------------------------------ checks


def check_python() -> Check:
    return Check("python", "ok", f"{platform.python_version()} ({sys.executable})",
                 details={"version": platform.python_version(), "executable": sys.executable,
                          "platform": platform.platform()})


def check_mooncake() -> Check:
    import mooncake

    location = Path(mooncake.__file__).resolve().parent
    details: dict[str, Any] = {"version": mooncake.__version__, "location": str(location)}
    root = location.parent
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "", ""
        details.update(install="source checkout", commit=commit or None, modified=bool(dirty))
    elif "site-packages" in str(location) or "dist-packages" in str(location):
        details["install"] = "installed package"
    else:
        details["install"] = "on sys.path"
    where = details["install"] + (f", commit {details['commit'][:12]}" if details.get("commit") else "") + \
        (" + local changes" if details.get("modified") else "")
    return Check("mooncake", "ok", f"{mooncake.__version__} at {location} ({where})", details=details)


def check_torch() -> Check:
    import torch

    cuda = torch.version.cuda
    details = {"version": torch.__version__, "cuda": cuda, "hip": getattr(torch.version, "hip", None),
               "cuda_available": bool(torch.cuda.is_available()) if cuda else False}
    summary = f"torch {torch.__version__}, " + (f"CUDA {cuda}" if cuda else "CPU-only build (no CUDA)")
    if _version_tuple(torch.__version__) < MIN_TORCH:
        return Check("torch", "fail", summary + f"; mooncake needs torch >= {'.'.join(map(str, MIN_TORCH))}",
                     fix=f"pip install 'torch>={'.'.join(map(str, MIN_TORCH))}' (the same build everywhere)",
                     details=details)
    return Check("torch", "ok", summary, details=details)


def _native_extensions() -> list[Path]:
    """Python extension modules in the package (not the ``lib*.so`` libraries loaded with ctypes, such as
    the CPU plane's prebuilt helper: the ``native.cpu`` line covers those)."""
    import mooncake

    package = Path(mooncake.__file__).resolve().parent
    found = []
    for pattern in ("**/*.so", "**/*.pyd"):
        found += [Path(p) for p in glob.glob(str(package / pattern), recursive=True)
                  if not os.path.basename(p).startswith("lib")]
    return sorted(found)


def check_native(timeout_s: float) -> Check:
    """Whether a compiled extension exists in the package and loads with this torch / CUDA."""
    import torch

    import mooncake

    package = Path(mooncake.__file__).resolve().parent
    extensions = _native_extensions()
    from mooncake import _nativebuild as nb

    sources = sorted(p.name for p in nb.csrc_root()[0].glob("*") if p.suffix in (".cu", ".cpp", ".cc"))
    details: dict[str, Any] = {"extensions": [str(p) for p in extensions], "csrc_sources": sources,
                               "torch": torch.__version__, "cuda": torch.version.cuda}
    if not extensions:
        note = f" (CUDA sources, compiled on first use: {', '.join(sources)})" if sources else ""
        return Check("native", "ok", "not built: no compiled extension module in the package" + note +
                     "; the ref implementation needs none", details=details)
    problems, loaded = [], []
    for path in extensions:
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).split(".cpython")[0]
        module = module.split(".abi3")[0]
        code = (f"import json, torch, importlib; m = importlib.import_module({module!r}); "
                "print(json.dumps({'torch': getattr(m, 'TORCH_VERSION', None), "
                "'cuda': getattr(m, 'CUDA_VERSION', None)}))")
        result, why = _probe(code, timeout_s + _CHILD_IMPORT_ALLOWANCE_S)
        if result is None:
            problems.append(f"{module}: does not load ({why})")
            continue
        built = [f"{k} {v}" for k, v in (("torch", result["torch"]), ("CUDA", result["cuda"])) if v]
        if result["torch"] and str(result["torch"]) != torch.__version__:
            problems.append(f"{module}: built against torch=={result['torch']}, this is {torch.__version__}")
        elif result["cuda"] and torch.version.cuda and str(result["cuda"]) != torch.version.cuda:
            problems.append(f"{module}: built for CUDA {result['cuda']}, torch has CUDA {torch.version.cuda}")
        else:
            loaded.append(module + (f" ({', '.join(built)})" if built else ""))
    details.update(loaded=loaded, problems=problems)
    if problems:
        return Check("native", "fail", "; ".join(problems),
                     fix="rebuild the extension in this environment (same torch and CUDA as at run time), or "
                         "remove it to use the ref implementation",
                     details=details)
    return Check("native", "ok", "built and loads: " + ", ".join(loaded), details=details)


_FAST_CPU_PROBE = r"""
import json
from mooncake.fast import cpu
native_reason = getattr(cpu, "native_reason", None)
plane = getattr(cpu, "unavailable_reason", None)
out = {"has_native": native_reason is not None, "native_reason": native_reason() if native_reason else None,
       "plane_reason": plane() if plane else None}
if native_reason is not None:
    from mooncake.fast.cpu import native
    from mooncake import _nativebuild as nb
    root, origin = nb.csrc_root()
    out.update(problem=getattr(native, "problem", None), fix=getattr(native, "fix", None),
               origin=getattr(native, "origin", None), path=getattr(native, "path", None),
               isa=getattr(native, "isa", None), sources=str(root), sources_from=origin,
               cache=str(nb.cache_dir("cpu")), prebuilt=str(nb.CPU_PREBUILT) if nb.CPU_PREBUILT.is_file() else None)
print(json.dumps(out))
"""

#: what each ``native.problem`` code means, for the summary line (the fix comes from mooncake itself)
_NATIVE_PROBLEMS = {
    "source-missing": "the C source is missing",
    "cache-not-owned": "the build cache is not yours",
    "cache-writable-by-others": "the build cache is writable by others",
    "cache-not-writable": "the build cache is not writable",
    "no-compiler": "no C compiler",
    "compiler-failed": "the C compiler failed",
    "library-unsafe": "the compiled library is writable by others",
    "load-failed": "the compiled library does not load",
}


def check_native_fast_cpu(timeout_s: float) -> list[Check]:
    """The compiled helpers of the shared-memory CPU plane, if this install has that plane.

    A wheel ships them prebuilt (``origin`` ``package``); a source checkout compiles them on first use
    into the user's cache (``cache``).  Runs in a child process: that first use happens there, as in the
    first mooncake group.
    """
    import importlib.util

    try:
        if importlib.util.find_spec("mooncake.fast.cpu") is None:
            return []
    except (ImportError, ValueError):
        return []
    result, why = _probe(_FAST_CPU_PROBE, timeout_s + _CHILD_IMPORT_ALLOWANCE_S)
    if result is None:
        return [Check("native.cpu", "warn", f"could not ask the shared-memory CPU plane about its compiled helpers "
                      f"({why})", fix="run `python -c 'import mooncake.fast.cpu'` to see the error",
                      details={"error": why})]
    if not result["has_native"]:
        return []
    details = dict(result)
    if result["plane_reason"]:
        return [Check("native.cpu", "ok", f"shared-memory CPU plane unavailable here: {result['plane_reason']}",
                      details=details)]
    reason = result["native_reason"]
    if reason is None:
        where = {"package": "prebuilt, shipped with the package", "cache": "compiled on first use into the cache"}
        isa = f"; folds use {result['isa']}" if result.get("isa") else ""
        return [Check("native.cpu", "ok", f"compiled helpers of the shared-memory CPU plane loaded "
                      f"({where.get(result.get('origin'), result.get('origin') or 'built')}: {result.get('path')}{isa})",
                      details=details)]
    code = result.get("problem")
    if code in ("disabled",) or "=0" in reason:
        return [Check("native.cpu", "ok", f"compiled helpers switched off ({reason}): torch fallbacks, same "
                      "results, slower", details=details)]
    what = _NATIVE_PROBLEMS.get(code, "compiled helpers not in use")
    fix = result.get("fix") or ("install a C compiler (`cc`, or set CC) and make the cache directory yours and "
                                "writable (MOONCAKE_CACHE_DIR, default ~/.cache/mooncake)")
    return [Check("native.cpu", "warn", f"{what}: torch fallbacks instead of the compiled helpers (same results, "
                  f"slower): {reason}", fix=fix, details=details)]


_NATIVE_CUDA_PROBLEMS = {
    "source-missing": "the CUDA sources are missing",
    "cache-not-owned": "the CUDA build cache is not yours",
    "cache-writable-by-others": "the CUDA build cache is writable by others",
    "cache-not-writable": "the CUDA build cache is not writable",
    "library-unsafe": "the cached CUDA library is writable by others",
    "no-nvcc": "no nvcc and no cached CUDA library",
    "arch": "unsupported GPU architecture",
}


def check_native_cuda() -> list[Check]:
    """Whether the CUDA kernels can be built (or are cached) for the GPUs present: sources, architectures,
    cache, nvcc.  Only with a CUDA build of torch that sees a GPU (the ``cuda`` line covers the rest).
    Builds nothing: the first CUDA group compiles (minutes), the doctor only looks."""
    import torch

    if not torch.version.cuda or not torch.cuda.is_available():
        return []
    from mooncake import _nativebuild as nb
    from mooncake.fast.cuda import build

    root, origin = nb.csrc_root()
    details: dict[str, Any] = {"sources": str(root), "sources_from": origin, "cache": str(build.cache_root()),
                               "MOONCAKE_CUDA_LIB": os.environ.get("MOONCAKE_CUDA_LIB")}
    if details["MOONCAKE_CUDA_LIB"]:
        return [Check("native.cuda", "ok", f"CUDA library given by MOONCAKE_CUDA_LIB={details['MOONCAKE_CUDA_LIB']} "
                      "(not built here)", details=details)]
    try:
        details["archs"] = build.archs()
        digest = build.source_hash()
        cache = build.cache_root()
        if cache.exists():
            nb.check_dir(cache)
        cached = build.find_cached(digest)
        if cached is not None:
            nb.check_file(cached)
    except (build.BuildError, nb.NativeProblem) as exc:
        what = _NATIVE_CUDA_PROBLEMS.get(exc.code, "the CUDA kernels cannot be built")
        details.update(problem=exc.code, error=str(exc))
        return [Check("native.cuda", "warn", f"{what}: the CUDA fast path falls back to ref ({exc})",
                      fix=exc.fix or "see docs/troubleshooting.md", details=details)]
    nvcc = build.nvcc_path()
    details.update(cached=str(cached) if cached else None, nvcc=nvcc)
    sm = "/".join("sm_" + a for a in details["archs"])
    if cached is not None:
        return [Check("native.cuda", "ok", f"CUDA kernels for {sm} cached: {cached}", details=details)]
    if nvcc is None:
        details["problem"] = "no-nvcc"
        return [Check("native.cuda", "warn", f"{_NATIVE_CUDA_PROBLEMS['no-nvcc']} for {sm} (sources: {root}, "
                      f"{origin}): the CUDA fast path falls back to ref",
                      fix="install a CUDA toolkit (nvcc) whose release the driver supports and set CUDA_HOME or "
                          "put nvcc on PATH; or point MOONCAKE_CUDA_LIB at a built library", details=details)]
    return [Check("native.cuda", "ok", f"CUDA kernels for {sm} are compiled on first use with {nvcc} from {root} "
                  f"({origin}) into {cache}", details=details)]


def check_pg_import() -> Check:
    try:
        importlib.import_module("mooncake.pg")
    except Exception as exc:  # noqa: BLE001
        return Check("pg", "fail", f"import mooncake.pg failed: {type(exc).__name__}: {exc}",
                     fix="install mooncake with one UCX flavour: pip install 'mooncake-ft[cu13]' (or [cu12] for a "
                         "CUDA 12 driver; either works without a GPU); from a checkout: pip install -e '.[cu13]'")
    import torch.distributed as dist

    registered = [b for b in ("mooncake-cpu", "mooncake") if b in dist.Backend.backend_list
                  or b.upper() in getattr(dist.Backend, "_plugins", {})]
    if set(registered) != {"mooncake-cpu", "mooncake"}:
        return Check("pg", "fail", f"import mooncake.pg worked but registered only {registered}",
                     fix="make sure no other package registers backends named mooncake / mooncake-cpu")
    pg = importlib.import_module("mooncake.pg")
    membership = [name for name in _MEMBERSHIP_API if hasattr(pg, name)]
    missing = [name for name in _MEMBERSHIP_API if name not in membership]
    if missing:
        return Check("pg", "warn", f"import mooncake.pg works but lacks membership calls {missing}",
                     fix="reinstall mooncake: the package is older than its documentation",
                     details={"backends": registered, "membership_api": membership})
    return Check("pg", "ok", "import mooncake.pg registers backends mooncake-cpu and mooncake",
                 details={"backends": registered, "membership_api": membership})


#: upstream's membership surface (docs/semantics.md, "Manual membership and proposals")
_MEMBERSHIP_API = ("get_peer_state", "activate_ranks", "deactivate_ranks", "recover_ranks", "join_group",
                   "sync_after_failure", "get_current_epoch", "get_local_success", "get_failed_ranks_hint")


def check_impl() -> list[Check]:
    from mooncake import impl
    from mooncake.control.errors import ArgumentError

    raw = os.environ.get("MOONCAKE_IMPL")
    try:
        wanted = impl.requested()
    except ArgumentError as exc:
        return [Check("impl", "fail", str(exc), fix="set MOONCAKE_IMPL to ref, fast or auto (or unset it)",
                      details={"MOONCAKE_IMPL": raw})]
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    checks = []
    for device in devices:
        details = {"MOONCAKE_IMPL": raw, "requested": wanted, "device": device}
        try:
            choice, reason = impl.select(device)
        except ArgumentError as exc:
            checks.append(Check(f"impl.{device}", "fail", str(exc),
                                fix="unset MOONCAKE_IMPL (auto falls back to ref and says why) or set it to ref",
                                details=details))
            continue
        details.update(implementation=choice, reason=reason)
        checks.append(Check(f"impl.{device}", "ok", f"{device} tensors: {choice} ({reason})", details=details))
    return checks


_UCX_PROBE = r"""
import json, os, re, sys, time
t0 = time.monotonic()
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
import ucxx
import ucxx._lib.libucxx as u
net = os.environ.get("MOONCAKE_DOCTOR_NET_DEVICES") or None
try:
    from mooncake.ref.ucx import _ucx_config
    config = _ucx_config(net)
except Exception:
    config = {"NET_DEVICES": net} if net and "UCX_NET_DEVICES" not in os.environ else {}
ctx = u.UCXContext(config_dict=config, feature_flags=(u.Feature.TAG, u.Feature.WAKEUP))
resources = re.findall(r"resource\s+\d+\s*:.*?--\s*(\S+)\s*$", ctx.info, re.M)
try:
    from mooncake.ref.ucx import cuda_choice
    cuda_memory = cuda_choice(ctx)._asdict()
except Exception as exc:
    cuda_memory = {"error": f"{type(exc).__name__}: {exc}"}
worker = u.UCXWorker(ctx)
print(json.dumps({"ucxx": getattr(ucxx, "__version__", None),
                  "ucx": ".".join(map(str, u.get_ucx_version())),
                  "resources": resources, "cuda_support": bool(getattr(ctx, "cuda_support", False)),
                  "cuda_memory": cuda_memory,
                  "config": {k: ctx.config.get(k) for k in ("TLS", "NET_DEVICES")}, "requested": config,
                  "seconds": round(time.monotonic() - t0, 3)}))
"""


def _classify(resources: list[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"tcp": [], "rdma": [], "shm": [], "cuda": [], "other": []}
    for res in resources:
        tl = res.split("/", 1)[0]
        if tl == "tcp":
            kinds["tcp"].append(res)
        elif tl.startswith(_CUDA_TRANSPORTS):
            kinds["cuda"].append(res)
        elif tl.startswith(_SHM_TRANSPORTS):
            kinds["shm"].append(res)
        elif tl.split("_")[0] in _RDMA_TRANSPORTS:
            kinds["rdma"].append(res)
        elif tl != "self":
            kinds["other"].append(res)
    return kinds


def _mooncake_net_devices() -> tuple[str | None, str | None]:
    """The UCX_NET_DEVICES list mooncake would use in this process, and an error if it cannot tell."""
    try:
        from mooncake.pg import backend

        return backend._net_devices(), None
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"


def check_ucx(timeout_s: float) -> tuple[Check, dict | None]:
    net, net_error = _mooncake_net_devices()
    env = {"MOONCAKE_DOCTOR_NET_DEVICES": net} if net else {}
    result, why = _probe(_UCX_PROBE, timeout_s, env=env)
    user_env = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    if result is None:
        return Check("ucx", "fail", f"UCX could not start a context with mooncake's settings ({why})",
                     fix="check `pip show ucxx-cu13 libucx-cu13` (or the -cu12 pair); unset UCX_* variables that restrict transports "
                         f"({', '.join(user_env) or 'none set'}); if it hangs, a broken RDMA driver is a common "
                         "cause: try UCX_TLS=tcp,self to confirm",
                     details={"net_devices": net, "env": user_env, "error": why}), None
    kinds = _classify(result["resources"])
    details = dict(result, net_devices=net, env=user_env, transports=kinds)
    listed = ", ".join(result["resources"]) or "none"
    summary = f"UCX {result['ucx']} (ucxx {result['ucxx']}); transports on {net or 'all devices'}: {listed}"
    if net_error:
        return Check("ucx", "fail", summary + f"; mooncake cannot choose its interface: {net_error}",
                     fix="call pg.set_host_ip(<an address of this host>) before init_process_group",
                     details=details), result
    if not kinds["tcp"] and not kinds["rdma"]:
        return Check("ucx", "fail", summary + "; no TCP or RDMA transport: the ref data plane keeps endpoint "
                     "error handling on (to detect dead peers), which shared memory does not support",
                     fix="include tcp in UCX_TLS (or unset it) and make sure the device filter names an existing "
                         "interface (see the device_filter line)",
                     details=details), result
    return Check("ucx", "ok", summary, details=details), result


def check_ucx_cuda(ucx_result: dict | None) -> list[Check]:
    """Whether the ref plane hands CUDA tensors' device memory to UCX or stages them through host memory,
    and why (``MOONCAKE_UCX_CUDA``).  A line only where it matters: torch sees a GPU, or the variable is set."""
    import torch

    raw = os.environ.get("MOONCAKE_UCX_CUDA")
    if raw is None and not torch.cuda.is_available():
        return []
    choice = (ucx_result or {}).get("cuda_memory")
    details = {"MOONCAKE_UCX_CUDA": raw, "choice": choice}
    if choice is None:
        return [Check("ucx.cuda", "fail", "cannot tell whether UCX takes CUDA memory: the UCX probe failed",
                      fix="see the ucx line", details=details)]
    if "error" in choice:
        return [Check("ucx.cuda", "fail", f"cannot decide how CUDA tensors travel: {choice['error']}",
                      fix="set MOONCAKE_UCX_CUDA to auto, on or off (or unset it)", details=details)]
    if choice["on"]:
        return [Check("ucx.cuda", "ok", f"CUDA tensors go to UCX in device memory: {choice['reason']}",
                      details=details)]
    summary = f"CUDA tensors are staged through host memory: {choice['reason']}"
    if choice["mode"] == "on":
        return [Check("ucx.cuda", "fail", summary + " (MOONCAKE_UCX_CUDA=on: CUDA groups on the ref plane fail)",
                      fix="run where torch sees a GPU, with the UCX wheel built with CUDA (libucx-cu13 / "
                          "libucx-cu12) and cuda_copy in UCX_TLS, or set MOONCAKE_UCX_CUDA=auto", details=details)]
    if choice["mode"] == "auto" and torch.cuda.is_available():  # a GPU, but UCX cannot take its memory
        return [Check("ucx.cuda", "warn", summary,
                      fix="install the UCX wheel built with CUDA (libucx-cu13 / libucx-cu12) and keep cuda_copy in "
                          "UCX_TLS (or unset it)", details=details)]
    return [Check("ucx.cuda", "ok", summary, details=details)]


def _rdma_devices() -> list[dict[str, Any]]:
    devices = []
    for dev in sorted(glob.glob("/sys/class/infiniband/*")):
        ports = []
        for port in sorted(glob.glob(os.path.join(dev, "ports", "*"))):
            ports.append({"port": os.path.basename(port), "state": _read(os.path.join(port, "state")),
                          "link_layer": _read(os.path.join(port, "link_layer")),
                          "rate": _read(os.path.join(port, "rate"))})
        devices.append({"name": os.path.basename(dev), "ports": ports})
    return devices


def check_rdma(ucx_result: dict | None) -> Check:
    devices = _rdma_devices()
    details: dict[str, Any] = {"devices": devices, "dev_infiniband": os.path.isdir("/dev/infiniband")}
    if not devices:
        return Check("rdma", "ok", "no RDMA devices (/sys/class/infiniband is empty or absent): TCP and shared "
                     "memory only, which is fine on one host", details=details)
    active = [f"{d['name']}:{p['port']}" for d in devices for p in d["ports"] if p["state"] and "ACTIVE" in p["state"]]
    names = ", ".join(f"{d['name']}({'/'.join((p['state'] or '?').split(':')[-1].strip() for p in d['ports'])})"
                      for d in devices)
    details["active_ports"] = active
    if not active:
        return Check("rdma", "warn", f"RDMA devices {names}, but no port is ACTIVE",
                     fix="check cabling / subnet manager (`ibstat`), or filter to the devices you use with "
                         "pg.set_device_filter([...]) / MOONCAKE_PGTEST_DEVICE_FILTERS",
                     details=details)
    if not details["dev_infiniband"]:
        return Check("rdma", "warn", f"RDMA devices {names} are visible in sysfs but /dev/infiniband is missing",
                     fix="inside a container, pass the devices through (e.g. --device=/dev/infiniband) and the "
                         "RDMA userspace libraries (rdma-core)",
                     details=details)
    if ucx_result is not None and not _classify(ucx_result["resources"])["rdma"]:
        return Check("rdma", "warn", f"RDMA devices {names}, active ports {', '.join(active)}, but UCX lists no "
                     "RDMA transport (traffic will use TCP)",
                     fix="install rdma-core / libibverbs in this environment, or check UCX_TLS and the device "
                         "filter (an HCA must be named as e.g. mlx5_0:1 in UCX_NET_DEVICES)",
                     details=details)
    return Check("rdma", "ok", f"RDMA devices {names}; active ports {', '.join(active)}", details=details)


def check_device_filter() -> Check:
    env = os.environ.get("MOONCAKE_PGTEST_DEVICE_FILTERS")
    try:
        from mooncake.pg import get_device_filter

        filters = get_device_filter()
    except Exception:  # noqa: BLE001 - mooncake.pg did not import (see the pg line)
        filters = [f for f in (env or "").split(",") if f]
    source = "MOONCAKE_PGTEST_DEVICE_FILTERS" if env else "none set"
    rdma = {os.path.basename(d) for d in glob.glob("/sys/class/infiniband/*")}
    net = {os.path.basename(d) for d in glob.glob("/sys/class/net/*")}
    details = {"filters": filters, "source": source, "rdma_devices": sorted(rdma), "net_devices": sorted(net),
               "note": "pg.set_device_filter([...]) is per process: this shows only the environment's filter"}
    if not filters:
        return Check("device_filter", "ok", "no device filter: UCX uses the host interface only (see the host "
                     "line); to use RDMA or other NICs name them with pg.set_device_filter([...]) or "
                     "MOONCAKE_PGTEST_DEVICE_FILTERS, the same on every rank", details=details)
    unknown = [f for f in filters if f.split(":")[0] not in rdma | net]
    details["unknown"] = unknown
    if unknown:
        return Check("device_filter", "fail", f"device filter {filters} ({source}) names devices this host does "
                     f"not have: {unknown}",
                     fix=f"use devices of this host (RDMA: {sorted(rdma) or 'none'}; network: {sorted(net)}), and "
                         "the same filter on every rank",
                     details=details)
    return Check("device_filter", "ok", f"device filter {filters} ({source}); use the same one on every rank",
                 details=details)


def check_host() -> Check:
    try:
        from mooncake.pg.options import host_ip_choice
        from mooncake.ref.ucx import interface_of

        ip, why = host_ip_choice()
        iface = interface_of(ip)
    except Exception as exc:  # noqa: BLE001
        return Check("host", "fail", f"cannot resolve mooncake's host address: {type(exc).__name__}: {exc}",
                     fix="set MOONCAKE_HOST_IP (or call pg.set_host_ip) to an address of this host")
    scope = "loopback: single-host jobs only" if iface == "lo" else "reachable from other hosts"
    across = ("a mooncake-cpu group with ranks on several hosts runs on the ref plane (UCX) even under "
              "MOONCAKE_IMPL=fast: the fast CPU plane's shared memory serves one-host groups only (no hybrid)")
    return Check("host", "ok", f"ucx.address {ip} ({iface}; {scope}), chosen by {why}; for multi-host jobs "
                 "set MASTER_ADDR to node 0's address, or MOONCAKE_HOST_IP / pg.set_host_ip to this host's; "
                 + across, details={"host_ip": ip, "interface": iface, "source": why, "across_hosts": across})


def _ipc_child(q_in, q_out) -> None:
    """Child side of the CUDA IPC probe: read the parent's tensor, report its sum, write into it."""
    import torch

    t = q_in.get()
    q_out.put(float(t.sum().item()))
    t.add_(1)
    if t.is_cuda:
        torch.cuda.synchronize()
    q_out.put("done")


_IPC_PROBE = r"""
import json, sys, torch, torch.multiprocessing as mp
from mooncake.doctor import _ipc_child
device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
ctx = mp.get_context("spawn")
q_in, q_out = ctx.Queue(), ctx.Queue()
p = ctx.Process(target=_ipc_child, args=(q_in, q_out), daemon=True)
p.start()
x = torch.arange(1024, dtype=torch.float32, device=device)
if device == "cpu":
    x.share_memory_()
q_in.put(x)
seen = q_out.get(timeout=120)
q_out.get(timeout=120)
if x.is_cuda:
    torch.cuda.synchronize()
p.join(10)
print(json.dumps({"child_saw": seen, "expected": float(torch.arange(1024).sum()),
                  "parent_sees_write": bool(torch.equal(x.cpu(), torch.arange(1024, dtype=torch.float32) + 1))}))
"""


def probe_ipc(device: str, timeout_s: float) -> tuple[bool, dict | None, str]:
    """Share a ``device`` tensor with a spawned child process (CUDA IPC for "cuda"); ``(ok, result, why)``."""
    code = _IPC_PROBE.replace('sys.argv[1] if len(sys.argv) > 1 else "cuda"', repr(device))
    result, why = _probe(code, timeout_s)
    ok = result is not None and result["child_saw"] == result["expected"] and result["parent_sees_write"]
    return ok, result, why


def _mps_status() -> dict[str, Any]:
    names = []
    for comm in glob.glob("/proc/[0-9]*/comm"):
        name = _read(comm)
        if name and name.startswith("nvidia-cuda-mps"):
            names.append(name)
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return {"daemon_processes": sorted(set(names)), "pipe_directory": pipe_dir,
            "control_pipe": os.path.exists(os.path.join(pipe_dir, "control"))}


def check_cuda(timeout_s: float) -> list[Check]:
    import torch

    if not torch.version.cuda:
        return [Check("cuda", "ok", "CPU-only torch: backend mooncake and EP on GPUs are unavailable; mooncake-cpu "
                      "works (install a CUDA build of torch for GPUs)", details={"available": False})]
    if not torch.cuda.is_available():
        return [Check("cuda", "warn", f"torch is built with CUDA {torch.version.cuda} but sees no GPU",
                      fix="check `nvidia-smi`, the driver version against CUDA "
                          f"{torch.version.cuda}, and CUDA_VISIBLE_DEVICES "
                          f"({os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
                      details={"available": False, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")})]
    count = torch.cuda.device_count()
    gpus = [{"index": i, "name": torch.cuda.get_device_name(i),
             "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))} for i in range(count)]
    checks = [Check("cuda", "ok", f"CUDA {torch.version.cuda}, {count} GPU(s): " +
                    ", ".join(f"{g['index']}: {g['name']} (sm {g['capability']})" for g in gpus),
                    details={"available": True, "devices": gpus})]
    if count > 1:
        matrix = {f"{i}->{j}": bool(torch.cuda.can_device_access_peer(i, j))
                  for i in range(count) for j in range(count) if i != j}
        missing = [k for k, v in matrix.items() if not v]
        if missing:
            checks.append(Check("cuda.peer_access", "warn", f"no peer access for {', '.join(missing)}",
                                fix="GPUs without P2P (different PCIe roots, IOMMU/ACS, or a container without "
                                    "the right topology) make the CUDA fast path fall back; check `nvidia-smi topo -m`",
                                details={"matrix": matrix}))
        else:
            checks.append(Check("cuda.peer_access", "ok", f"every pair of the {count} GPUs has peer access",
                                details={"matrix": matrix}))
    else:
        checks.append(Check("cuda.peer_access", "ok", "one GPU: peer access not needed (ranks sharing it map each "
                            "other's memory directly)", details={"matrix": {}}))
    ok, result, why = probe_ipc("cuda", timeout_s + _CHILD_IMPORT_ALLOWANCE_S)
    if not ok:
        checks.append(Check("cuda.ipc", "fail", f"CUDA IPC between two processes failed ({why or result})",
                            fix="in containers use --ipc=host (or a large enough /dev/shm) and the same GPU "
                                "visibility for all ranks; check that no exclusive-process compute mode is set "
                                "(`nvidia-smi -q | grep 'Compute Mode'`)",
                            details={"result": result, "error": why}))
    else:
        checks.append(Check("cuda.ipc", "ok", "a CUDA tensor shared with a child process reads and writes through "
                            "CUDA IPC", details={"result": result}))
    mps = _mps_status()
    if mps["daemon_processes"] or mps["control_pipe"]:
        checks.append(Check("cuda.mps", "ok", f"MPS is running ({', '.join(mps['daemon_processes']) or 'pipe'} "
                            f"in {mps['pipe_directory']})", details=mps))
    elif count == 1:
        checks.append(Check("cuda.mps", "warn", "MPS is not running: ranks sharing this GPU are time-sliced "
                            "(a kernel ping-pong costs ~ms instead of ~µs)",
                            fix="if several ranks share the GPU: export CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d) "
                                "CUDA_MPS_LOG_DIRECTORY=$(mktemp -d); nvidia-cuda-mps-control -d "
                                "(stop with: echo quit | nvidia-cuda-mps-control)",
                            details=mps))
    else:
        checks.append(Check("cuda.mps", "ok", "MPS is not running (needed only when several ranks share one GPU)",
                            details=mps))
    return checks


_STORE_PROBE = r"""
import json, os, sys, time
from datetime import timedelta
import torch.distributed as dist
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.monotonic()
try:
    store = dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=timeout))
    connected = time.monotonic() - t0
    key = f"mooncake/doctor/{os.getpid()}"
    t1 = time.monotonic()
    store.set(key, b"ping")
    ok = store.get(key) == b"ping"
    rtt = time.monotonic() - t1
    try:
        store.delete_key(key)
    except Exception:
        pass
    print(json.dumps({"reachable": True, "roundtrip_ok": ok, "connect_s": round(connected, 4),
                      "roundtrip_s": round(rtt, 6)}))
except Exception as exc:
    msg = str(exc).strip().splitlines()
    print(json.dumps({"reachable": False, "error": f"{type(exc).__name__}: {msg[0] if msg else ''}",
                      "seconds": round(time.monotonic() - t0, 3)}))
"""


def parse_store(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6addr]:port`` too) -> (host, port); raises ValueError naming the expected form."""
    match = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", address.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"--store expects HOST:PORT, got {address!r}")
    return match.group(1), int(match.group(2))


def check_store(address: str, timeout_s: float) -> Check:
    try:
        host, port = parse_store(address)
    except ValueError as exc:
        return Check("store", "fail", str(exc), fix="pass the Store's address as HOST:PORT, e.g. --store 10.0.0.1:29500")
    code = _STORE_PROBE.replace("sys.argv[1], int(sys.argv[2]), float(sys.argv[3])",
                                f"{host!r}, {port}, {timeout_s!r}")
    result, why = _probe(code, timeout_s * 3 + _CHILD_IMPORT_ALLOWANCE_S,
                         env={"TORCH_CPP_LOG_LEVEL": "FATAL"})
    details: dict[str, Any] = {"host": host, "port": port, "timeout_s": timeout_s}
    if result is None:
        result = {"reachable": False, "error": why}
    details.update(result)
    if not result["reachable"] or not result.get("roundtrip_ok"):
        return Check("store", "fail", f"Store {host}:{port} is not reachable within {timeout_s:g} s "
                     f"({result.get('error', 'set/get round trip failed')})",
                     fix="check that the process hosting the TCPStore (MASTER_ADDR:MASTER_PORT, or your own "
                         "external Store) is running and that this host can reach that port (firewall, "
                         "address family); for fault tolerance host it outside the ranks that may die "
                         "(failure agreement, sync_after_failure, activate_ranks / deactivate_ranks proposals "
                         "and join_group all go through it)",
                     details=details)
    return Check("store", "ok", f"Store {host}:{port} reachable: connected in {result['connect_s'] * 1e3:.0f} ms, "
                 f"set/get round trip {result['roundtrip_s'] * 1e3:.2f} ms", details=details)


# ------------------------------------------------------------------------------------------ report


def run_checks(store: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               store_timeout_s: float = DEFAULT_STORE_TIMEOUT_S) -> list[Check]:
    """Every check, in report order."""
    checks: list[Check] = []
    checks += _safe("python", check_python)
    checks += _safe("mooncake", check_mooncake)
    checks += _safe("torch", check_torch)
    checks += _safe("native", lambda: check_native(timeout_s))
    checks += _safe("native.cpu", lambda: check_native_fast_cpu(timeout_s))
    checks += _safe("native.cuda", check_native_cuda)
    checks += _safe("pg", check_pg_import)
    checks += _safe("impl", check_impl)
    ucx_holder: list[dict | None] = [None]

    def ucx() -> Check:
        check, ucx_holder[0] = check_ucx(timeout_s)
        return check

    checks += _safe("ucx", ucx)
    checks += _safe("ucx.cuda", lambda: check_ucx_cuda(ucx_holder[0]))
    checks += _safe("host", check_host)
    checks += _safe("device_filter", check_device_filter)
    checks += _safe("rdma", lambda: check_rdma(ucx_holder[0]))
    checks += _safe("cuda", lambda: check_cuda(timeout_s))
    if store:
        checks += _safe("store", lambda: check_store(store, store_timeout_s))
    return checks


def overall(checks: list[Check]) -> str:
    return max((c.verdict for c in checks), key=VERDICTS.index, default="ok")


def to_json(checks: list[Check], seconds: float | None = None) -> dict[str, Any]:
    counts = {v: sum(c.verdict == v for c in checks) for v in VERDICTS}
    return {"schema": SCHEMA, "verdict": overall(checks), "counts": counts, "seconds": seconds,
            "checks": [dataclasses.asdict(c) for c in checks]}


def format_text(checks: list[Check], seconds: float | None = None) -> str:
    width = max(len(c.name) for c in checks) if checks else 0
    lines = ["mooncake doctor" + (f" ({seconds:.1f} s)" if seconds is not None else "")]
    for c in checks:
        lines.append(f"[{c.verdict:^4}] {c.name:<{width}}  {c.summary}")
        if c.fix and c.verdict != "ok":
            lines.append(f"{'':7}{'':<{width}}  fix: {c.fix}")
    counts = {v: sum(c.verdict == v for c in checks) for v in VERDICTS}
    lines.append(f"verdict: {overall(checks)} ({counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mooncake.doctor",
                                     description="Report what this machine gives mooncake, with a verdict and a fix "
                                                 "per line. Exit status 1 if any line fails.")
    parser.add_argument("--store", metavar="HOST:PORT", help="also check that this c10d TCPStore is reachable")
    parser.add_argument("--store-timeout", type=float, default=DEFAULT_STORE_TIMEOUT_S, metavar="S",
                        help=f"Store connection timeout in seconds (default {DEFAULT_STORE_TIMEOUT_S:g})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"limit for each probe run in a child process (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    checks = run_checks(args.store, args.timeout, args.store_timeout)
    seconds = round(time.monotonic() - t0, 2)
    if args.json:
        print(json.dumps(to_json(checks, seconds), indent=2, default=str))
    else:
        print(format_text(checks, seconds))
    return 1 if overall(checks) == "fail" else 0


if __name__ == "__main__":
    sys.exit(main())
