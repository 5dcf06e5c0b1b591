"""Torch-free factories of the Flax twins of tests_external/test_golden_hf.py and
test_golden_diffusers.py: what ``parity verify --flax golden_hf_twins:gpt2`` imports in a process where torch cannot be imported. The
configs are the ones the torch side is built from (the test asserts they are equal)."""
from __future__ import annotations


def gpt2_config():
    import transformers

    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)


def bert_config():
    import transformers

    return transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=48, max_position_embeddings=32)


def gpt2():
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule

    return FlaxGPT2LMHeadModule(gpt2_config())


def bert():
    from transformers.models.bert.modeling_flax_bert import FlaxBertModule

    return FlaxBertModule(bert_config())


# tests_external/diffusers_pairs.py's unet2d_condition (the test asserts they are equal)
UNET_CONFIG = dict(in_channels=4, block_out_channels=(64,), layers_per_block=1, cross_attention_dim=16,
                   attention_head_dim=8, sample_size=8, out_channels=4, down_block_types=("DownBlock2D",),
                   up_block_types=("UpBlock2D",))


def unet():
    from diffusers import FlaxUNet2DConditionModel  # imports no torch (diffusers' Flax models are torch-free)

    return FlaxUNet2DConditionModel(**UNET_CONFIG)
