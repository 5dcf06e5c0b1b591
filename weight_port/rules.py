"""One conversion rule per torch layer type, its inverse beside it.

A rule lists, for each torch tensor name of the layer, where it lands in Flax
((collection, leaf name)) and the layout change both ways. The layout is decided by the torch
layer type (never by ndim or key suffix): a [out, in] Linear weight and a [out, in, 1] Conv1d
weight are different layers even when their shapes agree.

Every transform here is a pure permutation (transpose, flip, reshape), so the same rule also maps
gradients of the parameters. A rule that rescaled values would break that: keep rules layout-only.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

Transform = Callable[[np.ndarray, "LayerInfo"], np.ndarray]


@dataclass(frozen=True)
class LayerInfo:
    """One torch layer that owns tensors, paired with its Flax module.

    flatten: when this Linear's input is a flattened channels-first tensor, that tensor's
    per-sample shape [C, *S] (torch flattens C-major; a channels-last Flax twin flattens C-minor).
    """

    torch_path: str
    flax_path: tuple[str, ...]
    torch_type: type | None = None
    torch_module: nn.Module | None = None
    flax_module: Any = None
    flatten: tuple[int, ...] | None = None


def _identity(a: np.ndarray, layer: LayerInfo) -> np.ndarray:
    return a


@dataclass(frozen=True)
class TensorMap:
    torch_name: str
    collection: str
    flax_name: str
    to_flax: Transform = _identity
    to_torch: Transform = _identity


@dataclass(frozen=True)
class Rule:
    """How one torch layer type's tensors map to Flax leaves.

    dropped: torch tensors with no Flax counterpart; flax_to_torch refills them from the torch
    module it is given (e.g. BatchNorm's num_batches_tracked counter).
    """

    tensors: tuple[TensorMap, ...]
    dropped: tuple[str, ...] = field(default_factory=tuple)

    def by_torch_name(self) -> dict[str, TensorMap]:
        return {t.torch_name: t for t in self.tensors}


# --- Linear: torch y = x W^T with W [out, in]; Flax y = x K with K [in, out]. -----------------
def linear_weight_to_flax(w: np.ndarray, layer: LayerInfo) -> np.ndarray:
    if layer.flatten is not None:
        # torch's input features are ordered (C, *S); the Flax twin's are (*S, C).
        out = w.shape[0]
        w = np.moveaxis(w.reshape(out, *layer.flatten), 1, -1).reshape(out, -1)
    return w.T


def linear_weight_to_torch(k: np.ndarray, layer: LayerInfo) -> np.ndarray:
    w = k.T
    if layer.flatten is not None:
        c, *spatial = layer.flatten
        out = w.shape[0]
        w = np.moveaxis(w.reshape(out, *spatial, c), -1, 1).reshape(out, -1)
    return w


LINEAR = Rule(
    (
        TensorMap("weight", "params", "kernel", linear_weight_to_flax, linear_weight_to_torch),
        TensorMap("bias", "params", "bias"),
    )
)


# --- ConvNd: torch OI(spatial) [out, in/groups, *k]; Flax (spatial)IO [*k, in/groups, out]. -----
# Both are cross-correlations with the same group layout, so only the axes move.
def conv_weight_to_flax(w: np.ndarray, layer: LayerInfo) -> np.ndarray:
    return np.transpose(w, (*range(2, w.ndim), 1, 0))


def conv_weight_to_torch(k: np.ndarray, layer: LayerInfo) -> np.ndarray:
    n = k.ndim
    return np.transpose(k, (n - 1, n - 2, *range(n - 2)))


CONV = Rule(
    (
        TensorMap("weight", "params", "kernel", conv_weight_to_flax, conv_weight_to_torch),
        TensorMap("bias", "params", "bias"),
    )
)


# --- ConvTransposeNd: torch weight [in, out/groups, *k] is the kernel of the conv whose gradient
# it computes. Run as a conv over the stride-dilated input, that kernel must be flipped in space
# and have in/out swapped. flax ConvTranspose(transpose_kernel=False) runs its kernel [*k, in, out]
# as given, so the port flips; with transpose_kernel=True Flax flips and swaps itself and expects
# [*k, out, in] unflipped. (Padding is the twin's job: flax_impl.layers.torch_conv_transpose_padding.)
def _flax_transposes_kernel(layer: LayerInfo) -> bool:
    return bool(getattr(layer.flax_module, "transpose_kernel", False))


def conv_transpose_weight_to_flax(w: np.ndarray, layer: LayerInfo) -> np.ndarray:
    spatial = tuple(range(2, w.ndim))
    if _flax_transposes_kernel(layer):
        return np.transpose(w, (*spatial, 1, 0))
    return np.transpose(np.flip(w, axis=spatial), (*spatial, 0, 1))


def conv_transpose_weight_to_torch(k: np.ndarray, layer: LayerInfo) -> np.ndarray:
    n = k.ndim
    spatial = tuple(range(2, n))
    if _flax_transposes_kernel(layer):
        return np.transpose(k, (n - 1, n - 2, *range(n - 2)))
    return np.flip(np.transpose(k, (n - 2, n - 1, *range(n - 2))), axis=spatial)


CONV_TRANSPOSE = Rule(
    (
        TensorMap(
            "weight", "params", "kernel", conv_transpose_weight_to_flax, conv_transpose_weight_to_torch
        ),
        TensorMap("bias", "params", "bias"),
    )
)


# --- BatchNormNd: affine weight/bias are Flax scale/bias; running stats live in the separate
# "batch_stats" collection as mean/var. torch's num_batches_tracked has no Flax counterpart (only
# used when momentum=None) and is refilled from the torch module on the way back.
BATCH_NORM = Rule(
    (
        TensorMap("weight", "params", "scale"),
        TensorMap("bias", "params", "bias"),
        TensorMap("running_mean", "batch_stats", "mean"),
        TensorMap("running_var", "batch_stats", "var"),
    ),
    dropped=("num_batches_tracked",),
)


_RULES: dict[type, Rule] = {
    nn.Linear: LINEAR,
    nn.Conv1d: CONV,
    nn.Conv2d: CONV,
    nn.Conv3d: CONV,
    nn.ConvTranspose1d: CONV_TRANSPOSE,
    nn.ConvTranspose2d: CONV_TRANSPOSE,
    nn.ConvTranspose3d: CONV_TRANSPOSE,
    nn.BatchNorm1d: BATCH_NORM,
    nn.BatchNorm2d: BATCH_NORM,
    nn.BatchNorm3d: BATCH_NORM,
}


def register_rule(torch_type: type, rule: Rule) -> None:
    """Extension hook: teach the port a torch layer type (subclasses inherit it)."""
    if not (isinstance(torch_type, type) and issubclass(torch_type, torch.nn.Module)):
        raise TypeError(f"register_rule needs a torch.nn.Module subclass, got {torch_type!r}")
    _RULES[torch_type] = rule


def rule_for(torch_type: type) -> Rule | None:
    """The rule of the closest registered class in ``torch_type``'s MRO, or None."""
    for cls in torch_type.__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def registered_rules() -> Mapping[type, Rule]:
    return dict(_RULES)
