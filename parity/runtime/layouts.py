"""Which layout each input, output and per-layer activation has (declared, or inferred when only
one answer is possible); the conversions themselves live in weight_port.layout.

Inputs: the caller's ``input_layout`` (one string for every float leaf, or one per leaf), else
integer leaves (ids, masks) as-is, else the kind of torch layer that first consumes the leaf
(Conv -> channels-first, Linear/Embedding/LayerNorm -> as-is), else a tensor with no spatial axis
([N, F]) as-is, else a LayoutError naming the leaf and the flag.
Outputs: ``output_layout``, else the one layout that makes the torch and Flax shapes agree, else
the kind of layer that produced the tensor, else a LayoutError naming the leaf and the flag.
Activations inside the model: the producing layer's kind (weight_port.layout.kind_layout),
pass-through kinds inheriting their input's layout.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from parity.runtime.torch_runner import TorchCall, input_paths, keystr
from parity.runtime.tree import flatten
from weight_port.call_order import first_consumers
from weight_port.layout import (AS_IS, CHANNELS_FIRST, INHERIT, LayoutError, check_layout,
                                consumer_layout, flax_shape, kind_layout, layout_from_shapes)

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

    def __init__(self, calls: Sequence[TorchCall], model_inputs: Mapping[int, str], aliases: Mapping[int, int]):
        self.aliases = aliases
        self.known: dict[int, str] = dict(model_inputs)
        self.inputs: dict[tuple[str, int], dict[str, str | None]] = {}
        self.outputs: dict[tuple[str, int], dict[str, str | None]] = {}
        self.nodes: dict[int, str] = {}  # id(autograd node that made a module output) -> layout
        self._keep = []  # the nodes themselves, so their ids stay theirs
        for c in calls:
            ins = {n: self._get(i) for n, i in c.input_ids.items()}
            self.inputs[(c.path, c.call)] = ins
            kind = kind_layout(type(c.module))
            first_in = next((v for n, v in ins.items() if c.inputs[n].is_floating_point()), None)
            outs = {}
            for p, o in c.outputs.items():
                if kind in (CHANNELS_FIRST, AS_IS):
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


def resolve(layout: str | None, torch_shape: tuple, flax_shape: tuple | None) -> tuple[str | None, str]:
    """(layout, note): a kind-derived layout as is; an unknown one from the shapes when only one
    layout fits; else (None, why)."""
    if layout is not None:
        return layout, ""
    if flax_shape is None:
        return None, "layout unknown"
    guess = layout_from_shapes(tuple(torch_shape), tuple(flax_shape))
    if guess is None:
        return None, (f"layout unknown: made by a function between modules and shapes torch "
                      f"{tuple(torch_shape)} / flax {tuple(flax_shape)} fit both or neither")
    return guess, ""


def model_input_ids(args: tuple, layouts: Mapping[str, str]) -> dict[int, str]:
    import jax

    return {id(x): layouts[keystr(p)] for p, x in jax.tree_util.tree_flatten_with_path(tuple(args))[0]
            if isinstance(x, torch.Tensor) and keystr(p) in layouts}


__all__ = ["ActivationLayouts", "declared", "input_layouts", "input_paths", "model_input_ids",
           "output_layouts", "resolve"]
