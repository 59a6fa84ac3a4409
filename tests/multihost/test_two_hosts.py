"""Two hosts on one machine: ranks 0, 1 on "hostA" (netns, 10.77.0.1) and 2, 3 on "hostB" (10.77.0.2).

Each rank runs tests/multihost/mh_worker.py under ``ip netns exec NS unshare --uts`` with its own host
name, MASTER_ADDR=10.77.0.1 and no MOONCAKE_HOST_IP: the UCX address comes from the route to MASTER_ADDR.
One launch per implementation (MOONCAKE_IMPL=ref and fast) checks, in order:

1. all_reduce, all_gather, broadcast, reduce_scatter and a send/recv ring bitwise equal to mooncake.model;
   EP dispatch/combine on CPU tensors (the ref EP path) equal to the EP model;
2. a whole host's ranks killed: ranks 2 and 3 (host B) die inside one all_reduce (one after posting its
   first send, one before sending); ranks 0, 1 return the model over themselves, the same mask and bits;
3. replacements joining from the other host: once both are dead the test starts a new rank 2 on host A
   and a new rank 3 on host B; ranks 0, 1 admit them (get_peer_state, recover_ranks); all four run step
   1's collectives again across the hosts, checked against the model over all four;
4. one rank killed: rank 1 (host A) dies inside an all_reduce; ranks 0 (A), 2 (A) and 3 (B) agree: the
   same mask [1, 0, 1, 1] and the same bits, equal to the model over them.

The fast CPU plane runs hybrid once a rank is on another host: shared memory between the ranks of one
host, UCX between hosts; the test asserts that every rank names exactly the other host's ranks as remote
(``group._plane.hybrid`` / ``remote_ranks``), for the founders and for the replacements (rank 2's
replacement moved from host B to host A).  Rank 0 hosts the TCPStore and is never killed.

Skipped, with the reason, where namespaces cannot be made (not root, no iproute2, no CAP_NET_ADMIN).
"""

import json
import os
import subprocess
import sys
import time

import pytest

WORLD = 4
LIMIT_S = 120  # one launch (4 founders + 2 replacements, the faults), every process killed after it
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _start(hosts, impl, tmp_path, env, rank, host, role):
    argv = [sys.executable, os.path.join(HERE, "mh_worker.py"), str(rank), str(WORLD), env["MASTER_PORT"],
            str(tmp_path), impl, role]
    name = f"rank{rank}" + ("j" if role == "joiner" else "")
    log = open(tmp_path / f"{name}.log", "w")
    return name, subprocess.Popen(hosts.command(host, argv, ("hostA", "hostB")[host]), env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)


def _launch(hosts, impl, tmp_path):
    """The four founders; once host B's two have died (step 2), the replacements: rank 2 on host A (the
    other host), rank 3 on host B.  Every process is killed after LIMIT_S."""
    port = 29000 + os.getpid() % 1000 * 2 + (impl == "fast")  # one per launch: no TIME_WAIT clash
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOONCAKE_", "MASTER_", "UCX_"))}
    env.update(MASTER_ADDR="10.77.0.1", MASTER_PORT=str(port), MOONCAKE_IMPL=impl, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    procs = {}
    deadline = time.monotonic() + LIMIT_S
    try:
        for r in range(WORLD):
            name, procs[name] = _start(hosts, impl, tmp_path, env, r, r // 2, "founder")
        while time.monotonic() < deadline and (procs["rank2"].poll() is None or procs["rank3"].poll() is None):
            time.sleep(0.05)
        if procs["rank2"].poll() is not None and procs["rank3"].poll() is not None:
            for r, host in ((2, 0), (3, 1)):
                name, procs[name] = _start(hosts, impl, tmp_path, env, r, host, "joiner")
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)
    outs = {}
    for name in procs:
        path = tmp_path / f"{name}.json"
        outs[name] = json.loads(path.read_text()) if path.exists() else None
    logs = "\n".join(f"--- {name}\n" + (tmp_path / f"{name}.log").read_text()[-3000:] for name in procs)
    return outs, {name: p.returncode for name, p in procs.items()}, logs


def _one_verdict(faults, members, victims):
    """Every survivor: the same mask and bits, a model result, the survivors all in the mask."""
    assert all(f is not None for f in faults), faults
    assert all(f == faults[0] for f in faults), faults  # same mask, same bits, same world size
    assert faults[0]["model"] and faults[0]["expected_mask"], faults[0]  # the model over the survivors


@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_two_hosts(hosts, impl, tmp_path):
    outs, codes, logs = _launch(hosts, impl, tmp_path)
    founders = [f"rank{r}" for r in range(WORLD)]
    joiners = ["rank2j", "rank3j"]
    assert all(outs.get(n) is not None for n in founders + joiners), (sorted(outs), logs)
    for n in founders + joiners:
        o = outs[n]
        assert o["failures"] == [], (n, o["failures"], logs)
        ip, why = o["host_ip"]
        host = 0 if n in ("rank0", "rank1", "rank2j") else 1
        assert ip == ("10.77.0.1", "10.77.0.2")[host] and "MASTER_ADDR=10.77.0.1" in why, (n, o)
        assert o["impl"][0] == impl, (n, o)
        if n in ("rank2", "rank3"):
            continue  # host B's founders died in step 2
        if impl == "fast":  # hybrid: the other host's ranks (after the joins: 0, 1, 2 on A, 3 on B) over UCX
            assert o["remote_after_join"] == ([3] if host == 0 else [0, 1, 2]), (n, o)
            assert o["hybrid_after_join"].startswith("hybrid: "), (n, o)
        else:
            assert o.get("hybrid_after_join") is None, (n, o)
        assert o["mask_after_join"] == [1] * WORLD, (n, o)
    for n in founders:
        if impl == "fast":
            remote = [2, 3] if n in ("rank0", "rank1") else [0, 1]
            assert outs[n]["hybrid"].startswith(f"hybrid: rank(s) {remote} run on other hosts"), outs[n]
            assert "mooncake fast cpu: rank(s)" in (tmp_path / f"{n}.log").read_text(), n  # logged (WARNING)
        assert outs[n]["ep_impl"] == "ref", outs[n]
    # the whole of host B (ranks 2, 3) killed: ranks 0, 1 agree
    assert codes["rank2"] != 0 and codes["rank3"] != 0, (codes, logs)
    _one_verdict([outs[n]["host_fault"] for n in ("rank0", "rank1")], [0, 1], [2, 3])
    # rank 1 (host A) killed after the replacements joined: ranks 0 (A), 2 (A, replacement), 3 (B) agree
    assert codes["rank1"] != 0 and [codes[n] for n in ("rank0", "rank2j", "rank3j")] == [0, 0, 0], (codes, logs)
    _one_verdict([outs[n]["rank_fault"] for n in ("rank0", "rank2j", "rank3j")], [0, 2, 3], [1])
