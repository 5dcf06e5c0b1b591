"""The rule table: a PartitionSpec for every leaf of a port plan's Flax variables.

Defaults are decided by the port rule that produced the leaf (weight_port's layer kind and the
rule's Flax tensor name), never by the leaf's rank or name suffix, and the Flax layouts below are
the ones those rules write:

    linear     kernel [in, out]               tp: out over "model" (column-parallel)
    conv       kernel [*k, in/groups, out]    tp: out channels over "model"
    embedding  embedding [vocab, features]    tp: features over "model" (the lookup stays local)
    multihead_attention  {query,key,value}/kernel [in, heads, head_dim]   tp: heads over "model"
                         out/kernel [heads, head_dim, out]                tp: heads over "model"

fsdp: every weight above, and conv_transpose / conv1d kernels (whose in/out order depends on the
twin, so no tp rule), get their largest still-unsharded axis that "data" divides, over "data".
Biases, norm scales and BatchNorm statistics stay replicated (small; a rule can shard them).
User rules (``regex=spec``) match the whole leaf path ``collection/module/.../name`` and win over
the defaults, first match first. An axis that does not divide stays replicated, with a note.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from parity.sharding._mesh import DATA, MODEL, ShardingError

STYLES = ("fsdp", "tp", "fsdp+tp")

# (rule kind, Flax tensor name) -> the axis tensor parallelism splits over "model"
TENSOR_PARALLEL: dict[tuple[str, str], int] = {
    ("linear", "kernel"): -1,
    ("conv", "kernel"): -1,
    ("embedding", "embedding"): -1,
    **{("multihead_attention", f"{n}/kernel"): 1 for n in ("query", "key", "value")},
    ("multihead_attention", "out/kernel"): 0,
}
# the weights FSDP shards over "data" (any axis is correct for FSDP: it only splits storage)
FSDP_WEIGHTS = frozenset(TENSOR_PARALLEL) | {("conv_transpose", "kernel"), ("conv1d", "kernel")}

Leaf = tuple[str, ...]
Dim = tuple[str, ...]  # the mesh axes one tensor dimension is split over; () = whole


@dataclass(frozen=True)
class ShardRule:
    """``regex=spec``: leaves whose path the regex matches in full get ``spec`` (one entry per
    leading dimension, each whole or split over one or more mesh axes)."""

    pattern: str
    spec: tuple[Dim, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> "ShardRule":
        """``'.*/kernel=None,model'``, ``'embed/embedding=data+model'`` (two axes on one dimension),
        ``'.*bias='`` (replicated). The spec is after the last '='."""
        pattern, eq, spec = str(text).rpartition("=")
        if not eq or not pattern:
            raise ShardingError(f"--shard-rule {text!r}: expected REGEX=SPEC, e.g. '.*/kernel=None,model'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ShardingError(f"--shard-rule {text!r}: bad regex ({exc})") from None
        dims = []
        for entry in (spec.split(",") if spec.strip() else []):
            entry = entry.strip()
            axes = () if entry in ("None", "none", "") else tuple(a.strip() for a in entry.split("+"))
            if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", a) for a in axes):
                raise ShardingError(f"--shard-rule {text!r}: {entry!r} is not None or mesh axes joined by '+'")
            dims.append(axes)
        return cls(pattern, tuple(dims), text)


@dataclass(frozen=True)
class ShardOptions:
    """How to shard: a default style (STYLES) and the user's rules (ShardRule or 'regex=spec')."""

    style: str = "fsdp+tp"
    rules: tuple = ()

    def __post_init__(self):
        if self.style not in STYLES:
            raise ShardingError(f"--shard-style {self.style!r}: choose one of {', '.join(STYLES)}")
        object.__setattr__(self, "rules", tuple(r if isinstance(r, ShardRule) else ShardRule.parse(r)
                                                for r in self.rules))


@dataclass(frozen=True)
class Note:
    """A finding of the placement: where (a leaf path or an input) and what (a finding is data)."""

    where: str
    text: str

    def to_dict(self) -> dict:
        return {"where": self.where, "text": self.text}


def _kinds(plan) -> dict[Leaf, tuple[str, str]]:
    """{Flax leaf: (port rule kind, the rule's Flax tensor name)} of every leaf a layer produces."""
    return {layer.flax_leaf(t.collection, t.flax_name): (layer.rule.name, t.flax_name)
            for layer in plan.layers for t in layer.rule.tensors}


