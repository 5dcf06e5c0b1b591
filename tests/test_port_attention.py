"""nn.MultiheadAttention <-> Flax multi-head attention (linen and nnx): parity, round trips, refusals."""
from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import weight_port
from flax_impl.layers import exact_attention
from parity.judge import judge
from parity.tolerances import FORWARD, tolerance_for
from weight_port.attention import UnsupportedAttentionError


class TorchSelfAttention(torch.nn.Module):
    """Self-attention returning only the output: torch MHA returns (out, weights), the twin out."""

    def __init__(self, **kwargs):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class NNXSelfAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, bias: bool, rngs: nnx.Rngs):
        # exact_attention: nnx's default computes the softmax in float32 (see its docstring)
        self.attn = nnx.MultiHeadAttention(heads, dim, use_bias=bias, decode=False,
                                           attention_fn=exact_attention, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.attn(x)


class LinenSelfAttention(fnn.Module):
    heads: int
    bias: bool

    @fnn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return fnn.MultiHeadDotProductAttention(self.heads, use_bias=self.bias, name="attn")(x)


# (embed_dim, num_heads, bias, batch_first)
GRID = [(8, 1, True, True), (12, 3, True, False), (12, 4, False, True), (16, 2, False, False)]


def _grid_id(c) -> str:
    return f"d{c[0]}-h{c[1]}-bias{int(c[2])}-{'NTD' if c[3] else 'TND'}"


def _pair(cfg, api: str, dtype: str):
    dim, heads, bias, batch_first = cfg
    torch_model = TorchSelfAttention(embed_dim=dim, num_heads=heads, bias=bias, batch_first=batch_first)
    torch_model = torch_model.to(getattr(torch, dtype))
    if bias:  # torch initialises in_proj_bias / out_proj.bias to zero: make them count
        with torch.no_grad():
            torch_model.attn.in_proj_bias.uniform_(-1, 1)
            torch_model.attn.out_proj.bias.uniform_(-1, 1)
    flax_model = NNXSelfAttention(dim, heads, bias, nnx.Rngs(0)) if api == "nnx" else LinenSelfAttention(heads, bias)
    return torch_model, flax_model


def _flax_forward(api: str, flax_model, ported, x: np.ndarray) -> np.ndarray:
    if api == "nnx":  # the port returns an nnx.State; the module it was given is untouched
        nnx.update(flax_model, ported)
        return np.asarray(flax_model(jnp.asarray(x)))
    return np.asarray(flax_model.apply(ported, jnp.asarray(x)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("cfg", GRID, ids=_grid_id)
def test_forward_parity_and_round_trip(cfg, api, dtype):
    dim, heads, bias, batch_first = cfg
    torch_model, flax_model = _pair(cfg, api, dtype)
    x = np.random.default_rng(0).standard_normal((2, 5, dim)).astype(dtype)  # [N, T, D]
    # batch_first=False: torch takes [T, N, D]; the Flax twin is always batch-first, so the
    # caller swaps the first two axes going in and coming out.
    x_torch = x if batch_first else x.swapaxes(0, 1)
    with jax.enable_x64(dtype == "float64"):
        ported = weight_port.torch_to_flax(torch_model, flax_model, torch.as_tensor(x_torch), input_layout="as_is")
        y = _flax_forward(api, flax_model, ported, x)
    with torch.no_grad():
        expected = torch_model(torch.as_tensor(x_torch)).numpy()
    if not batch_first:
        expected = expected.swapaxes(0, 1)
    result = judge(f"attn-{_grid_id(cfg)}-{api}-{dtype}", y, expected, tolerance_for(dtype, FORWARD))
    assert result.ok, str(result)

    back = weight_port.flax_to_torch(ported, torch_model, flax_model if api == "linen" else None,
                                     torch.as_tensor(x_torch), input_layout="as_is")
    original = torch_model.state_dict()
    assert set(back) == set(original)
    for k, v in original.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_kernel_layout_is_heads_split_head_major():
    """q kernel [D, heads, hd]: head h, feature e is torch output row h * hd + e."""
    torch_model, flax_model = _pair((12, 3, True, True), "nnx", "float32")
    ported = weight_port.torch_to_flax(torch_model, flax_model)
    w = torch_model.attn.in_proj_weight.detach().numpy()
    q = np.asarray(ported["attn"]["query"]["kernel"].get_value())
    v = np.asarray(ported["attn"]["value"]["kernel"].get_value())
    assert q.shape == (12, 3, 4)
    np.testing.assert_array_equal(q[:, 2, 1], w[2 * 4 + 1])
    np.testing.assert_array_equal(v[:, 0, 3], w[2 * 12 + 3])


@pytest.mark.parametrize("kwargs, what", [
    (dict(add_bias_kv=True), "add_bias_kv"),
    (dict(kdim=6, vdim=6), "kdim"),
    (dict(add_zero_attn=True), "add_zero_attn"),
])
def test_unsupported_configurations_are_refused_by_name(kwargs, what):
    torch_model = TorchSelfAttention(embed_dim=8, num_heads=2, batch_first=True, **kwargs)
    with pytest.raises(UnsupportedAttentionError, match=what):
        weight_port.torch_to_flax(torch_model, NNXSelfAttention(8, 2, True, nnx.Rngs(0)))


def test_head_count_mismatch_is_named():
    torch_model = TorchSelfAttention(embed_dim=8, num_heads=2, batch_first=True)
    with pytest.raises(weight_port.PortError, match="num_heads"):
        weight_port.torch_to_flax(torch_model, NNXSelfAttention(8, 4, True, nnx.Rngs(0)))
