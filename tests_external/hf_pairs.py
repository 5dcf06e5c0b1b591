"""Tiny Hugging Face pairs (torch model, its transformers Flax module, inputs) built from config
objects only (no hub, no network), one per architecture: the battery's registry.

Each entry gives what a user would write: the torch model, the Flax *module* (the Linen module of
``FlaxXModel``; for float64 built with ``dtype=jnp.float64``, since HF Flax modules compute in
their ``dtype``), and the call. HF forwards take their inputs in different positional orders on
the two sides (GPT-2: torch ``(input_ids, past_key_values, ...)``, Flax ``(input_ids,
attention_mask, position_ids)``), so calls are ``parity.Inputs`` with keywords. ``misport``
names one torch layer of the second block: the battery scales its weight by 1 + 1e-3 in the
ported Flax variables and expects the check to FAIL there.
"""
from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np
import torch

from parity import Inputs

T = 7  # tokens per sequence
_JDT = {"float32": jnp.float32, "float64": jnp.float64}


@dataclass(frozen=True)
class HFPair:
    name: str
    config: Callable[[], object]
    torch_cls: str  # transformers class name
    flax_module: str  # "<model dir>:<Flax module class>" in transformers.models
    inputs: Callable[[], object]
    misport: str  # torch path of a layer whose weight the mis-port test perturbs
    input_layout: dict = field(default_factory=dict)  # parity.check's, when inference cannot decide
    # weight_port's input_layout; None: its default (float [N, C, *S] channels-first, the rest as is)
    port_layout: str | None = None

    def build(self, dtype: str, **config_overrides):
        """(torch model in eval mode, Flax Linen module computing in ``dtype``, inputs)."""
        import transformers

        cfg = self.config()
        for k, v in config_overrides.items():
            setattr(cfg, k, v)
        torch.manual_seed(0)
        tm = getattr(transformers, self.torch_cls)(cfg).eval()
        mod, cls = self.flax_module.split(":")
        flax_cls = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_flax_{mod}"), cls)
        return tm, flax_cls(copy.deepcopy(cfg), dtype=_JDT[dtype]), self.inputs()


def ids(vocab: int = 64, t: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, t), generator=torch.Generator().manual_seed(seed))


def mask(t: int = T) -> torch.Tensor:
    m = torch.ones(2, t, dtype=torch.long)
    m[1, t - 2:] = 0  # padding: the mask matters
    return m


def pos(t: int = T, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, t + offset)[None].repeat(2, 1)


def pixels(size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, size, size))


def _causal() -> Inputs:
    return Inputs(ids(), attention_mask=mask(), position_ids=pos())


def _encoder(position_offset: int | None = 0, head_mask: bool = False) -> Callable[[], Inputs]:
    def make() -> Inputs:
        kw = dict(attention_mask=mask(), token_type_ids=torch.zeros(2, T, dtype=torch.long))
        if position_offset is not None:
            kw["position_ids"] = pos(offset=position_offset)
        if head_mask:  # the Flax module requires it (None: no head mask); torch defaults it
            kw["flax_only"] = dict(head_mask=None)
        return Inputs(ids(), **kw)
    return make


def _seq2seq() -> Inputs:
    # FlaxBartModule requires position ids that BartModel computes itself: Flax-only constants.
    return Inputs(ids(), attention_mask=mask(), decoder_input_ids=ids(t=5, seed=1),
                  decoder_attention_mask=torch.ones(2, 5, dtype=torch.long),
                  flax_only=dict(position_ids=pos(), decoder_position_ids=pos(5)))


def _tf():
    import transformers
    return transformers


_BERTLIKE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=32)
_DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32)
_SEQ2SEQ = dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32)

