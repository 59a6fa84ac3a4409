"""``MooncakeBackendOptions`` and the process-wide settings that must precede the first group."""

from __future__ import annotations

import ipaddress
import os
import socket

import torch

from ..control.errors import ArgumentError, MooncakeError
from ..control.wire import MAX_RANKS

#: Process-wide settings, applied when the UCX engine starts (the first mooncake group).
_settings: dict[str, object] = {"host_ip": None, "device_filters": [], "chosen": None}

LOOPBACK = "127.0.0.1"


class MooncakeBackendOptions:
    """Options handed to ``dist.init_process_group(..., pg_options=...)`` / ``dist.new_group``.

    Two spellings, as upstream (docs/semantics.md, "Views" and "Manual membership and proposals")::

        MooncakeBackendOptions(max_group_size, is_extension=False,
                               auto_deactivate_on_failure=True, auto_sync_on_failure=True)
        MooncakeBackendOptions(active_ranks, is_extension=False, max_world_size=None,
                               *, failure_mode="complete")

    Arguments:
        max_group_size / max_world_size: capacity (reserved rank slots), ``>= world_size``, at most
            256; ``<= 0`` means unset (the world size).  ``max_group_size`` is also accepted as a
            keyword of the tensor form.
        active_ranks: ``torch.int32`` tensor; on CPU for ``mooncake-cpu``, on CUDA for ``mooncake``;
            length ``max_world_size`` when that is set.  Its initial values choose the initial
            active set; afterwards the backend keeps it up to date as a mirror of the group's mask.
            The int form has none (``pg.get_active_ranks`` still answers).
        is_extension: start as a joining rank, local-only until ``join_group`` returns.
        auto_deactivate_on_failure, auto_sync_on_failure: who moves failed ranks out of the view.
            ``(True, True)`` (default) = ``failure_mode="complete"``: the survivors agree and re-run
            the op over themselves.  ``(True, False)`` = ``failure_mode="raise"``: the op raises
            ``PeerFailureError`` on every survivor and the view drops the failed ranks.
            ``(False, False)`` = manual mode: the op raises ``PeerFailureError`` on every survivor,
            the failed ranks stay in the view (suspended) and every later collective raises the
            same way until the framework calls ``deactivate_ranks`` (or ``activate_ranks``).
            ``auto_sync_on_failure=True`` requires ``auto_deactivate_on_failure=True``.
        failure_mode: the mask spelling of the first two modes (``"complete"`` or ``"raise"``).
    """

    def __init__(self, active_ranks=None, is_extension: bool = False, max_world_size=None,
                 auto_sync_on_failure: bool | None = None, *, failure_mode: str | None = None,
                 max_group_size: int | None = None, auto_deactivate_on_failure: bool | None = None):
        if isinstance(active_ranks, int) and not isinstance(active_ranks, bool):
            # upstream's int form: (max_group_size, is_extension, auto_deactivate, auto_sync)
            if max_group_size is not None:
                raise ArgumentError("max_group_size given twice (positionally and as a keyword)")
            if max_world_size is not None:
                if auto_deactivate_on_failure is not None:
                    raise ArgumentError("auto_deactivate_on_failure given twice")
                auto_deactivate_on_failure = max_world_size
            max_group_size, active_ranks, max_world_size = active_ranks, None, None
        if max_group_size is not None:
            if max_world_size is not None:
                raise ArgumentError("pass max_group_size or max_world_size, not both")
            max_world_size = max_group_size
        if active_ranks is None and max_world_size is None:
            raise ArgumentError("MooncakeBackendOptions needs max_group_size (an int) or active_ranks "
                                "(a torch.int32 tensor)")
        if active_ranks is not None:
            if not isinstance(active_ranks, torch.Tensor):
                raise ArgumentError(f"active_ranks must be a torch.Tensor of dtype torch.int32, "
                                    f"got {type(active_ranks).__name__}")
            if active_ranks.dtype != torch.int32:
                raise ArgumentError(f"activeRanks must be int. Got {active_ranks.dtype}: pass "
                                    "active_ranks as a torch.int32 tensor")
            if active_ranks.dim() != 1:
                raise ArgumentError(f"active_ranks must be 1-D, got shape {tuple(active_ranks.shape)}")
        if not isinstance(is_extension, bool):
            raise ArgumentError(f"is_extension must be a bool, got {type(is_extension).__name__}")
        if max_world_size is not None:
            if isinstance(max_world_size, bool) or not isinstance(max_world_size, int):
                raise ArgumentError(f"max_world_size must be an int, got {type(max_world_size).__name__}")
            if max_world_size <= 0:
                max_world_size = None  # upstream: <= 0 means unset
            elif max_world_size > MAX_RANKS:
                raise ArgumentError(f"max_world_size out of range: {max_world_size} > {MAX_RANKS}")
        for name, flag in (("auto_deactivate_on_failure", auto_deactivate_on_failure),
                           ("auto_sync_on_failure", auto_sync_on_failure)):
            if flag is not None and not isinstance(flag, bool):
                raise ArgumentError(f"{name} must be a bool, got {type(flag).__name__}")
        if failure_mode is not None and failure_mode not in ("complete", "raise"):
            raise ArgumentError(f"failure_mode must be 'complete' or 'raise', got {failure_mode!r}")
        deactivate = True if auto_deactivate_on_failure is None else auto_deactivate_on_failure
        sync = (failure_mode != "raise" if deactivate else False) if auto_sync_on_failure is None \
            else auto_sync_on_failure
        if sync and not deactivate:
            raise ArgumentError("auto_sync_on_failure=True requires auto_deactivate_on_failure=True "
                                "(manual membership: pass both False)")
        implied = "complete" if sync else "raise"
        if failure_mode is not None and failure_mode != implied:
            raise ArgumentError(f"failure_mode={failure_mode!r} contradicts auto_deactivate_on_failure="
                                f"{deactivate}, auto_sync_on_failure={sync}")
        if active_ranks is not None:
            values = active_ranks.detach().to("cpu")
            if bool(((values != 0) & (values != 1)).any()):
                raise ArgumentError(f"active_ranks entries must be 0 or 1, got {values.tolist()}")
        self.active_ranks = active_ranks
        self.is_extension = is_extension
        self.max_world_size = max_world_size
        self.auto_deactivate_on_failure = deactivate
        self.auto_sync_on_failure = sync
        self.failure_mode = implied

    @property
    def max_group_size(self) -> int | None:
        return self.max_world_size

    @property
    def manual(self) -> bool:
        """Manual membership: failed ranks stay in the view until the framework acts."""
        return not self.auto_deactivate_on_failure

    def __repr__(self) -> str:
        mask = None if self.active_ranks is None else self.active_ranks.tolist()
        return (f"MooncakeBackendOptions(active_ranks={mask}, is_extension={self.is_extension}, "
                f"max_world_size={self.max_world_size}, auto_deactivate_on_failure="
                f"{self.auto_deactivate_on_failure}, auto_sync_on_failure={self.auto_sync_on_failure})")


