"""The order in which a torch model first calls its submodules, traced with forward pre-hooks.

Structural matching pairs layers that names cannot pair (Flax auto-names ``Dense_0``) in
*execution* order: a twin is written to compute the same thing, so its layers run in the same
order, while the order in which torch registers them (``__init__``) is free to differ.
"""
from __future__ import annotations

import torch


def torch_call_order(module: torch.nn.Module, inputs: tuple) -> list[str] | None:
    """Module paths in first-call order (parents before children), or None if the forward fails.

    Runs one forward in eval mode without gradients (BatchNorm running stats stay untouched);
    the module's train/eval mode is restored afterwards.
    """
    order: dict[str, None] = {}
    handles = []
    for path, sub in module.named_modules():
        handles.append(sub.register_forward_pre_hook(lambda _m, _a, p=path: order.setdefault(p, None)))
    modes = {m: m.training for m in module.modules()}  # restored one by one: they may differ
    module.eval()
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception:  # an input the forward does not take: pairing falls back (and says so)
        return None
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    return list(order)


__all__ = ["torch_call_order"]
