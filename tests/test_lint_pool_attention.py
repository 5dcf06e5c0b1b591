"""parity.lint: average pooling count_include_pad and attention logits scaled by a different
constant, each named with both locations (and shown to change the numbers)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import parity
from parity.lint import lint_pair

_QUIET = dict(layers=False, grads=False, lint=False)


# --- average pooling: count_include_pad --------------------------------------------------------------
class _TorchPooled(torch.nn.Module):
    def __init__(self, count_include_pad: bool = True):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)

    def forward(self, x):
        return self.pool(x)


class _FlaxPooled(nn.Module):
    count_include_pad: bool = True

    @nn.compact
    def __call__(self, x):  # [N, H, W, C]
        return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                           count_include_pad=self.count_include_pad)


class _NNXPooled(nnx.Module):
    def __call__(self, x):  # flax's default: count_include_pad=True
        return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _pool_findings(torch_model, twin):
    torch.manual_seed(0)
    found = lint_pair(torch_model.eval(), twin, torch.randn(2, 3, 6, 6), input_layouts="NC...")
    return [f for f in found if f.kind == "pool-count-include-pad"]


@pytest.mark.parametrize("torch_counts", [True, False])
def test_count_include_pad_mismatch_is_named(torch_counts):
    found = _pool_findings(_TorchPooled(torch_counts), _FlaxPooled(not torch_counts))
    assert [(f.torch_where, f.flax_where) for f in found] == [("pool", "<root> (inline avg_pool)")]
    assert f"count_include_pad={torch_counts}" in found[0].message
    assert f"count_include_pad={not torch_counts}" in found[0].message
    assert _pool_findings(_TorchPooled(torch_counts), _FlaxPooled(torch_counts)) == []
    x = torch.randn(2, 3, 6, 6)  # the border outputs differ: the numbers say so too
    assert parity.check(_TorchPooled(torch_counts), _FlaxPooled(not torch_counts), x, input_layout="NC...",
                        **_QUIET).verdict == "FAIL"


def test_count_include_pad_read_on_nnx_twins():
    assert _pool_findings(_TorchPooled(True), _NNXPooled()) == []
    found = _pool_findings(_TorchPooled(False), _NNXPooled())
    assert [(f.torch_where, f.flax_where) for f in found] == [("pool", "<root> (inline avg_pool)")]


# --- attention scaling ------------------------------------------------------------------------------
_DIM, _HEADS = 16, 2  # head_dim 8: 1/sqrt(8) is torch's default, 1/sqrt(16) the usual slip


class _TorchAttn(torch.nn.Module):
    """Self-attention on [N, T, D]: sdpa (default scale 1/sqrt(head_dim)) or written out."""

    def __init__(self, written: bool, prescaled: bool = False):
        super().__init__()
        self.qkv = torch.nn.Linear(_DIM, 3 * _DIM)
        self.written, self.prescaled = written, prescaled

    def forward(self, x):
        n, t = x.size(0), x.size(1)
        qkv = self.qkv(x).reshape(n, t, 3, _HEADS, _DIM // _HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.written:
            o = ((q @ k.transpose(-2, -1)) * (_DIM // _HEADS) ** -0.5).softmax(-1) @ v
        elif self.prescaled:  # as Hugging Face's OPT and Whisper: q scaled first, sdpa's scale=1.0
            o = F.scaled_dot_product_attention(q * (_DIM // _HEADS) ** -0.5, k, v, scale=1.0)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(n, t, _DIM)


class _TorchModel(torch.nn.Module):
    def __init__(self, written: bool = False, prescaled: bool = False):
        super().__init__()
        self.attn = _TorchAttn(written, prescaled)

    def forward(self, x):
        return self.attn(x)


class _FlaxAttn(nn.Module):
    scale: float | None  # None: no scaling at all

    @nn.compact
    def __call__(self, x):  # [N, T, D]
        n, t, _ = x.shape
        q, k, v = (a.reshape(n, t, _HEADS, _DIM // _HEADS) for a in jnp.split(nn.Dense(3 * _DIM, name="qkv")(x), 3, -1))
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k)
        if self.scale is not None:
            logits = logits * self.scale
        return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, -1), v).reshape(n, t, _DIM)


class _FlaxModel(nn.Module):
    scale: float | None

    @nn.compact
    def __call__(self, x):
        return _FlaxAttn(self.scale, name="attn")(x)


def _attn_findings(torch_model, twin):
    torch.manual_seed(0)
    found = lint_pair(torch_model.eval(), twin, torch.randn(2, 5, _DIM), input_layouts="as_is")
    return [f for f in found if f.kind == "attention-scale"]


@pytest.mark.parametrize("written", [False, True], ids=["sdpa", "written-out"])
def test_attention_scaled_by_embed_dim_is_named(written):
    found = _attn_findings(_TorchModel(written), _FlaxModel(_DIM ** -0.5))
    kind = "softmax attention" if written else "scaled_dot_product_attention"
    assert [(f.torch_where, f.flax_where) for f in found] == [(f"attn (inline {kind})", "attn (q.k product)")]
    assert "by 1/sqrt(8)" in found[0].message and "Flax by 1/sqrt(16)" in found[0].message
    assert _attn_findings(_TorchModel(written), _FlaxModel((_DIM // _HEADS) ** -0.5)) == []


def test_sdpa_on_a_prescaled_query_counts_the_factor():
    # sdpa(scale=1.0) on q * 1/sqrt(8) scales the logits by 1/sqrt(8): no finding against a Flax
    # 1/sqrt(8) (once named "torch scales by 1"), named against 1/sqrt(16).
    assert _attn_findings(_TorchModel(prescaled=True), _FlaxModel((_DIM // _HEADS) ** -0.5)) == []
    found = _attn_findings(_TorchModel(prescaled=True), _FlaxModel(_DIM ** -0.5))
    assert len(found) == 1 and "by 1/sqrt(8) (its scale=, q and k scaled by 1/sqrt(8) before it)" in found[0].message


def test_unscaled_attention_is_named_and_fails():
    found = _attn_findings(_TorchModel(), _FlaxModel(None))
    assert len(found) == 1 and "Flax by 1 " in found[0].message
    x = torch.randn(2, 5, _DIM)
    assert parity.check(_TorchModel(), _FlaxModel(None), x, input_layout="as_is", **_QUIET).verdict == "FAIL"
    assert parity.check(_TorchModel(), _FlaxModel((_DIM // _HEADS) ** -0.5), x, input_layout="as_is",
                        **_QUIET).verdict == "PASS"


def test_flax_multihead_attention_module_is_read():
    # flax's own attention divides q by sqrt(head_dim) before the product: read through the
    # einsum, the division and the softmax (the registry's vit pair checks torch
    # nn.MultiheadAttention against NNX's with no finding).
    from parity.lint._attention import flax_attention
    from parity.lint._torch import inv_sqrt
    from parity.lint._trace import flax_trace
    from parity.runtime import FlaxTwin

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(_HEADS, name="attn")(x)

    x = jnp.zeros((2, 5, _DIM))
    trace = flax_trace(FlaxTwin(Twin()), Twin().init(jax.random.key(0), x), (x,))
    found = [(scope, inv_sqrt(s), d) for scope, items in flax_attention(trace).items() for _, s, d in items]
    assert found == [(("attn",), "1/sqrt(8)", 8)]
