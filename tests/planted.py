"""Planted bugs: Flax twins (and variables) that are wrong in exactly one, known layer.

Each helper returns what parity.check needs; the tests assert the report names that layer.
Small extra pairs cover layers the built-in models do not have (LayerNorm, GELU, a resize).
"""
from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

import flax_impl
from flax_impl.layers import resize_bilinear
from flax_impl.unet import DoubleConv, up_conv
from weight_port import build_plan


def port(torch_model, flax_model, x, layout) -> dict:
    """The correct Flax variables (float64), to be damaged by one helper below."""
    tm = copy.deepcopy(torch_model).double()
    with jax.enable_x64(True):  # jnp.asarray would silently round to float32 otherwise
        return build_plan(tm, flax_model, torch.as_tensor(x), input_layout=layout).to_flax(tm.state_dict())


def _set(variables: dict, path: tuple[str, ...], value) -> dict:
    out = jax.tree_util.tree_map(lambda a: a, variables)  # a fresh nested dict, leaves shared
    node = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = np.asarray(value)  # numpy: keeps float64 outside an x64 context
    return out


# --- mlp: a detached input (stop_gradient): forward equal, gradients upstream wrong -------------
class DetachedDense(nn.Dense):
    def __call__(self, x):
        return super().__call__(jax.lax.stop_gradient(x))


class MLPDetached(flax_impl.ExplicitMLP):
    """layers_1 stops the gradient to its input: layers.0 learns nothing."""

    def setup(self) -> None:
        f = self.config.features
        self.layers = [nn.Dense(f[0]), DetachedDense(f[1]), *[nn.Dense(n) for n in f[2:]]]


# --- cnn: wrong padding on conv2; unpermuted flatten for dense1 ---------------------------------
class CNNWrongPadding(flax_impl.CNN):
    """conv2 pads (0, 2) instead of (1, 1): same output shape, window shifted by one pixel."""

    def setup(self) -> None:
        c1, c2 = self.config.features
        self.conv1 = nn.Conv(c1, (3, 3), padding="SAME")
        self.conv2 = nn.Conv(c2, (3, 3), padding=((0, 2), (0, 2)))
        self.dense1 = nn.Dense(self.config.hidden)
        self.dense2 = nn.Dense(self.config.num_classes)


def cnn_unpermuted_flatten(torch_model, variables) -> dict:
    """dense1's kernel as a plain transpose: torch's (C, H, W) feature order fed an (H, W, C) flatten."""
    w = torch_model.dense1.weight.detach().double().numpy()
    return _set(variables, ("params", "dense1", "kernel"), w.T)


# --- unet: an unflipped transposed-conv kernel; a transposed conv with Flax 'SAME' padding ------
def unet_unflipped_kernel(torch_model, variables, index: int = 1) -> dict:
    """up.{index} kernel moved to [kh, kw, in, out] without the spatial flip the port applies."""
    w = getattr(torch_model.up, str(index)).weight.detach().double().numpy()  # [in, out, kh, kw]
    return _set(variables, ("params", f"up_{index}", "kernel"), np.transpose(w, (2, 3, 0, 1)))


def _unet_setup(self, up0=None, up_conv0=None) -> None:
    """flax_impl.UNet.setup with up_0 and/or up_conv_0 replaced (setup cannot reassign a name)."""
    cfg = self.config
    rev = cfg.channels[::-1]
    self.down = [DoubleConv(c, cfg.padding, cfg.batch_norm) for c in cfg.channels]
    ups = [up_conv(c, cfg.padding) for c in rev[1:]]
    blocks = [DoubleConv(c, cfg.padding, cfg.batch_norm) for c in rev[1:]]
    self.up = [up0 or ups[0], *ups[1:]]
    self.up_conv = [up_conv0 or blocks[0], *blocks[1:]]
    self.head = nn.Conv(cfg.num_classes, (1, 1))


class UNetSamePaddedUp(flax_impl.UNet):
    """up_0 uses Flax 'SAME' padding: the same 2x output size as torch, but a shifted window."""

    def setup(self) -> None:
        c = self.config.channels[::-1][1]
        _unet_setup(self, up0=nn.ConvTranspose(c, (3, 3), strides=(2, 2), padding="SAME"))


# --- unet-same-bn: a detached skip branch inside one decoder block ------------------------------
class DetachedSkipDoubleConv(DoubleConv):
    """Stops the gradient to the skip half of its concatenated input: forward equal."""

    def __call__(self, x, train: bool = False):
        c = x.shape[-1] // 2
        x = jnp.concatenate([jax.lax.stop_gradient(x[..., :c]), x[..., c:]], axis=-1)
        return super().__call__(x, train)


class UNetDetachedSkip(flax_impl.UNet):
    def setup(self) -> None:
        cfg = self.config
        _unet_setup(self, up_conv0=DetachedSkipDoubleConv(cfg.channels[-2], cfg.padding, cfg.batch_norm))


