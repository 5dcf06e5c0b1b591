"""Which layout each input, output and per-layer activation has (declared, or inferred when only
one answer is possible); the conversions themselves live in weight_port.layout.

Inputs: the caller's ``input_layout`` (one string for every float leaf, or one per leaf), else
integer leaves (ids, masks) as-is, else the kind of torch layer that first consumes the leaf
(Conv -> channels-first, Linear/Embedding/LayerNorm -> as-is), else a tensor with no spatial axis
([N, F]) as-is, else a LayoutError naming the leaf and the flag.
Outputs: ``output_layout``, else the one layout that makes the torch and Flax shapes agree, else
the kind of layer that produced the tensor, else a LayoutError naming the leaf and the flag.
Activations inside the model: ``output_layout`` entries that name a layer by its torch module
path (``split_output_spec``), else the one layout in which the torch and Flax shapes agree (what
the tensor is: HF ResNetModel's convolutions return channels-first maps on the Flax side too),
else the producing layer's kind (weight_port.layout.kind_layout), pass-through kinds inheriting
their input's layout (``resolve``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from typing import TYPE_CHECKING

try:
    import torch
except ImportError:  # a Flax-only machine (parity verify) resolves recorded layouts only
    torch = None

from parity.runtime.tree import flatten, input_paths, keystr
from weight_port import first_consumers
from weight_port.layout import (AS_IS, CHANNELS_FIRST, INHERIT, LayoutError, check_layout,
                                consumer_layout, fitting_layouts, flax_shape, kind_layout, layout_from_shapes)

if TYPE_CHECKING:
    from parity.runtime.torch_runner import TorchCall

LayoutSpec = str | Mapping | Sequence | None

# Autograd nodes (names without the trailing version digit) that keep every element where it is,
# so a tensor computed through them has the layout of the tensors they were computed from.
_ELEMENTWISE = {f"{op}Backward" for op in (
    "Add", "Sub", "Mul", "Div", "Neg", "Tanh", "Relu", "Sigmoid", "Gelu", "Silu", "Exp", "Log", "Pow",
    "Sqrt", "Rsqrt", "Abs", "Clamp", "Maximum", "Minimum", "ToCopy", "Clone", "Alias", "LeakyRelu",
    "Elu", "Softplus", "Hardtanh", "Where", "MulScalar", "AddScalar")}


def declared(spec: LayoutSpec, paths: Sequence[str], *, root: str, flag: str) -> dict[str, str]:
    """{path: layout} for the leaves the caller declared. spec: one string (every leaf), a dict
    keyed by leaf path (``input[1]``, ``out.logits``) or by the key/field name below the root
    (``logits``), or a tuple/list/dict mirroring the tree with a string per leaf."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        check_layout(spec, flag)
        return {p: spec for p in paths}
    mirrored = {p: v for p, v in flatten(spec, root).items() if isinstance(v, str)}
    if not isinstance(spec, Mapping) or set(mirrored) <= set(paths) and mirrored:
        table = mirrored
    else:
        table = {}
        for key, value in spec.items():
            hits = [p for p in paths if p == key or p.endswith((f".{key}", f"[{key!r}]", f"[{key}]"))]
            if not hits:
                raise LayoutError(f"{flag}: {key!r} names no leaf; leaves are {', '.join(paths)}")
            table.update({h: value for h in hits})
    unknown = set(table) - set(paths)
    if unknown:
        raise LayoutError(f"{flag}: {', '.join(sorted(unknown))} name no leaf; leaves are {', '.join(paths)}")
    return {p: check_layout(v, f"{flag} {p}") for p, v in table.items()}


def split_output_spec(spec: LayoutSpec, output_paths: Sequence[str], module_paths: Sequence[str]
                      ) -> tuple[LayoutSpec, dict[str, dict[str, str]]]:
    """(the model-output part of ``output_layout``, {torch module path: {output leaf key or "": layout}}).

    A dict key that names a model output leaf (``declared``'s forms) is a model output. Any other
    key naming a torch submodule path (``resnet``, ``encoder.layer.0``, as ``named_modules`` spells
    it) declares every output leaf of that layer's rows; ``path:leaf`` (``resnet:pooler_output``,
    ``blk:out[0]``) one leaf of them. Strings and mirrored trees are model outputs only.
    """
    if not isinstance(spec, Mapping):
        return spec, {}
    modules = set(module_paths)
    model, layers = {}, {}
    for key, value in spec.items():
        names_output = isinstance(key, str) and any(
            p == key or p.endswith((f".{key}", f"[{key!r}]", f"[{key}]")) for p in output_paths)
        path, _, leaf = key.partition(":") if isinstance(key, str) else (key, "", "")
        if not names_output and path in modules and path:
            layers.setdefault(path, {})[leaf] = check_layout(value, f"output_layout {key!r}")
        else:
            model[key] = value
    return (model or None), layers


