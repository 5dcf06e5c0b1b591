"""Pin and record the numerics environment of both frameworks.

On GPU, torch matmuls/convs may run in TF32 and JAX's "default" matmul precision is bf16-pass
or TF32 too; a parity check that does not pin both is comparing two different approximations.
"""
from __future__ import annotations

import platform

import jax
import torch


# JAX precisions that use reduced-precision (TF32 or bf16) passes for float32 on GPU.
_REDUCED = {"default", "high", "tensorfloat32", "bfloat16", "bfloat16_3x"}


def tf32_for(precision: str) -> bool:
    """The torch TF32 setting that matches a JAX matmul precision (so both sides agree)."""
    return precision in _REDUCED


def pin_numerics(precision: str = "highest", tf32: bool | None = None) -> None:
    """Set JAX matmul precision and torch TF32 flags (both sides at the same precision).

    tf32=None derives torch's setting from ``precision``: TF32 on exactly when JAX uses reduced
    float32 passes, so the two sides compute the same approximation.
    """
    tf32 = tf32_for(precision) if tf32 is None else tf32
    jax.config.update("jax_default_matmul_precision", precision)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def precision_warnings(env: dict) -> list[str]:
    """Say when torch and JAX are set to different float32 matmul precisions."""
    jax_reduced = env["jax_default_matmul_precision"] in _REDUCED
    torch_mm = env["torch_matmul_allow_tf32"] or env["torch_float32_matmul_precision"] != "highest"
    out = []
    if jax_reduced != torch_mm:
        out.append(
            f"the two sides use different matmul precision: JAX {env['jax_default_matmul_precision']!r}, "
            f"torch allow_tf32={env['torch_matmul_allow_tf32']} "
            f"float32_matmul_precision={env['torch_float32_matmul_precision']!r}"
        )
    if jax_reduced != env["torch_cudnn_allow_tf32"]:
        out.append(
            f"the two sides use different conv precision: JAX {env['jax_default_matmul_precision']!r}, "
            f"torch cudnn.allow_tf32={env['torch_cudnn_allow_tf32']}"
        )
    return out


def reduced_float32(dtype: str, env: dict, platform: str) -> bool:
    """True when a float32 check's matmuls and convolutions run with reduced-precision passes:
    TF32 on a GPU (or bf16 passes on a TPU), asked for by JAX's precision or torch's TF32 flags.
    On a CPU both frameworks compute every float32 product in full float32 whatever the flags.

    Such runs are judged against a float64 reference (parity.checker): see REDUCED_FLOAT32_NOTE.
    """
    if dtype != "float32" or platform not in ("gpu", "cuda", "rocm", "tpu"):
        return False
    return (env["jax_default_matmul_precision"] in _REDUCED or env["torch_matmul_allow_tf32"]
            or env["torch_cudnn_allow_tf32"])


REDUCED_FLOAT32_NOTE = (
    "reduced-precision float32 (TF32) arithmetic: judged against a float64 run of the same weights "
    "(Flax's error vs float64 within k x torch's own), not by the table's fixed bound: TF32 "
    "rounding (~5e-4 per product) is amplified by every ReLU whose input it flips, so two correct "
    "TF32 runs differ by far more than any fixed bound that still catches bugs (an H200 gave UNet "
    "gradients 1-8% apart while every layer alone agreed to 3e-4)")


def jax_precision() -> str:
    return str(jax.config.jax_default_matmul_precision or "default")


def numerics_env(torch_device: str | None = None) -> dict:
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
        "torch_device": torch_device or "cpu",
        "torch_cuda_available": torch.cuda.is_available(),
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

    def __init__(self, precision: str = "highest", tf32: bool | None = None):
        self.precision, self.tf32 = precision, tf32

    def __enter__(self) -> "pinned":
        self._saved = (
            jax.config.jax_default_matmul_precision,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(),
        )
        pin_numerics(self.precision, self.tf32)
        return self

    def __exit__(self, *exc) -> None:
        prec, mm, cudnn, mm_prec = self._saved
        jax.config.update("jax_default_matmul_precision", prec)
        torch.set_float32_matmul_precision(mm_prec)  # before allow_tf32: it sets that flag too
        torch.backends.cuda.matmul.allow_tf32 = mm
        torch.backends.cudnn.allow_tf32 = cudnn
