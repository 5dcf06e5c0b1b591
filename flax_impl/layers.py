"""Small helpers that make Flax layers compute exactly what their torch counterparts do."""
from __future__ import annotations

from collections.abc import Sequence

import jax


def torch_conv_transpose_padding(
    kernel_size: Sequence[int],
    padding: Sequence[int],
    output_padding: Sequence[int],
    dilation: Sequence[int] | None = None,
) -> tuple[tuple[int, int], ...]:
    """Explicit (low, high) padding that makes flax ``nn.ConvTranspose`` equal torch's.

    torch's ConvTranspose is the gradient of a conv: output = (in - 1) * s - 2p + d(k - 1) + op + 1.
    lax.conv_transpose with explicit padding pads the stride-dilated input by exactly what it is
    given, so the equivalent is d(k-1) - p on the low side and d(k-1) - p + op on the high side.
    Flax's 'SAME' also gives in * s outputs for k=3, s=2 but shifts the window: silently wrong.
    """
    dilation = dilation or (1,) * len(kernel_size)
    return tuple(
        (d * (k - 1) - p, d * (k - 1) - p + op)
        for k, p, op, d in zip(kernel_size, padding, output_padding, dilation)
    )


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize [N, H, W, C] to ``size`` like torch ``interpolate(bilinear, align_corners=False)``.

    jax.image.resize antialiases by default: identical when up-sampling, different (a wider
    triangle filter) when down-sampling. torch does not antialias unless asked, so turn it off.
    Half-pixel centers match align_corners=False.
    """
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, *size, c), method="bilinear", antialias=False)


def center_crop(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Crop [N, H, W, C] to the centered window of ``size`` (same floor offset as torch_ref)."""
    h, w = size
    top = (x.shape[1] - h) // 2
    left = (x.shape[2] - w) // 2
    return x[:, top : top + h, left : left + w, :]


def log_softmax(x: jax.Array) -> jax.Array:
    return x - jax.scipy.special.logsumexp(x, axis=-1, keepdims=True)


__all__ = ["center_crop", "log_softmax", "resize_bilinear", "torch_conv_transpose_padding"]
