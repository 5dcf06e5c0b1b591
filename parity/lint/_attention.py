"""Attention scaling: the constant the softmax logits are scaled by, on both sides.

Torch: nn.MultiheadAttention and F.scaled_dot_product_attention(scale=None) scale q.k by
1/sqrt(head_dim); sdpa(scale=c) by c, times any constant applied to q or k before the call
(Hugging Face's OPT and Whisper scale q and pass scale=1.0); a hand-written attention by the
numeric factors between its q @ k matmul and the softmax (read from one real forward,
parity.lint._torch).
Flax: in the jaxpr, every ``exp`` whose result is summed (a softmax) is walked back through the
usual softmax and mask ops (x - max, + mask, select, casts, reshapes) to the ``dot_general``
producing the logits, multiplying the constant factors met on the way and on each operand of
that product (q / sqrt(d) before the product, as flax's dot_product_attention does). A product
with a parameter operand (a Dense before a softmax head) is not attention and is skipped. The
contraction size of that product is Flax's head_dim, the one a default torch scale refers to.
"""
from __future__ import annotations

import math

import torch

from parity.lint._common import Finding, flax_path_of, guess_flax_path, pair_by_scope, tpath
from parity.lint._torch import TorchCall, inv_sqrt
from parity.lint._trace import Eqn, FlaxTrace
from weight_port import flax_path_str

_VIEW = ("convert_element_type", "reshape", "transpose", "broadcast_in_dim", "copy", "squeeze",
         "expand_dims", "reduce_precision")


def _scale_of(trace: FlaxTrace, v, depth: int = 0) -> tuple[Eqn, float] | None:
    """(the dot_general producing the logits v came from, product of constants on the way)."""
    e = trace.source(v)
    if e is None or depth > 64:
        return None
    if e.prim == "dot_general":
        return e, 1.0
    if e.prim in _VIEW:
        return _scale_of(trace, e.invars[0], depth + 1)
    if e.prim == "sub":  # x - max(x): the max is a shift, not a scale
        return _scale_of(trace, e.invars[0], depth + 1)
    if e.prim in ("mul", "div"):
        a, b = e.invars
        cb = trace.constant(b)
        if cb is not None and cb.size == 1:
            inner = _scale_of(trace, a, depth + 1)
            f = float(cb.reshape(()))
            return None if inner is None else (inner[0], inner[1] * f if e.prim == "mul" else inner[1] / f)
        ca = trace.constant(a)
        if e.prim == "mul" and ca is not None and ca.size == 1:
            inner = _scale_of(trace, b, depth + 1)
            return None if inner is None else (inner[0], inner[1] * float(ca.reshape(())))
        return None
    if e.prim in ("add", "select_n", "max", "min"):  # a mask added or selected: follow the data
        for a in e.invars[1:] if e.prim == "select_n" else e.invars:
            if trace.constant(a) is None:
                found = _scale_of(trace, a, depth + 1)
                if found is not None:
                    return found
    return None


def _operand(trace: FlaxTrace, v, depth: int = 0) -> tuple[float, bool]:
    """(constant factor applied to a product operand, whether it is computed: False for a
    variable of the twin -- a parameter or an input -- reached through views alone)."""
    e = trace.source(v)
    if e is None:
        return 1.0, trace.constant(v) is not None
    if depth < 64 and e.prim in _VIEW:
        return _operand(trace, e.invars[0], depth + 1)
    if depth < 64 and e.prim in ("mul", "div"):
        a, b = e.invars
        cb = trace.constant(b)
        if cb is not None and cb.size == 1:
            f, computed = _operand(trace, a, depth + 1)
            c = float(cb.reshape(()))
            return (f * c if e.prim == "mul" else f / c), computed
        ca = trace.constant(a)
        if e.prim == "mul" and ca is not None and ca.size == 1:
            f, computed = _operand(trace, b, depth + 1)
            return f * float(ca.reshape(())), computed
    return 1.0, True


def flax_attention(trace: FlaxTrace) -> dict[tuple[str, ...], list[tuple[Eqn, float, int]]]:
    """{scope of the q.k product: [(product, logit scale, contraction size)]} in trace order."""
    out: dict[tuple[str, ...], list[tuple[Eqn, float, int]]] = {}
    seen = set()
    for e in trace.eqns:
        if e.prim != "exp" or not any(r.prim == "reduce_sum" for r in trace.readers(e.outvars[0])):
            continue
        found = _scale_of(trace, e.invars[0])
        if found is None or id(found[0]) in seen:
            continue
        dot, scale = found
        (f_q, q_computed), (f_k, k_computed) = (_operand(trace, x) for x in dot.invars[:2])
        if not (q_computed and k_computed):
            continue  # x @ kernel: a Dense before a softmax, not q.k
        seen.add(id(dot))
        (contract, _), _ = dot.params["dimension_numbers"]
        d = math.prod(dot.in_shapes[0][i] for i in contract)
        out.setdefault(dot.scope, []).append((dot, scale * f_q * f_k, d))
    return out


def _torch_attention(torch_module, plan, calls: list[TorchCall], nnx: bool) -> list[tuple]:
    """[(torch where, scale or None for 1/sqrt(head_dim), factor on q and k before it, where the
    scale comes from, Flax path)]."""
    out = [(tpath(p), m.head_dim ** -0.5, 1.0, f"nn.MultiheadAttention head_dim {m.head_dim}",
            flax_path_of(p, plan, nnx))
           for p, m in torch_module.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    for c in calls:
        if c.op == "sdpa":
            scale, factor = c.kwargs.get("scale"), c.kwargs.get("factor", 1.0)
            origin = "scaled_dot_product_attention's default" if scale is None else "its scale="
            if not math.isclose(factor, 1.0):
                origin += f", q and k scaled by {inv_sqrt(factor)} before it"
            out.append((f"{tpath(c.path)} (inline scaled_dot_product_attention)",
                        None if scale is None else float(scale), factor, origin, guess_flax_path(c.path, nnx)))
        elif c.op == "attention":
            out.append((f"{tpath(c.path)} (inline softmax attention)", c.kwargs["scale"], 1.0,
                        "constants before its softmax", guess_flax_path(c.path, nnx)))
    return out


def attention_findings(torch_module, plan, trace: FlaxTrace, calls: list[TorchCall], nnx: bool) -> list[Finding]:
    out = []
    for (where, t_scale, factor, origin, _), (dot, f_scale, d) in pair_by_scope(
            _torch_attention(torch_module, plan, calls, nnx), flax_attention(trace)):
        want = (d ** -0.5 if t_scale is None else t_scale) * factor
        if math.isclose(want, f_scale, rel_tol=1e-5):
            continue
        t_text = f"{inv_sqrt(want)} ({origin}{'' if t_scale is not None else f', head_dim {d} on the Flax side'})"
        out.append(Finding("attention-scale", where, flax_path_str(dot.scope) + " (q.k product)",
                           f"torch scales the attention logits by {t_text}, Flax by {inv_sqrt(f_scale)} "
                           f"(q.k contracts {d} features): the softmax sees logits {f_scale / want:.3g}x torch's"))
    return out


__all__ = ["attention_findings", "flax_attention"]
