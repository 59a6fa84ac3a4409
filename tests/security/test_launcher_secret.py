"""mooncake-run hands its workers a job secret (docs/launcher.md): generated per job, the same on every
worker, never on a command line or in the Store; a malformed one stops the launcher before any worker."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_TIMEOUT_S = 120
pytestmark = pytest.mark.timeout(2 * RUN_TIMEOUT_S)


def run(args: list[str], env: dict | None = None) -> tuple[int, str]:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
    full.pop("MOONCAKE_JOB_SECRET", None)
    full.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "mooncake.run", "--master-port", "0", *args], cwd=REPO,
                            env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        pytest.fail(f"mooncake-run {' '.join(args)} did not finish within {RUN_TIMEOUT_S} s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_workers_share_a_generated_secret_that_stays_out_of_the_store(tmp_path):
    job = script(tmp_path, """
        import os, torch, torch.distributed as dist
        import mooncake.pg  # noqa: F401
        secret = os.environ["MOONCAKE_JOB_SECRET"]
        with open("/proc/self/cmdline", "rb") as f:
            assert secret.encode() not in f.read()
        dist.init_process_group("mooncake-cpu")
        t = torch.tensor([1.0 + dist.get_rank()])
        dist.all_reduce(t)
        store = dist.distributed_c10d._get_default_store()
        raw = store.underlying_store if hasattr(store, "underlying_store") else store
        values = b"".join(raw.get(k) for k in raw.list_keys())
        assert secret.encode() not in values and bytes.fromhex(secret) not in values
        print("SECRET", secret, "SUM", t.item(), flush=True)
        dist.destroy_process_group()
    """)
    code, out = run(["--nproc-per-node", "2", "--max-replacements", "0", job])
    assert code == 0, out
    seen = re.findall(r"\[rank \d\] SECRET ([0-9a-f]+) SUM 3.0", out)
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == 64, out
    assert seen[0] not in out.replace(f"SECRET {seen[0]}", ""), "the launcher printed the secret"


def test_given_secret_is_passed_and_off_means_none(tmp_path):
    job = script(tmp_path, """
        import os
        print("HAS", os.environ.get("MOONCAKE_JOB_SECRET", "-"), flush=True)
    """)
    given = os.urandom(16).hex()
    code, out = run(["--nproc-per-node", "1", job], env={"MOONCAKE_JOB_SECRET": given})
    assert code == 0 and f"HAS {given}" in out, out
    code, out = run(["--nproc-per-node", "1", "--job-secret", "off", job], env={"MOONCAKE_JOB_SECRET": given})
    assert code == 0 and "HAS -" in out, out


def test_malformed_secret_stops_the_launcher_before_any_worker(tmp_path):
    marker = tmp_path / "started"
    job = script(tmp_path, f"open({str(marker)!r}, 'w').close()\n")
    code, out = run(["--nproc-per-node", "1", job], env={"MOONCAKE_JOB_SECRET": "not-hex"})
    assert code == 2, out
    assert "MOONCAKE_JOB_SECRET must be" in out and "hex digits" in out, out
    assert not marker.exists()
