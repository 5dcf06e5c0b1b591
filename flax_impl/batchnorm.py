"""A Flax BatchNorm whose train-mode statistics are exactly torch's BatchNormNd (channels-last).

Same variable names as ``flax.linen.BatchNorm`` (params ``scale``/``bias``, batch_stats
``mean``/``var``), so the weight port's BatchNorm rule keeps working unchanged.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    """BatchNorm over every axis but the last, input [N, *S, C], matching torch.nn.BatchNormNd.

    Differences from the stock ``flax.linen.BatchNorm`` (each one is a torch convention):
      * running ``var`` is updated with the UNBIASED batch variance (times n / (n - 1), n = number
        of values reduced per channel), as torch does; stock Flax stores the biased one, so its
        running variance is low by a factor (n - 1) / n at every update.
      * the batch variance is two-pass, mean((x - mean)^2), like torch; stock Flax's default
        (use_fast_variance=True) uses E[x^2] - E[x]^2, which cancels catastrophically in float32.
      * normalisation still uses the BIASED batch variance, as torch does.

    momentum keeps the FLAX convention (weight of the old running value):
        running = momentum * running + (1 - momentum) * batch_statistic
    torch's momentum is the weight of the new value, so torch momentum=0.1 is momentum=0.9 here.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5  # torch BatchNormNd's default eps (Flax's default too)
    use_bias: bool = True
    use_scale: bool = True
    # Accepted so this is a drop-in for ``nn.BatchNorm(..., use_fast_variance=False)``; True is
    # refused because the one-pass formula is not what torch computes.
    use_fast_variance: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """x: [N, *S, C]; statistics over [N, *S] per channel C. Returns the same shape."""
        if self.use_fast_variance:
            raise ValueError("flax_impl.batchnorm.BatchNorm: use_fast_variance=True is not torch's "
                             "two-pass variance; use flax.linen.BatchNorm if you want it")
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        stat_dtype = self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), stat_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), stat_dtype))
        dtype = self.dtype or jnp.result_type(x, ra_mean.value)
        x = x.astype(dtype)

        if use_ra:
            mean, var = ra_mean.value.astype(dtype), ra_var.value.astype(dtype)
        else:
            n = math.prod(x.shape[:-1])
            if n < 2:
                # torch raises "Expected more than 1 value per channel when training".
                raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, got {n}")
            # Shifted mean: s + mean(x - s) with s one sample per channel. It equals mean(x) in
            # exact arithmetic (and has the same gradient, s being a constant), but sums small
            # values: a float32 sum of values near 3000 loses ~10x the accuracy of torch's mean.
            shift = jax.lax.stop_gradient(x[(0,) * (x.ndim - 1)])
            mean = shift + jnp.mean(x - shift, axis=axes)
            # Two-pass biased variance: what torch normalises with.
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            if not self.is_initializing():
                # torch: running_var <- (1 - m) * running_var + m * var * n / (n - 1) (Bessel).
                unbiased = var * (n / (n - 1))
                # Blend in the compute dtype: a float32 stat times 0.9 would round 0.9 to float32.
                ra_mean.value = self.momentum * ra_mean.value.astype(dtype) + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value.astype(dtype) + (1 - self.momentum) * unbiased

        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            y = y * self.param("scale", nn.initializers.ones, (features,), self.param_dtype).astype(dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (features,), self.param_dtype).astype(dtype)
        return y


__all__ = ["BatchNorm"]
