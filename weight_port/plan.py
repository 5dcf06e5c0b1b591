"""The port plan: every torch layer paired with its Flax module and rule, applied both ways.

Build it once per model pair (it traces and abstract-inits), then convert any number of
state_dicts, checkpoint files or gradient dicts with it.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import numpy as np
import torch
from flax import traverse_util

from weight_port.errors import (
    AttributeMismatchError, KeyMismatchError, NoRuleError, NonFiniteWeightError, PortError,
    ShapeMismatchError,
)
from weight_port.flatten import find_flattened_linears
from weight_port.flax_tree import FlaxTarget, abstract_target
from weight_port.layout import CHANNELS_FIRST, to_flax_layout
from weight_port.matching import Rename, apply_rename, candidate_paths, with_closest
from weight_port.naming import flax_path_str
from weight_port.rules import LayerInfo, Rule, direct_rule, flax_rule_for, rule_for
from weight_port.tensors import to_jax, to_numpy

Leaf = tuple[str, ...]  # (collection, *module_path, leaf_name)


@dataclass
class PlannedLayer:
    info: LayerInfo
    rule: Rule
    # torch tensor name -> shape, as the source layer has it (used for structural matching)
    own_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def torch_key(self, name: str) -> str:
        return f"{self.info.torch_path}.{name}" if self.info.torch_path else name

    def flax_leaf(self, collection: str, name: str) -> Leaf:
        return (collection, *self.info.flax_path, *name.split("/"))


def _leaf_str(leaf: Leaf) -> str:
    return "/".join(leaf)


def _all_finite(a: np.ndarray) -> bool:
    """True when ``a`` holds no NaN/Inf, without allocating a mask as large as ``a``.

    Any NaN or Inf makes the sum non-finite, so one streaming reduction (numpy's pairwise SIMD
    sum, several GiB/s) decides the common case; only a non-finite sum -- a real NaN/Inf or a
    finite overflow, float32 accumulation for 16-bit types -- needs the exact elementwise test.
    """
    if a.dtype.kind != "f" and a.dtype != np.dtype("bfloat16"):
        return True
    acc = np.float64 if a.dtype.itemsize == 8 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(a, dtype=acc)):
            return True
    return bool(np.isfinite(a).all())


@dataclass
class PortPlan:
    layers: list[PlannedLayer]
    target: FlaxTarget
    dropped_defaults: dict[str, np.ndarray]

    # -- torch -> flax -----------------------------------------------------------------------
    def to_flax(
        self,
        state: Mapping[str, object],
        *,
        collections: tuple[str, ...] | None = None,
        dtype=None,
        allow_nonfinite: bool = False,
        copy: bool = True,
    ) -> dict[str, dict]:
        """torch-named tensors -> nested Flax variables {collection: {...}} of jax arrays.

        state: any mapping (a state_dict, or a lazy checkpoint mapping read one tensor at a time);
        values are torch tensors or numpy arrays in torch layout. collections: convert only these
        (e.g. ("params",) for gradients); None means all that the Flax twin has. dtype: optional
        target dtype (cast once, from the source dtype). copy=True (default): every result owns
        its memory, so later in-place updates of the source tensors cannot leak into the JAX
        arrays; copy=False hands layout-unchanged tensors over zero-copy (checkpoint loads). Raises KeyMismatchError listing every missing,
        unexpected and mis-shaped key (ShapeMismatchError when only shapes differ), and
        NonFiniteWeightError for NaN/Inf unless allow_nonfinite.
        """
        wanted = set(collections) if collections is not None else self.target.collections()
        used: set[str] = set()
        out: dict[Leaf, object] = {}
        produced: set[Leaf] = set()
        missing, unexpected, mismatched, nonfinite = [], [], [], []
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                key = layer.torch_key(tmap.torch_name)
                if tmap.collection not in wanted:
                    used.add(key)
                    continue
                leaf = layer.flax_leaf(tmap.collection, tmap.flax_name)
                if key not in state:
                    if leaf in self.target.shapes:
                        missing.append((key, f"torch {key} (for flax {_leaf_str(leaf)})"))
                        produced.add(leaf)
                    continue
                used.add(key)
                source = to_numpy(state[key])
                value = tmap.to_flax(source, layer.info)
                if leaf not in self.target.shapes:
                    unexpected.append((key, f"torch {key} -> flax {_leaf_str(leaf)} (no such flax leaf)"))
                    continue
                produced.add(leaf)
                want = tuple(self.target.shapes[leaf].shape)
                if tuple(value.shape) != want:
                    mismatched.append(
                        f"torch {key} {tuple(source.shape)} -> flax {_leaf_str(leaf)} "
                        f"{tuple(value.shape)}, flax expects {want}"
                    )
                    continue
                if not allow_nonfinite and not _all_finite(source):
                    nonfinite.append(key)
                    continue
                # Materialize now, one tensor at a time: the transposed view is copied once and
                # nothing but the result stays alive (peak memory ~ the output's bytes).
                out[leaf] = to_jax(value, dtype, copy=copy)
                del source, value
            for name in layer.rule.dropped:
                used.add(layer.torch_key(name))
        unclaimed = [
            leaf for leaf in self.target.shapes if leaf[0] in wanted and leaf not in produced
        ]
        unused = [key for key in state.keys() if key not in used]
        # Closest candidates, compared as dotted torch-style names: an unexpected torch key
        # against the torch keys the plan wanted but did not get and the unclaimed Flax leaves;
        # a missing key against the torch keys nobody used.
        unclaimed_s = [_leaf_str(leaf) for leaf in unclaimed]
        wanted_names = [k for k, _ in missing] + [".".join(leaf[1:]) for leaf in unclaimed]
        spare = unused + [k for k, _ in unexpected]
        lines_unexpected = [with_closest(line, k, wanted_names, "wanted key") for k, line in unexpected]
        lines_unexpected += [with_closest(f"torch {k} (no layer of the plan owns it)", k, wanted_names,
                                          "wanted key") for k in unused]
        missing = [with_closest(line, k, spare, "unused torch key") for k, line in missing]
        missing += [with_closest(f"flax {s} (no torch tensor maps to it)", ".".join(s.split("/")[1:]),
                                 spare, "unused torch key") for s in unclaimed_s]
        if missing or lines_unexpected or mismatched:
            cls = KeyMismatchError if missing or lines_unexpected else ShapeMismatchError
            raise cls(missing, lines_unexpected, mismatched, context="torch -> flax")
        if nonfinite:
            raise NonFiniteWeightError(nonfinite)
        variables = traverse_util.unflatten_dict(out)
        if "params" in wanted or collections is None:
            variables.setdefault("params", {})  # a parameter-free twin still takes {"params": {}}
        return variables

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
        spare = [_leaf_str(k) for k in flat if k not in used and k[0] in wanted]
        missing = [with_closest(m, m.split()[1], spare, "unused flax leaf") for m in missing]
        unexpected = [f"flax {s} (no torch tensor maps to it)" for s in spare]
        if missing or unexpected:
            raise KeyMismatchError(missing, unexpected, context="flax -> torch")
        if collections is None:
            out.update(self.dropped_defaults)
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


def _is_nnx(module) -> bool:
    from flax import nnx

    return isinstance(module, nnx.Module)


def _own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    # non-persistent buffers (e.g. precomputed position ids) are not in the state_dict: skip them
    skip = getattr(module, "_non_persistent_buffers_set", set())
    return {k: v for k, v in own.items() if v is not None and k not in skip}


def _leaves_of(rule: Rule, names, path: tuple[str, ...]) -> list[Leaf]:
    by_name = rule.by_torch_name()
    return [(by_name[n].collection, *path, *by_name[n].flax_name.split("/")) for n in names if n in by_name]


def _direct_rule_at(names, path, target: FlaxTarget) -> Rule:
    """A direct-copy rule; each tensor goes to the collection that has its leaf ("params" if none)."""
    colls = sorted(target.collections(), key=lambda c: c != "params")
    return direct_rule({n: next((c for c in colls if (c, *path, n) in target.shapes), "params")
                        for n in names})


def _converted_shape(rule: Rule, name: str, shape: tuple[int, ...], info: LayerInfo) -> tuple[int, ...]:
    tmap = rule.by_torch_name()[name]
    # A zero-stride stand-in: transposes and flips of it cost nothing; only a reshape copies.
    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), shape, (0,) * len(shape))
    return tuple(tmap.to_flax(dummy, info).shape)


def _fits(layer: PlannedLayer, path: tuple[str, ...], target: FlaxTarget, *, shapes: bool) -> bool:
    info = LayerInfo(layer.info.torch_path, path, layer.info.torch_type, layer.info.torch_module,
                     target.modules.get(path), layer.info.flatten)
    leaves = _leaves_of(layer.rule, layer.own_shapes, path)
    if not leaves or any(leaf not in target.shapes for leaf in leaves):
        return False
    if not shapes:
        return True
    return all(
        tuple(target.shapes[leaf].shape) == _converted_shape(layer.rule, n, s, info)
        for n, s, leaf in zip(layer.own_shapes, layer.own_shapes.values(), leaves)
    )


def _module_paths_in_order(target: FlaxTarget) -> list[tuple[str, ...]]:
    """Flax module paths owning leaves, in creation order (variables are created in call order)."""
    seen: dict[tuple[str, ...], None] = {}
    for leaf in target.shapes:
        seen.setdefault(tuple(leaf[1:-1]), None)
    return list(seen)


def _same_kind(rule: Rule, flax_module) -> bool:
    if flax_module is None:
        return True  # target read off variables: no types, shapes decide
    frule = flax_rule_for(type(flax_module))
    return frule is not None and (frule is rule or (frule.name and frule.name == rule.name))


def _resolve_paths(layers: list[PlannedLayer], target: FlaxTarget, sequential: set[str], rename: Rename):
    """Give each layer its Flax path: rename, naming rules, then structural matching."""
    claimed: set[tuple[str, ...]] = set()
    unresolved: list[tuple[PlannedLayer, tuple[str, ...]]] = []
    for layer in layers:
        renamed = apply_rename(layer.info.torch_path, rename)
        cands = candidate_paths(renamed, sequential)
        hit = next((c for c in cands if c not in claimed and _fits(layer, c, target, shapes=False)), None)
        if hit is None:
            unresolved.append((layer, cands[0]))
            continue
        claimed.add(hit)
        _set_path(layer, hit, target)
    free = [p for p in _module_paths_in_order(target) if p not in claimed]
    for layer, fallback in unresolved:
        hit = None
        for p in free:
            rule = layer.rule
            if layer.info.torch_type is None and rule.name == "direct" and p in target.modules:
                # no torch module: the layer type is the Flax module's, verified by names and shapes
                rule = flax_rule_for(type(target.modules[p])) or rule
                if not set(layer.own_shapes) <= set(rule.by_torch_name()) | set(rule.dropped):
                    continue
            elif not _same_kind(rule, target.modules.get(p)):
                continue
            own = {n: s for n, s in layer.own_shapes.items() if n not in rule.dropped}
            trial = PlannedLayer(layer.info, rule, own)
            if _fits(trial, p, target, shapes=True):
                hit, layer.rule, layer.own_shapes = p, rule, own
                break
        if hit is not None:
            free.remove(hit)
        _set_path(layer, hit if hit is not None else fallback, target)


def _set_path(layer: PlannedLayer, path: tuple[str, ...], target: FlaxTarget) -> None:
    i = layer.info
    layer.info = LayerInfo(i.torch_path, path, i.torch_type, i.torch_module, target.modules.get(path), i.flatten)
    if layer.rule.name == "direct":  # collections depend on where the leaves are
        layer.rule = _direct_rule_at(layer.own_shapes, path, target)


def _check_attributes(infos: list[tuple[LayerInfo, Rule]], mode: str) -> None:
    problems = [line for info, rule in infos if rule.check and info.flax_module is not None
                for line in rule.check(info)]
    if not problems or mode == "ignore":
        return
    if mode == "warn":
        warnings.warn(str(AttributeMismatchError(problems)), UserWarning, stacklevel=3)
        return
    raise AttributeMismatchError(problems)


def _target_for(flax_module, example_input, variables, input_layout) -> FlaxTarget:
    if flax_module is not None and _is_nnx(flax_module):
        from weight_port.nnx import nnx_target

        return nnx_target(flax_module)
    if flax_module is not None:
        if example_input is None:
            raise TypeError("build_plan needs example_input together with a linen flax_module")
        flax_inputs = tuple(to_flax_layout(to_numpy(x), input_layout) for x in _as_tuple(example_input))
        return abstract_target(flax_module, flax_inputs)
    if variables is not None:
        return target_from_variables(variables)
    raise TypeError("build_plan needs a flax_module (with example_input) or variables")


def _layers_from_torch(torch_module: torch.nn.Module, target: FlaxTarget, found: Mapping):
    layers, no_rule, dropped_defaults, paramless = [], [], {}, []
    covered: list[str] = []  # modules whose rule maps their children's tensors (Rule.children)
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
        info = LayerInfo(path, (), type(module), module, None,
                         tuple(found[path]) if path in found else None)
        layer = PlannedLayer(info, rule, {n: tuple(t.shape) for n, t in own.items()
                                          if n not in rule.dropped})
        for name in rule.dropped:
            if name in own:
                dropped_defaults[layer.torch_key(name)] = to_numpy(own[name]).copy()
        layers.append(layer)
    if no_rule:
        raise NoRuleError(no_rule)
    sequential = {p for p, m in torch_module.named_modules() if isinstance(m, torch.nn.Sequential)}
    return layers, dropped_defaults, paramless, sequential


def _layers_from_state(state: Mapping, target: FlaxTarget, rename: Rename):
    """Without a torch module: group keys by module path, read layer types off the Flax twin."""
    from weight_port.sources import shape_of

    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in state.keys():
        path, _, name = key.rpartition(".")
        groups.setdefault(path, {})[name] = shape_of(state, key)
    layers, no_rule = [], []
    for path, own in groups.items():
        cands = candidate_paths(apply_rename(path, rename))
        hit = next((c for c in cands if c in target.modules), None)
        module = target.modules.get(hit) if hit is not None else None
        rule = flax_rule_for(type(module)) if module is not None else None
        if module is not None and rule is None:
            if hit and not any(leaf[1:-1] == hit and leaf[-1] in own for leaf in target.shapes):
                no_rule.append((path, f"flax {type(module).__name__}"))
                continue
        if rule is None:
            rule = direct_rule({n: "params" for n in own})
        info = LayerInfo(path, (), None, None, module, None)
        layers.append(PlannedLayer(info, rule, {n: s for n, s in own.items() if n not in rule.dropped}))
    if no_rule:
        raise NoRuleError(no_rule)
    return layers


def build_plan(
    torch_module: torch.nn.Module | None,
    flax_module=None,
    example_input=None,
    *,
    variables: Mapping | None = None,
    input_layout: str = CHANNELS_FIRST,
    flatten: Mapping[str, tuple[int, ...]] | None = None,
    state: Mapping | None = None,
    rename: Rename = None,
    check_attributes: str = "error",
) -> PortPlan:
    """Pair every torch layer owning tensors with its Flax module and conversion rule.

    torch_module: gives layer types and (by tracing) flatten order. Without it pass ``state`` (a
    state_dict or sources.load_state mapping): layer types then come from the Flax twin's module
    classes per path. flax_module: a linen Module (abstract-initialised on the channels-last
    [N, *S, C] equivalent of the torch-layout ``example_input`` [N, C, *S]) or an nnx.Module
    (read as built); without one, ``variables`` give the target. flatten: explicit
    {linear path: (C, *S)} entries, merged over what tracing finds. rename: callable or
    (regex, replacement) pairs applied to torch paths first. check_attributes: "error", "warn" or
    "ignore" when eps/momentum/groups of a Flax module differ from its torch layer's.
    """
    if check_attributes not in ("error", "warn", "ignore"):
        raise ValueError("check_attributes must be 'error', 'warn' or 'ignore'")
    target = _target_for(flax_module, example_input, variables, input_layout)
    paramless: list = []
    if torch_module is not None:
        inputs = _torch_inputs(torch_module, example_input) if example_input is not None else None
        found = find_flattened_linears(copy.deepcopy(torch_module), inputs) or {}
        found.update(dict(flatten or {}))
        layers, dropped_defaults, paramless, sequential = _layers_from_torch(torch_module, target, found)
    elif state is not None:
        if not target.modules:
            raise PortError("porting without a torch module needs a Flax module (layer types come "
                            "from it); pass flax_module and example_input")
        layers, dropped_defaults, sequential = _layers_from_state(state, target, rename), {}, set()
        for layer in layers:  # explicit flatten entries still apply
            if flatten and layer.info.torch_path in flatten:
                i = layer.info
                layer.info = LayerInfo(i.torch_path, i.flax_path, i.torch_type, None, i.flax_module,
                                       tuple(flatten[i.torch_path]))
    else:
        raise TypeError("build_plan needs a torch_module or a state (state_dict / checkpoint)")
    _resolve_paths(layers, target, sequential, rename)
    checks = [(layer.info, layer.rule) for layer in layers]
    for path, module, rule in paramless:  # e.g. LayerNorm(elementwise_affine=False): eps still matters
        flax_path = next((c for c in candidate_paths(apply_rename(path, rename), sequential)
                          if c in target.modules), None)
        if flax_path is not None:
            checks.append((LayerInfo(path, flax_path, type(module), module, target.modules[flax_path]), rule))
    _check_attributes(checks, check_attributes)
    return PortPlan(layers=layers, target=target, dropped_defaults=dropped_defaults)


__all__ = ["PortPlan", "PlannedLayer", "build_plan", "flax_path_str"]
