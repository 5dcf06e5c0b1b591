"""Pair each torch layer with its Flax module: rename, naming rules, then execution order.

Names first (weight_port.matching: the fixed forms, then a walk of the Flax module tree). Layers
names cannot pair (Flax auto-names ``Dense_0``) are paired structurally: torch layers in the
order the torch forward first calls them, against the unclaimed Flax modules in the order the
twin first calls them, each with the first module of the same layer kind whose leaves have the
converted shapes (a Flax class of no registered kind counts when its variables are exactly the
kind's: weight_port.lookalike). Registration order (torch ``__init__``)
is never trusted: a correct twin may register layers in another order than it runs them. When an
order is not traced (no example input, no torch module) a pairing is made only if exactly one
module fits; otherwise AmbiguousPairingError names both candidates.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace


from weight_port.errors import AmbiguousPairingError
from weight_port.flax_tree import FlaxTarget
from weight_port.lookalike import is_lookalike, lookalike_rule, looks_like
from weight_port.matching import Rename, apply_rename, candidate_paths, tree_paths
from weight_port.naming import flax_path_str
from weight_port.rules import LayerInfo, Rule, converted_shape, direct_rule, flax_rule_for

Leaf = tuple[str, ...]  # (collection, *module_path, leaf_name)


@dataclass
class PlannedLayer:
    info: LayerInfo
    rule: Rule
    # torch tensor name -> shape, as the source layer has it (used for structural matching)
    own_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    matched: str = "name"  # how the Flax path was found (printed by PortPlan.describe)
    # Other torch paths of the same module object (registered under several names, e.g. Pegasus'
    # ``shared`` is also ``encoder.embed_tokens``): tried by name too; ported once, under info.torch_path.
    aliases: tuple[str, ...] = ()

    def torch_key(self, name: str) -> str:
        return f"{self.info.torch_path}.{name}" if self.info.torch_path else name

    def flax_leaf(self, collection: str, name: str) -> Leaf:
        return (collection, *self.info.flax_path, *name.split("/"))  # name may be a sub-path


def _leaves_of(rule: Rule, names, path: tuple[str, ...]) -> list[Leaf]:
    by_name = rule.by_torch_name()
    return [(by_name[n].collection, *path, *by_name[n].flax_name.split("/")) for n in names if n in by_name]


def _direct_rule_at(names, path, target: FlaxTarget) -> Rule:
    """A direct-copy rule; each tensor goes to the collection that has its leaf ("params" if none)."""
    colls = sorted(target.collections(), key=lambda c: c != "params")
    return direct_rule({n: next((c for c in colls if (c, *path, n) in target.shapes), "params")
                        for n in names})


def _fits(layer: PlannedLayer, path: tuple[str, ...], target: FlaxTarget, *, shapes: bool) -> bool:
    info = replace(layer.info, flax_path=path, flax_module=target.modules.get(path))
    leaves = _leaves_of(layer.rule, layer.own_shapes, path)
    if not leaves or any(leaf not in target.shapes for leaf in leaves):
        return False
    if not shapes:
        return True
    return all(
        tuple(target.shapes[leaf].shape) == converted_shape(layer.rule, n, s, info)
        for n, s, leaf in zip(layer.own_shapes, layer.own_shapes.values(), leaves)
    )


def _flax_paths_in_order(target: FlaxTarget) -> list[tuple[str, ...]]:
    """Flax module paths owning leaves: traced call order first, then creation order."""
    owning: dict[tuple[str, ...], None] = {}
    for leaf in target.shapes:
        owning.setdefault(tuple(leaf[1:-1]), None)
    called = [p for p in (target.order or ()) if p in owning]
    return called + [p for p in owning if p not in set(called)]


def rule_at(rule: Rule, flax_module) -> Rule:
    """The torch layer's rule, or -- when the Flax module's class has a rule of its own registered
    for the same kind (``register_rule(MyBatchNorm, renamed(BATCH_NORM, {...}))``) -- that one,
    which says how this Flax class stores the kind's tensors. Built-in Flax classes share the
    torch rules, so only a user's registration changes anything."""
    frule = flax_rule_for(type(flax_module)) if flax_module is not None else None
    if frule is None or frule is rule or not rule.name or frule.name != rule.name:
        return rule
    return replace(frule, dropped=tuple(dict.fromkeys(rule.dropped + frule.dropped)),
                   children=rule.children, check=frule.check or rule.check)


def _same_kind(rule: Rule, flax_module) -> bool:
    if flax_module is None:
        return True  # target read off variables: no types, shapes decide
    frule = flax_rule_for(type(flax_module))
    return frule is not None and (frule is rule or (frule.name and frule.name == rule.name))


