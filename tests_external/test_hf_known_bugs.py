"""Where transformers' Flax twin really computes something else than its torch model: the checker
FAILs and names the place (a success of the tool), and where the Flax twin cannot run at all."""
from __future__ import annotations

import numpy as np
import pytest

import parity
from hf_pairs import PAIRS

pytest.importorskip("transformers")


def test_mistral_without_sliding_window_attends_to_the_diagonal_only():
    """FlaxMistralAttention builds ``jnp.triu(causal, k=-(sliding_window or 0))``: with
    sliding_window=None that keeps the diagonal alone (each token attends to itself), where torch
    attends causally. The bug is inline attention code; the layer cannot run alone (torch hands
    it 6 tensors, Flax 3), and the check still names it."""
    tm, fm, inputs = PAIRS["mistral"].build("float32", sliding_window=None)
    r = parity.check(tm, fm, inputs, dtype="float32", lint=False)  # a forward bug, located by rows (the gradients place it inside the block)
    assert r.verdict == "FAIL"
    assert (r.first_divergence, r.divergence_kind) == ("layers.0.self_attn", "forward"), r
    assert r.layer("layers.0.self_attn").isolated is None  # located by the accumulated rows


def test_dinov2_layer_scale_other_than_one_is_squared_in_flax():
    """FlaxDinov2LayerScale multiplies its ``lambda1`` parameter by config.layerscale_value twice
    in setup (torch stores the scaled value and uses it as is); invisible at the default 1.0."""
    tm, fm, x = PAIRS["dinov2"].build("float64", layerscale_value=0.5)
    r = parity.check(tm, fm, x, dtype="float64", grads=False, lint=False)  # a forward bug, located by rows
    assert r.verdict == "FAIL"
    assert (r.first_divergence, r.divergence_kind) == ("encoder.layer.0.layer_scale1", "forward"), r
    row = r.layer("encoder.layer.0.layer_scale1")
    assert row.torch_type == "Dinov2LayerScale" and row.isolated.rel_norm > 0.5, r


def test_flax_t5_does_not_run_on_this_jax():
    """FlaxT5's relative position buckets call ``jnp.clip(x, a_max=...)``, a keyword removed from
    jax.numpy.clip (JAX 0.10 here): the Flax twin cannot run, so there is nothing to check."""
    import jax
    import transformers
    from transformers.models.t5.modeling_flax_t5 import FlaxT5Module

    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=0)
    ids = np.ones((1, 4), dtype=np.int32)
    with pytest.raises(TypeError, match="a_max"):
        jax.eval_shape(lambda: FlaxT5Module(cfg).init(jax.random.key(0), ids, ids, ids, ids))