# --- an extra pair with LayerNorm and GELU (the built-ins have neither) -------------------------
class TorchBlock(torch.nn.Module):
    """[N, 8] -> fc1 -> LayerNorm (no affine: no port rule needed) -> exact GELU -> fc2 -> [N, 4]."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16, elementwise_affine=False)  # eps 1e-5
        self.act = torch.nn.GELU()  # exact erf form
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


class GELU(nn.Module):
    # Flax's nn.gelu defaults to the tanh approximation; torch's nn.GELU() is the exact erf form.
    approximate: bool = False

    def __call__(self, x):
        return nn.gelu(x, approximate=self.approximate)


class FlaxBlock(nn.Module):
    eps: float = 1e-5  # torch LayerNorm's default; Flax's default is 1e-6
    approximate: bool = False

    def setup(self) -> None:
        self.fc1 = nn.Dense(16)
        self.norm = nn.LayerNorm(epsilon=self.eps, use_scale=False, use_bias=False)
        self.act = GELU(self.approximate)
        self.fc2 = nn.Dense(4)

    def __call__(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


def block_input(rng: np.random.Generator) -> np.ndarray:
    # Small activations make LayerNorm's eps matter (var ~1e-4, so eps 1e-5 vs 1e-6 is ~5%).
    return 0.01 * rng.standard_normal((3, 8))


# --- an extra pair that down-samples with a bilinear resize -------------------------------------
class TorchResize(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, x):
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


class TorchDown(torch.nn.Module):
    """[N, 2, 12, 12] -> conv -> resize to 5x5 (down-sampling) -> head -> [N, 3, 5, 5]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.resize = TorchResize((5, 5))
        self.head = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(self.resize(self.conv(x)))


class Resize(nn.Module):
    size: tuple[int, int]
    antialias: bool = False  # jax.image.resize's default is True: wrong when down-sampling

    def __call__(self, x):
        if self.antialias:
            n, _, _, c = x.shape
            return jax.image.resize(x, (n, *self.size, c), method="bilinear", antialias=True)
        return resize_bilinear(x, self.size)


class FlaxDown(nn.Module):
    antialias: bool = False

    def setup(self) -> None:
        self.conv = nn.Conv(4, (3, 3), padding="SAME")
        self.resize = Resize((5, 5), self.antialias)
        self.head = nn.Conv(3, (1, 1))

    def __call__(self, x):
        return self.head(self.resize(self.conv(x)))


def down_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((2, 2, 12, 12))




# --- factories for `parity check --torch planted:make_torch_block --flax ...` (CLI tests) --------
def make_torch_block() -> TorchBlock:
    torch.manual_seed(0)
    return TorchBlock()


def make_flax_block() -> FlaxBlock:
    return FlaxBlock()


def make_flax_block_tanh() -> FlaxBlock:
    return FlaxBlock(approximate=True)


def make_broken():
    raise RuntimeError("cannot build this model today")


# --- CLI pairs with pytree inputs (parity check/train --example-input) ---------------------------
class TorchTokenHead(torch.nn.Module):
    """Token ids + mask -> per-token logits [N, T, 5]."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5)

    def forward(self, ids, mask):
        return self.head(self.emb(ids) * mask[..., None])


class FlaxTokenHead(nn.Module):
    @nn.compact
    def __call__(self, ids, mask):
        return nn.Dense(5, name="head")(nn.Embed(11, 6, name="emb")(ids) * mask[..., None])


class FlaxTokenHeadRenamed(nn.Module):
    """The same twin with other module names: pairs only with --rename."""

    @nn.compact
    def __call__(self, ids, mask):
        return nn.Dense(5, name="out_proj")(nn.Embed(11, 6, name="tok")(ids) * mask[..., None])


def make_torch_tokens():
    torch.manual_seed(0)
    return TorchTokenHead()


def make_flax_tokens():
    return FlaxTokenHead()


def make_flax_tokens_renamed():
    return FlaxTokenHeadRenamed()


def example_tokens():
    """(ids [2, 7] int64, mask [2, 7] float): the torch model's two positional inputs."""
    ids = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    return ids, mask


def make_nnx_block():
    """An NNX twin of make_torch_block's LayerNorm/GELU block."""
    from flax import nnx

    class NNXBlock(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(8, 16, rngs=rngs)
            self.norm = nnx.LayerNorm(16, epsilon=1e-5, use_scale=False, use_bias=False, rngs=rngs)
            self.fc2 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.gelu(self.norm(self.fc1(x)), approximate=False))

    return NNXBlock(nnx.Rngs(0))


class TorchTwoFC(torch.nn.Module):
    """Linear -> tanh -> Linear, seeded: the smallest pair with two layers to locate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class FlaxTwoFC(nn.Module):
    """TorchTwoFC's twin. dtype: HF-style, every layer computes in it (None: in its inputs' and
    parameters' dtype, as a twin declared without one). low: the layer that computes in
    bfloat16 instead (a planted mis-port)."""

    dtype: jnp.dtype | None = jnp.float32
    low: str = ""

    @nn.compact
    def __call__(self, x):
        def dt(name):
            return jnp.bfloat16 if name == self.low else self.dtype
        h = nn.Dense(16, dtype=dt("fc1"), name="fc1")(x)
        return nn.Dense(4, dtype=dt("fc2"), name="fc2")(jnp.tanh(h)).astype(self.dtype or x.dtype)
