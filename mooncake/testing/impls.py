"""The data planes tests and benchmarks run under: the values of ``MOONCAKE_IMPL`` (``ref``, ``fast``), plus
``fast-hosts2``, the fast plane with its ranks on two emulated hosts (global rank r on host r % 2, read from
``RANK``), so that its operations spanning both run the hybrid plane (mooncake/fast/cpu/hybrid.py)."""

from __future__ import annotations

EMULATED_HOSTS = "fast-hosts2"


def impl_env(impl: str) -> dict[str, str]:
    """The environment a rank runs ``impl`` (``ref``, ``fast``, ``auto`` or ``EMULATED_HOSTS``) under."""
    if impl == EMULATED_HOSTS:
        return {"MOONCAKE_IMPL": "fast", "MOONCAKE_FAST_CPU_HOST_ID": "rank-mod-2"}
    return {"MOONCAKE_IMPL": impl}
