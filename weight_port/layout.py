"""Activation layout, the one place that knows NCHW vs NHWC: declared per tensor, never guessed.

``layout`` names the torch-side layout of one tensor: "NC..." (channels-first, at least one
spatial dim: NCL, NCHW, NCDHW) or "as_is" (no channel axis to move: [N, F], [N, T, D], token
ids). Flax twins are channels-last, so "NC..." moves axis 1 to the end and back.

Where a layout comes from, in order: the caller (``input_layout=`` / ``output_layout=``, one
string or one per leaf), the kind of torch layer that produced (or, for inputs, first consumes)
the tensor (``kind_layout``), and, for outputs, the shapes on both sides when only one layout
makes them agree (``layout_from_shapes``). Nothing here looks at a tensor's number of dimensions
to decide; a channels-first conversion of a tensor with fewer than 3 dims is an error.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CHANNELS_FIRST = "NC..."
AS_IS = "as_is"
INHERIT = "inherit"  # a layer kind that keeps its input's layout (ReLU, Dropout, BatchNorm1d, ...)
LAYOUTS = (CHANNELS_FIRST, AS_IS)


class LayoutError(ValueError):
    """A layout that is unknown, ambiguous, or impossible for the tensor it is applied to."""


def check_layout(layout: str, where: str = "layout") -> str:
    if layout not in LAYOUTS:
        raise LayoutError(f"{where}: unknown layout {layout!r}; use {CHANNELS_FIRST!r} or {AS_IS!r}")
    return layout


def _need_spatial(x, layout: str, where: str) -> None:
    if np.ndim(x) < 3:
        raise LayoutError(f"{where}: layout {layout!r} needs [N, C, *spatial] (>= 3 dims), got shape "
                          f"{tuple(np.shape(x))}; declare it {AS_IS!r} if it has no channel axis")


def to_flax_layout(x: np.ndarray, layout: str = CHANNELS_FIRST, where: str = "tensor") -> np.ndarray:
    """Torch layout -> Flax layout: [N, C, *S] -> [N, *S, C] for "NC...", unchanged for "as_is"."""
    if check_layout(layout, where) == CHANNELS_FIRST:
        _need_spatial(x, layout, where)
        return np.moveaxis(x, 1, -1)
    return x


def to_torch_layout(x: np.ndarray, layout: str = CHANNELS_FIRST, where: str = "tensor") -> np.ndarray:
    """Flax layout -> torch layout: [N, *S, C] -> [N, C, *S] (the inverse of to_flax_layout)."""
    if check_layout(layout, where) == CHANNELS_FIRST:
        _need_spatial(x, layout, where)
        return np.moveaxis(x, -1, 1)
    return x


def per_arg(layout: str | Sequence[str], args: Sequence) -> list[str]:
    """One layout per positional argument: a string applies to every argument, a sequence is one
    each (weight_port.input_layouts reads undeclared ones off the layer that receives them)."""
    n = len(args)
    if isinstance(layout, str):
        return [check_layout(layout, "input_layout")] * n
    if len(layout) != n:
        raise LayoutError(f"{len(layout)} input layouts for {n} inputs")
    return [check_layout(lay, f"input_layout[{i}]") for i, lay in enumerate(layout)]


def flax_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The Flax-layout shape of a torch-layout ``shape`` (LayoutError when impossible)."""
    return tuple(np.shape(to_flax_layout(np.empty(shape, dtype=np.bool_), layout)))


def fitting_layouts(torch_shape: tuple[int, ...], flax_shape_: tuple[int, ...]) -> list[str]:
    """The layouts under which a torch-layout tensor of ``torch_shape`` has Flax shape ``flax_shape_``."""
    fits = []
    for layout in LAYOUTS:
        try:
            if flax_shape(tuple(torch_shape), layout) == tuple(flax_shape_):
                fits.append(layout)
        except LayoutError:
            pass
    return fits


def layout_from_shapes(torch_shape: tuple[int, ...], flax_shape_: tuple[int, ...]) -> str | None:
    """The one layout under which the two shapes agree, or None when both or neither do
    (e.g. [N, T, D] with T == D: ambiguous; the caller must declare it)."""
    fits = fitting_layouts(torch_shape, flax_shape_)
    return fits[0] if len(fits) == 1 else None


# Layout of a torch layer's *output* by layer kind (class name; subclasses match by MRO).
# Conv/pool/upsample/batch-norm-2d+ compute on [N, C, *S] in torch and [N, *S, C] in Flax.
# Linear, LayerNorm, Embedding, attention act on the last axis on both sides. Element-wise layers
# and BatchNorm1d (whose [N, C] input has no spatial axis) keep the layout of their input.
_KIND_LAYOUT: dict[str, str] = {
    **{f"Conv{d}d": CHANNELS_FIRST for d in (1, 2, 3)},
    **{f"ConvTranspose{d}d": CHANNELS_FIRST for d in (1, 2, 3)},
    **{f"{p}Pool{d}d": CHANNELS_FIRST for p in ("Max", "Avg", "AdaptiveAvg", "AdaptiveMax", "LP")
       for d in (1, 2, 3)},
    **{f"BatchNorm{d}d": CHANNELS_FIRST for d in (2, 3)},
    **{f"InstanceNorm{d}d": CHANNELS_FIRST for d in (1, 2, 3)},
    "GroupNorm": CHANNELS_FIRST, "Upsample": CHANNELS_FIRST, "UpsamplingNearest2d": CHANNELS_FIRST,
    "UpsamplingBilinear2d": CHANNELS_FIRST, "PixelShuffle": CHANNELS_FIRST, "ZeroPad2d": CHANNELS_FIRST,
    "Linear": AS_IS, "LayerNorm": AS_IS, "RMSNorm": AS_IS, "Embedding": AS_IS, "Bilinear": AS_IS,
    "MultiheadAttention": AS_IS, "Conv1D": AS_IS, "Flatten": AS_IS,
    "BatchNorm1d": INHERIT, "Identity": INHERIT, "Dropout": INHERIT, "Dropout1d": INHERIT,
    "Dropout2d": INHERIT, "Dropout3d": INHERIT, "AlphaDropout": INHERIT,
    **{k: INHERIT for k in ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU",
                            "SiLU", "Mish", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid",
                            "Hardtanh", "Softplus", "Softsign", "Tanhshrink", "Threshold")},
}

# Layout of a model *input* by the kind of layer that first consumes it: a conv/pool eats
# channels-first images; a Linear/LayerNorm/Embedding/attention eats features-last tensors.
_CONSUMER_LAYOUT = {k: v for k, v in _KIND_LAYOUT.items() if v != INHERIT}


def _lookup(table: dict[str, str], layer_type: type) -> str | None:
    for cls in getattr(layer_type, "__mro__", (layer_type,)):
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def kind_layout(layer_type: type) -> str | None:
    """Output layout of a torch layer type: CHANNELS_FIRST, AS_IS, INHERIT, or None (unknown,
    e.g. a user container: its output is whatever its last inner layer made)."""
    return _lookup(_KIND_LAYOUT, layer_type)


def consumer_layout(layer_type: type) -> str | None:
    """Layout a layer type expects of its input (CHANNELS_FIRST / AS_IS), None if it does not say."""
    return _lookup(_CONSUMER_LAYOUT, layer_type)


__all__ = ["AS_IS", "CHANNELS_FIRST", "INHERIT", "LAYOUTS", "LayoutError", "check_layout",
           "consumer_layout", "flax_shape", "per_arg", "kind_layout", "layout_from_shapes", "to_flax_layout",
           "to_torch_layout"]
