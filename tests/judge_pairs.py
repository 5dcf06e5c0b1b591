"""Small pairs written the way users write them, for the one-judge tests (tests/test_verdicts_one_judge.py).

Each twin is correct unless a ``bug`` names what it gets wrong.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch


# --- an attention block fed an additive mask (what HF models build) ---------------------------------
class TorchMaskedAttention(torch.nn.Module):
    """x [N, T, D], mask [N, 1, T] additive (0 or a huge negative) -> x + attn(x) [N, T, D]."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x, mask):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / x.shape[-1] ** 0.5 + mask
        return x + torch.softmax(scores, dim=-1) @ self.v(x)


class FlaxMaskedAttention(nn.Module):
    dim: int = 8
    bug: str = ""  # "no-residual": forgets x +; "residual-no-grad": the residual carries no gradient

    @nn.compact
    def __call__(self, x, mask):
        q, k, v = (nn.Dense(self.dim, name=n)(x) for n in ("q", "k", "v"))
        attn = nn.softmax(q @ jnp.swapaxes(k, -1, -2) / x.shape[-1] ** 0.5 + mask, axis=-1) @ v
        if self.bug == "no-residual":
            return attn
        return (jax.lax.stop_gradient(x) if self.bug == "residual-no-grad" else x) + attn


def masked_attention_input(fill: float, rng=None) -> tuple[np.ndarray, np.ndarray]:
    rng = rng or np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8))
    mask = np.zeros((2, 1, 5))
    mask[0, 0, 3:] = fill  # the last two keys of sample 0 are padding
    return x, mask


# --- a regression head with columns of very different scale -----------------------------------------
class TorchHead(torch.nn.Module):
    """x [N, 8] -> [price ~ 3e5, rate ~ 5e-2] [N, 2]."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)
        self.register_buffer("scale", torch.tensor([3e5, 5e-2]), persistent=False)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))) * self.scale


class FlaxHead(nn.Module):
    zero_rate: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(2, name="head")(jnp.tanh(nn.Dense(8, name="body")(x))) * jnp.array([3e5, 5e-2], x.dtype)
        return y.at[:, 1].set(0.0) if self.zero_rate else y


# --- BatchNorm left at its initial statistics -------------------------------------------------------
class TorchConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class FlaxBNVarPlusEps(nn.Module):
    """A hand-written BatchNorm dividing by (var + eps) instead of sqrt(var + eps)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
        var = self.variable("batch_stats", "var", jnp.ones, (c,))
        return (x - mean.value) / (var.value + 1e-5) * scale + bias


class FlaxConvBN(nn.Module):
    wrong_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        if self.wrong_bn:
            return FlaxBNVarPlusEps(name="bn")(h)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(h)


# --- a gradient that is zero in exact arithmetic: GroupNorm with one channel per group ---------------
class TorchTimeBlock(torch.nn.Module):
    """diffusers' ResnetBlock2D pattern: h = conv(x) + temb_proj(temb)[..., None, None], then a
    GroupNorm with one channel per group removes each channel's constant, so temb_proj's
    gradients are zero in exact arithmetic."""

    def __init__(self, c: int = 4, t: int = 6):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.temb_proj = torch.nn.Linear(t, c)
        self.norm = torch.nn.GroupNorm(c, c)

    def forward(self, x, temb):
        return self.norm(self.conv(x) + self.temb_proj(temb)[:, :, None, None])


class FlaxTimeBlock(nn.Module):
    c: int = 4

    @nn.compact
    def __call__(self, x, temb):
        h = nn.Conv(self.c, (3, 3), padding=1, name="conv")(x) + nn.Dense(self.c, name="temb_proj")(temb)[:, None, None, :]
        return nn.GroupNorm(num_groups=self.c, epsilon=1e-5, name="norm")(h)


# --- legitimate infinities --------------------------------------------------------------------------
class TorchBannedLogits(torch.nn.Module):
    """Logits with some vocabulary entries banned by -inf on both sides."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)
        self.register_buffer("ban", torch.tensor([0.0, float("-inf"), 0.0, 0.0, float("-inf"), 0.0]),
                             persistent=False)

    def forward(self, x):
        return self.fc(x) + self.ban


class FlaxBannedLogits(nn.Module):
    nan_flax: bool = False

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(6, name="fc")(x) + jnp.array([0.0, -jnp.inf, 0.0, 0.0, -jnp.inf, 0.0], x.dtype)
        return y.at[0, 0].set(jnp.nan) if self.nan_flax else y


class TorchPadPool(torch.nn.Module):
    """ConstantPad2d(-inf) before a max-pool (a 'SAME' max-pool written by hand)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.pad = torch.nn.ConstantPad2d((0, 1, 0, 1), float("-inf"))
        self.pool = torch.nn.MaxPool2d(2, stride=1)

    def forward(self, x):
        return self.pool(self.pad(self.conv(x)))


class FlaxPadPool(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3), padding=1, name="conv")(x)
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-jnp.inf)
        return nn.max_pool(h, (2, 2), strides=(1, 1))


# --- float32 inside a float64 model (HF's RMS norm upcasts to float32 whatever the model's dtype) ---
class TorchRMSBlock(torch.nn.Module):
    def __init__(self, d: int = 16):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm  # upcasts to float32 inside

        super().__init__()
        self.fc1 = torch.nn.Linear(d, d)
        self.norm = LlamaRMSNorm(d, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.add_(0.1 * torch.randn(d))
        self.fc2 = torch.nn.Linear(d, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class FlaxRMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return w * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)


class FlaxRMSBlock(nn.Module):
    fc2_bug: float = 0.0  # a relative error planted in fc2's output

    @nn.compact
    def __call__(self, x):
        h = FlaxRMSNorm(name="norm")(nn.Dense(16, name="fc1")(x))
        return nn.Dense(4, name="fc2")(h) * (1.0 + self.fc2_bug)


# --- a model whose float64 run cannot run (a float32 constant built inside) ---------------------------
class TorchFloat32Inside(torch.nn.Module):
    """A legitimately small output (``factor`` scale); the projection is a constant of ``dtype``
    made in forward, so a copy in another dtype fails (a matmul of mixed dtypes)."""

    def __init__(self, factor: float = 1e-6, dtype=torch.float32):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.factor, self.const_dtype = factor, dtype

    def forward(self, x):
        return self.fc(x) @ torch.eye(4, dtype=self.const_dtype) * self.factor


class FlaxFloat32Inside(nn.Module):
    factor: float = 1e-6

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc")(x) * self.factor
