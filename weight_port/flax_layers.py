"""Flax layers the port needs that Flax lacks: a grouped transposed convolution.

flax.linen.ConvTranspose has no ``feature_group_count``, so torch ConvTransposeNd(groups>1) has no
built-in twin. Input [N, *S, C_in], output [N, *S', C_out] (channels-last).
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class GroupedConvTranspose(nn.Module):
    """torch.nn.ConvTransposeNd(groups=g) as a Flax module; kernel [*k, in/g, out], bias [out].

    A transposed conv is the gradient of a conv. lax computes it as a plain conv over the input
    dilated by ``stride`` (lhs_dilation inserts stride-1 zeros between pixels), with the kernel
    flipped in space and in/out swapped -- the port does that flip/swap once (rules.CONV_TRANSPOSE
    with groups), so this module runs its kernel as given, like Flax Conv with
    feature_group_count=g. Padding: torch's ``padding`` p crops p from each side of the full
    transposed output, and ``output_padding`` op adds op on the high side, so the dilated input is
    padded by d(k-1)-p low and d(k-1)-p+op high (flax_impl.layers.torch_conv_transpose_padding);
    output size (in-1)*s - 2p + d(k-1) + op + 1, exactly torch's.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Sequence[int] | None = None  # torch's symmetric padding per spatial dim
    output_padding: Sequence[int] | None = None
    dilation: Sequence[int] | None = None
    feature_group_count: int = 1
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.kernel_size)
        strides = tuple(self.strides or (1,) * n)
        padding = tuple(self.padding or (0,) * n)
        output_padding = tuple(self.output_padding or (0,) * n)
        dilation = tuple(self.dilation or (1,) * n)
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(),
            (*self.kernel_size, in_features // self.feature_group_count, self.features),
            self.param_dtype,
        )
        pads = tuple(
            (d * (k - 1) - p, d * (k - 1) - p + op)
            for k, p, op, d in zip(self.kernel_size, padding, output_padding, dilation)
        )
        spatial = "".join("DHW"[3 - n:]) if n <= 3 else None
        dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(x.dtype), window_strides=(1,) * n, padding=pads,
            lhs_dilation=strides, rhs_dilation=dilation, dimension_numbers=dims,
            feature_group_count=self.feature_group_count,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
        return y


__all__ = ["GroupedConvTranspose"]
