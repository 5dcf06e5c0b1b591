"""Pin and record the numerics environment of both frameworks.

On GPU, torch matmuls/convs may run in TF32 and JAX's "default" matmul precision is bf16-pass
or TF32 too; a parity check that does not pin both is comparing two different approximations.
"""
from __future__ import annotations

import platform

import jax
import torch


def pin_numerics(precision: str = "highest", tf32: bool = False) -> None:
    """Set JAX matmul precision and torch TF32 flags (both sides at the same precision)."""
    jax.config.update("jax_default_matmul_precision", precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def jax_precision() -> str:
    return str(jax.config.jax_default_matmul_precision or "default")


def numerics_env() -> dict:
    """Everything that changes the numbers: precision flags, x64, devices, versions."""
    import flax

    return {
        "jax_default_matmul_precision": jax_precision(),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "torch_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "torch_cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "jax": jax.__version__,
            "flax": flax.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }


class pinned:
    """Context manager: JAX matmul precision and torch TF32 flags set for the block, then restored."""

    def __init__(self, precision: str = "highest", tf32: bool = False):
        self.precision, self.tf32 = precision, tf32

    def __enter__(self) -> "pinned":
        self._saved = (
            jax.config.jax_default_matmul_precision,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        )
        pin_numerics(self.precision, self.tf32)
        return self

    def __exit__(self, *exc) -> None:
        prec, mm, cudnn = self._saved
        jax.config.update("jax_default_matmul_precision", prec)
        torch.backends.cuda.matmul.allow_tf32 = mm
        torch.backends.cudnn.allow_tf32 = cudnn
