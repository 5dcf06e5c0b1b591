"""The torch side of the trap lint: the ops a user module calls inline in its own ``forward``
(F.gelu, F.interpolate, F.scaled_dot_product_attention, a hand-written softmax attention),
read with torch.fx, one trace per module with every child kept as a leaf, so each op is
attributed to the module whose ``forward`` called it. Built-in layers are read by attributes
elsewhere (they have no user-written forward)."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TorchCall:
    """One inline call: path of the module whose forward made it, the op ("gelu", "interpolate",
    "sdpa", "attention"), and its arguments by name (attention: {"scale": float}, the product of
    the constants between the q.k matmul and the softmax)."""

    path: str
    op: str
    kwargs: dict = field(default_factory=dict)


_INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                     "antialias")
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _named(node, names: tuple[str, ...]) -> dict:
    return {**dict(zip(names, node.args)), **node.kwargs}


def _is(node, fns: tuple, methods: tuple = ()) -> bool:
    return ((node.op == "call_function" and node.target in fns)
            or (node.op == "call_method" and node.target in methods))


_SOFTMAX = (torch.softmax, F.softmax, torch.nn.functional.softmax)
_MATMUL = (operator.matmul, torch.matmul, torch.bmm)
_MUL = (operator.mul, torch.mul)
_DIV = (operator.truediv, torch.div, torch.true_divide)
_PASS_FN = (operator.add, torch.add, torch.where, torch.masked_fill)
_PASS_METHODS = ("masked_fill", "float", "to", "type_as", "contiguous", "view", "reshape", "transpose",
                 "permute")


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _scale_to_matmul(node, depth: int = 0) -> float | None:
    """The product of numeric factors between a softmax's input and the matmul feeding it
    (x * c, x / c; masks added or filled pass through), or None when no matmul is reached
    through such ops or a factor is not a Python number."""
    if depth > 32 or not isinstance(node, torch.fx.Node):
        return None
    if _is(node, _MATMUL, ("matmul", "bmm")):
        return _operand_scale(node.args[0]) * _operand_scale(node.args[1])
    if _is(node, _MUL, ("mul",)) or _is(node, _DIV, ("div",)):
        a, b = node.args[0], node.args[1]
        div = _is(node, _DIV, ("div",))
        if _number(b) is not None:
            inner = _scale_to_matmul(a, depth + 1)
            return None if inner is None else (inner / _number(b) if div else inner * _number(b))
        if _number(a) is not None and not div:
            inner = _scale_to_matmul(b, depth + 1)
            return None if inner is None else inner * _number(a)
        return None
    if _is(node, _PASS_FN, _PASS_METHODS + ("add",)):
        for a in node.args[:2] if node.target is not torch.where else node.args[1:3]:
            inner = _scale_to_matmul(a, depth + 1)
            if inner is not None:
                return inner
    return None


def _operand_scale(node, depth: int = 0) -> float:
    """Numeric factors applied to one matmul operand (q * c before q @ k^T), through view ops."""
    if depth > 32 or not isinstance(node, torch.fx.Node):
        return 1.0
    if _is(node, _MUL, ("mul",)) or _is(node, _DIV, ("div",)):
        a, b = node.args[0], node.args[1]
        if _number(b) is not None:
            c = _number(b)
            return _operand_scale(a, depth + 1) * (1 / c if _is(node, _DIV, ("div",)) else c)
        if _number(a) is not None and _is(node, _MUL, ("mul",)):
            return _operand_scale(b, depth + 1) * _number(a)
        return 1.0
    if _is(node, (torch.transpose, torch.permute), _PASS_METHODS):
        return _operand_scale(node.args[0], depth + 1)
    return 1.0


def inline_calls(module: torch.nn.Module) -> tuple[list[TorchCall], list[str]]:
    """Every inline call the lint reads, in graph order per module, and the paths whose forward
    torch.fx could not trace (skipped)."""
    import torch.fx

    class _Own(torch.fx.Tracer):  # every child a leaf: only this module's own ops appear
        def is_leaf_module(self, m, qualname):
            return True

    found, failed = [], []
    for path, mod in module.named_modules():
        if type(mod).__module__.startswith("torch.nn."):
            continue  # a built-in layer or container: read by its attributes, no user-written forward
        try:
            graph = _Own().trace(mod)
        except Exception:  # noqa: BLE001  (fx cannot trace data-dependent control flow: skip it)
            failed.append(path or "<root>")
            continue
        for node in graph.nodes:
            if node.op == "call_function" and node.target is F.gelu:
                found.append(TorchCall(path, "gelu", {"approximate": node.kwargs.get("approximate", "none")}))
            elif node.op == "call_function" and node.target is F.interpolate:
                found.append(TorchCall(path, "interpolate", _named(node, _INTERPOLATE_ARGS)))
            elif node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                found.append(TorchCall(path, "sdpa", {"scale": _named(node, _SDPA_ARGS).get("scale")}))
            elif _is(node, _SOFTMAX, ("softmax",)):
                scale = _scale_to_matmul(node.args[0])
                if scale is not None:
                    found.append(TorchCall(path, "attention", {"scale": scale}))
    return found, failed


def inv_sqrt(scale: float) -> str:
    """0.3535... -> '1/sqrt(8)' when 1/scale^2 is a whole number, else the number."""
    if math.isclose(scale, 1.0):
        return "1"
    if scale > 0:
        n = 1 / (scale * scale)
        if abs(n - round(n)) < 1e-6 * max(n, 1):
            return f"1/sqrt({round(n)})"
    return f"{scale:.6g}"


__all__ = ["TorchCall", "inline_calls", "inv_sqrt"]