def _divides(shape, dim: int, axes: Dim, mesh) -> bool:
    return shape[dim] % math.prod(mesh.shape[a] for a in axes) == 0


def _default(leaf_name: str, kind: tuple[str, str] | None, shape, mesh, style: str, notes: list[Note]) -> list[Dim]:
    dims: list[Dim] = [()] * len(shape)
    if kind is None:
        return dims
    if "tp" in style.split("+") and mesh.shape.get(MODEL, 1) > 1 and kind in TENSOR_PARALLEL:
        d = TENSOR_PARALLEL[kind] % len(shape)
        if _divides(shape, d, (MODEL,), mesh):
            dims[d] = (MODEL,)
        else:
            notes.append(Note(leaf_name, f"tp: axis {d} of {list(shape)} is not divisible by "
                                         f"{MODEL}={mesh.shape[MODEL]}: replicated over {MODEL}"))
    if "fsdp" in style.split("+") and mesh.shape.get(DATA, 1) > 1 and kind in FSDP_WEIGHTS:
        free = [d for d in range(len(shape)) if not dims[d] and _divides(shape, d, (DATA,), mesh)]
        if free:
            dims[max(free, key=lambda d: (shape[d], -d))] = (DATA,)  # the largest; the first of equals
        else:
            notes.append(Note(leaf_name, f"fsdp: no free axis of {list(shape)} is divisible by "
                                         f"{DATA}={mesh.shape[DATA]}: replicated over {DATA}"))
    return dims


def _by_rule(rule: ShardRule, leaf_name: str, shape, mesh, notes: list[Note]) -> list[Dim]:
    if len(rule.spec) > len(shape):
        raise ShardingError(f"--shard-rule {rule.text!r}: {len(rule.spec)} entries for {leaf_name}, "
                            f"which has {len(shape)} dimensions {list(shape)}")
    used = [a for axes in rule.spec for a in axes]
    missing = [a for a in used if a not in mesh.shape]
    if missing:
        raise ShardingError(f"--shard-rule {rule.text!r}: the mesh has no axis {missing[0]!r} "
                            f"(its axes: {', '.join(mesh.shape)})")
    if len(set(used)) != len(used):
        raise ShardingError(f"--shard-rule {rule.text!r}: a mesh axis may split one dimension only")
    dims: list[Dim] = list(rule.spec) + [()] * (len(shape) - len(rule.spec))
    for d, axes in enumerate(dims):
        if axes and not _divides(shape, d, axes, mesh):
            notes.append(Note(leaf_name, f"rule {rule.text!r}: axis {d} of {list(shape)} is not divisible by "
                                         f"{'*'.join(f'{a}={mesh.shape[a]}' for a in axes)}: replicated there"))
            dims[d] = ()
    return dims


def plan_specs(plan, mesh, options: ShardOptions) -> tuple[dict[Leaf, tuple[Dim, ...]], list[Note]]:
    """{leaf: per-dimension mesh axes} for every leaf of ``plan`` (a weight_port.PortPlan), and the
    notes (axes that did not divide). ShardingError when a user rule is malformed for a leaf it
    matches, or matches no leaf at all."""
    kinds = _kinds(plan)
    notes: list[Note] = []
    specs: dict[Leaf, tuple[Dim, ...]] = {}
    matched = {r.text: 0 for r in options.rules}
    for leaf, struct in plan.target.shapes.items():
        name, shape = "/".join(leaf), tuple(struct.shape)
        rule = next((r for r in options.rules if re.fullmatch(r.pattern, name)), None)
        if rule is not None:
            matched[rule.text] += 1
            specs[leaf] = tuple(_by_rule(rule, name, shape, mesh, notes))
        else:
            specs[leaf] = tuple(_default(name, kinds.get(leaf), shape, mesh, options.style, notes))
    unused = [t for t, n in matched.items() if not n]
    if unused:
        some = ", ".join("/".join(leaf) for leaf in list(plan.target.shapes)[:4])
        raise ShardingError(f"--shard-rule {unused[0]!r} decides no parameter (it matches none, or only ones an "
                            f"earlier rule took; a regex matches the whole path, e.g. {some}{', ...' if len(plan.target.shapes) > 4 else ''})")
    return specs, notes


__all__ = ["FSDP_WEIGHTS", "Note", "STYLES", "ShardOptions", "ShardRule", "TENSOR_PARALLEL", "plan_specs"]