def check_for_backend(options: MooncakeBackendOptions | None, backend_device: str,
                      world_size: int) -> int:
    """Validate options against the backend and group; returns the capacity."""
    if options is None:
        return world_size
    if not isinstance(options, MooncakeBackendOptions):
        raise ArgumentError(f"pg_options must be a MooncakeBackendOptions, got {type(options).__name__}")
    tensor = options.active_ranks
    if tensor is not None and backend_device == "cpu" and tensor.device.type != "cpu":
        raise ArgumentError(f"activeRanks must be on CPU. Got {tensor.device} for backend mooncake-cpu")
    if tensor is not None and backend_device == "cuda" and tensor.device.type != "cuda":
        raise ArgumentError(f"activeRanks must be on GPU. Got {tensor.device} for backend mooncake")
    capacity = options.max_world_size or world_size
    if capacity < world_size:
        raise ArgumentError(f"max_world_size must be >= process group size: {capacity} < {world_size}")
    if world_size > MAX_RANKS:
        raise ArgumentError(f"The number of ranks exceeds the limit: {world_size} > {MAX_RANKS}")
    if tensor is not None and tensor.numel() != capacity:
        if options.max_world_size is not None:
            raise ArgumentError("activeRanks must be sized to max_world_size when max_world_size is set"
                                f" (got {tensor.numel()} entries, max_world_size={capacity})")
        raise ArgumentError(f"active_ranks must have one entry per rank: got {tensor.numel()}, "
                            f"world size {world_size}")
    return capacity


def set_job_secret(secret) -> None:
    """The job secret (hex string of 32-128 digits, or 16-64 bytes) for groups created from now on,
    instead of ``MOONCAKE_JOB_SECRET``; ``None`` goes back to the environment.  Every rank of the job
    must use the same one (docs/semantics.md, "Trust model").  A malformed one raises ArgumentError."""
    from ..control import auth
    auth.set_job_secret(secret)


def set_host_ip(ip: str) -> None:
    """Address this process's UCX traffic uses (overrides ``MOONCAKE_HOST_IP`` and the automatic choice,
    see ``choose_host_ip``).

    Must be called before the first mooncake process group is created.
    """
    _check_ip(ip, "set_host_ip")
    _require_engine_not_started("set_host_ip")
    _settings["host_ip"] = ip