def _fit_rule(layer: PlannedLayer, p: tuple[str, ...], target: FlaxTarget):
    """(rule, own shapes) with which ``layer`` fits Flax module ``p`` by kind and shapes, or None."""
    rule = layer.rule
    module = target.modules.get(p)
    if layer.info.torch_type is None and rule.name == "direct" and p in target.modules:
        # no torch module: the layer type is the Flax module's, verified by names and shapes
        rule = flax_rule_for(type(module)) or lookalike_rule(layer.own_shapes, layer.info, target.shapes, p)[0] or rule
        if not set(layer.own_shapes) <= set(rule.by_torch_name()) | set(rule.dropped):
            return None
    elif is_lookalike(module):
        # a Flax class of no registered kind: the torch layer's kind if it has exactly its variables
        if not looks_like(rule, layer.own_shapes, replace(layer.info, flax_path=p, flax_module=module),
                          target.shapes, p):
            return None
    elif not _same_kind(rule, module):
        return None
    else:
        rule = rule_at(rule, module)
    own = {n: s for n, s in layer.own_shapes.items() if n not in rule.dropped}
    return (rule, own) if _fits(PlannedLayer(layer.info, rule, own), p, target, shapes=True) else None


def resolve_paths(
    layers: list[PlannedLayer],
    target: FlaxTarget,
    sequential: set[str],
    rename: Rename,
    torch_order: Callable[[], Sequence[str] | None] | None,
) -> list[str]:
    """Give each layer its Flax path; returns one note per pairing not made by name.

    torch_order: traces the torch forward's call order; called only if names leave a layer unpaired.
    """
    claimed: set[tuple[str, ...]] = set()
    unresolved: list[tuple[PlannedLayer, tuple[str, ...]]] = []
    prefixes = {leaf[1:i] for leaf in target.shapes for i in range(2, len(leaf))}

    def by_name(torch_path: str) -> list[tuple[str, ...]]:
        cands = candidate_paths(torch_path, sequential)
        if "/" in torch_path:  # a rename to a Flax path is taken literally
            return cands
        return cands + [p for p in tree_paths(torch_path, prefixes) if p not in cands]

    def named_fit(layer: PlannedLayer, c: tuple[str, ...]) -> bool:
        if c in claimed:
            return False
        at = PlannedLayer(layer.info, rule_at(layer.rule, target.modules.get(c)), layer.own_shapes)
        return _fits(at, c, target, shapes=False)

    for layer in layers:
        renamed = apply_rename(layer.info.torch_path, rename)
        cands = by_name(renamed)
        hit = next((c for c in cands if named_fit(layer, c)), None)
        via = None
        for alias in layer.aliases if hit is None else ():  # the twin may use another of its names
            hit = next((c for c in by_name(apply_rename(alias, rename)) if named_fit(layer, c)), None)
            if hit is not None:
                via = alias
                break
        if hit is None:
            unresolved.append((layer, cands[0]))
            continue
        claimed.add(hit)
        layer.rule = rule_at(layer.rule, target.modules.get(hit))
        layer.matched = ("rename" if renamed != layer.info.torch_path else "name") + (
            f" (of its alias {via})" if via else "")
        _set_path(layer, hit, target)
    order = torch_order() if unresolved and torch_order is not None else None
    rank = {p: i for i, p in enumerate(order)} if order is not None else None
    if rank is not None:  # execution order; layers the forward never called go last
        unresolved.sort(key=lambda lf: rank.get(lf[0].info.torch_path, len(rank)))
    free = [p for p in _flax_paths_in_order(target) if p not in claimed]
    flax_called = set(target.order or ())
    notes = []
    for layer, fallback in unresolved:
        fits = [(p, fr) for p in free if (fr := _fit_rule(layer, p, target)) is not None]
        if not fits:
            _set_path(layer, fallback, target)
            layer.matched = "unpaired"
            continue
        hit, (layer.rule, layer.own_shapes) = fits[0]
        traced = (rank is not None and layer.info.torch_path in rank and hit in flax_called)
        if len(fits) > 1 and not traced:
            why = ("the torch forward was not traced" if rank is None or layer.info.torch_path not in rank
                   else "the Flax twin's calls were not traced")
            raise AmbiguousPairingError(layer.info.torch_path,
                                        [flax_path_str(p) for p, _ in fits[:2]], why)
        layer.matched = ("execution order (traced torch forward and flax call)" if traced
                         else "only module of its kind and shapes (order not traced)")
        free.remove(hit)
        _set_path(layer, hit, target)
        notes.append(f"torch {layer.info.torch_path or '<root>'} -> flax {flax_path_str(hit)}: "
                     f"{layer.matched}")
    return notes


def _set_path(layer: PlannedLayer, path: tuple[str, ...], target: FlaxTarget) -> None:
    layer.info = replace(layer.info, flax_path=path, flax_module=target.modules.get(path))
    if layer.rule.name == "direct":  # collections depend on where the leaves are
        layer.rule = _direct_rule_at(layer.own_shapes, path, target)


__all__ = ["PlannedLayer", "converted_shape", "resolve_paths"]  # converted_shape: weight_port.rules
