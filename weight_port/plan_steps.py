"""Plan steps after pairing: flatten order, transposed-kernel layout, tied parameters.

Each step either decides from what the plan knows (the Flax twin's jaxpr, shapes, storage) or
refuses with a named error; none guesses silently.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import numpy as np
try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

from weight_port.errors import FlattenOrderError, GroupedKernelLayoutError, KernelLayoutError
from weight_port.flax_tree import FlaxTarget
from weight_port.naming import flax_path_str
from weight_port.lookalike import (
    KIND_CLASS, LOOKALIKE_KINDS, is_lookalike, lookalike_note, module_leaves, register_rule_call,
)
from weight_port.pairing import PlannedLayer, converted_shape
from weight_port.rules import Rule, conv_groups, flax_rule_for, flax_transposes_kernel
from weight_port.tensors import to_numpy

# torch layers whose output is channels-first (the only way a later flatten can be C-major)
_CHANNELS_FIRST_LAYERS = () if torch is None else (torch.nn.modules.conv._ConvNd, torch.nn.modules.pooling._MaxPoolNd,
                          torch.nn.modules.pooling._AvgPoolNd, torch.nn.modules.pooling._AdaptiveAvgPoolNd,
                          torch.nn.modules.pooling._AdaptiveMaxPoolNd, torch.nn.BatchNorm2d,
                          torch.nn.BatchNorm3d, torch.nn.Upsample)


def _could_flatten_channels_first(torch_module: torch.nn.Module, inputs: tuple | None) -> bool:
    """Whether some Linear could follow a channels-first flatten: worth a torch trace at all."""
    if inputs is not None and any(getattr(x, "ndim", 0) >= 3 for x in inputs):
        return True
    return any(isinstance(m, _CHANNELS_FIRST_LAYERS) for m in torch_module.modules())


def decide_flatten(
    layers: list[PlannedLayer],
    target: FlaxTarget,
    explicit: Mapping[str, tuple[int, ...] | None],
    torch_module: torch.nn.Module | None,
    torch_inputs: Callable[[], tuple | None],
) -> list[str]:
    """Set LayerInfo.flatten on every Linear fed by a channels-first flatten; returns notes.

    Order of evidence: ``explicit`` (the caller's flatten=), the Flax twin's jaxpr (free: it came
    with the abstract init), then a torch trace -- only when the jaxpr could not decide (or there
    is no Flax trace) and some torch layer produces channels-first values. Without a torch module
    an undecided Dense is refused (FlattenOrderError), never ported in a guessed order.
    """
    notes: list[str] = []
    undecided: list[str] = []
    traced: dict | None = None

    def torch_found() -> dict:
        nonlocal traced
        if traced is None:
            inputs = torch_inputs()
            traced = {}
            if _could_flatten_channels_first(torch_module, inputs):
                from weight_port.flatten import find_flattened_linears  # torch.fx: the torch side only

                traced = find_flattened_linears(copy.deepcopy(torch_module), inputs) or {}
        return traced

    def has_conv() -> bool:  # lazily: the Flax rule table imports flax.nnx
        return any((r := flax_rule_for(type(m))) is not None and r.name.startswith("conv")
                   for m in target.modules.values())

    for layer in layers:
        if layer.rule.name != "linear":
            continue
        tp, fp = layer.info.torch_path, layer.info.flax_path
        where = f"torch {tp or '<root>'} -> flax {flax_path_str(fp)}"
        finding = target.flatten.get(fp)
        if tp in explicit:
            shape, how = explicit[tp], "given by flatten="
        elif finding is not None and finding.decided:
            shape, how = finding.permute, f"flax jaxpr: {finding.reason}"
        elif torch_module is not None and (finding is not None or target.order is None):
            shape, how = torch_found().get(tp), "torch trace"
            if shape is None and finding is None:
                continue
        elif finding is not None:
            undecided.append(f"{where} ({finding.reason})")
            continue
        elif target.order is None and has_conv():
            undecided.append(f"{where} (the Flax twin was not traced: pass example_input)")
            continue
        else:
            continue
        w = layer.own_shapes.get("weight")
        if shape is not None and (w is None or len(w) != 2 or math.prod(shape) != w[1]):
            continue  # a Dense of another width: the shape check of the port reports it
        layer.info = replace(layer.info, flatten=tuple(shape) if shape is not None else None)
        change = f"input features permuted from torch {tuple(shape)}" if shape is not None else "order kept"
        notes.append(f"{where}: flatten, {change} ({how})")
    if undecided:
        raise FlattenOrderError(undecided)
    return notes


def decide_transpose_kernels(layers: list[PlannedLayer], target: FlaxTarget) -> None:
    """Without a Flax module, tell a kernel stored [.., out, in] (ConvTranspose with
    transpose_kernel=True, HF FlaxConv1D) from [.., in, out] by its shape; refuse
    (KernelLayoutError) when in == out makes them alike. A grouped transposed conv has one
    layout, [*k, in/g, out]: refuse (GroupedKernelLayoutError) any other, with or without the module."""
    alike, grouped = [], []
    for layer in layers:
        info = layer.info
        if layer.rule.name not in ("conv_transpose", "conv1d") or "weight" not in layer.own_shapes:
            continue
        leaf = target.shapes.get(("params", *info.flax_path, "kernel"))
        if layer.rule.name == "conv_transpose" and conv_groups(info) > 1:
            # Grouped: one layout only, GroupedConvTranspose's [*k, in/g, out]. A Flax module that
            # transposes its kernel itself, or (without the module) any other kernel shape, is
            # refused by name: read as [*k, in/g, out] it would be reshaped into a wrong tensor.
            g, (cin, cout_g) = conv_groups(info), layer.own_shapes["weight"][:2]
            where = f"torch {info.torch_path or '<root>'} (groups={g}) -> flax {flax_path_str(info.flax_path)}"
            if info.flax_module is not None and flax_transposes_kernel(info):
                grouped.append(f"{where} is a ConvTranspose(transpose_kernel=True)")
            elif leaf is not None and tuple(leaf.shape[-2:]) != (cin // g, cout_g * g):
                grouped.append(f"{where} kernel {tuple(leaf.shape)}, expected [*k, in/g, out] = "
                               f"[.., {cin // g}, {cout_g * g}]")
            continue
        if info.flax_module is not None or leaf is None:
            continue  # the module decides; missing leaves are reported later
        cin, cout = layer.own_shapes["weight"][:2]
        io = tuple(leaf.shape[-2:])
        if cin == cout:
            alike.append(f"torch {info.torch_path or '<root>'} -> flax {flax_path_str(info.flax_path)} "
                         f"(in = out = {cin})")
        elif io in ((cin, cout), (cout, cin)):
            layer.info = replace(info, transpose_kernel=io == (cout, cin))
    if grouped:
        raise GroupedKernelLayoutError(grouped)
    if alike:
        raise KernelLayoutError(alike)


def drop_computed_tables(layers: list[PlannedLayer], target: FlaxTarget, torch_module: torch.nn.Module,
                         dropped_defaults: dict[str, np.ndarray]) -> list[str]:
    """Frozen torch parameters (requires_grad=False) that the Flax twin computes instead of
    storing -- the sinusoid position tables of Pegasus, Marian, RoFormer -- are not ported: a
    frozen parameter with no Flax leaf is dropped (refilled from the torch module on the way
    back), one note each. A frozen parameter the twin does store (Whisper's) is ported as usual;
    a buffer or a trainable parameter without a leaf stays an error (it may be real state)."""
    frozen = {n: p for n, p in torch_module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    notes = []
    for layer in layers:
        drop = [t for t in layer.rule.tensors if layer.torch_key(t.torch_name) in frozen
                and layer.flax_leaf(t.collection, t.flax_name) not in target.shapes]
        if not drop:
            continue
        names = tuple(t.torch_name for t in drop)
        for n in names:
            key = layer.torch_key(n)
            dropped_defaults[key] = to_numpy(frozen[key]).copy()
            layer.own_shapes.pop(n, None)
            notes.append(f"torch {key}: frozen (requires_grad=False) and the Flax twin has no leaf for it "
                         "(it computes the table): not ported, refilled from the torch module on the way back")
        keep = tuple(t for t in layer.rule.tensors if t.torch_name not in names)
        layer.rule = replace(layer.rule, tensors=keep, dropped=(*layer.rule.dropped, *names))
    return notes


def lookalike_notes(layers: list[PlannedLayer]) -> list[str]:
    """One note per layer ported into a Flax module of no registered class by the rule of the kind
    whose variables it has exactly (weight_port.lookalike)."""
    return [lookalike_note(layer.info.torch_path, layer.info.torch_type, layer.rule, layer.info.flax_path,
                           layer.info.flax_module)
            for layer in layers if layer.rule.name in LOOKALIKE_KINDS and is_lookalike(layer.info.flax_module)]


def unpaired_hint(layers: list[PlannedLayer], target: FlaxTarget) -> str:
    """When torch layers found no Flax module of their kind and Flax modules of no known class are
    left over: name both classes and the ``register_rule`` call that would teach the port the
    Flax class (matched to a torch layer whose converted shapes it has, per collection)."""
    unpaired = [layer for layer in layers if layer.matched == "unpaired" and layer.info.torch_type is not None
                and layer.rule.tensors]
    if not unpaired:
        return ""
    claimed = {layer.info.flax_path for layer in layers if layer.matched != "unpaired"}
    unknown = {p: m for p, m in target.modules.items()
               if p not in claimed and flax_rule_for(type(m)) is None and module_leaves(target.shapes, p)}
    hints, seen = [], set()
    for path, module in unknown.items():
        if type(module) in seen:
            continue
        leaves = module_leaves(target.shapes, path)
        shapes = sorted((c, s) for (c, _), s in leaves.items())
        for layer in unpaired:
            info = replace(layer.info, flax_path=path, flax_module=module)
            maps = layer.rule.by_torch_name()
            want = sorted((maps[n].collection, converted_shape(layer.rule, n, s, info))
                          for n, s in layer.own_shapes.items() if n in maps)
            if want == shapes:
                seen.add(type(module))
                n = sum(isinstance(m, type(module)) for m in unknown.values())
                hints.append(
                    f"torch {layer.info.torch_path or '<root>'} ({layer.info.torch_type.__name__}) found no Flax "
                    f"module of its kind ({layer.rule.name}); flax {'/'.join(path)} ({type(module).__name__}"
                    f"{f', and {n - 1} more of that class' if n > 1 else ''}) has its shapes but is of no "
                    f"known kind (variables {', '.join('/'.join(k) for k in leaves)}): if {type(module).__name__} "
                    f"is a {KIND_CLASS.get(layer.rule.name, layer.rule.name)} layer, teach the port: "
                    + register_rule_call(type(module), layer.rule, layer.own_shapes, leaves, info))
                break
    return "; ".join(hints)


def tied_aliases(named: Iterable[tuple[str, object]]) -> dict[str, str]:
    """{alias: canonical} for torch tensors sharing storage (same data pointer, shape, strides).

    torch's state_dict lists a tied parameter under every name; the first name is canonical."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in named:
        if torch is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        ident = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def fold_tied(layers: list[PlannedLayer], aliases: Mapping[str, str], target: FlaxTarget) -> dict[str, str]:
    """Drop alias tensors that have no Flax leaf of their own (the twin uses one leaf for both,
    e.g. ``embed.attend`` as the LM head); returns {alias: canonical} for those. An alias that has
    its own Flax leaf (an untied twin) is ported like any tensor."""
    tied: dict[str, str] = {}
    for layer in list(layers):
        keep = []
        for tmap in layer.rule.tensors:
            key = layer.torch_key(tmap.torch_name)
            if key in aliases and layer.flax_leaf(tmap.collection, tmap.flax_name) not in target.shapes:
                tied[key] = aliases[key]
                layer.own_shapes.pop(tmap.torch_name, None)
            else:
                keep.append(tmap)
        if len(keep) == len(layer.rule.tensors):
            continue
        if not keep and not layer.rule.dropped:
            layers.remove(layer)
        else:
            layer.rule = Rule(tuple(keep), layer.rule.dropped, layer.rule.check, layer.rule.name)
    return tied


__all__ = ["decide_flatten", "decide_transpose_kernels", "drop_computed_tables", "fold_tied",
           "lookalike_notes", "tied_aliases", "unpaired_hint"]