def input_layouts(torch_module: torch.nn.Module, args: tuple, spec: LayoutSpec = None) -> dict[str, str]:
    """{input path: layout} for every array leaf of ``args`` (torch tensors, torch layout)."""
    import jax

    leaves = {keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tuple(args))[0]
              if isinstance(x, torch.Tensor)}
    paths = list(leaves)
    floats = [p for p in paths if leaves[p].is_floating_point()]
    out = declared(spec, floats, root="input", flag="input_layout") if isinstance(spec, str) else \
        declared(spec, paths, root="input", flag="input_layout")
    for p in paths:
        if p not in out and not leaves[p].is_floating_point():
            out[p] = AS_IS  # token ids, masks: no channel axis
    for p in paths:
        if p not in out and leaves[p].dim() < 3:
            out[p] = AS_IS  # no spatial axis: channels-first is impossible, so only one answer
    todo = [p for p in paths if p not in out]
    if todo:
        consumers = first_consumers(torch_module, lambda: torch_module(*args),
                                    {id(leaves[p]): p for p in todo})
        for p in todo:
            kind = consumers.get(p)
            if kind is None:
                raise LayoutError(
                    f"cannot tell the layout of {p} (shape {tuple(leaves[p].shape)}): no conv/linear-like "
                    f"layer receives it directly; declare it with input_layout= (CLI --layout), "
                    f"{CHANNELS_FIRST!r} for [N, C, *spatial] or {AS_IS!r}")
            out[p] = consumer_layout(kind)
    return out


def output_layouts(spec: LayoutSpec, torch_shapes: Mapping[str, tuple], flax_shapes: Mapping[str, tuple],
                   producer_layout=None) -> dict[str, str]:
    """{output path: layout}. producer_layout(path) -> layout or None: the kind of torch layer
    that produced that output (asked only when the shapes fit both layouts)."""
    paths = list(torch_shapes)
    out = declared(spec, paths, root="out", flag="output_layout")
    for p in paths:
        if p in out:
            continue
        t, f = tuple(torch_shapes[p]), tuple(flax_shapes[p])
        guess = layout_from_shapes(t, f)
        if guess is None:
            fits_both = t == f and flax_shape_cf(t) == f
            prod = producer_layout(p) if producer_layout is not None else None
            if fits_both and prod is None:
                raise LayoutError(
                    f"cannot tell the layout of output {p}: torch shape {t} and Flax shape {f} fit both "
                    f"layouts and no layer kind decides it; declare it with output_layout= "
                    f"(CLI --output-layout)")
            # Fits neither: a wrong twin; the comparison reports the shape mismatch.
            guess = prod or AS_IS
        out[p] = guess
    return out


