"""What a torch model's forward does first, traced with forward pre-hooks: the order in which it
calls its submodules, and which layer first receives each input tensor.

Structural matching pairs layers that names cannot pair (Flax auto-names ``Dense_0``) in
*execution* order: a twin is written to compute the same thing, so its layers run in the same
order, while the order in which torch registers them (``__init__``) is free to differ. The first
layer to receive an input declares that input's layout (a Conv2d eats [N, C, H, W], a Linear
[..., F]): weight_port.layout.consumer_layout.

Both run the forward in eval mode without gradients (BatchNorm running statistics stay
untouched) and restore every submodule's train/eval flag afterwards.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import jax
try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

from weight_port.layout import consumer_layout


@contextmanager
def _eval_forward(module: torch.nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}  # restored one by one: they may differ
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def torch_call_order(module: torch.nn.Module, inputs: tuple) -> list[str] | None:
    """Module paths in first-call order (parents before children), or None if the forward fails."""
    order: dict[str, None] = {}
    handles = [sub.register_forward_pre_hook(lambda _m, _a, p=path: order.setdefault(p, None))
               for path, sub in module.named_modules()]
    try:
        with _eval_forward(module):
            module(*inputs)
    except Exception:  # an input the forward does not take: pairing falls back (and says so)
        return None
    finally:
        for h in handles:
            h.remove()
    return list(order)


class _AllFound(Exception):
    """Raised from a pre-hook once every wanted input has its consumer: the rest of the forward
    is not needed (the search costs one layer's dispatch, not a whole forward)."""


def first_consumers(
    module: torch.nn.Module,
    call: Callable[[], object],
    wanted: Mapping[int, str],
) -> dict[str, type]:
    """{name: type of the first layer with a known input layout that receives that very tensor}.

    call: runs the forward (e.g. ``lambda: module(*args)``). wanted: {id(input tensor): name}.
    The forward stops as soon as every wanted tensor is found (its own errors propagate).
    Identity, not shape, links a
    tensor to a layer: a layer that receives a permuted or reshaped copy says nothing about the
    input's own layout.
    """
    found: dict[str, type] = {}

    def pre(mod, args, kwargs):
        if consumer_layout(type(mod)) is None:
            return
        for leaf in jax.tree_util.tree_leaves((args, kwargs)):
            name = wanted.get(id(leaf))
            if name is not None and name not in found:
                found[name] = type(mod)
        if len(found) == len(wanted):
            raise _AllFound

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in module.modules()]
    try:
        with _eval_forward(module):
            call()
    except _AllFound:
        pass
    finally:
        for h in handles:
            h.remove()
    return found


__all__ = ["first_consumers", "torch_call_order"]
