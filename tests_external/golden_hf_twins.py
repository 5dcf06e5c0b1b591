"""Torch-free factories of the Flax twins of tests_external/test_golden_hf.py: what ``parity
verify --flax golden_hf_twins:gpt2`` imports in a process where torch cannot be imported. The
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
