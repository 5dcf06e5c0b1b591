"""Flax layers recognised by their variables, and what to say when a layer is of no known kind.

An independent Flax port often has its own copy of a Flax layer class (a ResNet's ``BatchNorm``
with Flax's exact variables ``scale``/``bias`` and ``mean``/``var``). The port knows layer kinds
by class; such a copy is of no registered class. A Flax module whose variables are *exactly*
those a known kind's rule maps -- same collections, names and converted shapes, nothing more,
no submodule with variables -- is handled by that kind's rule, with a note in the plan. Only
kinds whose layout is fully told by their variable names qualify: a transposed conv's kernel
layout hides in a module attribute (``transpose_kernel``), HF FlaxConv1D's in its class, so those
never match by look. Without a torch module (the layer kind must come from the Flax side), two
kinds that both fit and convert differently (a Dense and a Conv on a square 4-D kernel) are
refused, never guessed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from weight_port.rules import (
    BATCH_NORM, CONV, EMBEDDING, GROUP_NORM, INSTANCE_NORM, LINEAR, NORM, RMS_NORM, LayerInfo, Rule,
    converted_shape, flax_rule_for,
)

Path = tuple[str, ...]
# Kinds recognised by their variables; NORM first of the three norms that store the same tensors.
LOOKALIKE_RULES: tuple[Rule, ...] = (LINEAR, CONV, BATCH_NORM, NORM, GROUP_NORM, INSTANCE_NORM, EMBEDDING, RMS_NORM)
LOOKALIKE_KINDS = frozenset(r.name for r in LOOKALIKE_RULES)
# How a note or error calls each kind (the Flax class a look-alike copies).
KIND_CLASS = {"linear": "Dense", "conv": "Conv", "batch_norm": "BatchNorm", "norm": "LayerNorm",
              "group_norm": "GroupNorm", "instance_norm": "InstanceNorm", "embedding": "Embed",
              "rms_norm": "RMSNorm"}


def module_leaves(shapes: Mapping[tuple, object], path: Path) -> dict[tuple[str, str], tuple[int, ...]] | None:
    """{(collection, leaf name): shape} of the variables directly in module ``path``; None when a
    submodule of it has variables too (a container, not a layer)."""
    own: dict[tuple[str, str], tuple[int, ...]] = {}
    n = len(path)
    for leaf, spec in shapes.items():
        if tuple(leaf[1:1 + n]) != path or len(leaf) < n + 2:
            continue
        if len(leaf) > n + 2:
            return None
        own[(leaf[0], leaf[-1])] = tuple(spec.shape)
    return own


def _converted(rule: Rule, name: str, shape: tuple[int, ...], info: LayerInfo) -> tuple[int, ...] | None:
    """The Flax shape ``rule`` makes of a torch tensor, None when the rule cannot take that rank."""
    try:
        return converted_shape(rule, name, shape, info)
    except ValueError:  # e.g. a conv kernel's transpose of a 1-D norm weight
        return None


def looks_like(rule: Rule, own_shapes: Mapping[str, tuple[int, ...]], info: LayerInfo,
               shapes: Mapping[tuple, object], path: Path) -> bool:
    """Whether Flax module ``path`` has exactly the variables ``rule`` makes of ``own_shapes``."""
    if rule.name not in LOOKALIKE_KINDS:
        return False
    leaves = module_leaves(shapes, path)
    maps = rule.by_torch_name()
    if not leaves or not set(own_shapes) <= set(maps) | set(rule.dropped):
        return False
    want = {(maps[n].collection, maps[n].flax_name): _converted(rule, n, s, info)
            for n, s in own_shapes.items() if n in maps}
    return want == leaves


def is_lookalike(flax_module) -> bool:
    """A Flax module of a class no rule is registered for (so only its variables can tell)."""
    return flax_module is not None and flax_rule_for(type(flax_module)) is None


def _probe(rule: Rule, own_shapes: Mapping[str, tuple[int, ...]], info: LayerInfo) -> list[np.ndarray]:
    # the rule's layout change on a small array of each tensor's rank with distinct axis lengths
    out = []
    for n, s in own_shapes.items():
        tmap = rule.by_torch_name().get(n)
        if tmap is not None:
            dims = (2, 3, 5, 7, 11, 13)[:len(s)]
            out.append(np.asarray(tmap.to_flax(np.arange(math.prod(dims)).reshape(dims), info)))
    return out


def lookalike_rule(own_shapes: Mapping[str, tuple[int, ...]], info: LayerInfo,
                   shapes: Mapping[tuple, object], path: Path) -> tuple[Rule | None, list[str]]:
    """Without a torch module: (the look-alike kind's rule, []) for Flax module ``path``, or
    (None, [kinds that fit but convert differently]) -- ([] when none fits)."""
    # the kind with the fewest tensors first: a LayerNorm's weight and bias also fit a BatchNorm
    # whose running statistics are absent, but that is not what the module is
    fits = sorted((r for r in LOOKALIKE_RULES if looks_like(r, own_shapes, info, shapes, path)),
                  key=lambda r: len(r.tensors))
    if not fits:
        return None, []
    ref = _probe(fits[0], own_shapes, info)
    if all(len(p := _probe(r, own_shapes, info)) == len(ref) and all(np.array_equal(a, b) for a, b in zip(p, ref))
           for r in fits[1:]):
        return fits[0], []
    return None, [KIND_CLASS[r.name] for r in fits]


def lookalike_note(torch_path: str, torch_type: type | None, rule: Rule, flax_path: Path, flax_module) -> str:
    leaves = ", ".join(f"{t.collection}/{t.flax_name}" for t in rule.tensors)
    src = f"torch {torch_path or '<root>'}" + (f" ({torch_type.__name__})" if torch_type is not None else "")
    return (f"flax {'/'.join(flax_path) or '<root>'} ({type(flax_module).__name__}) is of no registered class "
            f"but has exactly a {KIND_CLASS.get(rule.name, rule.name)}'s variables ({leaves}): {src} ported "
            f"by the {rule.name} rule")


# Other spellings of a kind's Flax variable names (Haiku, Keras, TF ports), to tell apart
# variables of one shape in the register_rule template.
_SPELLINGS = {
    "scale": ("scale", "gamma", "weight", "w", "g"), "bias": ("bias", "beta", "b", "offset"),
    "mean": ("mean", "avg", "moving_mean", "running_mean", "mu"),
    "var": ("var", "variance", "moving_var", "moving_variance", "running_var", "v"),
    "kernel": ("kernel", "w", "weight"), "embedding": ("embedding", "embeddings", "table", "weight", "w"),
}


def register_rule_call(flax_cls: type, rule: Rule, own_shapes: Mapping[str, tuple[int, ...]],
                       leaves: Mapping[tuple[str, str], tuple[int, ...]], info: LayerInfo) -> str:
    """The ``register_rule`` call that would teach the port ``flax_cls`` as ``rule``'s kind: the
    kind's rule with each torch tensor renamed to the Flax variable of its collection with the
    converted shape, in order ('<leaf>' where none fits: a template to check, never acted on)."""
    import weight_port.rules as rules

    free = dict(leaves)
    names = {}
    for tmap in rule.tensors:
        if tmap.torch_name not in own_shapes:
            continue
        want = _converted(rule, tmap.torch_name, own_shapes[tmap.torch_name], info)
        fits = [k for k, s in free.items() if k[0] == tmap.collection and s == want]
        # several of one shape (a norm's scale and bias): the usual spellings of the kind's name
        usual = [k for k in fits if k[1].lower() in _SPELLINGS.get(tmap.flax_name, ())]
        hit = (usual or fits)[0] if len(usual or fits) == 1 else None
        if hit is not None:
            del free[hit]
            names[tmap.torch_name] = hit[1]
        else:
            names[tmap.torch_name] = f"<{'|'.join(k[1] for k in fits) or 'leaf'}>"
    const = next((n for n, v in vars(rules).items() if v is rule and n.isupper()), None)
    base = f"weight_port.rules.{const}" if const else f"<the {rule.name} rule>"
    return f"weight_port.register_rule({flax_cls.__name__}, weight_port.rules.renamed({base}, {names!r}))"


__all__ = ["KIND_CLASS", "LOOKALIKE_KINDS", "LOOKALIKE_RULES", "is_lookalike", "lookalike_note", "lookalike_rule",
           "looks_like", "module_leaves", "register_rule_call"]
