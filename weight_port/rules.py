"""One conversion rule per torch layer type, its inverse beside it.

A rule lists, for each torch tensor name of the layer, where it lands in Flax
((collection, leaf name)) and the layout change both ways. The layout is decided by the torch
layer type (never by ndim or key suffix): a [out, in] Linear weight and a [out, in, 1] Conv1d
weight are different layers even when their shapes agree.

Every transform here is a pure permutation (transpose, flip, reshape), so the same rule also maps
gradients of the parameters. A rule that rescaled values would break that: keep rules layout-only.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
try:
    import torch
    from torch import nn
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

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
    # Whether the Flax kernel has in/out swapped against the rule's default layout (ConvTranspose
    # with transpose_kernel=True; HF FlaxConv1D's [out, in]), decided from shapes when there is no
    # Flax module (flax_to_torch from bare variables); None: read it off flax_module.
    transpose_kernel: bool | None = None


def _identity(a: np.ndarray, layer: LayerInfo) -> np.ndarray:
    return a


@dataclass(frozen=True)
class TensorMap:
    """One torch tensor of a layer -> one Flax leaf.

    flax_name: a leaf name, or a path relative to the layer's Flax module ("query/kernel").
    Several maps may share one torch_name (a fused tensor such as MultiheadAttention's
    in_proj_weight): each to_flax takes its block of the tensor, and on the way back the plan
    concatenates their to_torch results on axis 0 in the rule's order.
    """

    torch_name: str
    collection: str
    flax_name: str
    to_flax: Transform = _identity
    to_torch: Transform = _identity
    # The layout change in words, for PortPlan.describe(); a callable when it depends on the layer.
    layout: str | Callable[["LayerInfo"], str] = "unchanged"

    def describe(self, layer: "LayerInfo") -> str:
        return self.layout(layer) if callable(self.layout) else self.layout


@dataclass(frozen=True)
class Rule:
    """How one torch layer type's tensors map to Flax leaves.

    dropped: torch tensors with no Flax counterpart; flax_to_torch refills them from the torch
    module it is given (e.g. BatchNorm's num_batches_tracked counter).
    children: torch child modules whose tensors this rule maps itself ("out_proj.weight"); the
    plan gives them no layer of their own.
    """

    tensors: tuple[TensorMap, ...]
    dropped: tuple[str, ...] = field(default_factory=tuple)
    children: tuple[str, ...] = field(default_factory=tuple)
    # Hyperparameters the port cannot copy (eps, momentum, groups): returns one line per
    # difference between the torch layer and its Flax module, [] when they agree or are unknown.
    check: Callable[["LayerInfo"], list[str]] | None = None
    name: str = ""

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


def _linear_layout(layer: LayerInfo) -> str:
    if layer.flatten is None:
        return "[out, in] -> [in, out]"
    c, *s = layer.flatten
    return f"[out, in] -> [in, out], in permuted {(c, *s)} -> {(*s, c)} (flatten order)"


LINEAR = Rule(
    (
        TensorMap("weight", "params", "kernel", linear_weight_to_flax, linear_weight_to_torch,
                  _linear_layout),
        TensorMap("bias", "params", "bias"),
    ),
    name="linear",
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
        TensorMap("weight", "params", "kernel", conv_weight_to_flax, conv_weight_to_torch,
                  "[out, in/g, *k] -> [*k, in/g, out]"),
        TensorMap("bias", "params", "bias"),
    ),
    name="conv",
)


# --- ConvTransposeNd: torch weight [in, out/groups, *k] is the kernel of the conv whose gradient
# it computes. Run as a conv over the stride-dilated input, that kernel must be flipped in space
# and have in/out swapped. flax ConvTranspose(transpose_kernel=False) runs its kernel [*k, in, out]
# as given, so the port flips; with transpose_kernel=True Flax flips and swaps itself and expects
# [*k, out, in] unflipped. (Padding is the twin's job: flax_impl.layers.torch_conv_transpose_padding.)
# With groups g, torch's in axis is g blocks of in/g, each mapping to its own out/g outputs; the
# equivalent grouped conv (weight_port.flax_layers.GroupedConvTranspose) has kernel
# [*k, in/g, out] with out ordered (group, out/g) -- the same group-major order torch uses.
def flax_transposes_kernel(layer: LayerInfo) -> bool:
    if layer.transpose_kernel is not None:
        return layer.transpose_kernel
    return bool(getattr(layer.flax_module, "transpose_kernel", False))


def _conv_transpose_layout(layer: LayerInfo) -> str:
    if flax_transposes_kernel(layer):
        return "[in, out, *k] -> [*k, out, in] (flax transpose_kernel=True flips itself)"
    return "[in, out/g, *k] -> [*k, in/g, out], spatially flipped"


def conv_groups(layer: LayerInfo) -> int:
    """groups from the torch layer, else from the Flax module (feature_group_count), else 1."""
    for obj, attr in ((layer.torch_module, "groups"), (layer.flax_module, "feature_group_count")):
        value = getattr(obj, attr, None)
        if isinstance(value, int):
            return value
    return 1


def conv_transpose_weight_to_flax(w: np.ndarray, layer: LayerInfo) -> np.ndarray:
    spatial = tuple(range(2, w.ndim))
    if flax_transposes_kernel(layer):
        return np.transpose(w, (*spatial, 1, 0))
    g = conv_groups(layer)
    if g == 1:  # a view (no copy): the materializer does the one copy
        return np.transpose(np.flip(w, axis=spatial), (*spatial, 0, 1))
    cin, cout_g, *k = w.shape
    w = np.flip(w, axis=spatial).reshape(g, cin // g, cout_g, *k)  # [g, in/g, out/g, *k]
    n = len(k)
    w = np.transpose(w, (*range(3, 3 + n), 1, 0, 2))  # [*k, in/g, g, out/g]
    return w.reshape(*k, cin // g, g * cout_g)


def conv_transpose_weight_to_torch(k: np.ndarray, layer: LayerInfo) -> np.ndarray:
    n = k.ndim
    spatial = tuple(range(2, n))
    if flax_transposes_kernel(layer):
        return np.transpose(k, (n - 1, n - 2, *range(n - 2)))
    g = conv_groups(layer)
    if g == 1:
        return np.flip(np.transpose(k, (n - 2, n - 1, *range(n - 2))), axis=spatial)
    *ks, cin_g, cout = k.shape
    w = k.reshape(*ks, cin_g, g, cout // g)  # [*k, in/g, g, out/g]
    w = np.transpose(w, (n - 1, n - 2, n, *range(n - 2)))  # [g, in/g, out/g, *k]
    return np.flip(w.reshape(g * cin_g, cout // g, *ks), axis=spatial)


CONV_TRANSPOSE = Rule(
    (
        TensorMap(
            "weight", "params", "kernel", conv_transpose_weight_to_flax, conv_transpose_weight_to_torch,
            _conv_transpose_layout,
        ),
        TensorMap("bias", "params", "bias"),
    ),
    # groups > 1 with a kernel-transposing Flax module: refused in plan_steps.decide_transpose_kernels
    # (GroupedKernelLayoutError), in both port directions and whatever check_attributes says.
    name="conv_transpose",
)


# --- Attribute checks shared by the norm rules. -------------------------------------------------
def _differs(a: float, b: float) -> bool:
    return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def _eps_check(layer: LayerInfo) -> list[str]:
    # torch's default eps is 1e-5 for every norm layer; Flax's LayerNorm/GroupNorm/InstanceNorm
    # default to 1e-6, so a twin written with defaults is silently off by ~1e-6 relative.
    t_eps = getattr(layer.torch_module, "eps", None)
    f_eps = getattr(layer.flax_module, "epsilon", None)
    if t_eps is not None and f_eps is not None and _differs(t_eps, f_eps):
        return [f"{layer.torch_path or '<root>'}: torch eps={t_eps:g} but flax "
                f"{'/'.join(layer.flax_path) or '<root>'} epsilon={f_eps:g} (set epsilon={t_eps:g})"]
    return []


def _batch_norm_check(layer: LayerInfo) -> list[str]:
    out = _eps_check(layer)
    t_m = getattr(layer.torch_module, "momentum", 0.1) if layer.torch_module is not None else None
    f_m = getattr(layer.flax_module, "momentum", None)
    where = f"{layer.torch_path or '<root>'}"
    if layer.torch_module is not None and f_m is not None:
        if t_m is None:
            # momentum=None is a cumulative average (weights 1/num_batches_tracked); Flax has none.
            out.append(f"{where}: torch momentum=None (cumulative average) has no Flax equivalent")
        elif _differs(1.0 - t_m, f_m):
            # torch weights the *new* batch statistic by momentum, Flax the *old* running value.
            out.append(f"{where}: torch momentum={t_m:g} is flax momentum={1 - t_m:g}, "
                       f"but flax {'/'.join(layer.flax_path)} has momentum={f_m:g}")
    return out


def _group_norm_check(layer: LayerInfo) -> list[str]:
    out = _eps_check(layer)
    t_g = getattr(layer.torch_module, "num_groups", None)
    f_g = getattr(layer.flax_module, "num_groups", None)
    if t_g is not None and f_g is not None and t_g != f_g:
        out.append(f"{layer.torch_path or '<root>'}: torch num_groups={t_g} but flax "
                   f"{'/'.join(layer.flax_path)} num_groups={f_g}")
    return out


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
    check=_batch_norm_check,
    name="batch_norm",
)


# --- LayerNorm / GroupNorm / InstanceNorm: torch's affine weight/bias are Flax's scale/bias, same
# shape and order (GroupNorm groups contiguous channels on both sides: torch splits axis 1 into
# (G, C/G), Flax the last axis). No layout change; only eps (and groups) must agree.
NORM = Rule(
    (TensorMap("weight", "params", "scale"), TensorMap("bias", "params", "bias")),
    check=_eps_check,
    name="norm",
)
LAYER_NORM = NORM
GROUP_NORM = Rule(NORM.tensors, check=_group_norm_check, name="group_norm")
# torch InstanceNorm with track_running_stats=True has running stats Flax's InstanceNorm lacks:
# they are deliberately not in this rule, so they surface as unexpected keys instead of vanishing.
INSTANCE_NORM = Rule(NORM.tensors, dropped=("num_batches_tracked",), check=_eps_check,
                     name="instance_norm")


# --- RMSNorm: torch weight is Flax scale, same shape. torch's eps=None means finfo(x.dtype).eps
# (1.19e-07 for float32) at run time; Flax's RMSNorm defaults to epsilon=1e-6.
def _rms_norm_check(layer: LayerInfo) -> list[str]:
    t = layer.torch_module
    if t is None or getattr(t, "eps", 0) is not None:
        return _eps_check(layer)
    weight = getattr(t, "weight", None)
    # without a weight the input dtype is unknown: any float dtype's eps is a faithful twin
    dtypes = [weight.dtype] if weight is not None else [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    eps = [torch.finfo(d).eps for d in dtypes]
    f_eps = getattr(layer.flax_module, "epsilon", None)
    if f_eps is not None and all(_differs(e, f_eps) for e in eps):
        return [f"{layer.torch_path or '<root>'}: torch eps=None (finfo eps {eps[0]:g} of the input dtype) "
                f"but flax {'/'.join(layer.flax_path) or '<root>'} epsilon={f_eps:g} (set epsilon={eps[0]:g})"]
    return []


RMS_NORM = Rule((TensorMap("weight", "params", "scale"),), check=_rms_norm_check, name="rms_norm")


# --- transformers' own RMS norms (LlamaRMSNorm, MistralRMSNorm, GemmaRMSNorm, T5LayerNorm): one
# ``weight`` of shape [features], which their Flax twins (FlaxLlamaRMSNorm, ...) also call
# ``weight`` (nn.RMSNorm calls it ``scale``). No layout change. Gemma computes x * (1 + weight) on
# both sides: the stored tensor is the same, so the port copies it unchanged either way.
def _hf_rms_eps(module, names: tuple[str, ...]) -> float | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _hf_rms_norm_check(layer: LayerInfo) -> list[str]:
    # torch keeps eps as variance_epsilon (Llama, Mistral, T5) or eps (Gemma); the Flax twins as
    # a field ``eps`` (T5) or in their config (rms_norm_eps; ``epsilon`` exists only after setup).
    t_eps = _hf_rms_eps(layer.torch_module, ("variance_epsilon", "eps"))
    f = layer.flax_module
    f_eps = _hf_rms_eps(f, ("eps", "epsilon"))
    if f_eps is None:
        f_eps = _hf_rms_eps(getattr(f, "config", None), ("rms_norm_eps",))
    if t_eps is not None and f_eps is not None and _differs(t_eps, f_eps):
        return [f"{layer.torch_path or '<root>'}: torch eps={t_eps:g} but flax "
                f"{'/'.join(layer.flax_path) or '<root>'} eps={f_eps:g}"]
    return []


HF_RMS_NORM = Rule((TensorMap("weight", "params", "weight"),), check=_hf_rms_norm_check, name="hf_rms_norm")


# --- transformers' leaf layers holding one tensor used as is, stored under the same name by
# their Flax twins: BEiT's relative position bias table [distances, heads] (indexed, never
# multiplied as a matrix) and DINOv2's layer scale [features] (elementwise). No layout change.
HF_BEIT_RELATIVE_POSITION_BIAS = Rule((TensorMap("relative_position_bias_table", "params",
                                                 "relative_position_bias_table"),), name="hf_relative_position_bias")
HF_LAYER_SCALE = Rule((TensorMap("lambda1", "params", "lambda1"),), name="hf_layer_scale")
# (Frozen computed tables -- RoFormer's, Pegasus' and Marian's sinusoid position tables, frozen
# torch Parameters whose Flax twins compute them -- need no rule of their own: the plan drops any
# frozen parameter the twin has no leaf for, plan_steps.drop_computed_tables.)


# --- Weight norm (torch.nn.utils.parametrizations.weight_norm): torch stores g as
# ``parametrizations.weight.original0`` and v as ``...original1`` (both in torch's conv layout,
# [out, in/groups, k], g reduced over every axis but ``dim``) and computes weight = g * v / ||v||.
# HF's FlaxConvWithWeightNorm (Wav2Vec2's positional conv) keeps ``weight_g`` / ``weight_v`` in
# that same torch layout and transposes the computed kernel itself: no layout change here.
def _weight_norm_check(layer: LayerInfo) -> list[str]:
    plist = getattr(getattr(layer.torch_module, "parametrizations", None), "weight", None)
    kinds = [type(p).__name__ for p in (plist or [])]
    if kinds != ["_WeightNorm"]:
        return [f"{layer.torch_path or '<root>'}: parametrization {kinds} is not weight_norm; "
                "its tensors are mapped as weight norm's (g, v)"]
    return []


WEIGHT_NORM_CONV = Rule(
    (TensorMap("parametrizations.weight.original0", "params", "weight_g", layout="g, torch layout unchanged"),
     TensorMap("parametrizations.weight.original1", "params", "weight_v", layout="v, torch layout unchanged"),
     TensorMap("bias", "params", "bias")),
    children=("parametrizations",),
    check=_weight_norm_check,
    name="weight_norm_conv",
)


# --- transformers' Conv1D (GPT-2): y = x W + b with W stored [in, out] -- already Flax Dense's
# kernel layout, so no transpose against nn.Dense / nnx.Linear. HF's own FlaxConv1D stores its
# kernel [out, in] (it transposes in __call__), so against that twin the port transposes.
def _flax_kernel_is_out_in(layer: LayerInfo) -> bool:
    if layer.transpose_kernel is not None:
        return layer.transpose_kernel
    return _is_hf(type(layer.flax_module), "FlaxConv1D")


def conv1d_weight_to_flax(w: np.ndarray, layer: LayerInfo) -> np.ndarray:
    return w.T if _flax_kernel_is_out_in(layer) else w


def conv1d_weight_to_torch(k: np.ndarray, layer: LayerInfo) -> np.ndarray:
    return k.T if _flax_kernel_is_out_in(layer) else k


CONV1D = Rule(
    (
        TensorMap("weight", "params", "kernel", conv1d_weight_to_flax, conv1d_weight_to_torch,
                  lambda layer: "[in, out] -> [out, in] (HF FlaxConv1D)" if _flax_kernel_is_out_in(layer)
                  else "[in, out] unchanged (Dense layout)"),
        TensorMap("bias", "params", "bias"),
    ),
    name="conv1d",
)


# --- Embedding: both store the table as [num_embeddings, features]; lookups index row-wise. ------
EMBEDDING = Rule((TensorMap("weight", "params", "embedding"),), name="embedding")


def renamed(rule: Rule, flax_names: Mapping[str, str]) -> Rule:
    """``rule`` with other Flax leaf names ({torch tensor name: Flax leaf name}) and the same
    layout changes: the rule of a Flax class that stores a known kind's tensors under names of its
    own (``register_rule(MyBatchNorm, renamed(BATCH_NORM, {"weight": "gamma", ...}))``). Registered
    for a Flax class, it is used wherever that class meets a torch layer of the same kind."""
    unknown = set(flax_names) - set(rule.by_torch_name())
    if unknown:
        raise ValueError(f"renamed: {sorted(unknown)} are not tensors of the {rule.name} rule "
                         f"({', '.join(rule.by_torch_name())})")
    return replace(rule, tensors=tuple(replace(t, flax_name=flax_names.get(t.torch_name, t.flax_name))
                                       for t in rule.tensors))


def direct_rule(names: Mapping[str, str]) -> Rule:
    """Tensors registered directly on a module (class tokens, position embeddings, scalars).

    names: {torch tensor name: Flax collection}. They have no layer semantics, so they are copied
    unchanged under the same name; a shape difference is an error, never a reshape.
    """
    return Rule(tuple(TensorMap(n, c, n) for n, c in names.items()), name="direct")


_RULES: dict[type, Rule] = {} if torch is None else {
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
    nn.LayerNorm: LAYER_NORM,
    nn.GroupNorm: GROUP_NORM,
    nn.InstanceNorm1d: INSTANCE_NORM,
    nn.InstanceNorm2d: INSTANCE_NORM,
    nn.InstanceNorm3d: INSTANCE_NORM,
    nn.Embedding: EMBEDDING,
    nn.RMSNorm: RMS_NORM,
}
# Layer types of optional libraries, keyed by (module prefix, class name) so that nothing is
# imported to register them: a transformers Conv1D can only reach the port when transformers is
# importable (and imported), so the rule exists exactly when transformers does.
_OPTIONAL_RULES: dict[tuple[str, str], Rule] = {
    ("transformers.", "Conv1D"): CONV1D,
    ("transformers.", "FlaxConv1D"): CONV1D,
    **{("transformers.", n): HF_RMS_NORM
       for n in ("LlamaRMSNorm", "MistralRMSNorm", "GemmaRMSNorm", "T5LayerNorm", "FlaxLlamaRMSNorm",
                 "FlaxMistralRMSNorm", "FlaxGemmaRMSNorm", "FlaxT5LayerNorm")},
    ("transformers.", "BeitRelativePositionBias"): HF_BEIT_RELATIVE_POSITION_BIAS,
    ("transformers.", "FlaxBeitRelativePositionBias"): HF_BEIT_RELATIVE_POSITION_BIAS,
    ("transformers.", "Dinov2LayerScale"): HF_LAYER_SCALE,
    ("transformers.", "FlaxDinov2LayerScale"): HF_LAYER_SCALE,
    # torch.nn.utils.parametrize makes one ParametrizedConv1d class per parametrized Conv1d (the
    # class says nothing of which parametrization: the rule's check reads it).
    ("torch.nn.utils.parametrize", "ParametrizedConv1d"): WEIGHT_NORM_CONV,
    ("transformers.", "FlaxConvWithWeightNorm"): WEIGHT_NORM_CONV,
}


def _is_hf(cls: type, name: str) -> bool:
    return cls.__name__ == name and cls.__module__.startswith("transformers.")


def _optional_rule(cls: type) -> Rule | None:
    return next((r for (prefix, name), r in _OPTIONAL_RULES.items()
                 if cls.__name__ == name and cls.__module__.startswith(prefix)), None)
# Flax-side types, for ports without a torch module (a state_dict or checkpoint file): the layer
# type is then read off the Flax twin at each path. Filled lazily (importing flax is slow).
_FLAX_RULES: dict[type, Rule] = {}


def _builtin_flax_rules() -> dict[type, Rule]:
    import flax.linen as fnn
    from flax import nnx

    from weight_port.flax_layers import GroupedConvTranspose

    return {
        fnn.Dense: LINEAR, nnx.Linear: LINEAR,
        fnn.Conv: CONV, nnx.Conv: CONV,
        fnn.ConvTranspose: CONV_TRANSPOSE, nnx.ConvTranspose: CONV_TRANSPOSE,
        GroupedConvTranspose: CONV_TRANSPOSE,
        fnn.BatchNorm: BATCH_NORM, nnx.BatchNorm: BATCH_NORM,
        fnn.LayerNorm: LAYER_NORM, nnx.LayerNorm: LAYER_NORM,
        fnn.GroupNorm: GROUP_NORM, nnx.GroupNorm: GROUP_NORM,
        fnn.InstanceNorm: INSTANCE_NORM,
        fnn.Embed: EMBEDDING, nnx.Embed: EMBEDDING,
        fnn.RMSNorm: RMS_NORM, nnx.RMSNorm: RMS_NORM,
    }


def _is_flax_module_type(t: type) -> bool:
    import flax.linen as fnn
    from flax import nnx

    return issubclass(t, (fnn.Module, nnx.Module))


def register_rule(layer_type: type, rule: Rule) -> None:
    """Extension hook: teach the port a layer type (subclasses inherit it).

    layer_type: a torch.nn.Module subclass (used when the source is a torch module), or a Flax
    linen/nnx Module subclass (used when the source is a bare state_dict or checkpoint file and the
    layer type must be read off the Flax twin). Register both for a layer you port both ways.
    """
    if torch is not None and isinstance(layer_type, type) and issubclass(layer_type, torch.nn.Module):
        _RULES[layer_type] = rule
    elif isinstance(layer_type, type) and _is_flax_module_type(layer_type):
        _flax_rules()[layer_type] = rule
    else:
        raise TypeError(f"register_rule needs a torch.nn.Module or Flax Module subclass, got {layer_type!r}")


def rule_for(torch_type: type) -> Rule | None:
    """The rule of the closest registered class in ``torch_type``'s MRO, or None."""
    for cls in torch_type.__mro__:
        if cls in _RULES:
            return _RULES[cls]
        if (rule := _optional_rule(cls)) is not None:
            return rule
    return None


def _flax_rules() -> dict[type, Rule]:
    if not _FLAX_RULES:
        _FLAX_RULES.update(_builtin_flax_rules())
    return _FLAX_RULES


def flax_rule_for(flax_type: type) -> Rule | None:
    """The rule for a Flax module class (linen or nnx), by MRO, or None."""
    rules = _flax_rules()
    for cls in flax_type.__mro__:
        if cls in rules:
            return rules[cls]
        if (rule := _optional_rule(cls)) is not None:
            return rule
    return None


def registered_rules() -> Mapping[type, Rule]:
    return dict(_RULES)


def converted_shape(rule: Rule, name: str, shape: tuple[int, ...], info: LayerInfo) -> tuple[int, ...]:
    """The Flax shape ``rule`` makes of the torch tensor ``name`` of ``shape`` (no data moved)."""
    tmap = rule.by_torch_name()[name]
    # A zero-stride stand-in: transposes and flips of it cost nothing; only a reshape copies.
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape, (0,) * len(shape))
    return tuple(tmap.to_flax(dummy, info).shape)
