"""A rank whose UCX would listen on loopback while a peer runs on another host is told so at init, by
name and fix, on every implementation (the fast plane and ref alike), instead of leaving the peer to
time out on an address it cannot reach.  Two hosts as in test_two_hosts.py; rank 1 (host B) is given
MOONCAKE_HOST_IP=127.0.0.1."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LIMIT_S = 60


@pytest.mark.timeout(LIMIT_S + 30)
@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_loopback_is_never_advertised_to_another_host(hosts, impl, tmp_path):
    port = 31000 + os.getpid() % 1000 * 2 + (impl == "fast")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONCAKE_", "MASTER_", "UCX_"))}
    env.update(MASTER_ADDR="10.77.0.1", MASTER_PORT=str(port), MOONCAKE_IMPL=impl, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    procs = []
    try:
        for rank in (0, 1):
            rank_env = dict(env, MOONCAKE_HOST_IP="127.0.0.1") if rank == 1 else env
            argv = [sys.executable, os.path.join(HERE, "lb_worker.py"), str(rank), str(port),
                    str(tmp_path / f"rank{rank}.json")]
            procs.append(subprocess.Popen(hosts.command(rank, argv, ("hostA", "hostB")[rank]), env=rank_env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        procs[1].wait(LIMIT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)
    kind, message = json.loads((tmp_path / "rank1.json").read_text())
    assert kind in ("MooncakeError", "DistBackendError") and "listens on loopback" in message, (kind, message)
    assert "MOONCAKE_HOST_IP" in message and "[0]" in message, message
