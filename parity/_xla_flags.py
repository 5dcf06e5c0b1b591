"""XLA_FLAGS edits in one place: the simulated CPU device count, beside whatever else is set.

XLA reads XLA_FLAGS once, when JAX starts its CPU backend, so these edit the environment of this
process before that happens or of a child process about to start. A user's other flags (threads,
dumps, optimisation level) always travel with the device count.
"""
from __future__ import annotations

FORCE_DEVICES = "--xla_force_host_platform_device_count"


def with_cpu_devices(flags: str, n: int, *, replace: bool = True) -> str:
    """``flags`` (an XLA_FLAGS value) asking for ``n`` simulated CPU devices. ``replace=False``
    keeps a device count already there (the user's choice wins); the other flags always stay."""
    if not replace and any(f.startswith(FORCE_DEVICES) for f in flags.split()):
        return flags
    return " ".join([*without_cpu_devices(flags).split(), f"{FORCE_DEVICES}={n}"])


def without_cpu_devices(flags: str) -> str:
    """``flags`` (an XLA_FLAGS value) without a simulated CPU device count; the others stay."""
    return " ".join(f for f in flags.split() if not f.startswith(FORCE_DEVICES))
