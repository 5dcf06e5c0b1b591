"""The torch.nn.MultiheadAttention rule, against Flax's multi-head attention (linen and nnx).

torch keeps q, k and v projections fused in one ``in_proj_weight`` [3D, D] (rows q, then k, then
v; each block [out, in]) and ``in_proj_bias`` [3D], and the output projection as a child Linear
``out_proj`` ([D, D], [D]). Flax ``nn.MultiHeadDotProductAttention`` and ``nnx.MultiHeadAttention``
have four DenseGeneral/LinearGeneral submodules: ``query``, ``key``, ``value`` with kernel
[D, heads, head_dim] and bias [heads, head_dim], and ``out`` with kernel [heads, head_dim, D] and
bias [D]. torch splits a projected [.., D] into heads head-major (feature h * head_dim + e), which
is exactly a row-major reshape to [heads, head_dim]; so every conversion is a transpose plus a
reshape, and the rule is a pure permutation like the others (it maps gradients too).

Both scale the logits by 1/sqrt(head_dim) (torch's default ``scale``; Flax's
``dot_product_attention`` divides the query by sqrt(depth), depth = head_dim): same math.

batch_first: the weights do not depend on it. torch with batch_first=False takes and returns
[T, N, D]; Flax attention is always batch-first ([N, T, D]: attention over axis -2). A user porting
a batch_first=False model feeds the twin ``x.swapaxes(0, 1)`` and swaps its output back (or writes
the twin's caller to do so); the port itself needs nothing.

Refused by name (UnsupportedAttentionError): ``add_bias_kv=True`` (learned key/value rows appended
to the sequence; Flax has no such parameters) and ``kdim``/``vdim`` != ``embed_dim`` (separate
q/k/v_proj_weight tensors). ``add_zero_attn`` has no parameters, but changes the math: refused too.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from torch import nn

from weight_port.errors import PortError
from weight_port.rules import LayerInfo, Rule, TensorMap, register_rule

_QKV = ("query", "key", "value")


class UnsupportedAttentionError(PortError):
    """A torch MultiheadAttention configuration that Flax's multi-head attention cannot express."""


def _unsupported(layer: LayerInfo) -> list[str]:
    m = layer.torch_module
    if m is None:
        return []
    where = layer.torch_path or "<root>"
    out = []
    if getattr(m, "bias_k", None) is not None:
        out.append(f"{where}: add_bias_kv=True (bias_k/bias_v have no Flax counterpart)")
    if getattr(m, "add_zero_attn", False):
        out.append(f"{where}: add_zero_attn=True (Flax attention has no zero key/value row)")
    if not getattr(m, "_qkv_same_embed_dim", True):
        out.append(f"{where}: kdim={m.kdim}/vdim={m.vdim} differ from embed_dim={m.embed_dim} "
                   "(separate q/k/v_proj_weight)")
    return out


def _require_supported(layer: LayerInfo) -> None:
    problems = _unsupported(layer)
    if problems:
        raise UnsupportedAttentionError("cannot port nn.MultiheadAttention: " + "; ".join(problems))


def _num_heads(layer: LayerInfo) -> int:
    """From the torch layer, else the Flax module (ports without a torch module)."""
    for obj in (layer.torch_module, layer.flax_module):
        value = getattr(obj, "num_heads", None)
        if isinstance(value, int):
            return value
    raise UnsupportedAttentionError(f"{layer.torch_path or '<root>'}: number of heads unknown "
                                    "(pass the torch module)")


# --- q/k/v: block i of in_proj_weight [3D, D] is torch [out, in]; Flax kernel [D, heads, hd]. ----
def qkv_weight_to_flax(w: np.ndarray, layer: LayerInfo, *, index: int) -> np.ndarray:
    _require_supported(layer)
    d = w.shape[0] // 3
    block = w[index * d:(index + 1) * d]  # [out, in]
    return block.T.reshape(block.shape[1], _num_heads(layer), -1)


def qkv_weight_to_torch(k: np.ndarray, layer: LayerInfo) -> np.ndarray:
    """One block [out, in]; the plan concatenates q, k, v (rule order) into in_proj_weight."""
    _require_supported(layer)
    return k.reshape(k.shape[0], -1).T


def qkv_bias_to_flax(b: np.ndarray, layer: LayerInfo, *, index: int) -> np.ndarray:
    _require_supported(layer)
    d = b.shape[0] // 3
    return b[index * d:(index + 1) * d].reshape(_num_heads(layer), -1)


def qkv_bias_to_torch(b: np.ndarray, layer: LayerInfo) -> np.ndarray:
    _require_supported(layer)
    return b.reshape(-1)


# --- out_proj: torch [D, heads * hd] ([out, in]); Flax kernel [heads, hd, D]. ----------------------
def out_weight_to_flax(w: np.ndarray, layer: LayerInfo) -> np.ndarray:
    _require_supported(layer)
    return w.T.reshape(_num_heads(layer), -1, w.shape[0])


def out_weight_to_torch(k: np.ndarray, layer: LayerInfo) -> np.ndarray:
    _require_supported(layer)
    return k.reshape(-1, k.shape[-1]).T


def _check(layer: LayerInfo) -> list[str]:
    # Refusals are errors in every check mode: no flag makes such a port correct.
    _require_supported(layer)
    out = []
    t_h, f_h = getattr(layer.torch_module, "num_heads", None), getattr(layer.flax_module, "num_heads", None)
    if isinstance(t_h, int) and isinstance(f_h, int) and t_h != f_h:
        out.append(f"{layer.torch_path or '<root>'}: torch num_heads={t_h} but flax "
                   f"{'/'.join(layer.flax_path) or '<root>'} num_heads={f_h}")
    if getattr(layer.flax_module, "normalize_qk", False):
        out.append(f"{layer.torch_path or '<root>'}: flax normalize_qk=True; torch has no QK norm")
    return out


def _pair(torch_name: str, flax_name: str, to_flax, to_torch, index: int) -> TensorMap:
    return TensorMap(torch_name, "params", flax_name, partial(to_flax, index=index), to_torch)


MULTIHEAD_ATTENTION = Rule(
    (
        *(_pair("in_proj_weight", f"{n}/kernel", qkv_weight_to_flax, qkv_weight_to_torch, i)
          for i, n in enumerate(_QKV)),
        *(_pair("in_proj_bias", f"{n}/bias", qkv_bias_to_flax, qkv_bias_to_torch, i)
          for i, n in enumerate(_QKV)),
        TensorMap("out_proj.weight", "params", "out/kernel", out_weight_to_flax, out_weight_to_torch),
        TensorMap("out_proj.bias", "params", "out/bias"),
    ),
    children=("out_proj",),
    check=_check,
    name="multihead_attention",
)

register_rule(nn.MultiheadAttention, MULTIHEAD_ATTENTION)

__all__ = ["MULTIHEAD_ATTENTION", "UnsupportedAttentionError"]
