"""A strided transposed convolution computed as one sub-pixel convolution. Input [N, *S, C_in].

``SubpixelConvTranspose`` is a ``flax.linen.ConvTranspose`` (same class hierarchy, same "kernel"
[*k, in, out] and "bias" [out] parameters, same initialisers, so ports, checkpoints and the
weight_port rule are unchanged) whose forward avoids the stride-dilated input.

Why: ConvTranspose lowers to a convolution over the input dilated by the stride (s - 1 zeros
between pixels, ``lhs_dilation``). In 2-D that is s^2 = 4 times the pixels, most of them zeros,
and XLA:CPU has no fast kernel for it (nor for its backward), while torch runs a direct
transposed-convolution kernel.

The math (per spatial dim, Flax kernel Kf run as a plain correlation over the dilated input z
padded by (lo, hi)): out[o] = sum_k z[o + k - lo] Kf[k], and z[t] is non-zero only at t = s*i
(z[s*i] = x[i]). Split outputs by phase, o = s*m + a: only taps k = lo - a (mod s) hit data, at
input offset d = (a + k - lo) / s, so out[s*m + a] = sum_k x[m + d] Kf[k] -- a stride-1
correlation of the undilated x. All s phases share one window of offsets [Dmin, Dmax]; a phase
without a tap at some offset gets a zero there. So one stride-1 conv with s^d * C_out outputs
(kernel gathered from Kf, zeros elsewhere), then depth-to-space, computes every output from the
same products as the dilated form; only the order of the (at most k/s per dim) terms in each sum
may differ.

UNet cases: 2x2 stride 2 'valid' (lo = hi = 1) is a 1x1 conv to 4*C_out (one product per output:
bit-identical); 3x3 stride 2 padding 1 output_padding 1 (lo = 1, hi = 2) is a 2x2 conv to
4*C_out with 9 of its 16 taps non-zero.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def phase_taps(k: int, s: int, lo: int) -> tuple[np.ndarray, int]:
    """Per phase a (rows) and window offset (columns): the kernel tap index, or k for "none".

    Returns (taps [s, W], Dmin) with input offset d = Dmin + column. Index k points at the zero
    slice the caller appends to the kernel.
    """
    entries = [(a, kk, (a + kk - lo) // s) for a in range(s) for kk in range(k) if (kk - lo + a) % s == 0]
    if not entries:
        return np.full((s, 1), k), 0
    dmin = min(d for _, _, d in entries)
    dmax = max(d for _, _, d in entries)
    taps = np.full((s, dmax - dmin + 1), k)
    for a, kk, d in entries:
        taps[a, d - dmin] = kk
    return taps, dmin


def subpixel_kernel(kernel: jax.Array, taps: list[np.ndarray]) -> jax.Array:
    """Flax ConvTranspose kernel [*k, in, out] -> sub-pixel conv kernel [*W, in, prod(s) * out]
    with output channels ordered (phase_1, ..., phase_n, out)."""
    n = len(taps)
    k = jnp.pad(kernel, [(0, 1)] * n + [(0, 0), (0, 0)])  # index k_i: the zero tap
    for i, t in enumerate(taps):
        k = jnp.take(k, jnp.asarray(t.reshape(-1)), axis=i)  # axis i: (phase, window) flattened
    s = [t.shape[0] for t in taps]
    w = [t.shape[1] for t in taps]
    cin, cout = kernel.shape[-2:]
    k = k.reshape(*(v for pair in zip(s, w) for v in pair), cin, cout)  # [s1, W1, ..., in, out]
    k = jnp.transpose(k, (*range(1, 2 * n, 2), 2 * n, *range(0, 2 * n, 2), 2 * n + 1))
    return k.reshape(*w, cin, int(np.prod(s)) * cout)


class SubpixelConvTranspose(nn.ConvTranspose):
    """nn.ConvTranspose with explicit ((lo, hi), ...) padding, computed sub-pixel (module doc).

    Same fields and parameters as the parent; supported: one batch axis, transpose_kernel=False,
    kernel_dilation 1, no mask, explicit padding pairs.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        n = inputs.ndim - 2
        ks = (self.kernel_size,) * n if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        strides = self.strides if self.strides is not None else 1
        strides = (strides,) * n if isinstance(strides, int) else tuple(strides)
        dilation = self.kernel_dilation if self.kernel_dilation is not None else 1
        padding = self.padding
        explicit = (not isinstance(padding, str) and len(padding) == n
                    and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding))
        if self.transpose_kernel or self.mask is not None or not explicit or dilation not in (1, (1,) * n):
            raise NotImplementedError(
                "SubpixelConvTranspose supports transpose_kernel=False, kernel_dilation=1, no mask "
                f"and explicit ((lo, hi), ...) padding; got transpose_kernel={self.transpose_kernel}, "
                f"kernel_dilation={self.kernel_dilation}, padding={padding!r}")
        cin = inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (*ks, cin, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)

        taps, conv_pad, out_len, blocks = [], [], [], []
        for size, k, s, (lo, hi) in zip(inputs.shape[1:-1], ks, strides, padding):
            t, dmin = phase_taps(k, s, lo)
            length = (size - 1) * s + 1 + lo + hi - k + 1  # the dilated conv's output length
            m = -(-length // s)  # outputs per phase (the last block is cropped below)
            taps.append(t)
            conv_pad.append((-dmin, m - 1 + dmin + t.shape[1] - 1 - (size - 1)))
            out_len.append(length)
            blocks.append(m)
        if any(p < 0 for pair in conv_pad for p in pair):  # crop the input where the window ends early
            inputs = lax.pad(inputs, jnp.zeros((), inputs.dtype),
                             [(0, 0, 0), *((min(lo, 0), min(hi, 0), 0) for lo, hi in conv_pad), (0, 0, 0)])
            conv_pad = [(max(lo, 0), max(hi, 0)) for lo, hi in conv_pad]
        spatial = "DHW"[3 - n:] if n <= 3 else None
        y = lax.conv_general_dilated(
            inputs, subpixel_kernel(kernel, taps), (1,) * n, conv_pad,
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
            precision=self.precision, preferred_element_type=self.preferred_element_type,
        )  # [N, *M, s1 * ... * sn * out]
        # depth-to-space: [N, *M, *s, out] -> [N, M1, s1, ..., out] -> [N, M1 * s1, ..., out]
        batch = y.shape[0]
        y = y.reshape(batch, *blocks, *strides, self.features)
        y = jnp.transpose(y, (0, *(v for i in range(n) for v in (1 + i, 1 + n + i)), 1 + 2 * n))
        y = y.reshape(batch, *(m * s for m, s in zip(blocks, strides)), self.features)
        if any(m * s != length for m, s, length in zip(blocks, strides, out_len)):
            y = y[(slice(None), *(slice(0, length) for length in out_len))]
        if bias is not None:
            y = y + bias
        return y


__all__ = ["SubpixelConvTranspose", "phase_taps", "subpixel_kernel"]
