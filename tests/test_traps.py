"""The known PyTorch->Flax traps. Each test passes with the handling and fails without it.

Each one also shows the trap is real (the naive port is detected as wrong), so a checker that
stopped detecting differences would fail here too.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

import parity
from flax_impl.layers import resize_bilinear, torch_conv_transpose_padding
from layer_helpers import FlaxWrap, TorchWrap
from parity.judge import judge
from parity.registry import PAIRS
from parity.tolerances import FORWARD, tolerance_for
from weight_port import build_plan, torch_to_flax


def _tconv_pair(padding):
    torch_layer = torch.nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
    flax_layer = FlaxWrap(lambda: nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding=padding))
    return TorchWrap(torch_layer), flax_layer


def test_transposed_conv_kernel_is_flipped():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch_model, flax_model = _tconv_pair(torch_conv_transpose_padding((3, 3), (1, 1), (1, 1)))
    ported = torch_to_flax(torch_model.double(), flax_model, x)
    assert parity.check(torch_model, flax_model, x, dtype="float64").ok
    # The naive port (OIHW -> HWIO-style transpose, no spatial flip) is caught.
    w = torch_model.layer.weight.detach().numpy()
    naive = jax.tree_util.tree_map(lambda a: a, ported)
    naive["params"]["layer"]["kernel"] = np.transpose(w, (2, 3, 0, 1))
    assert not np.allclose(naive["params"]["layer"]["kernel"], ported["params"]["layer"]["kernel"])
    assert not parity.check(torch_model, flax_model, x, dtype="float64", variables=naive).ok


def test_transposed_conv_needs_explicit_padding_not_same():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    explicit = _tconv_pair(torch_conv_transpose_padding((3, 3), (1, 1), (1, 1)))
    assert parity.check(*explicit, x, dtype="float64").ok
    # 'SAME' also produces 2x the input size here, which is what makes the trap silent.
    same = _tconv_pair("SAME")
    torch.manual_seed(0)
    report = parity.check(*same, x, dtype="float64")
    assert report.outputs[0].shape == (2, 4, 10, 10)
    assert not report.ok


def test_unet_same_uses_torch_equivalent_transposed_padding():
    pair = PAIRS["unet-same"]
    assert torch_conv_transpose_padding((3, 3), (1, 1), (1, 1)) == ((1, 2), (1, 2))
    torch_model, flax_model = pair.build()
    assert parity.check(torch_model, flax_model, pair.example_input(), dtype="float64").ok


def test_cnn_flatten_is_permuted():
    pair = PAIRS["cnn"]
    cfg = pair.config("tiny")
    torch_model, flax_model = pair.build(cfg)
    x = torch.as_tensor(pair.example_input(cfg), dtype=torch.float64)
    torch_model = torch_model.double()
    plan = build_plan(torch_model, flax_model, x)
    dense1 = next(layer for layer in plan.layers if layer.info.torch_path == "dense1")
    side = cfg.image_size // 4
    assert dense1.info.flatten == (cfg.features[1], side, side)
    assert parity.check(torch_model, flax_model, x, dtype="float64").ok
    # Without the permutation (same shapes, wrong values) the outputs differ.
    dense1.info = dataclasses.replace(dense1.info, flatten=None)
    unpermuted = plan.to_flax(torch_model.state_dict())
    report = parity.check(torch_model, flax_model, x, dtype="float64", variables=unpermuted)
    assert not report.outputs[0].ok


def test_resize_matches_torch_when_downsampling_and_antialias_would_not():
    x = np.random.default_rng(0).standard_normal((2, 3, 13, 11))
    expected = F.interpolate(torch.from_numpy(x), size=(5, 4), mode="bilinear", align_corners=False).numpy()
    nhwc = np.moveaxis(x, 1, -1)
    tol = tolerance_for("float32", FORWARD)
    with jax.enable_x64(True):
        ours = np.moveaxis(np.asarray(resize_bilinear(nhwc, (5, 4))), -1, 1)
        antialiased = np.moveaxis(
            np.asarray(jax.image.resize(nhwc, (2, 5, 4, 3), "bilinear")), -1, 1)  # antialias=True default
    assert judge("resize", ours, expected, tol).ok
    assert not judge("resize", antialiased, expected, tol).ok


@pytest.mark.parametrize("name", ["unet-valid-retain"])
def test_retain_dim_resize_parity(name):
    pair = PAIRS[name]
    torch_model, flax_model = pair.build()
    assert parity.check(torch_model, flax_model, pair.example_input(), dtype="float64").ok


def test_port_target_comes_from_eval_shape_not_init(monkeypatch):
    """torch_to_flax never materialises random Flax weights (it would be slow for big models)."""
    import flax.linen.initializers as inits

    pair = PAIRS["cnn"]
    torch_model, flax_model = pair.build()
    x = torch.as_tensor(pair.example_input(), dtype=torch.float32)
    calls = []
    real = jax.random.normal

    def spy(*a, **k):
        out = real(*a, **k)
        if not isinstance(out, jax.core.Tracer):
            calls.append(a)
        return out

    monkeypatch.setattr(jax.random, "normal", spy)
    monkeypatch.setattr(inits, "normal", lambda *a, **k: (lambda key, shape, dtype=None: spy(key, shape)))
    variables = torch_to_flax(torch_model, flax_model, x)
    assert calls == []
    flat = traverse_util.flatten_dict(variables)
    sd = torch_model.state_dict()
    assert np.array_equal(np.asarray(flat[("params", "conv1", "bias")]), sd["conv1.bias"].numpy())
