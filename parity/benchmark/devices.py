"""Explicit device selection: one device kind for both frameworks, or a one-line error.

JAX's platform and torch's device must be the same kind of hardware; a benchmark that quietly
runs torch on the host CPU while JAX uses the GPU (or the reverse) compares nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import torch

# Our device names -> JAX platform names.
_JAX_PLATFORM = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}


class DeviceError(ValueError):
    """The requested device is not usable by one of the frameworks (CLI: one line, exit 2)."""


@dataclass(frozen=True)
class Device:
    """Where both sides run. torch_device is None when torch cannot run there (torch_missing says why)."""

    kind: str
    jax_device: Any
    torch_device: torch.device | None
    torch_missing: str | None = None
    _torch_sync: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def sync_torch(self) -> None:
        """Wait for queued torch work (CUDA kernels, XLA graph) so the clock reads finished work."""
        self._torch_sync()

    def describe(self) -> dict:
        jd = self.jax_device
        return {
            "kind": self.kind,
            "jax_device": str(jd),
            "jax_device_kind": getattr(jd, "device_kind", "?"),
            "jax_backend": jd.platform,
            "torch_device": str(self.torch_device) if self.torch_device is not None else None,
            "torch_device_name": _torch_device_name(self),
            "torch_missing": self.torch_missing,
        }


def _torch_device_name(device: Device) -> str | None:
    if device.torch_device is None:
        return None
    if device.kind == "cuda":
        return torch.cuda.get_device_name(device.torch_device)
    if device.kind == "cpu":
        import platform

        return platform.processor() or platform.machine()
    return str(device.torch_device)


def _jax_device(kind: str):
    platform = _JAX_PLATFORM[kind]
    try:
        devices = jax.devices(platform)
    except RuntimeError as exc:
        hint = f" (JAX_PLATFORMS={os.environ['JAX_PLATFORMS']})" if os.environ.get("JAX_PLATFORMS") else ""
        raise DeviceError(f"--device {kind}: JAX has no {platform} backend{hint}: "
                          f"{str(exc).splitlines()[0]}") from None
    return devices[0]


def select_device(kind: str) -> Device:
    """The JAX device and torch device for ``kind`` ('cpu', 'cuda' or 'tpu'), checked to agree."""
    if kind not in _JAX_PLATFORM:
        raise DeviceError(f"--device must be one of {', '.join(_JAX_PLATFORM)}, got {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: torch.cuda.is_available() is False "
                          f"(torch {torch.__version__} built for CUDA {torch.version.cuda})")
    jax_dev = _jax_device(kind)
    if kind == "cpu":
        return Device("cpu", jax_dev, torch.device("cpu"))
    if kind == "cuda":
        return Device("cuda", jax_dev, torch.device("cuda", 0), _torch_sync=torch.cuda.synchronize)
    # TPU: torch only through torch_xla, never silently on the host CPU.
    try:
        import torch_xla.core.xla_model as xm  # type: ignore[import-not-found]
    except ImportError:
        return Device("tpu", jax_dev, None, torch_missing="torch_xla is not installed")

    def xla_sync() -> None:
        xm.mark_step()
        xm.wait_device_ops()

    return Device("tpu", jax_dev, xm.xla_device(), _torch_sync=xla_sync)


def set_cpu_threads(n: int) -> None:
    """Give both frameworks ``n`` CPU threads: torch's intra-op pool, and XLA:CPU's through
    XLA_FLAGS (read when JAX starts its CPU backend, so call this before any JAX computation).
    Flags already in XLA_FLAGS win."""
    if n < 1:
        raise DeviceError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    if "intra_op_parallelism_threads" not in flags:
        extra.append(f"--xla_cpu_multi_thread_eigen={'false' if n == 1 else 'true'} intra_op_parallelism_threads={n}")
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
