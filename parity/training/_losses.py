"""The training losses, one formula on both sides: class axis 1 in torch, last in Flax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as F

from parity.runtime import flatten

LOSSES = ("cross_entropy", "nll", "mse")


def torch_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss on torch's output: class axis 1 ([N, C] or [N, C, *S])."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)  # logits [N, C, *S], labels [N, *S]
    if kind == "nll":
        return F.nll_loss(out, y)  # log-probabilities [N, C, *S]
    return F.mse_loss(out, y)


def flax_loss(kind: str, out: jax.Array, y: jax.Array) -> jax.Array:
    """out: [N, *S, C] (Flax layout); y: labels [N, *S] (same in both layouts) or targets like out."""
    if kind == "mse":
        return jnp.mean(jnp.square(out - y))
    logp = jax.nn.log_softmax(out, axis=-1) if kind == "cross_entropy" else out
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


def first_leaf(out):
    """The output the loss reads: the output itself, or the first leaf of a pytree output."""
    return next(iter(flatten(out).values()))
