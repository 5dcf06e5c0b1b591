"""Flax NNX ViT twin of torch_ref.vit (same class and submodule names). Input [N, H, W, C]."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl.layers import exact_attention
from model_configs import ViTConfig

# torch's LayerNorm eps is 1e-5; Flax's default 1e-6 would be silently off by ~1e-6 relative.
_LN_EPS = 1e-5


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # torch nn.GELU() is the exact erf form; Flax's gelu defaults to the tanh approximation.
        return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-LN transformer block on [N, T, D]."""

    def __init__(self, config: ViTConfig, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(config.dim, epsilon=_LN_EPS, rngs=rngs)
        # Batch-first like torch's batch_first=True; 1/sqrt(head_dim) scaling like torch.
        # exact_attention keeps the softmax in the input dtype (nnx's default rounds float64
        # through float32).
        self.attn = nnx.MultiHeadAttention(config.heads, config.dim, decode=False,
                                           attention_fn=exact_attention, rngs=rngs)
        self.norm2 = nnx.LayerNorm(config.dim, epsilon=_LN_EPS, rngs=rngs)
        self.mlp = MLP(config.dim, config.mlp_dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nnx.Module):
    """Logits [N, num_classes] from images [N, H, W, C]."""

    def __init__(self, config: ViTConfig, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        p = config.patch_size
        self.patch_embed = nnx.Conv(config.in_channels, config.dim, (p, p), strides=(p, p),
                                    padding="VALID", rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, config.dim)))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, config.num_patches + 1, config.dim)))
        # An nnx list: paths blocks/0/..., which the port's naming rule pairs with torch blocks.0.
        self.blocks = nnx.List([Block(config, rngs) for _ in range(config.depth)])
        self.norm = nnx.LayerNorm(config.dim, epsilon=_LN_EPS, rngs=rngs)
        self.head = nnx.Linear(config.dim, config.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.patch_embed(x)  # [N, h, w, D]
        # Row-major (h, w) tokens: the order torch's flatten(2).transpose(1, 2) gives.
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        cls = jnp.broadcast_to(self.cls_token[...], (n, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
