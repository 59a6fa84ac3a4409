"""Two hosts on one machine: ranks 0, 1 on "hostA" (netns, 10.77.0.1) and 2, 3 on "hostB" (10.77.0.2).

Each rank runs tests/multihost/mh_worker.py under ``ip netns exec NS unshare --uts`` with its own host
name, MASTER_ADDR=10.77.0.1 and no MOONCAKE_HOST_IP: the UCX address comes from the route to MASTER_ADDR.
Checked, for MOONCAKE_IMPL=ref and fast: all_reduce, all_gather, broadcast, reduce_scatter and a
send/recv ring bitwise equal to mooncake.model; EP dispatch/combine on CPU (ref EP path) equal to the EP
model; rank 3 (host B) killed mid-all_reduce, the survivors agree on the mask and the bits.

The fast CPU plane today delegates the WHOLE group to ref once any rank is on another host (no hybrid
shared-memory-within / UCX-between plane yet): the test asserts exactly that (``group._plane.delegate``).

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2, no CAP_NET_ADMIN).
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mooncake.testing.netns import TwoHosts

WORLD = 4
LIMIT_S = 90  # one launch (4 ranks: start, collectives, EP, the fault), every process killed after it
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def hosts():
    why = TwoHosts.unavailable()
    if why:
        pytest.skip(f"two-host tests need network namespaces: {why}")
    h = TwoHosts()
    yield h
    h.close()


def _launch(hosts, impl, tmp_path):
    port = 29000 + os.getpid() % 1000 * 2 + (impl == "fast")  # one per launch: no TIME_WAIT clash
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONCAKE_", "MASTER_", "UCX_"))}
    env.update(MASTER_ADDR="10.77.0.1", MASTER_PORT=str(port), MOONCAKE_IMPL=impl, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    procs = []
    try:
        for r in range(WORLD):
            host = r // 2
            argv = [sys.executable, os.path.join(HERE, "mh_worker.py"), str(r), str(WORLD), str(port),
                    str(tmp_path), impl]
            log = open(tmp_path / f"rank{r}.log", "w")
            procs.append(subprocess.Popen(hosts.command(host, argv, ("hostA", "hostB")[host]),
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + LIMIT_S
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)
    outs = {}
    for r in range(WORLD):
        path = tmp_path / f"rank{r}.json"
        outs[r] = json.loads(path.read_text()) if path.exists() else None
    logs = "\n".join(f"--- rank {r}\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD))
    return outs, [p.returncode for p in procs], logs


@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_two_hosts(hosts, impl, tmp_path):
    outs, codes, logs = _launch(hosts, impl, tmp_path)
    assert all(outs[r] is not None for r in range(WORLD)), logs
    for r in range(WORLD):
        o = outs[r]
        assert o["failures"] == [], (r, o["failures"], logs)
        ip, why = o["host_ip"]
        assert ip == ("10.77.0.1", "10.77.0.2")[r // 2] and "MASTER_ADDR=10.77.0.1" in why, o
        assert o["impl"][0] == impl, o
        if impl == "fast":  # ranks 2, 3 (or 0, 1) on the other host: the whole group delegates to ref
            assert o["delegate"] and "another host" in o["delegate"], o
        else:
            assert o["delegate"] is None, o
    survivors = [outs[r]["fault"] for r in range(3)]
    assert all(f is not None for f in survivors), logs
    assert codes[:3] == [0, 0, 0] and codes[3] != 0, (codes, logs)
    assert all(f == survivors[0] for f in survivors), survivors  # same mask, same bits
    assert survivors[0]["model"] and survivors[0]["mask"][:3] == [1, 1, 1], survivors[0]
