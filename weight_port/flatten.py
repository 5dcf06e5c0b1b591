"""Find Linear layers fed by a flattened channels-first tensor, by tracing the torch model.

torch flattens [N, C, *S] in C-major order; a channels-last Flax twin flattens [N, *S, C] in
C-minor order. The Linear after such a flatten needs its input features permuted, and the only
reliable way to know which Linear that is, is to follow the data: torch.fx traces the module and
ShapeProp runs the example input through it to get every intermediate shape.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

# Ops that reshape [N, ...] to [N, F] (when the output is 2-D with the same batch size).
_FLATTEN_FUNCS = {torch.flatten, torch.reshape}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
# Ops that keep the flattened feature order (walked through between the flatten and the Linear).
_ELEMENTWISE_MODULES = (nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_ELEMENTWISE_FUNCS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.dropout,
                      torch.nn.functional.gelu, torch.tanh, torch.sigmoid}


class FlattenTraceWarning(UserWarning):
    """The torch model could not be traced; flatten order was not detected."""


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_elementwise(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ELEMENTWISE_MODULES)
    return node.op == "call_function" and node.target in _ELEMENTWISE_FUNCS


def _is_flatten(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCS
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


def _flatten_feeding(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The flatten op behind ``node`` (walking back through order-keeping elementwise ops)."""
    while _is_elementwise(node, gm) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if not _is_flatten(node, gm) or not isinstance(node.args[0], fx.Node):
        return None
    return node


def _flattened_source(node: fx.Node, gm: fx.GraphModule) -> tuple[int, ...] | None:
    """Per-sample [C, *S] shape if ``node`` is a channels-first tensor flattened to [N, F]."""
    node = _flatten_feeding(node, gm)
    if node is None:
        return None
    src, out = _shape(node.args[0]), _shape(node)
    if src is None or out is None or len(src) < 3 or len(out) != 2:
        return None
    if src[0] != out[0] or math.prod(src[1:]) != out[1]:
        return None
    return src[1:]


def _channels_without_shapes(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """Channel count of a flatten's input, read off the nearest layer that sets it."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 32:
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            for attr in ("out_channels", "num_features", "num_channels"):
                if isinstance(getattr(sub, attr, None), int):
                    return getattr(sub, attr)
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if len(args) != 1:
            return None
        node, seen = args[0], seen + 1
    return None


def _flattened_source_without_shapes(node: fx.Node, gm: fx.GraphModule, linear: nn.Linear):
    node = _flatten_feeding(node, gm)
    if node is None:
        return None
    channels = _channels_without_shapes(node.args[0], gm)
    if channels is None or linear.in_features % channels or linear.in_features == channels:
        return None
    # (C, H, W) -> (H, W, C) only needs C and H*W: spatial dims keep their relative order.
    return (channels, linear.in_features // channels)


def find_flattened_linears(
    module: nn.Module, example_inputs: tuple | None
) -> dict[str, tuple[int, ...]] | None:
    """Map torch path of each Linear fed by a flattened [N, C, *S] tensor to its [C, *S].

    With example inputs, ShapeProp gives exact shapes. Without (flax_to_torch from a bare torch
    module), C is read off the nearest Conv/BatchNorm/GroupNorm before the flatten and S becomes
    [in_features // C]. Returns None (after one FlattenTraceWarning) when the model cannot be
    traced; the caller then ports without flatten handling unless ``flatten=`` is passed.
    """
    try:
        gm = fx.symbolic_trace(module)
        if example_inputs is not None:
            was_training = gm.training
            gm.eval()  # shape propagation must not update BatchNorm running stats
            with torch.no_grad():
                ShapeProp(gm).propagate(*example_inputs)
            gm.train(was_training)
    except Exception as fx_exc:  # fx cannot trace Python control flow on tensors; try export
        if example_inputs is not None:
            try:
                return _find_with_export(module, example_inputs)
            except Exception as export_exc:
                reason = f"torch.fx: {type(fx_exc).__name__}; torch.export: {type(export_exc).__name__}"
        else:
            reason = f"torch.fx: {type(fx_exc).__name__}: {fx_exc}"
        # One warning per port (not per layer): porting goes on, only flatten detection is off.
        warnings.warn(
            f"could not trace {type(module).__name__} ({reason}); porting without flatten-order "
            "detection. If a Linear follows a flatten of a channels-first tensor, pass the "
            "override flatten={'<linear path>': (C, H, W)}.",
            FlattenTraceWarning,
            stacklevel=3,
        )
        return None
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            arg = node.args[0]
            if isinstance(arg, fx.Node):
                if example_inputs is None:
                    src = _flattened_source_without_shapes(arg, gm, gm.get_submodule(node.target))
                else:
                    src = _flattened_source(arg, gm)
                if src is not None:
                    found[node.target] = src
    return found


# torch.export sees through Python control flow (it runs the model on the example input), at the
# price of an ATen-level graph: Linear is aten.linear with its weight as a lifted placeholder.
_ATEN_FLATTENS = ("view", "reshape", "_unsafe_view", "flatten")
_ATEN_ELEMENTWISE = ("relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "clone", "alias",
                     "contiguous", "identity")


def _aten_name(node: fx.Node) -> str:
    # an OpOverload's __name__ is "<op>.<overload>", e.g. "linear.default", "_unsafe_view.default"
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _find_with_export(module: nn.Module, example_inputs: tuple) -> dict[str, tuple[int, ...]]:
    was_training = module.training
    module.eval()  # running the example must not update BatchNorm running stats
    try:
        with torch.no_grad():
            ep = torch.export.export(module, tuple(example_inputs), strict=False)
    finally:
        module.train(was_training)
    param_of = dict(ep.graph_signature.inputs_to_parameters)
    found: dict[str, tuple[int, ...]] = {}
    for node in ep.graph_module.graph.nodes:
        if node.op != "call_function" or _aten_name(node) != "linear":
            continue
        weight = param_of.get(getattr(node.args[1], "name", None))
        src = node.args[0]
        while isinstance(src, fx.Node) and src.op == "call_function" and _aten_name(src) in _ATEN_ELEMENTWISE:
            src = src.args[0]
        if weight is None or not isinstance(src, fx.Node) or src.op != "call_function":
            continue
        if _aten_name(src) not in _ATEN_FLATTENS or not isinstance(src.args[0], fx.Node):
            continue
        before, after = src.args[0].meta.get("val"), src.meta.get("val")
        if before is None or after is None or before.ndim < 3 or after.ndim != 2:
            continue
        if before.shape[0] == after.shape[0] and math.prod(before.shape[1:]) == after.shape[1]:
            found[weight.rpartition(".")[0]] = tuple(int(d) for d in before.shape[1:])
    return found
