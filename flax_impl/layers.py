"""Small helpers that make Flax layers compute exactly what their torch counterparts do."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


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


def exact_attention(query: jax.Array, key: jax.Array, value: jax.Array, **kwargs) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v in the inputs' dtype; q, k, v [N, T, heads, head_dim].

    An ``attention_fn`` for nnx.MultiHeadAttention. Its default hands dropout-free attention to
    jax.nn.dot_product_attention, whose XLA path computes the softmax in float32: a float64 twin
    then differs from torch's float64 by ~1e-8 relative. This is the same math (the scale
    1/sqrt(head_dim), like torch) with every step in the input dtype. Masks and dropout are not
    supported (the ViT uses neither).
    """
    if kwargs.get("mask") is not None or kwargs.get("bias") is not None:
        raise NotImplementedError("exact_attention: masks and attention biases are not supported")
    if kwargs.get("dropout_rate", 0.0) > 0.0 and not kwargs.get("deterministic", True):
        raise NotImplementedError("exact_attention: attention dropout is not supported")
    logits = jnp.einsum("...qhd,...khd->...hqk", query / jnp.sqrt(query.shape[-1]).astype(query.dtype), key)
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits, axis=-1), value)


def log_softmax(x: jax.Array) -> jax.Array:
    return x - jax.scipy.special.logsumexp(x, axis=-1, keepdims=True)


__all__ = ["center_crop", "exact_attention", "log_softmax", "resize_bilinear", "torch_conv_transpose_padding"]
