"""The port plan: every torch layer paired with its Flax module and rule, applied both ways.

Build it once per model pair (it traces and abstract-inits), then convert any number of
state_dicts or gradient dicts with it.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from weight_port.errors import KeyMismatchError, NoRuleError
from weight_port.flatten import find_flattened_linears
from weight_port.flax_tree import FlaxTarget, abstract_target
from weight_port.layout import CHANNELS_FIRST, to_flax_layout
from weight_port.naming import flax_path_str, torch_to_flax_path
from weight_port.rules import LayerInfo, Rule, rule_for
from weight_port.tensors import to_numpy

Leaf = tuple[str, ...]  # (collection, *module_path, leaf_name)


@dataclass
class PlannedLayer:
    info: LayerInfo
    rule: Rule

    def torch_key(self, name: str) -> str:
        return f"{self.info.torch_path}.{name}" if self.info.torch_path else name

    def flax_leaf(self, collection: str, name: str) -> Leaf:
        return (collection, *self.info.flax_path, name)


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
    ) -> dict[str, dict]:
        """torch-named tensors -> nested Flax variables {collection: {...}} of jax arrays.

        collections: convert only these (e.g. ("params",) for gradients); None means all that the
        Flax twin has. Raises KeyMismatchError listing every missing, unexpected and mis-shaped key.
        """
        wanted = set(collections) if collections is not None else self.target.collections()
        state = dict(state)
        used: set[str] = set()
        out: dict[Leaf, np.ndarray] = {}
        missing, unexpected, mismatched = [], [], []
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                if tmap.collection not in wanted:
                    used.add(layer.torch_key(tmap.torch_name))
                    continue
                key = layer.torch_key(tmap.torch_name)
                leaf = layer.flax_leaf(tmap.collection, tmap.flax_name)
                if key not in state:
                    if leaf in self.target.shapes:
                        missing.append(f"torch {key} (for flax {'/'.join(leaf)})")
                    continue
                used.add(key)
                value = tmap.to_flax(to_numpy(state[key]), layer.info)
                if leaf not in self.target.shapes:
                    unexpected.append(f"torch {key} -> flax {'/'.join(leaf)} (no such flax leaf)")
                    continue
                want = tuple(self.target.shapes[leaf].shape)
                if tuple(value.shape) != want:
                    mismatched.append(
                        f"torch {key} {tuple(to_numpy(state[key]).shape)} -> flax {'/'.join(leaf)} "
                        f"{tuple(value.shape)}, flax expects {want}"
                    )
                    continue
                out[leaf] = value
            for name in layer.rule.dropped:
                used.add(layer.torch_key(name))
        for key in state:
            if key not in used:
                unexpected.append(f"torch {key} (no layer of the plan owns it)")
        for leaf in self.target.shapes:
            if leaf[0] in wanted and leaf not in out and not any(leaf in m for m in missing):
                if not any("/".join(leaf) in m for m in missing + mismatched + unexpected):
                    missing.append(f"flax {'/'.join(leaf)} (no torch tensor maps to it)")
        if missing or unexpected or mismatched:
            raise KeyMismatchError(missing, unexpected, mismatched, context="torch -> flax")
        converted = {k: jnp.asarray(v if dtype is None else v.astype(dtype)) for k, v in out.items()}
        return traverse_util.unflatten_dict(converted)

    # -- flax -> torch -----------------------------------------------------------------------
    def to_torch(
        self, variables: Mapping[str, Mapping], *, collections: tuple[str, ...] | None = None
    ) -> dict[str, np.ndarray]:
        """Nested Flax variables -> torch-named numpy arrays in torch layout.

        With collections=None the result is a full state_dict (dropped tensors such as
        num_batches_tracked refilled from the torch module the plan was built from).
        """
        flat = traverse_util.flatten_dict(dict(variables))
        wanted = set(collections) if collections is not None else self.target.collections()
        out: dict[str, np.ndarray] = {}
        missing = []
        used: set[Leaf] = set()
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                if tmap.collection not in wanted:
                    continue
                leaf = layer.flax_leaf(tmap.collection, tmap.flax_name)
                if leaf not in flat:
                    if leaf in self.target.shapes:
                        missing.append(f"flax {'/'.join(leaf)} (for torch {layer.torch_key(tmap.torch_name)})")
                    continue
                used.add(leaf)
                out[layer.torch_key(tmap.torch_name)] = tmap.to_torch(np.asarray(flat[leaf]), layer.info)
        unexpected = [
            f"flax {'/'.join(k)} (no torch tensor maps to it)"
            for k in flat
            if k not in used and k[0] in wanted
        ]
        if missing or unexpected:
            raise KeyMismatchError(missing, unexpected, context="flax -> torch")
        if collections is None:
            out.update(self.dropped_defaults)
        return out

    def torch_name_of(self, leaf: Leaf) -> str | None:
        for layer in self.layers:
            for tmap in layer.rule.tensors:
                if layer.flax_leaf(tmap.collection, tmap.flax_name) == leaf:
                    return layer.torch_key(tmap.torch_name)
        return None


def _as_tuple(example_input) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def target_from_variables(variables: Mapping) -> FlaxTarget:
    """A Flax target read off existing variables (when there is no Flax module to init)."""
    flat = traverse_util.flatten_dict(dict(variables))
    return FlaxTarget({k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in flat.items()}, {})


def build_plan(
    torch_module: torch.nn.Module,
    flax_module: nn.Module | None = None,
    example_input=None,
    *,
    variables: Mapping | None = None,
    input_layout: str = CHANNELS_FIRST,
    flatten: Mapping[str, tuple[int, ...]] | None = None,
) -> PortPlan:
    """Pair every torch layer owning tensors with its Flax module and conversion rule.

    example_input: torch-layout tensor(s) ([N, C, *S] for input_layout "NC..."); the Flax side is
    abstract-initialised on the channels-last equivalent. Without a Flax module, ``variables``
    give the target and flatten order is inferred from the torch graph alone. flatten: explicit
    {linear path: (C, *S)} entries, merged over what tracing finds.
    """
    if flax_module is not None:
        if example_input is None:
            raise TypeError("build_plan needs example_input together with flax_module")
        inputs = _as_tuple(example_input)
        flax_inputs = tuple(to_flax_layout(to_numpy(x), input_layout) for x in inputs)
        target = abstract_target(flax_module, flax_inputs)
    elif variables is not None:
        inputs = _as_tuple(example_input) if example_input is not None else None
        target = target_from_variables(variables)
    else:
        raise TypeError("build_plan needs a flax_module (with example_input) or variables")
    found = find_flattened_linears(copy.deepcopy(torch_module), inputs) or {}
    found.update(dict(flatten or {}))

    layers, no_rule = [], []
    dropped_defaults: dict[str, np.ndarray] = {}
    for path, module in torch_module.named_modules():
        own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        own = {k: v for k, v in own.items() if v is not None}
        if not own:
            continue
        rule = rule_for(type(module))
        if rule is None:
            no_rule.append((path, type(module).__name__))
            continue
        flax_path = torch_to_flax_path(path)
        info = LayerInfo(
            torch_path=path,
            flax_path=flax_path,
            torch_type=type(module),
            torch_module=module,
            flax_module=target.modules.get(flax_path),
            flatten=tuple(found[path]) if path in found else None,
        )
        layer = PlannedLayer(info, rule)
        for name in rule.dropped:
            if name in own:
                dropped_defaults[layer.torch_key(name)] = to_numpy(own[name]).copy()
        layers.append(layer)
    if no_rule:
        raise NoRuleError(no_rule)
    return PortPlan(layers=layers, target=target, dropped_defaults=dropped_defaults)


__all__ = ["PortPlan", "PlannedLayer", "build_plan", "flax_path_str"]
