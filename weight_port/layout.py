"""Activation layout conversion, the one place that knows NCHW vs NHWC.

``layout`` names the torch-side layout of a tensor: "NC..." (channels-first, any number of
spatial dims: NCL, NCHW, NCDHW) or "as_is" (no channel axis to move: [N, F], token ids, ...).
Flax twins are channels-last, so "NC..." moves axis 1 to the end.
"""
from __future__ import annotations

import numpy as np

CHANNELS_FIRST = "NC..."
AS_IS = "as_is"


def to_flax_layout(x: np.ndarray, layout: str = CHANNELS_FIRST) -> np.ndarray:
    """Torch layout -> Flax layout: [N, C, *S] -> [N, *S, C] when channels-first and ndim >= 3."""
    if layout == CHANNELS_FIRST and np.ndim(x) >= 3:
        return np.moveaxis(x, 1, -1)
    if layout not in (CHANNELS_FIRST, AS_IS):
        raise ValueError(f"unknown layout {layout!r}; use {CHANNELS_FIRST!r} or {AS_IS!r}")
    return x


def to_torch_layout(x: np.ndarray, layout: str = CHANNELS_FIRST) -> np.ndarray:
    """Flax layout -> torch layout: [N, *S, C] -> [N, C, *S] (the inverse of to_flax_layout)."""
    if layout == CHANNELS_FIRST and np.ndim(x) >= 3:
        return np.moveaxis(x, -1, 1)
    if layout not in (CHANNELS_FIRST, AS_IS):
        raise ValueError(f"unknown layout {layout!r}; use {CHANNELS_FIRST!r} or {AS_IS!r}")
    return x