class ActivationLayouts:
    """Layouts of every recorded torch call's inputs and outputs, from layer kinds.

    Calls are visited in completion order, so the producer of every input has been seen: a
    layer's output layout is its kind's, a pass-through layer's is its input's, and a container's
    is that of the inner layer that produced the very same tensor. Tensors made by functional ops
    between modules (flatten, transpose) stay unknown (None): the caller then asks the shapes.
    """

    def __init__(self, calls: Sequence[TorchCall], model_inputs: Mapping[int, str], aliases: Mapping[int, int],
                 layer_outputs: Mapping[str, Mapping[str, str]] | None = None):
        """layer_outputs: the caller's layouts of layer outputs (``split_output_spec``): they win
        over everything, and ``declared`` lists the (path, call, leaf) they were given for."""
        self.aliases = aliases
        self.known: dict[int, str] = dict(model_inputs)
        self.inputs: dict[tuple[str, int], dict[str, str | None]] = {}
        self.outputs: dict[tuple[str, int], dict[str, str | None]] = {}
        self.nodes: dict[int, str] = {}  # id(autograd node that made a module output) -> layout
        self._keep = []  # the nodes themselves, so their ids stay theirs
        self.declared: set[tuple[str, int, str]] = set()
        for c in calls:
            ins = {n: self._get(i) for n, i in c.input_ids.items()}
            self.inputs[(c.path, c.call)] = ins
            kind = kind_layout(type(c.module))
            first_in = next((v for n, v in ins.items() if c.inputs[n].is_floating_point()), None)
            outs = {}
            given = _layer_spec((layer_outputs or {}).get(c.path), list(c.outputs), c.path)
            for p, o in c.outputs.items():
                if p in given:
                    lay = given[p]
                    self.declared.add((c.path, c.call, p))
                elif kind in (CHANNELS_FIRST, AS_IS):
                    lay = kind
                elif kind == INHERIT:
                    lay = first_in
                else:
                    lay = self._get(id(o))
                outs[p] = lay
                if lay is not None and id(o) not in self.known:
                    self.known[id(o)] = lay
                for t in (o, c.handed.get(p)):  # the tensor, and the view its callers got
                    if lay is not None and t is not None and t.grad_fn is not None:
                        self.nodes.setdefault(id(t.grad_fn), lay)
                        self._keep.append(t.grad_fn)
            self.outputs[(c.path, c.call)] = outs
        # Second pass for tensors made by plain functions between modules (F.relu, torch.cat):
        # the kind of layer that consumes them says their layout (a Conv2d eats [N, C, H, W]).
        consumed: dict[int, str] = {}
        for c in sorted(calls, key=lambda c: c.start):
            want = consumer_layout(type(c.module))
            if want is not None:
                for n, i in c.input_ids.items():
                    consumed.setdefault(self._root(i), want)
        for c in calls:
            for n, lay in self.inputs[(c.path, c.call)].items():
                if lay is None:
                    self.inputs[(c.path, c.call)][n] = consumed.get(self._root(c.input_ids[n]))
            for p, lay in self.outputs[(c.path, c.call)].items():
                if lay is None:
                    self.outputs[(c.path, c.call)][p] = consumed.get(self._root(id(c.outputs[p])))

    def is_declared(self, path: str, call: int, leaf: str) -> bool:
        return (path, call, leaf) in self.declared

    def _root(self, i: int) -> int:
        seen = 0
        while i in self.aliases and seen < 64:
            i, seen = self.aliases[i], seen + 1
        return i

    def _get(self, i: int) -> str | None:
        seen = 0
        while i not in self.known and i in self.aliases and seen < 64:
            i, seen = self.aliases[i], seen + 1
        return self.known.get(i)

    def of_tensor(self, t: torch.Tensor) -> str | None:
        """Layout of a tensor: its producing layer's, else (made by element-wise functions of
        module outputs, e.g. ``self.proj(x) * self.scale``) the one layout of the module outputs
        it was computed from, following autograd back through element-wise ops only."""
        got = self._get(id(t))
        if got is not None or t.grad_fn is None:
            return got
        found: set[str] = set()
        stack, seen = [t.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if id(node) in self.nodes:
                found.add(self.nodes[id(node)])
                continue
            name = type(node).__name__
            if name == "AccumulateGrad":
                continue  # a parameter: no layout of its own (a broadcast scale, a bias)
            if name.rstrip("0123456789") not in _ELEMENTWISE:
                return None  # a reshape/transpose/matmul between: the layout is not carried through
            stack.extend(fn for fn, _ in node.next_functions)
        return found.pop() if len(found) == 1 else None


def flax_shape_cf(shape: tuple) -> tuple | None:
    """Flax shape of a channels-first torch shape, None when it has no spatial axis."""
    try:
        return flax_shape(tuple(shape), CHANNELS_FIRST)
    except LayoutError:
        return None


def _layer_spec(spec: Mapping[str, str] | None, leaves: Sequence[str], path: str) -> dict[str, str]:
    """{leaf: layout} of one layer's outputs from its ``split_output_spec`` entry ("" = every leaf)."""
    if not spec:
        return {}
    out = {p: spec[""] for p in leaves} if "" in spec else {}
    named = {k: v for k, v in spec.items() if k}
    if named:
        out.update(declared(named, list(leaves), root="out", flag=f"output_layout {path!r}"))
    return out


def resolve(layout: str | None, torch_shape: tuple, flax_shape: tuple | None) -> tuple[str | None, str]:
    """(layout, note) of one activation inside the model, ``layout`` being its producing layer's
    kind (or None). What the tensor is decides first: when exactly one layout makes torch's and
    Flax's shapes agree, that one (a module that computes channels-last may return channels-first
    maps: HF's FlaxResNetModel transposes its outputs back to [N, C, H, W]); when both do, the
    kind; when neither does, the kind too (the comparison then reports the shape difference);
    else (None, why)."""
    if flax_shape is None:
        return (layout, "") if layout is not None else (None, "layout unknown")
    fits = fitting_layouts(torch_shape, flax_shape)
    if len(fits) == 1:
        return fits[0], ""
    if layout is not None:
        return layout, ""
    return None, (f"layout unknown: made by a function between modules and shapes torch "
                  f"{tuple(torch_shape)} / flax {tuple(flax_shape)} fit both or neither")


def model_input_ids(args: tuple, layouts: Mapping[str, str]) -> dict[int, str]:
    import jax

    return {id(x): layouts[keystr(p)] for p, x in jax.tree_util.tree_flatten_with_path(tuple(args))[0]
            if isinstance(x, torch.Tensor) and keystr(p) in layouts}


__all__ = ["ActivationLayouts", "declared", "fitting_layouts", "input_layouts", "input_paths", "model_input_ids",
           "output_layouts", "resolve", "split_output_spec"]
