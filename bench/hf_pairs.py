"""Real-model workloads for ``parity bench --torch/--flax``: Hugging Face transformers models and
their Flax modules, built from config objects (never the hub; no network), random weights.

Zero-argument factories, named ``<model>_<size>_<torch|flax|input>``: model bert (BertModel /
FlaxBertModule, token ids + an attention mask with padding), gpt2 (GPT2LMHeadModel /
FlaxGPT2LMHeadModule, LM head tied to the token embedding) and vit (ViTModel / FlaxViTModule,
[N, 3, H, W] pixels); size ``tiny`` (seconds, for tests and CI) or ``base`` (BERT-base, GPT-2 small
and ViT-B/16 dimensions, batch 2, 128 tokens / 224x224 pixels); ``<model>_base_gpu_input`` is
the base input at batch 32 (GPU_BATCH), for an accelerator::

    parity bench --torch bench.hf_pairs:bert_base_torch --flax bench.hf_pairs:bert_base_flax \\
                 --example-input bench.hf_pairs:bert_base_input

The torch models use transformers' default attention implementation (what users run: SDPA).
Dropout is configured as in the released models; the benchmark holds it off on both sides.
"""
from __future__ import annotations

import numpy as np
import torch

SEED = 0
BATCH = 2
GPU_BATCH = 32


# --- configs --------------------------------------------------------------------------------------
def _bert_config(size: str):
    from transformers import BertConfig

    if size == "base":
        return BertConfig()  # bert-base-uncased: 12 layers, 768 hidden, 12 heads, 3072 MLP, 30522 tokens
    return BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)


def _gpt2_config(size: str):
    from transformers import GPT2Config

    # use_cache=False: the benchmark times one full-sequence step, not generation; a KV cache
    # output would only add tensors to copy.
    if size == "base":
        return GPT2Config(use_cache=False)  # gpt2 (small): 12 layers, 768 hidden, 12 heads, 50257 tokens
    return GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32, use_cache=False)


def _vit_config(size: str):
    from transformers import ViTConfig

    if size == "base":
        return ViTConfig()  # ViT-B/16 at 224x224: 12 layers, 768 hidden, 12 heads, 3072 MLP
    return ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32)


SEQ = {"tiny": 8, "base": 128}


# --- models ---------------------------------------------------------------------------------------
def _torch(cls, config):
    torch.manual_seed(SEED)
    return cls(config).eval()


def _gpt2_torch_cls():
    from transformers import GPT2LMHeadModel

    class GPT2LMHeadModelPositional(GPT2LMHeadModel):
        """GPT2LMHeadModel with the Flax module's positional signature (input_ids, attention_mask,
        position_ids): torch's second positional argument is past_key_values, and the benchmark
        calls both sides as model(*inputs). A subclass, so every module name (and the port) is
        GPT2LMHeadModel's own."""

        def forward(self, input_ids, attention_mask, position_ids):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False)

    return GPT2LMHeadModelPositional


def _tokens(vocab: int, seq: int, positions: bool, batch: int = BATCH):
    """(ids [N, T] int64, mask [N, T] int64 with the last row padded from 3T/4 on[, position ids])."""
    rng = np.random.default_rng(SEED)
    ids = torch.as_tensor(rng.integers(0, vocab, (batch, seq)), dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, 3 * seq // 4:] = 0  # padding: a twin that ignored the mask would fail the gate
    if not positions:
        return ids, mask
    return ids, mask, torch.arange(seq).expand(batch, seq).contiguous()


def _pixels(size: str, batch: int = BATCH) -> np.ndarray:
    """[N, 3, H, W] float64 standard-normal pixels (torch layout)."""
    c = _vit_config(size)
    return np.random.default_rng(SEED).standard_normal((batch, c.num_channels, c.image_size, c.image_size))


def bert_tiny_torch():
    from transformers import BertModel

    return _torch(BertModel, _bert_config("tiny"))


def bert_tiny_flax():
    from transformers.models.bert.modeling_flax_bert import FlaxBertModule

    return FlaxBertModule(_bert_config("tiny"))


def bert_tiny_input():
    return _tokens(_bert_config("tiny").vocab_size, SEQ["tiny"], positions=False)


def bert_base_torch():
    from transformers import BertModel

    return _torch(BertModel, _bert_config("base"))


def bert_base_flax():
    from transformers.models.bert.modeling_flax_bert import FlaxBertModule

    return FlaxBertModule(_bert_config("base"))


def bert_base_input():
    return _tokens(_bert_config("base").vocab_size, SEQ["base"], positions=False)


def bert_base_gpu_input():
    return _tokens(_bert_config("base").vocab_size, SEQ["base"], positions=False, batch=GPU_BATCH)


def gpt2_tiny_torch():
    return _torch(_gpt2_torch_cls(), _gpt2_config("tiny"))


def gpt2_tiny_flax():
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule

    return FlaxGPT2LMHeadModule(_gpt2_config("tiny"))


def gpt2_tiny_input():
    return _tokens(_gpt2_config("tiny").vocab_size, SEQ["tiny"], positions=True)


def gpt2_base_torch():
    return _torch(_gpt2_torch_cls(), _gpt2_config("base"))


def gpt2_base_flax():
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule

    return FlaxGPT2LMHeadModule(_gpt2_config("base"))


def gpt2_base_input():
    return _tokens(_gpt2_config("base").vocab_size, SEQ["base"], positions=True)


def gpt2_base_gpu_input():
    return _tokens(_gpt2_config("base").vocab_size, SEQ["base"], positions=True, batch=GPU_BATCH)


def vit_tiny_torch():
    from transformers import ViTModel

    return _torch(ViTModel, _vit_config("tiny"))


def vit_tiny_flax():
    from transformers.models.vit.modeling_flax_vit import FlaxViTModule

    return FlaxViTModule(_vit_config("tiny"))


def vit_tiny_input():
    return _pixels("tiny")


def vit_base_torch():
    from transformers import ViTModel

    return _torch(ViTModel, _vit_config("base"))


def vit_base_flax():
    from transformers.models.vit.modeling_flax_vit import FlaxViTModule

    return FlaxViTModule(_vit_config("base"))


def vit_base_input():
    return _pixels("base")


def vit_base_gpu_input():
    return _pixels("base", GPU_BATCH)
