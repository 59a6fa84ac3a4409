"""The host of the Store lost: ranks 0, 1 on "hostA" (rank 0 hosts the TCPStore), 2, 3 on "hostB".

All four run all_reduces in a loop (tests/multihost/store_host_worker.py); the test then takes host A
away, either killed (its processes SIGKILLed: the kernel resets their connections) or cut off (its link
down first, then its processes killed: nothing ever answers, as with a host that lost power).  Without the
Store no agreement can be reached, so the survivors cannot go on; what they must do is end, each with the
same MooncakeError naming the Store, within the group timeout plus one Store deadline, and leave
(``destroy_process_group``) without hanging.  Skipped where namespaces cannot be made.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

TIMEOUT_S = 5  # the group timeout; a Store call of the agreement then gives up after 5 s as well
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@pytest.mark.timeout(180)
@pytest.mark.parametrize("impl,how", [("ref", "cut"), ("fast", "cut"), ("fast", "killed")])
def test_survivors_end_when_the_store_host_is_lost(hosts, impl, how, tmp_path):
    port = 30000 + os.getpid() % 1000 * 4 + ("ref", "fast").index(impl) * 2 + (how == "cut")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONCAKE_", "MASTER_", "UCX_"))}
    env.update(MASTER_ADDR="10.77.0.1", MASTER_PORT=str(port), MOONCAKE_IMPL=impl, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    procs = {}
    link_down = False
    try:
        for r in range(4):
            argv = [sys.executable, os.path.join(HERE, "store_host_worker.py"), str(r), "4", str(port),
                    str(tmp_path), str(TIMEOUT_S)]
            procs[r] = subprocess.Popen(hosts.command(r // 2, argv, ("hostA", "hostB")[r // 2]), env=env,
                                        stdout=open(tmp_path / f"r{r}.log", "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 90
        while not all((_read(tmp_path / f"rank{r}.json") or {}).get("ops", 0) >= 20 for r in range(4)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), \
                [(tmp_path / f"r{r}.log").read_text()[-2000:] for r in range(4)]
            time.sleep(0.1)
        if how == "cut":
            hosts.set_link(0, up=False)
            link_down = True
        lost_at = time.monotonic()
        for r in (0, 1):
            os.killpg(procs[r].pid, signal.SIGKILL)
        bound_s = 2 * TIMEOUT_S + 20  # the op's timeout, one Store deadline, slack for a loaded machine
        for r in (2, 3):
            try:
                procs[r].wait(max(0.1, lost_at + bound_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(procs[r].pid, signal.SIGUSR1)  # the worker dumps its threads' stacks into its log
                time.sleep(1)
                pytest.fail(f"rank {r} still running {bound_s} s after host A was {how}:\n"
                            + (tmp_path / f"r{r}.log").read_text()[-6000:])
        outs = [_read(tmp_path / f"rank{r}.json") for r in (2, 3)]
        for out in outs:
            assert out is not None and out["error"] is not None, outs
            kind, message = out["error"]
            assert kind == "MooncakeError" and "could not reach the Store" in message, out
            assert out["destroy"] == "ok" and out["destroy_s"] < 5, out
        # one verdict: the same error naming the Store (its cause in brackets is each rank's own socket's:
        # "Connection reset by peer" on one, "Broken pipe" on the other, after a kill)
        assert len({out["error"][1].split(" (")[0] for out in outs}) == 1, outs
        assert [procs[r].returncode for r in (2, 3)] == [0, 0]
    finally:
        if link_down:
            hosts.set_link(0, up=True)
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
