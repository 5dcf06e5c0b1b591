"""Conversion rules for transformers' own layer types (weight_port.rules): HF RMS norms, the
weight-norm positional conv, BEiT's relative position bias, DINOv2's layer scale and RoFormer's
frozen sinusoid table; each checked on the real HF layer or a tiny HF model, with round trips."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import weight_port as wp

transformers = pytest.importorskip("transformers")


def _x(*shape):
    return np.random.default_rng(0).standard_normal(shape)


def _round_trip(t, f, x, layout=wp.AS_IS):
    v = wp.torch_to_flax(t, f, x, input_layout=layout)
    back = wp.flax_to_torch(v, t, f, x, input_layout=layout)
    sd = t.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], val) for k, val in sd.items())
    t.load_state_dict(back, strict=True)


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_hf_rms_norm_pair_passes_and_round_trips(kind):
    from transformers.models.gemma.modeling_flax_gemma import FlaxGemmaRMSNorm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    cfg = (transformers.LlamaConfig if kind == "llama" else transformers.GemmaConfig)(hidden_size=8, rms_norm_eps=1e-5)
    t = (LlamaRMSNorm if kind == "llama" else GemmaRMSNorm)(8, eps=1e-5)
    with torch.no_grad():
        t.weight.uniform_(-1, 1)
    f = (FlaxLlamaRMSNorm if kind == "llama" else FlaxGemmaRMSNorm)(cfg)
    r = parity.check(t, f, _x(2, 3, 8), dtype="float32", input_layout="as_is")
    assert r.ok, r
    _round_trip(t, f, torch.zeros(2, 3, 8))


def test_hf_rms_norm_eps_difference_is_named():
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    f = FlaxLlamaRMSNorm(transformers.LlamaConfig(hidden_size=8, rms_norm_eps=1e-2))
    with pytest.raises(wp.AttributeMismatchError, match="eps=1e-05.*eps=0.01"):
        wp.torch_to_flax(LlamaRMSNorm(8, eps=1e-5), f, torch.zeros(2, 3, 8), input_layout=wp.AS_IS)


def test_weight_norm_positional_conv_passes_and_round_trips():
    """torch.nn.utils.parametrizations.weight_norm (g, v) against HF's FlaxConvWithWeightNorm."""
    from transformers.models.wav2vec2.modeling_flax_wav2vec2 import FlaxWav2Vec2PositionalConvEmbedding
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2PositionalConvEmbedding

    cfg = transformers.Wav2Vec2Config(hidden_size=8, num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    t = Wav2Vec2PositionalConvEmbedding(cfg)
    f = FlaxWav2Vec2PositionalConvEmbedding(cfg, dtype=jnp.float64)
    r = parity.check(t, f, _x(2, 6, 8), dtype="float64", input_layout="as_is")
    assert r.ok, r
    assert {c.name for c in r.param_grads} >= {"grad conv.parametrizations.weight.original0",
                                                "grad conv.parametrizations.weight.original1"}
    _round_trip(t, f, torch.zeros(2, 6, 8))


def test_dinov2_layer_scale_pair_passes():
    from transformers.models.dinov2.modeling_dinov2 import Dinov2LayerScale
    from transformers.models.dinov2.modeling_flax_dinov2 import FlaxDinov2LayerScale

    cfg = transformers.Dinov2Config(hidden_size=8)  # layerscale_value=1.0 (see the known-bug test)
    t = Dinov2LayerScale(cfg)
    with torch.no_grad():
        t.lambda1.uniform_(0.5, 1.5)
    r = parity.check(t, FlaxDinov2LayerScale(cfg, dtype=jnp.float64), _x(2, 3, 8), dtype="float64",
                     input_layout="as_is")
    assert r.ok, r


@pytest.mark.parametrize("name", ["beit", "roformer"])
def test_hf_model_with_bias_table_or_frozen_sinusoid_round_trips(name):
    """BEiT's relative position bias table (a leaf layer of its own type) and RoFormer's frozen
    sinusoid table (no Flax leaf: refilled from the torch module on the way back)."""
    if name == "beit":
        from transformers.models.beit.modeling_flax_beit import FlaxBeitModule
        cfg = transformers.BeitConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32, use_relative_position_bias=True)
        t, f, x, lay = transformers.BeitModel(cfg).eval(), FlaxBeitModule(cfg), torch.zeros(1, 3, 8, 8), None
    else:
        from transformers.models.roformer.modeling_flax_roformer import FlaxRoFormerModule
        cfg = transformers.RoFormerConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=16)
        t, f = transformers.RoFormerModel(cfg).eval(), FlaxRoFormerModule(cfg)
        x = parity.Inputs(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.long),
                          token_type_ids=torch.zeros(1, 5, dtype=torch.long), flax_only=dict(head_mask=None))
        lay = wp.AS_IS
    _round_trip(t, f, x, lay)
