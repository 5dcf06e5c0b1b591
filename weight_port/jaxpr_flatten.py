"""Find Dense layers fed by a flattened channels-last value, by reading the Flax twin's jaxpr.

torch flattens [N, C, *S] C-major; a channels-last Flax twin flattens [N, *S, C] C-minor, so the
Dense after such a flatten needs its input features permuted. The jaxpr the port already gets from
the abstract init (or an NNX twin's abstract call) shows every such flatten: a ``reshape`` of an
[N, *S, C] value to [N, F] whose result reaches a ``dot_general`` with a Dense kernel. Whether the
value was channels-last *because of the twin's layout* (and so channels-first on the torch side)
is read off what produced it: a convolution, a pooling window or a channels-first model input
means yes (permute); a ``dot_general`` (features-last tokens) or a transpose that moves channels
to axis 1 (the twin flattens channels-first itself) means no; anything else is undecided, and the
caller refuses rather than guess (see errors.FlattenOrderError).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from jax.extend import core as jcore

# Primitives that keep a value's layout (elementwise, casts, reductions over broadcast operands).
_LAYOUT_KEEPING = {
    "add", "sub", "mul", "div", "max", "min", "neg", "abs", "exp", "log", "log1p", "tanh",
    "logistic", "erf", "sqrt", "rsqrt", "pow", "integer_pow", "select_n", "convert_element_type",
    "square", "sign", "clamp", "copy", "copy_p", "stop_gradient", "custom_jvp_call",
    "custom_vjp_call", "pjit", "jit", "remat", "checkpoint", "erf_inv", "expm1", "ge", "gt",
}
_IMAGE_PRODUCERS = {"conv_general_dilated", "reduce_window_max", "reduce_window_sum",
                    "reduce_window_min", "reduce_window", "cumsum"}


@dataclass(frozen=True)
class Flatten:
    """One Dense fed by a flatten. permute: torch's per-sample [C, *S] when its features must be
    permuted, None when the order already agrees; reason: why (printed in the plan)."""

    permute: tuple[int, ...] | None
    reason: str
    decided: bool = True


def _producers(jaxpr) -> dict:
    return {v: e for e in jaxpr.eqns for v in e.outvars}


def _same_shape_operand(eqn, shape):
    return [v for v in eqn.invars if isinstance(v, jcore.Var) and tuple(v.aval.shape) == shape]


def _back_through_layout_keeping(var, producers):
    """Walk back through elementwise ops to the first op that changes shape or layout."""
    seen = 0
    while var in producers and seen < 64:
        eqn = producers[var]
        if eqn.primitive.name not in _LAYOUT_KEEPING:
            return var
        same = _same_shape_operand(eqn, tuple(var.aval.shape))
        if not same:
            return var
        var, seen = same[0], seen + 1
    return var


def _classify(var, producers, channels_last_inputs) -> tuple[str, str]:
    """('permute' | 'keep' | 'unknown', what produced the flattened value)."""
    var = _back_through_layout_keeping(var, producers)
    if var in channels_last_inputs:
        return "permute", "a channels-first model input"
    eqn = producers.get(var)
    if eqn is None:
        return "unknown", "a value the trace does not show"
    name = eqn.primitive.name
    if name in _IMAGE_PRODUCERS:
        return "permute", f"a {name} output (channels-first on torch)"
    if name == "dot_general":
        return "keep", "a Dense output (features-last on both sides)"
    if name == "transpose":
        perm = tuple(eqn.params["permutation"])
        n = len(perm)
        if perm == (0, n - 1, *range(1, n - 1)):
            return "keep", "a transpose to channels-first in the twin"
    return "unknown", f"a {name} output"


def _kernel_leaf(var, producers, leaf_of_var):
    seen = 0
    while var not in leaf_of_var and var in producers and seen < 8:
        eqn = producers[var]
        if eqn.primitive.name not in ("convert_element_type", "copy", "copy_p"):
            return None
        var, seen = eqn.invars[0], seen + 1
    return leaf_of_var.get(var)


def find_flattened_denses(
    jaxpr, leaf_of_var: Mapping, channels_last_inputs: set
) -> dict[tuple[str, ...], Flatten]:
    """{Flax module path of a Dense kernel: Flatten} for every Dense whose input is a flatten.

    jaxpr: an open jaxpr (top level; nested calls are not searched). leaf_of_var: jaxpr var ->
    (collection, *module_path, leaf) of a variable. channels_last_inputs: the vars of model inputs
    that are channels-first on the torch side ([N, *S, C] here).
    """
    producers = _producers(jaxpr)
    found: dict[tuple[str, ...], Flatten] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "dot_general" or len(eqn.invars) != 2:
            continue
        lhs, rhs = eqn.invars
        leaf = _kernel_leaf(rhs, producers, leaf_of_var) if isinstance(rhs, jcore.Var) else None
        if leaf is None or leaf[-1] != "kernel" or not isinstance(lhs, jcore.Var):
            continue
        flat = _back_through_layout_keeping(lhs, producers)
        reshape = producers.get(flat)
        if reshape is None or reshape.primitive.name != "reshape":
            continue
        src = reshape.invars[0]
        before, after = tuple(src.aval.shape), tuple(flat.aval.shape)
        if len(before) < 3 or len(after) != 2 or before[0] != after[0] or math.prod(before[1:]) != after[1]:
            continue
        kind, why = _classify(src, producers, channels_last_inputs)
        path = tuple(leaf[1:-1])
        if kind == "permute":
            *spatial, c = before[1:]
            found[path] = Flatten((c, *spatial), f"flatten of {why}")
        elif kind == "keep":
            found[path] = Flatten(None, f"flatten of {why}: order already agrees")
        else:
            found[path] = Flatten(None, f"flatten of {why}", decided=False)
    return found


__all__ = ["Flatten", "find_flattened_denses"]
