"""The torch-side layout of each positional input of a port's example input.

A port traces the Flax twin on the channels-last equivalent of ``example_input``, so it must know
which inputs are [N, C, *S] images. In order: the caller's ``input_layout``; integer inputs and
inputs without a spatial axis (< 3 dims) are as-is, the only layout they can have; otherwise the
kind of layer that first receives the tensor itself -- in the torch module when the port has one
(weight_port.call_order.first_consumers: a forward stopped at that layer), else in the Flax twin,
linen or NNX (a Conv receives channels-last images, a Dense/Linear/LayerNorm/Embed features-last
tensors), traced abstractly and stopped there. Nothing is decided from the number of dimensions alone: an input
that no such layer receives raises LayoutError naming it and the ``input_layout`` to declare.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

from weight_port.call_order import first_consumers
from weight_port.flax_tree import call_kwargs, is_nnx
from weight_port.layout import AS_IS, CHANNELS_FIRST, LayoutError, consumer_layout, per_arg

# Linen and NNX layer kinds (class names, matched along the MRO) by the torch-side layout of a tensor they
# receive directly: Flax convs eat channels-last images, the torch twin's input is channels-first.
_FLAX_CONSUMER = {
    "Conv": CHANNELS_FIRST, "ConvTranspose": CHANNELS_FIRST, "ConvLocal": CHANNELS_FIRST,
    "Dense": AS_IS, "DenseGeneral": AS_IS, "Linear": AS_IS, "LinearGeneral": AS_IS, "Einsum": AS_IS, "Embed": AS_IS, "LayerNorm": AS_IS,
    "RMSNorm": AS_IS, "MultiHeadDotProductAttention": AS_IS, "MultiHeadAttention": AS_IS,
    "SelfAttention": AS_IS,
}


class _Found(Exception):
    """Stops the twin's abstract trace once every wanted input has its consumer."""


def _is_float(x: np.ndarray) -> bool:
    # jnp.issubdtype: numpy's own does not count bfloat16 (ml_dtypes) as floating
    return bool(jax.numpy.issubdtype(np.asarray(x).dtype, jax.numpy.floating))


def _flax_layout(module) -> str | None:
    for cls in type(module).__mro__:
        if cls.__name__ in _FLAX_CONSUMER and cls.__module__.startswith("flax."):
            return _FLAX_CONSUMER[cls.__name__]
    return None


def _linen_consumers(flax_module, inputs: Sequence[np.ndarray], todo: list[int]) -> dict[int, str]:
    """{input index: torch-side layout} from the linen layers that first receive those inputs."""
    import flax.linen as nn

    found: dict[int, str] = {}

    def probe(*xs):
        wanted = {id(xs[i]): i for i in todo}

        def intercept(next_fun, args, kwargs, context):
            layout = _flax_layout(context.module)
            if layout is not None:
                for leaf in jax.tree_util.tree_leaves((args, kwargs)):
                    i = wanted.get(id(leaf))
                    if i is not None:
                        found.setdefault(i, layout)
                if len(found) == len(wanted):
                    raise _Found
            return next_fun(*args, **kwargs)

        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        with nn.intercept_methods(intercept):
            flax_module.init(rngs, *xs, **call_kwargs(flax_module, False))

    specs = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in inputs]
    try:
        jax.eval_shape(probe, *specs)
    except _Found:
        pass
    except Exception:  # noqa: BLE001 -- the twin refused the torch-layout shapes before any
        pass  # consumer (e.g. a channel-count check): what was not found is reported by the caller
    return found


def port_input_layouts(
    input_layout: str | Sequence[str] | None,
    inputs: Sequence[np.ndarray],
    torch_module: torch.nn.Module | None,
    torch_inputs: Callable[[], tuple],
    flax_module=None,
) -> list[str]:
    """One layout per positional input (torch layout: [N, C, *S] for "NC...").

    inputs: the example inputs as numpy arrays; torch_inputs() gives them as the torch tensors
    the module's forward takes (called only when a torch consumer must be found).
    """
    if isinstance(input_layout, str):  # one layout for every float input (ids have no channels)
        return [lay if _is_float(x) else AS_IS for x, lay in zip(inputs, per_arg(input_layout, inputs))]
    if input_layout is not None:
        return per_arg(input_layout, inputs)
    layouts: list[str | None] = [AS_IS if not _is_float(x) or np.ndim(x) < 3 else None for x in inputs]
    todo = [i for i, layout in enumerate(layouts) if layout is None]
    if todo and torch_module is not None:
        args = torch_inputs()
        found = first_consumers(torch_module, lambda: torch_module(*args), {id(args[i]): str(i) for i in todo})
        for name, kind in found.items():
            layouts[int(name)] = consumer_layout(kind)
    elif todo and flax_module is not None:
        if is_nnx(flax_module):
            from weight_port.nnx import nnx_first_consumers

            found = nnx_first_consumers(flax_module, tuple(inputs), todo, _flax_layout)
        else:
            found = _linen_consumers(flax_module, inputs, todo)
        for i, layout in found.items():
            layouts[i] = layout
    missing = [i for i in todo if layouts[i] is None]
    if missing:
        where = "the torch module" if torch_module is not None else "the Flax twin"
        shapes = ", ".join(f"input {i} {tuple(np.shape(inputs[i]))}" for i in missing)
        raise LayoutError(
            f"cannot tell the layout of {shapes}: no conv/linear-like layer of {where} receives it "
            f"directly; declare it with input_layout= ({CHANNELS_FIRST!r} for [N, C, *spatial], "
            f"{AS_IS!r} for [N, ..., features]; one per input for several)")
    return layouts


__all__ = ["port_input_layouts"]
