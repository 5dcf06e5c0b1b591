"""Small model pairs for the verdict tests (noise floor, INVALID, warnings); factories for the CLI."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch


class TorchAttention(torch.nn.Module):
    """[N, T, 8] -> single-head softmax attention with q/k/v/out Linear layers -> [N, T, 8].

    The key bias k.bias has a gradient that is exactly zero in exact arithmetic: it adds
    q . b_k to every score of a query row, and softmax ignores a per-row constant.
    """

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.scale = dim ** -0.5

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) * self.scale
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


class FlaxAttention(nn.Module):
    dim: int = 8
    flip_value_sign: bool = False  # a planted bug in the value branch (see random cotangent test)

    def setup(self) -> None:
        self.q, self.k, self.v, self.out = (nn.Dense(self.dim) for _ in range(4))

    def __call__(self, x):
        scores = self.q(x) @ jnp.swapaxes(self.k(x), -1, -2) * self.dim ** -0.5
        return self.out(nn.softmax(scores, axis=-1) @ self.v(x))


def attention_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((2, 5, 8))


def make_torch_attention() -> TorchAttention:
    torch.manual_seed(0)
    return TorchAttention()


def make_flax_attention() -> FlaxAttention:
    return FlaxAttention()


# --- a dead branch: a ReLU behind a very negative bias is zero everywhere ------------------------
class TorchDead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.fc.bias.fill_(-1e3)

    def forward(self, x):
        return torch.relu(self.fc(x))


class FlaxDead(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(4, name="fc")(x))


# --- a gradient bug that a ones cotangent cannot see ---------------------------------------------
@jax.custom_vjp
def mirrored_cotangent(x):
    """Identity forward; backward returns 2 mean(g) - g: the cotangent's deviations from its mean
    sign-flipped. A ones cotangent (mean 1, no deviation) comes back unchanged, so only a random
    cotangent exposes it."""
    return x


mirrored_cotangent.defvjp(lambda x: (x, None),
                          lambda _, g: (2 * jnp.mean(g, axis=-1, keepdims=True) - g,))


class FlaxBlockMirroredGrad(nn.Module):
    """planted.FlaxBlock with the backward bug at its output (where the cotangent is the one the
    checker draws)."""

    def setup(self) -> None:
        self.fc1 = nn.Dense(16)
        self.norm = nn.LayerNorm(epsilon=1e-5, use_scale=False, use_bias=False)
        self.fc2 = nn.Dense(4)

    def __call__(self, x):
        return mirrored_cotangent(self.fc2(nn.gelu(self.norm(self.fc1(x)), approximate=False)))


# --- CLI factories -------------------------------------------------------------------------------
def make_flax_block_eps6():
    import planted

    return planted.FlaxBlock(eps=1e-6)  # Flax's default LayerNorm eps; torch's is 1e-5


def make_flax_block_tanh():
    import planted

    return planted.FlaxBlock(approximate=True)


def nan_block_input() -> np.ndarray:
    return np.full((3, 8), np.nan)


def make_tensor() -> torch.Tensor:
    return torch.zeros(3, 8)


def large_block_input() -> np.ndarray:
    # Activations of variance ~30: LayerNorm eps 1e-6 vs 1e-5 changes outputs by ~1e-7 relative,
    # below float32's tolerance, so only the port's finding reveals it.
    return 10.0 * np.random.default_rng(0).standard_normal((3, 8))


# --- an output that is zero in exact arithmetic: features centred after a Linear with equal rows --
class TorchCenter(torch.nn.Module):
    """[N, F] -> x - mean over F: a parameter-free layer (its own module, so it gets a layer row)."""

    def forward(self, x):
        return x - x.mean(dim=-1, keepdim=True)


class TorchCentered(torch.nn.Module):
    """[N, 8] -> Linear(8, 6) -> centred over features -> [N, 6], zero in exact arithmetic.

    Every row of fc.weight (and every entry of fc.bias) is the same, so the 6 features of a sample
    are equal and centring cancels them: both frameworks return rounding noise of the size of the
    features (|h| eps), and the input gradient W^T (cot - mean(cot)) is zero in theory too.
    """

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)
        self.center = TorchCenter()
        with torch.no_grad():
            self.fc.weight.copy_(self.fc.weight[:1].expand(6, 8))
            self.fc.bias.fill_(float(self.fc.bias[0]))

    def forward(self, x):
        return self.center(self.fc(x))


class FlaxCenter(nn.Module):
    def __call__(self, x):
        return x - jnp.mean(x, axis=-1, keepdims=True)


class FlaxCentered(nn.Module):
    def setup(self) -> None:
        self.fc = nn.Dense(6)
        self.center = FlaxCenter()

    def __call__(self, x):
        return self.center(self.fc(x))


def make_torch_centered() -> TorchCentered:
    torch.manual_seed(0)
    return TorchCentered()


def make_flax_centered() -> FlaxCentered:
    return FlaxCentered()


def centered_input(rng: np.random.Generator) -> np.ndarray:
    # 10x the unit scale, so the cancelled features (and their rounding noise) are not tiny.
    return 10.0 * rng.standard_normal((5, 8))
