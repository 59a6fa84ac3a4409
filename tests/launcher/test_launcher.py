"""mooncake-run: the launcher's contract (environment, prefixes, exit status, replacements, signals)
and DDP training that goes on through a worker SIGKILLed mid-step, between steps, during the
catch-up and twice in a row (docs/launcher.md).

Every test starts the launcher in a session of its own and, on every exit path, SIGKILLs every
process left in that session (the launcher, its workers, their children)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(REPO, "tests", "launcher", "train_job.py")
RUN_TIMEOUT_S = 150
pytestmark = pytest.mark.timeout(2 * RUN_TIMEOUT_S)


def session_pids(sid: int) -> list[int]:
    """Every live process whose session is ``sid``."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":   # fields: state, ppid, pgrp, session
            pids.append(int(name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def launcher(args: list[str], **kwargs):
    """Start ``mooncake-run args`` in a new session; always kill the whole session afterwards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(kwargs.pop("env", {}))
    proc = subprocess.Popen([sys.executable, "-m", "mooncake.run", "--master-port", "0", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        kill_session(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def run(args: list[str], timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    with launcher(args) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mooncake-run {' '.join(args)} did not finish within {timeout} s")
        return proc.returncode, out


def script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


# -- the launcher alone (no torch in the workers: fast) -----------------------------------------
def test_environment_prefixes_and_exit_status(tmp_path):
    job = script(tmp_path, """
        import os, sys
        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE", "MOONCAKE_REPLACEMENT"]
        print(" ".join(f"{k}={os.environ[k]}" for k in keys), sys.argv[1:])
        sys.exit(5 if os.environ["RANK"] == "1" else 0)
    """)
    code, out = run(["--nproc-per-node", "3", "--max-replacements", "0", job, "--flag", "x"])
    assert code == 5, out
    port = re.search(r"Store at 127\.0\.0\.1:(\d+)", out).group(1)
    for r in range(3):
        line = next(line for line in out.splitlines() if line.startswith(f"[rank {r}] RANK="))
        assert line == (f"[rank {r}] RANK={r} LOCAL_RANK={r} WORLD_SIZE=3 LOCAL_WORLD_SIZE=3 MASTER_ADDR=127.0.0.1 "
                        f"MASTER_PORT={port} TORCHELASTIC_USE_AGENT_STORE=True MOONCAKE_REPLACEMENT=0 "
                        "['--flag', 'x']"), line


def test_replacement_knows_it_is_one_and_success_counts_last_lives(tmp_path):
    job = script(tmp_path, """
        import os, sys
        import mooncake.pg as pg
        print("replacement", pg.is_replacement(), os.environ["MOONCAKE_RESTART_COUNT"])
        if os.environ["RANK"] == "1" and not pg.is_replacement():
            os.kill(os.getpid(), 9)
    """)
    code, out = run(["--nproc-per-node", "2", "--max-replacements", "1", job])
    assert code == 0, out
    assert "[rank 1] replacement True 1" in out and "[rank 0] replacement False 0" in out, out
    assert "killed by SIGKILL; starting replacement 1/1" in out


def test_first_unreplaced_failure_sets_the_status(tmp_path):
    job = script(tmp_path, """
        import os, sys, time
        rank, again = int(os.environ["RANK"]), os.environ["MOONCAKE_REPLACEMENT"] == "1"
        if rank == 0:
            time.sleep(1.0)   # stays up, so rank 1 has somebody to be replaced for
        sys.exit(7 if rank == 1 else 0)
    """)
    code, out = run(["--nproc-per-node", "2", "--max-replacements", "1", job])
    assert code == 7 and "starting replacement 1/1" in out and "no replacement left" in out, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_every_child(tmp_path, sig):
    job = script(tmp_path, """
        import os, subprocess, time
        subprocess.Popen(["sleep", "600"])          # a grandchild, in the worker's process group
        print("up", flush=True)
        time.sleep(600)
    """)
    with launcher(["--nproc-per-node", "2", "--term-timeout", "5", job]) as proc:
        seen = 0
        for line in proc.stdout:
            seen += line.rstrip().endswith("] up")
            if seen == 2:
                break
        assert len(session_pids(proc.pid)) >= 5      # launcher, 2 workers, 2 sleeps
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig
        deadline = time.monotonic() + 30
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_pids(proc.pid) == []


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_external_store_outlives_node_0(tmp_path):
    """A Store served on its own (``--serve-store``) and two one-worker "nodes" launched with ``--store
    external``: node 0 is killed whole (its launcher SIGKILLed, its worker with it) in the middle of the
    all_reduces; node 1's worker goes on over itself and exits 0, and so does its launcher (with node 0's
    launcher hosting the Store, the agreement would have lost it)."""
    port = _free_port()
    job = script(tmp_path, """
        import os, time
        from datetime import timedelta
        import torch, torch.distributed as dist
        import mooncake.pg as pg
        dist.init_process_group("mooncake-cpu", timeout=timedelta(seconds=10))
        rank, seen = dist.get_rank(), set()
        for i in range(400):
            x = torch.ones(4)
            dist.all_reduce(x)
            seen.add(int(x[0]))
            if i == 20:
                print("running", flush=True)
            time.sleep(0.02)
        print("done", sorted(seen), pg.get_active_ranks(dist.group.WORLD).tolist(), flush=True)
        dist.destroy_process_group()
    """)
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-port", str(port), "--store", "external",
              "--max-replacements", "0"]
    import secrets
    secret = {"MOONCAKE_JOB_SECRET": secrets.token_hex(16)}  # one for both nodes
    with launcher(["--serve-store", "--master-port", str(port)]) as store, \
            launcher([*common, "--node-rank", "0", job], env=secret) as node0, \
            launcher([*common, "--node-rank", "1", job], env=secret) as node1:
        assert "serving only" in store.stdout.readline()
        for line in node0.stdout:
            if line.rstrip().endswith("] running"):
                break
        else:
            pytest.fail("node 0's worker never ran")
        kill_session(node0.pid)  # node 0 lost whole: launcher and worker
        try:
            out, _ = node1.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail("node 1 did not finish after node 0 was lost")
        assert node1.returncode == 0, out
        assert "[rank 1] done [1, 2] [0, 1]" in out, out  # sums over both, then over itself alone
        assert store.poll() is None  # the Store is still serving


def test_killed_launcher_takes_its_workers(tmp_path):
    job = script(tmp_path, """
        import os, time
        print("up", os.getpid(), flush=True)
        time.sleep(600)
    """)
    with launcher(["--nproc-per-node", "2", "--standby", "1", job]) as proc:
        pids = []
        for line in proc.stdout:
            if line.rstrip().split(" ")[2:3] == ["up"]:
                pids.append(int(line.split()[-1]))
            if len(pids) == 2:
                break
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_pids(proc.pid) == []    # workers and the standby: PR_SET_PDEATHSIG


# -- DDP training through failures ------------------------------------------------------------
STEPS = 10
PROBE_MEAN = {(0, 1, 2): 14 / 3, (0, 1): 2.5, (0, 2): 5.0, (1, 2): 6.5}   # see train_job.py


def parse(out: str) -> dict:
    steps: dict[int, list] = {r: [] for r in range(3)}
    final, resumed, admitted = {}, {}, []
    for line in out.splitlines():
        m = re.match(r"\[rank (\d)\] (STEP|FINAL|RESUME|ADMIT) (\d+) (.*)", line)
        if not m:
            continue
        rank, kind, step, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "STEP":
            fields = dict(re.findall(r"(\w+)=(\[.*?\]|\S+)", rest))
            steps[rank].append((step, int(fields["pid"]), float(fields["probe"]), eval(fields["mask"])))
        elif kind == "FINAL":
            final[rank] = (step, dict(re.findall(r"(\w+)=(\S+)", rest)))
        elif kind == "RESUME":
            resumed.setdefault(rank, []).append(step)
        else:
            admitted.append((rank, step))
    return {"steps": steps, "final": final, "resumed": resumed, "admitted": admitted}


def train(kills: list[str], standby: bool) -> dict:
    args = ["--nproc-per-node", "3", "--max-replacements", "4"] + (["--standby", "1"] if standby else [])
    args += [JOB, "--steps", str(STEPS)] + [a for k in kills for a in ("--kill", k)]
    code, out = run(args)
    assert code == 0, out
    result = parse(out)
    result["out"] = out
    return result


def check_run(result: dict, victims: set[int]) -> None:
    out, steps, final = result["out"], result["steps"], result["final"]
    for r in set(range(3)) - victims:
        assert {pid for _, pid, _, _ in steps[r]} == {int(final[r][1]["pid"])}, \
            f"survivor rank {r} changed process\n{out}"
        assert [s for s, *_ in steps[r]] == list(range(STEPS)), f"survivor rank {r} lost or repeated a step\n{out}"
    for r in victims:
        assert result["resumed"].get(r), f"rank {r} never came back\n{out}"
    assert sorted(final) == [0, 1, 2] and {f[0] for f in final.values()} == {STEPS}, out
    hashes = {f[1]["hash"] for f in final.values()}
    assert len(hashes) == 1, f"ranks end with different parameters: {final}\n{out}"
    # every step's probe gradient is the mean over the ranks its all_reduce ran over; all ranks agree
    by_step: dict[int, set] = {}
    for r in range(3):
        for step, _, probe, _mask in steps[r]:
            by_step.setdefault(step, set()).add(probe)
    for step, probes in by_step.items():
        assert len(probes) == 1, f"step {step}: ranks disagree on the gradient {probes}\n{out}"
        assert any(abs(p - m) < 1e-5 for p in probes for m in PROBE_MEAN.values()), \
            f"step {step}: gradient {probes} is no mean over a set of ranks (world-size scaling?)\n{out}"


def first_degraded(result: dict, survivor: int) -> tuple[int, float, list]:
    """The first step a survivor finished with a rank missing: (step, probe, mask)."""
    return next((s, p, m) for s, _, p, m in result["steps"][survivor] if 0 in m)


def test_kill_mid_step():
    """Rank 2 SIGKILLs itself as it posts step 4's first gradient all_reduce: the step completes over
    ranks 0 and 1 with gradients averaged over them, rank 2's replacement catches up."""
    result = train(["2:0:mid:4"], standby=False)
    check_run(result, {2})
    step, probe, mask = first_degraded(result, 0)
    assert (step, mask) == (4, [1, 1, 0]) and probe == pytest.approx(PROBE_MEAN[(0, 1)]), result["out"]


def test_kill_between_steps_rank0():
    """Rank 0 (the Store is not in it) dies after step 3: step 4 runs over ranks 1 and 2."""
    result = train(["0:0:between:3"], standby=True)
    check_run(result, {0})
    step, probe, mask = first_degraded(result, 1)
    assert (step, mask) == (4, [0, 1, 1]) and probe == pytest.approx(PROBE_MEAN[(1, 2)]), result["out"]


def test_kill_during_catch_up():
    """Rank 1 dies between steps, its first replacement dies in the middle of the catch-up, the
    second one catches up."""
    result = train(["1:0:between:2", "1:1:catchup:0"], standby=True)
    check_run(result, {1})
    assert len(result["resumed"][1]) == 1, result["out"]   # the first replacement never resumed
    assert result["out"].count("starting replacement") == 2, result["out"]


def test_killed_twice_in_a_row():
    """Rank 2 dies mid-step, then its replacement dies mid-step right after joining."""
    result = train(["2:0:mid:3", "2:1:mid1:1"], standby=True)
    check_run(result, {2})
    assert result["out"].count("starting replacement") == 2 and len(result["resumed"][2]) == 2, result["out"]
