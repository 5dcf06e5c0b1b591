"""The port plan: every torch layer paired with its Flax module and rule, applied both ways.

Build it once per model pair (it traces and abstract-inits), then convert any number of
state_dicts, checkpoint files or gradient dicts with it.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import numpy as np
try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None
from flax import traverse_util

from weight_port.errors import (
    AttributeMismatchError, KeyMismatchError, NoRuleError, NonFiniteWeightError, PortError,
    ShapeMismatchError,
)
from weight_port.flax_tree import FlaxTarget, abstract_target, is_nnx
from weight_port.input_layouts import port_input_layouts
from weight_port.layout import CHANNELS_FIRST, to_flax_layout
from weight_port.lookalike import lookalike_rule
from weight_port.matching import Rename, apply_rename, candidate_paths, tree_paths, with_closest
from weight_port.naming import flax_path_str
from weight_port.layout import AS_IS
from weight_port.pairing import Leaf, PlannedLayer, converted_shape, resolve_paths
from weight_port.plan_steps import (
    decide_flatten, decide_transpose_kernels, drop_computed_tables, fold_tied, lookalike_notes, tied_aliases,
    unpaired_hint,
)
from weight_port.rules import LayerInfo, Rule, direct_rule, flax_rule_for, rule_for
from weight_port.prefetch import Converted
from weight_port.tensors import all_finite, single_threaded_torch, to_jax, to_numpy

def _leaf_str(leaf: Leaf) -> str:
    return "/".join(leaf)


@dataclass
class PortPlan:
    """layers: each torch layer with its Flax path and rule. pairing_notes: one line per pairing
    not made by name (torch name, Flax path, how). flatten_notes: one line per Linear fed by a
    flatten (whether its input features were permuted, and what decided it). tied: alias torch name ->
    the canonical torch name that was ported in its place (the same storage; the Flax twin has one
    leaf for both, e.g. an LM head using ``embed.attend``; or one module registered under several
    names); flax_to_torch refills the alias. notes: one line per tensor a rule of the plan decided
    not to port or to port by its structure (frozen computed tables, look-alike Flax layers)."""

    layers: list[PlannedLayer]
    target: FlaxTarget
    dropped_defaults: dict[str, np.ndarray]
    pairing_notes: list[str] = field(default_factory=list)
    flatten_notes: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # What would fix the key or shape errors of a port (the register_rule call for a Flax class of
    # no known kind, torch_module= for a computed table, the other input layout): texts, or
    # functions computing one only when an error needs it (hint()).
    hints: list = field(default_factory=list, repr=False)

    def hint(self) -> str:
        """The hints for a KeyMismatchError / ShapeMismatchError of this plan, "" when none."""
        self.hints = [h() if callable(h) else h for h in self.hints]
        return "; ".join(h for h in self.hints if h)

    def describe(self) -> str:
        """The port as a table: torch tensor, Flax leaf, rule, layout change, how it was paired."""
        rows = [("torch", "flax", "rule", "layout change", "paired by")]
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                rows.append((layer.torch_key(tmap.torch_name),
                             _leaf_str(layer.flax_leaf(tmap.collection, tmap.flax_name)),
                             layer.rule.name or "custom", tmap.describe(layer.info), layer.matched))
        for alias, canonical in self.tied.items():
            rows.append((alias, "(none: tied)", "tied", f"same storage as {canonical}", "storage"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] for r in rows]
        if self.pairing_notes:
            lines += ["", "paired not by name:"] + [f"  {n}" for n in self.pairing_notes]
        if self.flatten_notes:
            lines += ["", "flatten order:"] + [f"  {n}" for n in self.flatten_notes]
        if self.notes:
            lines += ["", "notes:"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    # -- torch -> flax -----------------------------------------------------------------------
    def to_flax(
        self,
        state: Mapping[str, object],
        *,
        collections: tuple[str, ...] | None = None,
        dtype=None,
        allow_nonfinite: bool = False,
        copy: bool = True,
        precomputed: Mapping[str, Converted] | None = None,
    ) -> dict[str, dict]:
        """torch-named tensors -> nested Flax variables {collection: {...}} of jax arrays.

        state: any mapping (a state_dict, or a lazy checkpoint mapping read one tensor at a time);
        values are torch tensors or numpy arrays in torch layout. collections: convert only these
        (e.g. ("params",) for gradients); None means all that the Flax twin has. dtype: optional
        target dtype (cast once, from the source dtype). copy=True (default): every result owns
        its memory, so later in-place updates of the source tensors cannot leak into the JAX
        arrays; copy=False hands layout-unchanged tensors over zero-copy (checkpoint loads). Raises KeyMismatchError listing every missing,
        unexpected and mis-shaped key (ShapeMismatchError when only shapes differ), and
        NonFiniteWeightError for NaN/Inf unless allow_nonfinite. precomputed: tensors already
        converted with the same dtype/copy (weight_port.prefetch, overlapping the plan's trace);
        each is used only where this plan applies the same rule without a flatten permutation.
        """
        with single_threaded_torch():
            return self._to_flax(state, collections, dtype, allow_nonfinite, copy, precomputed or {})

    def _to_flax(self, state, collections, dtype, allow_nonfinite, copy, precomputed) -> dict[str, dict]:
        wanted = set(collections) if collections is not None else self.target.collections()
        used: set[str] = set()
        out: dict[Leaf, object] = {}
        produced: set[Leaf] = set()
        missing, unexpected, mismatched, nonfinite = [], [], [], []
        used.update(self.tied)  # ported once, under the canonical name
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                key = layer.torch_key(tmap.torch_name)
                if tmap.collection not in wanted:
                    used.add(key)
                    continue
                leaf = layer.flax_leaf(tmap.collection, tmap.flax_name)
                if key not in state:  # a checkpoint file may store a tied tensor under one alias only
                    key = next((a for a, c in self.tied.items() if c == key and a in state), key)
                if key not in state:
                    if leaf in self.target.shapes:
                        missing.append((key, f"torch {key} (for flax {_leaf_str(leaf)})"))
                        produced.add(leaf)
                    continue
                used.add(key)
                pre = precomputed.get(key)
                reuse = pre is not None and pre.rule is layer.rule and layer.info.flatten is None
                if reuse:  # converted already (a jax array in Flax layout)
                    source, value, source_shape = None, pre.value, pre.source_shape
                else:
                    source = to_numpy(state[key])
                    value = tmap.to_flax(source, layer.info)
                    source_shape = tuple(source.shape)
                if leaf not in self.target.shapes:
                    unexpected.append((key, f"torch {key} -> flax {_leaf_str(leaf)} (no such flax leaf)"))
                    continue
                produced.add(leaf)
                want = tuple(self.target.shapes[leaf].shape)
                if tuple(value.shape) != want:
                    mismatched.append(
                        f"torch {key} {source_shape} -> flax {_leaf_str(leaf)} "
                        f"{tuple(value.shape)}, flax expects {want}"
                    )
                    continue
                if not allow_nonfinite and not (pre.finite if reuse else all_finite(source)):
                    nonfinite.append(key)
                    continue
                # Materialize now, one tensor at a time: the transposed view is copied once and
                # nothing but the result stays alive (peak memory ~ the output's bytes).
                out[leaf] = value if reuse else to_jax(value, dtype, copy=copy)
                del source, value
            for name in layer.rule.dropped:
                used.add(layer.torch_key(name))
        unclaimed = [
            leaf for leaf in self.target.shapes if leaf[0] in wanted and leaf not in produced
        ]
        unused = [key for key in state.keys() if key not in used]
        # Closest candidates, compared as dotted torch-style names: an unexpected torch key
        # against the torch keys the plan wanted but did not get and the unclaimed Flax leaves;
        # a missing key against the torch keys nobody used. Only candidates of the same layer
        # kind (or of no known kind): a BatchNorm's mean is never "closest" to a Linear's bias.
        kind = self._kinds()
        wanted_names = [(k, kind.get(k)) for k, _ in missing] + [(".".join(leaf[1:]), kind.get(leaf))
                                                                 for leaf in unclaimed]
        spare = [(k, kind.get(k)) for k in unused + [k for k, _ in unexpected]]

        def near(line: str, name: str, of: str | tuple, cands, side: str) -> str:
            k = kind.get(of)
            return with_closest(line, name, [c for c, ck in cands if k is None or ck in (None, k)], side)

        lines_unexpected = [near(line, k, k, wanted_names, "wanted key") for k, line in unexpected]
        lines_unexpected += [near(f"torch {k} (no layer of the plan owns it)", k, k, wanted_names, "wanted key")
                             for k in unused]
        missing = [near(line, k, k, spare, "unused torch key") for k, line in missing]
        missing += [near(f"flax {_leaf_str(leaf)} (no torch tensor maps to it)", ".".join(leaf[1:]), leaf, spare,
                         "unused torch key") for leaf in unclaimed]
        if missing or lines_unexpected or mismatched:
            cls = KeyMismatchError if missing or lines_unexpected else ShapeMismatchError
            raise cls(missing, lines_unexpected, mismatched, context="torch -> flax", hint=self.hint())
        if nonfinite:
            raise NonFiniteWeightError(nonfinite)
        variables = traverse_util.unflatten_dict(out)
        if "params" in wanted or collections is None:
            variables.setdefault("params", {})  # a parameter-free twin still takes {"params": {}}
        return variables

    def _kinds(self) -> dict:
        """Layer kind (rule name) of every torch key and Flax leaf the plan knows one for: torch
        keys by their layer's rule, Flax leaves by their module's registered class."""
        kinds: dict = {}
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                kinds[layer.torch_key(tmap.torch_name)] = layer.rule.name
        for leaf in self.target.shapes:
            module = self.target.modules.get(tuple(leaf[1:-1]))
            rule = flax_rule_for(type(module)) if module is not None else None
            if rule is not None:
                kinds[leaf] = rule.name
        return kinds

    # -- flax -> torch -----------------------------------------------------------------------
    def to_torch(
        self, variables: Mapping[str, Mapping], *, collections: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Nested Flax variables -> torch-named numpy arrays in torch layout.

        With collections=None the result is a full state_dict (dropped tensors such as
        num_batches_tracked refilled from the torch module the plan was built from).
        """
        flat = traverse_util.flatten_dict(dict(variables))
        flat = {tuple(str(p) for p in k): v for k, v in flat.items()}
        wanted = set(collections) if collections is not None else self.target.collections()
        parts: dict[str, list[np.ndarray]] = {}  # several parts: a fused tensor (TensorMap doc)
        missing = []
        used: set[Leaf] = set()
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                if tmap.collection not in wanted:
                    continue
                leaf = layer.flax_leaf(tmap.collection, tmap.flax_name)
                if leaf not in flat:
                    if leaf in self.target.shapes:
                        missing.append(f"flax {_leaf_str(leaf)} (for torch {layer.torch_key(tmap.torch_name)})")
                    continue
                used.add(leaf)
                parts.setdefault(layer.torch_key(tmap.torch_name), []).append(
                    tmap.to_torch(np.asarray(flat[leaf]), layer.info))
        out = {k: p[0] if len(p) == 1 else np.concatenate(p, axis=0) for k, p in parts.items()}
        # The torch shapes are known: a tensor the rules produced in another shape is a wrong
        # layout, never something for load_state_dict to find later (or not, when it is reshaped).
        want = {layer.torch_key(n): tuple(s) for layer in self.layers for n, s in layer.own_shapes.items()}
        mismatched = [f"torch {k}: {tuple(v.shape)} from flax, {want[k]} in torch" for k, v in out.items()
                      if k in want and tuple(v.shape) != want[k]]
        spare = [_leaf_str(k) for k in flat if k not in used and k[0] in wanted]
        missing = [with_closest(m, m.split()[1], spare, "unused flax leaf") for m in missing]
        unexpected = [f"flax {s} (no torch tensor maps to it)" for s in spare]
        if missing or unexpected or mismatched:
            cls = KeyMismatchError if missing or unexpected else ShapeMismatchError
            raise cls(missing, unexpected, mismatched, context="flax -> torch", hint=self.hint())
        if collections is None:
            out.update(self.dropped_defaults)
        for alias, canonical in self.tied.items():  # strict load_state_dict wants every name
            if canonical in out:
                out[alias] = out[canonical]
        return out


def _as_tuple(example_input) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _torch_inputs(torch_module: torch.nn.Module, example_input) -> tuple:
    """Example inputs as torch tensors (numpy arrays allowed), floats in the model's dtype."""
    dtype = next((p.dtype for p in torch_module.parameters() if p.is_floating_point()), None)
    out = []
    for x in _as_tuple(example_input):
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        out.append(t)
    return tuple(out)


def target_from_variables(variables: Mapping) -> FlaxTarget:
    """A Flax target read off existing variables (when there is no Flax module to init)."""
    flat = traverse_util.flatten_dict(dict(variables))
    return FlaxTarget({tuple(str(p) for p in k): jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
                       for k, v in flat.items()}, {})


def _own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    # non-persistent buffers (e.g. precomputed position ids) are not in the state_dict: skip them
    skip = getattr(module, "_non_persistent_buffers_set", set())
    return {k: v for k, v in own.items() if v is not None and k not in skip}


def _check_attributes(infos: list[tuple[LayerInfo, Rule]], mode: str) -> None:
    problems = [line for info, rule in infos if rule.check and info.flax_module is not None
                for line in rule.check(info)]
    if not problems or mode == "ignore":
        return
    if mode == "warn":
        warnings.warn(str(AttributeMismatchError(problems)), UserWarning, stacklevel=3)
        return
    raise AttributeMismatchError(problems)


def _input_layouts(example_input, input_layout, torch_module, flax_module):
    """(example inputs as numpy arrays, the torch-side layout of each), or (None, None)."""
    if example_input is None:
        return None, None
    inputs = [to_numpy(x) for x in _as_tuple(example_input)]
    # one layout per positional input: declared, or read off the layer that receives it
    return inputs, port_input_layouts(input_layout, inputs, torch_module,
                                      lambda: _torch_inputs(torch_module, example_input), flax_module)


def _target_for(flax_module, inputs, layouts, variables) -> FlaxTarget:
    flax_inputs = channels_last = None
    if inputs is not None:
        flax_inputs = tuple(to_flax_layout(x, lay) for x, lay in zip(inputs, layouts))
        # which Flax inputs are the channels-last form of a channels-first torch input
        channels_last = tuple(lay == CHANNELS_FIRST for lay in layouts)
    if flax_module is not None and is_nnx(flax_module):
        from weight_port.nnx import nnx_target

        try:
            return nnx_target(flax_module, flax_inputs, channels_last=channels_last or ())
        except Exception as exc:  # a call the abstract trace cannot follow: pair by names/shapes
            warnings.warn(f"could not trace the NNX twin {type(flax_module).__name__} "
                          f"({type(exc).__name__}: {exc}); execution order and flatten order come "
                          "from the torch side only", UserWarning, stacklevel=4)
            return nnx_target(flax_module)
    if flax_module is not None:
        if flax_inputs is None:
            raise TypeError("build_plan needs example_input together with a linen flax_module")
        return abstract_target(flax_module, flax_inputs, channels_last=channels_last)
    if variables is not None:
        return target_from_variables(variables)
    raise TypeError("build_plan needs a flax_module (with example_input) or variables")


def _misshaped(layers: list[PlannedLayer], target: FlaxTarget) -> list[tuple[PlannedLayer, str, tuple]]:
    """(layer, torch tensor name, converted shape) of every tensor whose Flax leaf has another shape."""
    out = []
    for layer in layers:
        for tmap in layer.rule.tensors:
            leaf = layer.flax_leaf(tmap.collection, tmap.flax_name)
            if tmap.torch_name in layer.own_shapes and leaf in target.shapes:
                shape = converted_shape(layer.rule, tmap.torch_name, layer.own_shapes[tmap.torch_name], layer.info)
                if shape != tuple(target.shapes[leaf].shape):
                    out.append((layer, tmap.torch_name, shape))
    return out


def _layout_hint(layers: list[PlannedLayer], target: FlaxTarget, flax_module, inputs, layouts,
                 declared: bool) -> str:
    """When some Flax leaves have other shapes than the converted torch tensors and the twin, traced
    on the other layout of its image inputs, has exactly the converted shapes: say so, naming the
    flag. (diffusers' Flax models take NCHW and transpose inside: traced on NHWC, conv_in's kernel
    comes out [3, 3, W, C_out].) Costs one more abstract init, only on this failure path."""
    if inputs is None or flax_module is None or is_nnx(flax_module):
        return ""
    bad = _misshaped(layers, target)
    flips = [i for i, (x, lay) in enumerate(zip(inputs, layouts)) if np.ndim(x) >= 3 and lay in (CHANNELS_FIRST, AS_IS)]
    if not bad or not flips:
        return ""
    other = [(AS_IS if lay == CHANNELS_FIRST else CHANNELS_FIRST) if i in flips else lay
             for i, lay in enumerate(layouts)]
    try:
        alt = _target_for(flax_module, inputs, other, None)
    except Exception:  # noqa: BLE001 -- the twin cannot even run that way: no hint
        return ""
    if any(tuple(alt.shapes.get(layer.flax_leaf(t.collection, t.flax_name), np.empty(0)).shape) != shape
           for layer, name, shape in bad for t in layer.rule.tensors if t.torch_name == name):
        return ""
    where = ", ".join(f"{layer.torch_key(name)}" for layer, name, _ in bad[:3])
    want = other[0] if len(other) == 1 else other
    how = "the declared" if declared else "the inferred"
    return (f"the Flax twin's shapes fit the torch tensors ({where}) when its input is traced as "
            f"{other[flips[0]]!r} instead of {how} {layouts[flips[0]]!r} (a twin that takes torch's "
            f"layout and transposes inside, like diffusers' Flax models): pass input_layout={want!r} "
            f"(CLI: --layout {other[flips[0]]})")


def _layers_from_torch(torch_module: torch.nn.Module):
    layers, no_rule, dropped_defaults, paramless, named = [], [], {}, [], []
    covered: list[str] = []  # modules whose rule maps their children's tensors (Rule.children)
    # One module object may be registered under several names (Pegasus, Marian, Blenderbot:
    # ``shared`` is also ``encoder.embed_tokens`` and ``decoder.embed_tokens``). named_modules()
    # lists it once, the state_dict under every name: every name is an alias of the first.
    first_path: dict[int, str] = {}
    module_aliases: dict[str, list[str]] = {}
    for path, module in torch_module.named_modules(remove_duplicate=False):
        if id(module) in first_path:
            module_aliases.setdefault(first_path[id(module)], []).append(path)
        else:
            first_path[id(module)] = path
    module_alias_keys: dict[str, str] = {}
    for path, module in torch_module.named_modules():
        if any(path.startswith(f"{c}.") if c else True for c in covered):
            continue
        own = _own_tensors(module)
        rule = rule_for(type(module))
        if rule is not None and rule.children:
            covered.append(path)
        if not own:
            if rule is not None and rule.check is not None:
                paramless.append((path, module, rule))
            continue
        if rule is None:
            if next(module.children(), None) is None:
                # a leaf layer of a type we do not know: its tensors' layout is unknowable
                no_rule.append((path, type(module).__name__))
                continue
            # tensors registered directly on a container (class token, position embedding)
            rule = direct_rule({n: "params" for n in own})
        layer = PlannedLayer(LayerInfo(path, (), type(module), module), rule,
                             {n: tuple(t.shape) for n, t in own.items() if n not in rule.dropped},
                             aliases=tuple(module_aliases.get(path, ())))
        named += [(layer.torch_key(n), t) for n, t in own.items()]
        for alias in layer.aliases:  # the same tensors under the module's other names
            module_alias_keys.update({f"{alias}.{n}": layer.torch_key(n) for n in own})
        for name in rule.dropped:
            if name in own:
                dropped_defaults[layer.torch_key(name)] = to_numpy(own[name]).copy()
        layers.append(layer)
    if no_rule:
        raise NoRuleError(no_rule)
    sequential = {p for p, m in torch_module.named_modules() if isinstance(m, torch.nn.Sequential)}
    return layers, dropped_defaults, paramless, sequential, tied_aliases(named), module_alias_keys


def _layers_from_state(state: Mapping, target: FlaxTarget, rename: Rename):
    """Without a torch module: group keys by module path, read layer types off the Flax twin."""
    from weight_port.sources import shape_of

    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in state.keys():
        path, _, name = key.rpartition(".")
        groups.setdefault(path, {})[name] = shape_of(state, key)
    layers, no_rule = [], []
    prefixes = {leaf[1:i] for leaf in target.shapes for i in range(2, len(leaf))}
    for path, own in groups.items():
        renamed = apply_rename(path, rename)
        cands = candidate_paths(renamed) + ([] if "/" in renamed else tree_paths(renamed, prefixes))
        hit = next((c for c in cands if c in target.modules), None)
        module = target.modules.get(hit) if hit is not None else None
        rule = flax_rule_for(type(module)) if module is not None else None
        if module is not None and rule is None:
            # a Flax class of no registered kind: the kind whose variables it has exactly
            rule, kinds = lookalike_rule(own, LayerInfo(path, hit, None, None, module), target.shapes, hit)
            if kinds:
                no_rule.append((path, f"flax {type(module).__name__}: has the variables of a "
                                f"{' and of a '.join(kinds)}, which convert differently"))
                continue
            if rule is None and hit and not any(leaf[1:-1] == hit and leaf[-1] in own for leaf in target.shapes):
                no_rule.append((path, f"flax {type(module).__name__}"))
                continue
        if rule is None:
            rule = direct_rule({n: "params" for n in own})
        info = LayerInfo(path, (), None, None, module, None)
        layers.append(PlannedLayer(info, rule, {n: s for n, s in own.items() if n not in rule.dropped}))
    if no_rule:
        raise NoRuleError(no_rule)
    # in-memory state_dicts list tied tensors under every name (files usually store one)
    return layers, tied_aliases(state.items()) if isinstance(state, dict) else {}


def build_plan(
    torch_module: torch.nn.Module | None,
    flax_module=None,
    example_input=None,
    *,
    variables: Mapping | None = None,
    input_layout: str | None = None,  # None: read off the layer receiving each input
    flatten: Mapping[str, tuple[int, ...] | None] | None = None,
    state: Mapping | None = None,
    rename: Rename = None,
    check_attributes: str = "error",
    call_order: list[str] | None = None,
) -> PortPlan:
    """Pair every torch layer owning tensors with its Flax module and conversion rule.

    torch_module: gives layer types, execution order (forward pre-hooks on ``example_input``,
    run only when some layer cannot be paired by name) and, if the Flax side cannot tell, flatten
    order. Without it pass ``state`` (a state_dict or sources.load_state mapping): layer types then
    come from the Flax twin's module classes per path. flax_module: a linen Module
    (abstract-initialised on the channels-last [N, *S, C] equivalent of the torch-layout
    ``example_input`` [N, C, *S]) or an nnx.Module (abstractly called on it when given); without
    one, ``variables`` give the target. flatten: explicit {linear path: (C, *S) or None} entries,
    over what tracing finds. rename: callable or (regex, replacement) pairs applied to torch paths
    first. check_attributes: "error", "warn" or "ignore" when eps/momentum/groups of a Flax module
    differ from its torch layer's. call_order: the torch forward's module call order recorded
elsewhere (parity.golden bundles), for a port from ``state`` without a torch module to trace.
print(plan) shows every pairing and layout change.
    """
    if check_attributes not in ("error", "warn", "ignore"):
        raise ValueError("check_attributes must be 'error', 'warn' or 'ignore'")
    arrays, layouts = _input_layouts(example_input, input_layout, torch_module, flax_module)
    target = _target_for(flax_module, arrays, layouts, variables)
    paramless: list = []
    torch_order = None
    if torch_module is not None:
        layers, dropped_defaults, paramless, sequential, aliases, module_aliases = _layers_from_torch(torch_module)
        if example_input is not None:
            from weight_port.call_order import torch_call_order

            torch_order = lambda: torch_call_order(torch_module, _torch_inputs(torch_module, example_input))
    elif state is not None:
        if not target.modules:
            raise PortError("porting without a torch module needs a Flax module (layer types come "
                            "from it); pass flax_module and example_input")
        (layers, aliases), dropped_defaults, sequential = _layers_from_state(state, target, rename), {}, set()
        module_aliases = {}
        if call_order is not None:
            torch_order = lambda: list(call_order)
    else:
        raise TypeError("build_plan needs a torch_module or a state (state_dict / checkpoint)")
    notes = resolve_paths(layers, target, sequential, rename, torch_order)
    port_notes = lookalike_notes(layers)
    if torch_module is not None:
        port_notes += drop_computed_tables(layers, target, torch_module, dropped_defaults)
    hints: list = [unpaired_hint(layers, target)]
    tied = fold_tied(layers, aliases, target)
    # a module registered under several names: ported once (under the name that paired), every
    # other name refilled on the way back and its gradient judged as the sum over uses, like a tie
    tied.update(module_aliases)
    homeless = [layer.torch_key(n) for layer in layers if layer.matched == "unpaired" for n in layer.own_shapes]
    if torch_module is None and homeless:
        # without the torch module nothing says which tensors are frozen tables the twin computes
        hints.append(f"torch {', '.join(homeless[:3])}{' ...' if len(homeless) > 3 else ''} found no Flax "
                     "module: if the twin computes them (a frozen table such as a sinusoid position "
                     "embedding), pass torch_module= (the torch architecture) so the port sees they are "
                     "frozen and skips them")
    inputs = (lambda: _torch_inputs(torch_module, example_input) if example_input is not None else None)
    flatten_notes = decide_flatten(layers, target, dict(flatten or {}), torch_module, inputs)
    decide_transpose_kernels(layers, target)
    hints.append(lambda: _layout_hint(layers, target, flax_module, arrays, layouts, input_layout is not None))
    checks = [(layer.info, layer.rule) for layer in layers]
    for path, module, rule in paramless:  # e.g. LayerNorm(elementwise_affine=False): eps still matters
        flax_path = next((c for c in candidate_paths(apply_rename(path, rename), sequential)
                          if c in target.modules), None)
        if flax_path is not None:
            checks.append((LayerInfo(path, flax_path, type(module), module, target.modules[flax_path]), rule))
    _check_attributes(checks, check_attributes)
    return PortPlan(layers=layers, target=target, dropped_defaults=dropped_defaults,
                    pairing_notes=notes, flatten_notes=flatten_notes, tied=tied, notes=port_notes,
                    hints=hints)


__all__ = ["PortPlan", "PlannedLayer", "build_plan", "flax_path_str"]
