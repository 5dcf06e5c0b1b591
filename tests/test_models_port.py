"""Port of every registry model: torch -> flax -> torch bit-exact; bad keys and shapes named."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

from parity.registry import PAIRS
from weight_port import KeyMismatchError, NoRuleError, build_plan, flax_to_torch, torch_to_flax
from weight_port.flax_tree import is_nnx
from weight_port.layout import to_flax_layout
from weight_port.nnx import nnx_variables


def _randomize_buffers(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)


def _built(name, dtype=torch.float32):
    pair = PAIRS[name]
    torch_model, flax_model = pair.build()
    torch_model = torch_model.to(dtype)
    _randomize_buffers(torch_model)
    x = torch.as_tensor(pair.example_input(), dtype=dtype)
    return pair, torch_model, flax_model, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(PAIRS))
def test_round_trip_is_bit_exact(name, dtype):
    _, torch_model, flax_model, x = _built(name, dtype)
    with jax.enable_x64(dtype == torch.float64):
        variables = torch_to_flax(torch_model, flax_model, x)
        back = flax_to_torch(variables, torch_model)  # no Flax module: plan from torch side only
    sd = torch_model.state_dict()
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key
    torch_model.load_state_dict(back, strict=True)


@pytest.mark.parametrize("name", list(PAIRS))
def test_flax_structure_matches_abstract_init(name):
    pair, torch_model, flax_model, x = _built(name)
    ported = torch_to_flax(torch_model, flax_model, x, input_layout=pair.input_layout)
    if is_nnx(flax_model):  # an NNX twin gets an nnx.State; its own variables are the reference
        variables, expected = nnx_variables(ported), nnx_variables(flax_model)
    else:
        variables = ported
        xf = to_flax_layout(x.numpy(), pair.input_layout)
        expected = jax.eval_shape(flax_model.init, jax.random.key(0), xf)
    got = jax.tree_util.tree_map(lambda a: a.shape, dict(variables))
    want = jax.tree_util.tree_map(lambda a: a.shape, dict(expected))
    assert got == want
    assert ("batch_stats" in variables) == pair.has_batch_norm()


def test_missing_unexpected_and_mismatched_keys_are_all_listed():
    pair, torch_model, flax_model, x = _built("unet-same-bn")
    plan = build_plan(torch_model, flax_model, x)
    sd = dict(torch_model.state_dict())
    del sd["down.1.conv2.weight"]
    sd["down.0.extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(5, 4, 1, 1)
    with pytest.raises(KeyMismatchError) as info:
        plan.to_flax(sd)
    msg = str(info.value)
    assert "down.1.conv2.weight" in msg  # missing
    assert "down.0.extra.weight" in msg  # unexpected
    assert "head.weight" in msg and "(5, 4, 1, 1)" in msg  # mismatched, with both shapes
    assert info.value.missing and info.value.unexpected and info.value.mismatched


def test_shape_mismatch_between_configs_names_both_shapes():
    pair = PAIRS["mlp"]
    import dataclasses

    cfg = pair.config("tiny")
    torch_model = pair.torch_cls()(cfg)
    flax_model = pair.flax_cls()(dataclasses.replace(cfg, features=(3, 6, 5)))
    with pytest.raises(KeyMismatchError) as info:
        torch_to_flax(torch_model, flax_model, torch.zeros(2, cfg.in_features))
    msg = str(info.value)
    assert "layers.1.weight" in msg and "(4, 3)" in msg and "(3, 6)" in msg


def test_flax_to_torch_rejects_unexpected_flax_leaves():
    _, torch_model, flax_model, x = _built("mlp")
    variables = torch_to_flax(torch_model, flax_model, x)
    flat = traverse_util.flatten_dict(variables)
    flat[("params", "layers_9", "kernel")] = flat[("params", "layers_0", "kernel")]
    with pytest.raises(KeyMismatchError, match="layers_9"):
        flax_to_torch(traverse_util.unflatten_dict(flat), torch_model)


def test_layer_without_rule_is_named():
    class WithBilinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Bilinear(2, 2, 2)

        def forward(self, x):
            return self.mix(x, x)

    import flax.linen as nn

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="mix")(x)

    with pytest.raises(NoRuleError) as info:
        torch_to_flax(WithBilinear(), Twin(), torch.zeros(1, 2), input_layout="as_is")
    assert "mix" in str(info.value) and "Bilinear" in str(info.value)
    assert "register_rule" in str(info.value)


def test_dtype_preserved_and_optional_target_dtype():
    _, torch_model, flax_model, x = _built("cnn")
    variables = torch_to_flax(torch_model, flax_model, x)
    assert variables["params"]["conv1"]["kernel"].dtype == np.float32
    halved = torch_to_flax(torch_model, flax_model, x, dtype=np.float16)
    assert halved["params"]["conv1"]["kernel"].dtype == np.float16


@pytest.mark.parametrize("source", ["module", "state_dict"])
def test_ported_arrays_do_not_alias_live_torch_tensors(source):
    """An optimizer step or train-mode BatchNorm update on the torch side must not leak into Flax."""
    _, torch_model, flax_model, x = _built("unet-same-bn")
    src = torch_model if source == "module" else torch_model.state_dict()
    variables = torch_to_flax(src, flax_model, x, torch_module=torch_model)
    before_bias = np.array(variables["params"]["head"]["bias"])
    before_mean = np.array(variables["batch_stats"]["down_0"]["bn1"]["mean"])
    with torch.no_grad():
        torch_model.head.bias.add_(1.0)
    torch_model.train()(x)  # updates running_mean in place
    assert np.array_equal(np.asarray(variables["params"]["head"]["bias"]), before_bias)
    assert np.array_equal(np.asarray(variables["batch_stats"]["down_0"]["bn1"]["mean"]), before_mean)