def _check_ip(ip: str, what: str) -> None:
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        if what == "MOONCAKE_HOST_IP":
            raise ArgumentError(f"MOONCAKE_HOST_IP expects an IP address string, got {ip!r}") from None
        raise ArgumentError(f"set_host_ip expects an IP address string, got {ip!r}") from None


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def interface_address(name: str) -> str | None:
    """The IPv4 address of network interface ``name``, or None (no such interface, or no IPv4)."""
    import fcntl
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def route_source(addr: str, port: int = 9) -> str:
    """The local address of the interface that routes to ``addr``: a UDP ``connect()`` (no packet is
    sent) and ``getsockname()``.  Raises OSError when there is no route (or ``addr`` does not resolve)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, port))
        return s.getsockname()[0]


def choose_host_ip(env=None, explicit: str | None = None, filters: list[str] | None = None,
                   route=route_source, address_of=interface_address) -> tuple[str, str]:
    """``(address, why)``: where this process's UCX worker listens, first match wins:

    1. ``pg.set_host_ip(ip)``;
    2. ``MOONCAKE_HOST_IP``;
    3. the device filter (``set_device_filter`` / ``MOONCAKE_PGTEST_DEVICE_FILTERS``): the IPv4
       address of its first entry that is a network interface with one (RDMA names have none);
    4. ``MASTER_ADDR`` set and not loopback: the local address of the interface that routes to it;
    5. loopback (127.0.0.1): a single-host job.
    """
    env = os.environ if env is None else env
    if explicit:
        return explicit, "pg.set_host_ip"
    value = env.get("MOONCAKE_HOST_IP", "").strip()
    if value:
        _check_ip(value, "MOONCAKE_HOST_IP")
        return value, "MOONCAKE_HOST_IP"
    for name in filters or ():
        ip = address_of(name.split(":")[0])
        if ip:
            return ip, f"device filter: the address of {name}"
    master = env.get("MASTER_ADDR", "").strip()
    if master and not _is_loopback(master):
        try:
            ip = route(master, int(env.get("MASTER_PORT", "") or 9))
        except (OSError, ValueError) as exc:
            return LOOPBACK, (f"loopback: no route to MASTER_ADDR={master} ({exc}); set "
                              "MOONCAKE_HOST_IP for a multi-host job")
        if _is_loopback(ip):
            return LOOPBACK, f"loopback: MASTER_ADDR={master} is this host"
        return ip, f"the interface that routes to MASTER_ADDR={master}"
    if master:
        return LOOPBACK, f"loopback: MASTER_ADDR={master} (single host)"
    return LOOPBACK, "loopback: MASTER_ADDR unset (single host)"


def set_device_filter(filters: list[str]) -> None:
    """Restrict which network devices (e.g. ``["mlx5_1", "eth0"]``) UCX may use.

    Recorded and applied to UCX_NET_DEVICES together with the host interface.  Must be called
    before the first mooncake process group is created.  ``MOONCAKE_PGTEST_DEVICE_FILTERS``
    (comma-separated) sets the same list for tests and benchmarks.
    """
    if isinstance(filters, str) or not all(isinstance(f, str) and f for f in filters):
        raise ArgumentError(f"set_device_filter expects a list of device names, got {filters!r}")
    _require_engine_not_started("set_device_filter")
    _settings["device_filters"] = list(filters)


def get_device_filter() -> list[str]:
    env = os.environ.get("MOONCAKE_PGTEST_DEVICE_FILTERS")
    if env and not _settings["device_filters"]:
        return [f for f in env.split(",") if f]
    return list(_settings["device_filters"])  # type: ignore[arg-type]


def host_ip_choice() -> tuple[str, str]:
    """``(address, why)`` of ``choose_host_ip`` now; once UCX started, the choice it started with."""
    from ..ref import ucx
    chosen = _settings["chosen"]
    if chosen is not None and ucx.engine_started():
        return chosen  # type: ignore[return-value]
    choice = choose_host_ip(explicit=_settings["host_ip"], filters=get_device_filter())  # type: ignore[arg-type]
    _settings["chosen"] = choice
    return choice


def host_ip() -> str:
    return host_ip_choice()[0]


def listens_on_loopback() -> bool:
    """True when this process's UCX worker (would) listen on loopback: unreachable from other hosts."""
    return _is_loopback(host_ip())


def _require_engine_not_started(what: str) -> None:
    from ..ref import ucx
    if ucx.engine_started():
        raise ArgumentError(f"{what} must be called before the first mooncake process group is created")


def check_not_loopback_for(remote: list[int]) -> None:
    """Raise when ranks on another host would be told a loopback address (they cannot reach it).
    A faked host identity (``MOONCAKE_FAST_CPU_HOST_ID``, tests on one host) is exempt."""
    if remote and listens_on_loopback() and not os.environ.get("MOONCAKE_FAST_CPU_HOST_ID"):
        raise MooncakeError(
            f"rank(s) {remote} run on another host but this rank's UCX listens on loopback "
            f"({host_ip()}), which they cannot reach: set MOONCAKE_HOST_IP to this host's address "
            "(or MASTER_ADDR to node 0's routable address, or call pg.set_host_ip) on every rank")