PAIRS: dict[str, HFPair] = {p.name: p for p in [
    HFPair("gpt2", lambda: _tf().GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16),
           "GPT2LMHeadModel", "gpt2:FlaxGPT2LMHeadModule", _causal, "transformer.h.1.mlp.c_fc"),
    HFPair("llama", lambda: _tf().LlamaConfig(**_DECODER), "LlamaModel", "llama:FlaxLlamaModule", _causal,
           "layers.1.mlp.up_proj"),
    # sliding_window=None makes FlaxMistral attend to the diagonal only (a transformers bug, see
    # test_hf_known_bugs); a window wider than the sequence is plain causal attention on both sides.
    HFPair("mistral", lambda: _tf().MistralConfig(**_DECODER, sliding_window=16), "MistralModel",
           "mistral:FlaxMistralModule", _causal, "layers.1.self_attn.v_proj"),
    HFPair("gemma", lambda: _tf().GemmaConfig(**_DECODER, head_dim=8), "GemmaModel", "gemma:FlaxGemmaModule",
           _causal, "layers.1.mlp.gate_proj"),
    HFPair("opt", lambda: _tf().OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32),
           "OPTModel", "opt:FlaxOPTModule", _causal, "decoder.layers.1.fc1"),
    HFPair("gpt_neo", lambda: _tf().GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                                 attention_types=[[["global", "local"], 1]],
                                                 max_position_embeddings=32, window_size=4),
           "GPTNeoModel", "gpt_neo:FlaxGPTNeoModule", _causal, "h.1.attn.attention.q_proj"),
    HFPair("gptj", lambda: _tf().GPTJConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=2, rotary_dim=8,
                                            n_positions=32),
           "GPTJModel", "gptj:FlaxGPTJModule", _causal, "h.1.mlp.fc_in"),
    HFPair("bloom", lambda: _tf().BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2), "BloomModel",
           "bloom:FlaxBloomModule", lambda: Inputs(ids(), attention_mask=mask()),
           "h.1.self_attention.query_key_value"),
    HFPair("bart", lambda: _tf().BartConfig(**_SEQ2SEQ), "BartModel", "bart:FlaxBartModule", _seq2seq,
           "decoder.layers.1.encoder_attn.q_proj"),
    HFPair("mbart", lambda: _tf().MBartConfig(**_SEQ2SEQ), "MBartModel", "mbart:FlaxMBartModule", _seq2seq,
           "encoder.layers.1.fc2"),
    HFPair("roberta", lambda: _tf().RobertaConfig(**_BERTLIKE), "RobertaModel", "roberta:FlaxRobertaModule",
           _encoder(position_offset=2), "encoder.layer.1.attention.self.value"),
    HFPair("xlm_roberta", lambda: _tf().XLMRobertaConfig(**_BERTLIKE), "XLMRobertaModel",
           "xlm_roberta:FlaxXLMRobertaModule", _encoder(position_offset=2), "encoder.layer.1.output.dense"),
    HFPair("distilbert", lambda: _tf().DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=48,
                                                        max_position_embeddings=32),
           "DistilBertModel", "distilbert:FlaxDistilBertModule", lambda: Inputs(ids(), attention_mask=mask()),
           "transformer.layer.1.ffn.lin1"),
    HFPair("electra", lambda: _tf().ElectraConfig(**_BERTLIKE, embedding_size=16), "ElectraModel",
           "electra:FlaxElectraModule", _encoder(), "encoder.layer.1.intermediate.dense"),
    # ALBERT shares one layer across num_hidden_layers: each call's gradient is a share of torch's.
    HFPair("albert", lambda: _tf().AlbertConfig(**_BERTLIKE, embedding_size=16), "AlbertModel",
           "albert:FlaxAlbertModule", _encoder(), "encoder.albert_layer_groups.0.albert_layers.0.ffn"),
    HFPair("big_bird", lambda: _tf().BigBirdConfig(**_BERTLIKE, attention_type="original_full"), "BigBirdModel",
           "big_bird:FlaxBigBirdModule", _encoder(head_mask=True), "encoder.layer.1.attention.self.key"),
    HFPair("roformer", lambda: _tf().RoFormerConfig(**_BERTLIKE), "RoFormerModel", "roformer:FlaxRoFormerModule",
           _encoder(position_offset=None, head_mask=True), "encoder.layer.1.attention.self.query"),
    HFPair("beit", lambda: _tf().BeitConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=32,
                                            use_relative_position_bias=True),
           "BeitModel", "beit:FlaxBeitModule", lambda: pixels(), "encoder.layer.1.intermediate.dense"),
    HFPair("dinov2", lambda: _tf().Dinov2Config(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=2, mlp_ratio=2),
           "Dinov2Model", "dinov2:FlaxDinov2Module", lambda: pixels(), "encoder.layer.1.mlp.fc1"),
    HFPair("regnet", lambda: _tf().RegNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                groups_width=4),
           "RegNetModel", "regnet:FlaxRegNetModule", lambda: pixels(16),
           "encoder.stages.1.layers.0.layer.1.convolution"),
    HFPair("clip", lambda: _tf().CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2), projection_dim=8),
           "CLIPModel", "clip:FlaxCLIPModule",
           lambda: Inputs(ids(), pixel_values=pixels(), attention_mask=mask(), position_ids=pos()),
           "vision_model.encoder.layers.1.mlp.fc1"),
    # The Flax module supports only the "stable" layer norm variant (do_stable_layer_norm=True).
    HFPair("wav2vec2", lambda: _tf().Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=32, conv_dim=(8, 8), conv_stride=(4, 2),
                                                    conv_kernel=(8, 4), num_conv_pos_embeddings=4,
                                                    num_conv_pos_embedding_groups=2, vocab_size=32,
                                                    do_stable_layer_norm=True, feat_extract_norm="layer"),
           "Wav2Vec2Model", "wav2vec2:FlaxWav2Vec2Module",
           # return_dict: the Flax module returns a plain tuple by default, torch a ModelOutput
           lambda: Inputs(np.random.default_rng(0).standard_normal((2, 200)), flax_only=dict(return_dict=True)),
           "encoder.layers.1.feed_forward.intermediate_dense"),
    # Whisper's Flax module takes torch's [N, mel, frames] and transposes itself: declared as is.
    HFPair("whisper", lambda: _tf().WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
                                                  encoder_attention_heads=2, decoder_attention_heads=2, d_model=16,
                                                  encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
                                                  max_target_positions=16, pad_token_id=1, bos_token_id=2,
                                                  eos_token_id=3, decoder_start_token_id=2),
           "WhisperModel", "whisper:FlaxWhisperModule",
           lambda: Inputs(np.random.default_rng(0).standard_normal((2, 8, 16)), decoder_input_ids=ids(t=5, seed=1),
                          decoder_attention_mask=torch.ones(2, 5, dtype=torch.long), decoder_position_ids=pos(5)),
           "decoder.layers.1.fc1", input_layout={"input[0]": "as_is"}, port_layout="as_is"),
]}


def assert_round_trip(pair, tm, back: dict) -> None:
    """``back`` (flax_to_torch of the port of ``tm``) equals tm's state_dict bit for bit, and a
    fresh model of ``pair`` with zeroed parameters loads it strictly into the same state."""
    sd = tm.state_dict()
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    fresh, _, _ = pair.build("float32")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(back, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    assert type(tm).__name__ == pair.torch_cls and type(tm).__module__.startswith("transformers.")
