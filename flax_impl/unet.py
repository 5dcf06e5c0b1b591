"""Flax UNet twin of torch_ref.unet (valid/same padding, optional BatchNorm). Input [N, H, W, C]."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_impl.batchnorm import BatchNorm
from flax_impl.layers import center_crop, resize_bilinear, torch_conv_transpose_padding
from flax_impl.subpixel import SubpixelConvTranspose
from model_configs import UNetConfig


class DoubleConv(nn.Module):
    """(conv3x3 -> [BN] -> relu) x 2."""

    features: int
    padding: str
    batch_norm: bool

    def setup(self) -> None:
        # torch padding=1 for 3x3 is Flax 'SAME'; torch padding=0 is 'VALID'.
        pad = "SAME" if self.padding == "same" else "VALID"
        self.conv1 = nn.Conv(self.features, (3, 3), padding=pad, use_bias=not self.batch_norm)
        self.conv2 = nn.Conv(self.features, (3, 3), padding=pad, use_bias=not self.batch_norm)
        if self.batch_norm:
            # torch BatchNorm2d: eps 1e-5 (Flax's default too), momentum 0.1 on the *new* value,
            # which is Flax momentum 0.9 on the old one. use_fast_variance=False computes
            # E[(x - mean)^2] like torch, not E[x^2] - mean^2 (cancellation in float32).
            bn = dict(momentum=0.9, epsilon=1e-5, use_fast_variance=False)
            self.bn1 = BatchNorm(**bn)  # torch-exact: unbiased running_var
            self.bn2 = BatchNorm(**bn)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.conv1(x)
        if self.batch_norm:
            x = self.bn1(x, use_running_average=not train)
        x = nn.relu(x)
        x = self.conv2(x)
        if self.batch_norm:
            x = self.bn2(x, use_running_average=not train)
        return nn.relu(x)


def up_conv(features: int, padding: str, upsample: str = "subpixel") -> nn.ConvTranspose:
    # Explicit padding from torch's (padding, output_padding); the port flips the kernel
    # spatially because torch's transposed conv is a true gradient-of-conv (transpose_kernel
    # stays False here so the Flax kernel is a plain [kh, kw, in, out] conv kernel).
    # SubpixelConvTranspose is an nn.ConvTranspose with the same parameters, computed without
    # the zero-dilated input (UNetConfig.upsample).
    if padding == "same":
        k, pad = (3, 3), torch_conv_transpose_padding((3, 3), (1, 1), (1, 1))
    else:
        k, pad = (2, 2), torch_conv_transpose_padding((2, 2), (0, 0), (0, 0))
    cls = SubpixelConvTranspose if upsample == "subpixel" else nn.ConvTranspose
    return cls(features, k, strides=(2, 2), padding=pad)


class UNet(nn.Module):
    config: UNetConfig

    def setup(self) -> None:
        cfg = self.config
        rev = cfg.channels[::-1]
        self.down = [DoubleConv(c, cfg.padding, cfg.batch_norm) for c in cfg.channels]
        self.up = [up_conv(c, cfg.padding, cfg.upsample) for c in rev[1:]]
        self.up_conv = [DoubleConv(c, cfg.padding, cfg.batch_norm) for c in rev[1:]]
        self.head = nn.Conv(cfg.num_classes, (1, 1))

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        size = x.shape[1:3]
        skips = []
        for i, block in enumerate(self.down):
            x = block(x, train)
            if i < len(self.down) - 1:
                skips.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for up, block, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = up(x)
            x = block(jnp.concatenate([center_crop(skip, x.shape[1:3]), x], axis=-1), train)
        x = self.head(x)
        if self.config.retain_dim:
            x = resize_bilinear(x, size)
        return x
