"""The UNet twin's two up-sampling formulations: same parameters, same port, same math, torch parity.

"conv_transpose" is Flax's stock nn.ConvTranspose (a conv over the zero-dilated input);
"subpixel" (flax_impl.subpixel) is one stride-1 conv + depth-to-space with the same parameters.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import weight_port
from flax_impl import UNet as FlaxUNet
from flax_impl.layers import torch_conv_transpose_padding
from flax_impl.subpixel import SubpixelConvTranspose
from parity.judge import judge
from model_configs import UNetConfig
from parity.tolerances import FORWARD, GRAD, tolerance_for
from torch_ref import UNet as TorchUNet

FORMULATIONS = ("conv_transpose", "subpixel")
# (kernel, torch padding, torch output_padding): the UNet's 'valid' and 'same' up-convs, plus
# shapes where phases have unequal tap counts or the last block is cropped.
UP_CONVS = [((2, 2), (0, 0), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((3, 3), (1, 1), (0, 0)),
            ((4, 3), (1, 0), (0, 1))]


@pytest.mark.parametrize("k, p, op", UP_CONVS, ids=lambda v: "x".join(map(str, v)))
def test_subpixel_layer_equals_conv_transpose_float64(k, p, op, x64):
    """The same variables through both layers (random input and parameters): output, parameter
    and input gradients."""
    rng = np.random.default_rng(0)
    pad = torch_conv_transpose_padding(k, p, op)
    x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)))
    stock = nn.ConvTranspose(4, k, strides=(2, 2), padding=pad)
    subpixel = SubpixelConvTranspose(4, k, strides=(2, 2), padding=pad)
    variables = stock.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, subpixel.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, variables)
    variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), variables)
    cotangent = jnp.asarray(rng.standard_normal(stock.apply(variables, x).shape))
    results = {}
    for name, layer in (("stock", stock), ("subpixel", subpixel)):
        out, vjp = jax.vjp(layer.apply, variables, x)
        results[name] = (out, *vjp(cotangent))  # output, parameter and input gradients
    for (path, got), (_, want) in zip(*(jax.tree_util.tree_flatten_with_path(results[n])[0]
                                        for n in ("subpixel", "stock"))):
        kind = FORWARD if path[0].idx == 0 else GRAD
        result = judge(f"subpixel-{k}-{p}-{op}{jax.tree_util.keystr(path)}", np.asarray(got),
                         np.asarray(want), tolerance_for("float64", kind))
        assert result.ok, str(result)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_formulations_have_identical_variables_and_port_plan(padding):
    base = UNetConfig.tiny(padding=padding)
    torch.manual_seed(0)
    torch_model = TorchUNet(base)
    x = torch.as_tensor(np.random.default_rng(0).standard_normal(
        (2, base.in_channels, base.image_size, base.image_size)), dtype=torch.float32)
    plans, ported = {}, {}
    for up in FORMULATIONS:
        flax_model = FlaxUNet(dataclasses.replace(base, upsample=up))
        plan = weight_port.build_plan(torch_model, flax_model, x)
        plans[up] = [(l.info.torch_path, l.info.flax_path, l.rule.name) for l in plan.layers]
        ported[up] = weight_port.torch_to_flax(torch_model, flax_model, x)
    assert plans["subpixel"] == plans["conv_transpose"]
    a, b = (jax.tree_util.tree_flatten_with_path(ported[up]) for up in FORMULATIONS)
    assert a[1] == b[1]  # same tree structure (names)
    for (path, u), (_, v) in zip(a[0], b[0]):
        assert u.shape == v.shape and bool(jnp.array_equal(u, v)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("upsample", FORMULATIONS)
def test_parity_with_torch(upsample, padding):
    """Forward and gradients vs torch, float64 (float32 of the default formulation: test_models)."""
    config = UNetConfig.tiny(padding=padding, upsample=upsample)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, config.in_channels, config.image_size, config.image_size))
    report = parity.check(TorchUNet(config), FlaxUNet(config), x, dtype="float64", layers=False)
    assert report.ok, "\n" + str(report)


def test_unknown_upsample_is_refused():
    with pytest.raises(ValueError, match="upsample"):
        UNetConfig.tiny(upsample="nearest")


def test_unsupported_subpixel_settings_are_refused():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(NotImplementedError, match="transpose_kernel"):
        SubpixelConvTranspose(3, (3, 3), strides=(2, 2), padding="SAME").init(jax.random.key(0), x)
