"""Two "hosts" on one machine for tests: two network namespaces joined by a veth pair.

``TwoHosts()`` creates namespaces ``mcA<pid>`` / ``mcB<pid>`` whose only addresses are 10.77.0.1/24 and
10.77.0.2/24 on the pair (plus each namespace's own loopback), and ``command(host, argv, hostname)``
wraps a command to run inside one of them under its own UTS namespace and host name, so mooncake sees
two hosts (``host_identity()`` differs, ``MASTER_ADDR`` routes over the pair).  Needs root (CAP_NET_ADMIN,
CAP_SYS_ADMIN) and iproute2's ``ip`` plus util-linux's ``unshare``; ``TwoHosts.unavailable()`` says why not,
found by trying.  ``close()`` (also at interpreter exit) deletes both namespaces, which removes the pair;
namespaces of an earlier test process that was killed before it could (SIGKILL) are deleted by the next
``TwoHosts()`` (``sweep_stale``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess

ADDRESSES = ("10.77.0.1", "10.77.0.2")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def sweep_stale() -> list[str]:
    """Delete namespaces ``mcA<pid>`` / ``mcB<pid>`` left by a test process that no longer exists (one
    killed with SIGKILL never ran its atexit); returns their names."""
    listed = _ip("netns", "list", check=False)
    gone = []
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name[:3] in ("mcA", "mcB") and name[3:].isdigit() and not os.path.exists(f"/proc/{name[3:]}"):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


class TwoHosts:
    def __init__(self, tag: str | None = None):
        if tag is None:
            sweep_stale()
        tag = tag or str(os.getpid())
        self.names = (f"mcA{tag}", f"mcB{tag}")
        self._veth = (f"mcva{tag}"[:15], f"mcvb{tag}"[:15])
        self._closed = False
        atexit.register(self.close)
        try:
            a, b = self.names
            for ns in self.names:
                _ip("netns", "add", ns)
            _ip("link", "add", self._veth[0], "netns", a, "type", "veth", "peer", "name", self._veth[1],
                "netns", b)
            for ns, dev, addr in zip(self.names, self._veth, ADDRESSES):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def unavailable() -> str | None:
        """Why two namespaces cannot be made here (None: they can), found by trying."""
        if shutil.which("ip") is None:
            return "iproute2's `ip` is not installed (apt-get install -y iproute2)"
        if shutil.which("unshare") is None:
            return "util-linux's `unshare` is not installed"
        if os.geteuid() != 0:
            return "network namespaces need root (CAP_NET_ADMIN)"
        probe = f"mcprobe{os.getpid()}"
        try:
            made = _ip("netns", "add", probe, check=False)
            if made.returncode != 0:
                return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
            run = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "true"],
                                 capture_output=True, text=True, timeout=20)
            if run.returncode != 0:
                return f"`unshare --uts` inside a namespace failed: {run.stderr.strip() or run.returncode}"
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot create a network namespace: {exc}"
        finally:
            _ip("netns", "del", probe, check=False)
        return None

    def command(self, host: int, argv: list[str], hostname: str) -> list[str]:
        """``argv`` run in namespace ``host`` (0: A, 1: B) with its own host name."""
        return ["ip", "netns", "exec", self.names[host], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', hostname, *argv]

    def set_link(self, host: int, up: bool) -> None:
        """Bring host ``host``'s end of the pair down (the host is cut off: nothing it sent before arrives
        later, nothing answers) or up again."""
        _ip("netns", "exec", self.names[host], "ip", "link", "set", self._veth[host], "up" if up else "down")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in self.names:
            try:
                _ip("netns", "del", ns, check=False)
            except (OSError, subprocess.SubprocessError):
                pass
        atexit.unregister(self.close)

    def __enter__(self) -> "TwoHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
