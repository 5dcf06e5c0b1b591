"""parity.check on models whose inputs and outputs are pytrees: tuples with None, dicts,
ModelOutputs, integer inputs, image-in tokens-out (with T == D), in-place residual adds."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import planted
from weight_port.layout import AS_IS, LayoutError


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# --- tuple with None and a dict ------------------------------------------------------------------
class TorchMulti(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x), None, {"z": torch.tanh(self.b(x))}


class FlaxMulti(nn.Module):
    drop_z: bool = False
    wrong_act: bool = False

    @nn.compact
    def __call__(self, x):
        z = nn.Dense(2, name="b")(x)
        out = (nn.Dense(3, name="a")(x), None)
        if self.drop_z:
            return out
        return (*out, {"z": jnp.sin(z) if self.wrong_act else jnp.tanh(z)})


def test_tuple_with_none_and_dict_outputs_pass_leaf_by_leaf():
    r = parity.check(TorchMulti(), FlaxMulti(), _x(2, 4), dtype="float64")
    assert r.ok, r
    assert [c.name for c in r.outputs] == ["output[0]", "output[2]['z']"]


def test_planted_bug_in_one_output_leaf_is_named():
    r = parity.check(TorchMulti(), FlaxMulti(wrong_act=True), _x(2, 4), dtype="float64")
    assert not r.ok
    assert [c.name for c in r.outputs if not c.ok] == ["output[2]['z']"]


def test_structural_mismatch_is_a_failure_naming_both_structures():
    r = parity.check(TorchMulti(), FlaxMulti(drop_z=True), _x(2, 4), dtype="float64")
    assert not r.ok
    (c,) = r.outputs
    assert c.name == "output structure"
    assert "out[2]['z']" in c.note and "out[0]" in c.note


# --- a torch ModelOutput against a Flax dict -------------------------------------------------------
class TorchHFStyle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.fc(x))


class FlaxDictOut(nn.Module):
    @nn.compact
    def __call__(self, x):
        return {"last_hidden_state": nn.Dense(3, name="fc")(x)}


def test_model_output_fields_match_dict_keys():
    r = parity.check(TorchHFStyle(), FlaxDictOut(), _x(2, 4), dtype="float64")
    assert r.ok, r
    assert [c.name for c in r.outputs] == ["output"]


# --- integer inputs ---------------------------------------------------------------------------------
def test_integer_inputs_are_fed_as_is_and_get_no_gradient():
    ids, mask = planted.example_tokens()
    r = parity.check(planted.make_torch_tokens(), planted.make_flax_tokens(), (ids, mask.long()),
                     dtype="float64")
    assert r.ok, r
    assert r.input_grads == []  # token ids and an integer mask: nothing to differentiate
    assert {row.name for row in r.layers} >= {"emb", "head", "<root>"}


# --- image in, tokens out -------------------------------------------------------------------------------
class TorchPatchTokens(torch.nn.Module):
    """Conv patch stem, then [N, D, h, w] -> [N, T, D] (T = h * w), then an optional LayerNorm."""

    def __init__(self, dim: int = 4, norm: bool = True):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, 4, stride=4)
        self.norm = torch.nn.LayerNorm(dim) if norm else None

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(t) if self.norm is not None else t


class FlaxPatchTokens(nn.Module):
    dim: int = 4
    norm: bool = True
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):  # x: [N, H, W, C]
        y = nn.Conv(self.dim, (4, 4), strides=4, padding="VALID", name="proj")(x)
        t = y.reshape(y.shape[0], -1, self.dim)  # channels-last already: [N, h*w, D]
        return nn.LayerNorm(epsilon=self.eps, name="norm")(t) if self.norm else t


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_image_in_tokens_out_with_square_token_output(dtype):
    # 8x8 image, 4x4 patches: T = 4 tokens of D = 4 features: shapes fit both layouts, the
    # LayerNorm that produced the output says "as is".
    r = parity.check(TorchPatchTokens(), FlaxPatchTokens(), _x(2, 3, 8, 8), dtype=dtype)
    assert r.ok, r
    assert r.outputs[0].shape == (2, 4, 4)


def test_image_in_tokens_out_planted_bug_is_located():
    r = parity.check(TorchPatchTokens(), FlaxPatchTokens(eps=1e-2), _x(2, 3, 8, 8), dtype="float64")
    assert not r.ok and r.first_divergence == "norm"


def test_square_output_made_by_a_function_needs_a_declared_layout():
    with pytest.raises(LayoutError, match="output_layout"):
        parity.check(TorchPatchTokens(norm=False), FlaxPatchTokens(norm=False), _x(2, 3, 8, 8),
                     dtype="float64", layers=False)
    r = parity.check(TorchPatchTokens(norm=False), FlaxPatchTokens(norm=False), _x(2, 3, 8, 8),
                     dtype="float64", output_layout=AS_IS)
    assert r.ok, r


# --- in-place residual add after a BatchNorm --------------------------------------------------------------
class TorchResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

    def forward(self, x):
        h = self.bn(self.conv(x))
        h += x  # in place on the BatchNorm's output tensor (as HF ResNet does)
        return torch.relu(h)


class FlaxResidual(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(
            nn.Conv(3, (3, 3), padding=1, name="conv")(x))
        return nn.relu(h + x)


def test_in_place_ops_do_not_corrupt_per_layer_rows():
    r = parity.check(TorchResidual(), FlaxResidual(), _x(2, 3, 5, 5), dtype="float64")
    assert r.ok, r
    assert r.layer("bn").accumulated.ok and r.layer("bn").isolated.ok


class TorchScaledTokens(TorchPatchTokens):
    def forward(self, x):
        return super().forward(x) * 2.0 + 1.0  # element-wise after the LayerNorm


class FlaxScaledTokens(FlaxPatchTokens):
    def __call__(self, x):
        return super().__call__(x) * 2.0 + 1.0


@pytest.mark.parametrize("layers", [False, True])
def test_square_output_made_element_wise_from_a_layer_takes_that_layers_layout(layers):
    r = parity.check(TorchScaledTokens(), FlaxScaledTokens(), _x(2, 3, 8, 8), dtype="float64", layers=layers)
    assert r.ok, r
