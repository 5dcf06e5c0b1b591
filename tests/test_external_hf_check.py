"""Real external pairs: tiny HF transformers models (built from config objects, no download)
checked with parity.check directly on the torch ModelOutput, per-layer rows included.

What a user writes: the torch model, the Flax *module* (``FlaxXModel(config, dtype=...,
_do_init=False).module``: the linen module, not the wrapper object), the torch-layout input.
Nothing is wrapped; for float64 the Flax module is built with ``dtype=jnp.float64`` (HF Flax
modules compute in their ``dtype``, float32 by default).
"""
from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import weight_port

transformers = pytest.importorskip("transformers")

_JDT = {"float32": jnp.float32, "float64": jnp.float64}


def _flax(flax_cls, cfg, dtype: str, overrides: dict):
    """The Flax linen module of ``flax_cls`` on a copy of ``cfg`` with ``overrides`` (a planted bug)."""
    fcfg = copy.deepcopy(cfg)
    for k, v in overrides.items():
        setattr(fcfg, k, v)
    return flax_cls(fcfg, dtype=_JDT[dtype], _do_init=False).module


def _bert(dtype: str, **flax_overrides):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    tm = transformers.BertModel(cfg).eval()
    fm = _flax(transformers.FlaxBertModel, cfg, dtype, flax_overrides)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding: the mask matters
    return tm, fm, (ids, mask)


def _vit(dtype: str, **flax_overrides):
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    tm = transformers.ViTModel(cfg).eval()
    # The Flax *module* takes NHWC pixels (the FlaxViTModel wrapper transposes NCHW itself); the
    # checker's inferred input layout (a Conv2d eats it: channels-first) does that conversion.
    fm = _flax(transformers.FlaxViTModel, cfg, dtype, flax_overrides)
    return tm, fm, np.random.default_rng(0).standard_normal((2, 3, 8, 8))


def _resnet(dtype: str, **flax_overrides):
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic")
    torch.manual_seed(0)
    tm = transformers.ResNetModel(cfg).eval()
    fm = _flax(transformers.FlaxResNetModel, cfg, dtype, flax_overrides)
    return tm, fm, np.random.default_rng(0).standard_normal((2, 3, 16, 16))


PAIRS = {"bert": _bert, "vit": _vit, "resnet": _resnet}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_hf_pair_passes_with_per_layer_rows(name, dtype):
    tm, fm, x = PAIRS[name](dtype)
    r = parity.check(tm, fm, x, dtype=dtype)
    assert r.ok, r
    assert r.outputs[0].name.startswith("output.")  # ModelOutput fields, compared leaf by leaf
    judged = [row for row in r.layers if row.isolated is not None and row.torch_path]
    assert len(judged) >= 5, r


@pytest.mark.parametrize("name, layer", [("bert", "embeddings.LayerNorm"),
                                         ("vit", "encoder.layer.0.layernorm_before")])
def test_hf_changed_layer_norm_eps_is_located(name, layer):
    tm, fm, x = PAIRS[name]("float64", layer_norm_eps=1e-2)
    r = parity.check(tm, fm, x, dtype="float64", grads=False, lint=False)  # a forward bug: the forward rows
    assert not r.ok
    assert (r.first_divergence, r.divergence_kind) == (layer, "forward"), r


def test_hf_resnet_perturbed_weight_is_located():
    import jax
    from flax import traverse_util

    tm, fm, x = _resnet("float64")
    with jax.enable_x64(True):  # float64 variables for a float64 check
        variables = weight_port.torch_to_flax(copy.deepcopy(tm).double(), fm, torch.as_tensor(x),
                                              input_layout=weight_port.CHANNELS_FIRST)
        flat = traverse_util.flatten_dict(variables["params"])
        # the first conv of the second stage, 1% off
        key = next(k for k in flat if k[-1] == "kernel" and "1" in "".join(k[:4]) and "convolution" in k)
        flat[key] = flat[key] * 1.01
        bad = {**variables, "params": traverse_util.unflatten_dict(flat)}
    # (No separate passing run with the intact variables: a divergence pinned exactly to the
    # perturbed conv, with everything upstream in tolerance, already shows they were read right.)
    r = parity.check(tm, fm, x, dtype="float64", variables=bad, grads=False, lint=False)  # forward rows
    assert not r.ok
    row = r.layer(r.first_divergence)
    assert (row.torch_type, r.divergence_kind) == ("Conv2d", "forward"), r
    assert row.flax_path.split("/") == list(key[:-1]), r
