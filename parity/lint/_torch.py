"""The torch side of the trap lint: the ops a user module calls inline in its own ``forward``
(F.gelu, F.interpolate, F.scaled_dot_product_attention, a hand-written softmax attention), read
from one real forward (run_torch(ops=True): a torch function mode inside the module hooks), each
credited to the innermost module running when it was called. Any model that runs is read,
data-dependent control flow included. Built-in layers are read by their attributes elsewhere
(they have no user-written forward), so the ops they call are not read here."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from parity.runtime import TensorRef, TorchOp, run_torch


@dataclass(frozen=True)
class TorchCall:
    """One inline call: path of the module whose forward made it, the op ("gelu", "interpolate",
    "sdpa", "attention"), and its arguments by name (attention: {"scale": float}, the product of
    the constants between the q.k matmul and the softmax; sdpa: its "scale" argument and "factor",
    the constants applied to q and k before the call)."""

    path: str
    op: str
    kwargs: dict = field(default_factory=dict)


_INTERPOLATE_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                     "antialias")
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
_GELU_ARGS = ("input", "approximate")

# Function names as the torch function mode sees them: ``x @ y`` is "matmul", ``2 * x`` is "mul"
# with the tensor first, ``x / c`` is "div"; an in-place variant ends in "_".
_MATMUL = ("matmul", "bmm")
_MUL = ("mul", "mul_")
_DIV = ("div", "div_", "true_divide")
_VIEWS = ("masked_fill", "masked_fill_", "float", "to", "type_as", "contiguous", "view", "reshape", "transpose",
          "permute", "view_as")  # pass a matmul operand's factor through
_PASS = _VIEWS + ("add", "add_", "where")  # pass the logits through (a mask added, filled or selected)


def _named(op: TorchOp, names: tuple[str, ...]) -> dict:
    return {**dict(zip(names, op.args)), **op.kwargs}


class _Flow:
    """Walks the data flow of one recorded forward back from a softmax to the matmul feeding it."""

    def __init__(self, ops: list[TorchOp]):
        self.producer = {s: op for op in ops for s in op.outputs}

    def of(self, x) -> TorchOp | None:
        return self.producer.get(x.serial) if isinstance(x, TensorRef) else None

    def number(self, x) -> float | None:
        """A Python number, or a one-element tensor that no matmul feeds (``torch.tensor(8.0)``)."""
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
        if isinstance(x, TensorRef) and x.value is not None and self.scale_to_matmul(x) is None:
            return x.value
        return None

    def scale_to_matmul(self, x, depth: int = 0) -> float | None:
        """The product of numeric factors between a softmax's input and the matmul feeding it
        (x * c, x / c, baddbmm's alpha; masks added or filled pass through), or None when no
        matmul is reached through such ops or a factor is not a number."""
        op = self.of(x)
        if op is None or depth > 32:
            return None
        if op.name in _MATMUL:
            return self.operand_scale(op.args[0]) * self.operand_scale(op.args[1])
        if op.name == "baddbmm":  # beta * input + alpha * (b1 @ b2): input is the mask (or unused)
            b = _named(op, ("input", "batch1", "batch2", "beta", "alpha"))
            alpha = self.number(b.get("alpha", 1))
            return None if alpha is None else alpha * self.operand_scale(b["batch1"]) * self.operand_scale(b["batch2"])
        if op.name in _MUL + _DIV and len(op.args) >= 2:
            a, b = op.args[0], op.args[1]
            div = op.name in _DIV
            if self.number(b) is not None:
                inner = self.scale_to_matmul(a, depth + 1)
                return None if inner is None else (inner / self.number(b) if div else inner * self.number(b))
            if self.number(a) is not None and not div:
                inner = self.scale_to_matmul(b, depth + 1)
                return None if inner is None else inner * self.number(a)
            return None
        if op.name in _PASS:
            for a in op.args[1:3] if op.name == "where" else op.args[:2]:
                inner = self.scale_to_matmul(a, depth + 1)
                if inner is not None:
                    return inner
        return None

    def operand_scale(self, x, depth: int = 0) -> float:
        """Numeric factors applied to one matmul operand (q * c before q @ k^T), through view ops."""
        op = self.of(x)
        if op is None or depth > 32:
            return 1.0
        if op.name in _MUL + _DIV and len(op.args) >= 2:
            a, b = op.args[0], op.args[1]
            if self.number(b) is not None:
                c = self.number(b)
                return self.operand_scale(a, depth + 1) * (1 / c if op.name in _DIV else c)
            if self.number(a) is not None and op.name in _MUL:
                return self.operand_scale(b, depth + 1) * self.number(a)
            return 1.0
        if op.name in _VIEWS:
            return self.operand_scale(op.args[0], depth + 1)
        return 1.0


@contextlib.contextmanager
def _left_as_found(module: torch.nn.Module) -> Iterator[None]:
    """Whatever a forward changes in ``module`` is put back afterwards: training flags, buffers
    (BatchNorm running statistics in a train-mode forward), parameter .grad fields (run_torch
    resets them) and the random generators (dropout draws)."""
    flags = {m: m.training for m in module.modules()}
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    grads = [(p, p.grad) for p in module.parameters()]
    cuda = sorted({t.device.index or 0 for t in [*module.parameters(), *module.buffers()] if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            for m, flag in flags.items():
                m.training = flag
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in grads:
                p.grad = g


def traced_ops(module: torch.nn.Module, args: tuple, *, train: bool) -> list[TorchOp]:
    """Every torch function one forward of ``module(*args)`` calls (args in torch layout, as run
    by the check), without gradients, leaving the module as it found it."""
    with _left_as_found(module), torch.no_grad():
        return run_torch(module, args, train=train, grads=False, ops=True).ops


def inline_calls(module: torch.nn.Module, ops: list[TorchOp]) -> list[TorchCall]:
    """The inline calls the lint reads, in call order (one per call: a module run twice gives
    two), from ``traced_ops``; ops credited to a built-in torch.nn layer are skipped."""
    built_in = {p for p, m in module.named_modules() if type(m).__module__.startswith("torch.nn.")}
    flow = _Flow(ops)
    found = []
    for op in ops:
        if op.path in built_in:
            continue
        if op.name == "gelu":
            found.append(TorchCall(op.path, "gelu", {"approximate": _named(op, _GELU_ARGS).get("approximate", "none")}))
        elif op.name == "interpolate":
            found.append(TorchCall(op.path, "interpolate", _named(op, _INTERPOLATE_ARGS)))
        elif op.name == "scaled_dot_product_attention":
            # Hugging Face's OPT, Whisper & co. scale q before the call and pass scale=1.0: the
            # factors on q and k (through views) are part of the logits' scale.
            named = _named(op, _SDPA_ARGS)
            factor = flow.operand_scale(named.get("query")) * flow.operand_scale(named.get("key"))
            found.append(TorchCall(op.path, "sdpa", {"scale": named.get("scale"), "factor": factor}))
        elif op.name == "softmax" and op.args:
            scale = flow.scale_to_matmul(op.args[0])
            if scale is not None:
                found.append(TorchCall(op.path, "attention", {"scale": scale}))
    return found


def inv_sqrt(scale: float) -> str:
    """0.3535... -> '1/sqrt(8)' when 1/scale^2 is a whole number, else the number."""
    if math.isclose(scale, 1.0):
        return "1"
    if scale > 0:
        n = 1 / (scale * scale)
        if abs(n - round(n)) < 1e-6 * max(n, 1):
            return f"1/sqrt({round(n)})"
    return f"{scale:.6g}"


__all__ = ["TorchCall", "inline_calls", "inv_sqrt", "traced_ops"]
