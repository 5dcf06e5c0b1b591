"""Streaming ports: convert a checkpoint one group of layers at a time (a shard, or a layer).

A port of a sharded checkpoint (``*.index.json``) never holds the whole model: each shard's
layers are converted by the ordinary plan (``PortPlan.to_flax`` on a sub-plan restricted to
those layers, so there is one conversion path) and written, or placed on devices, before the
next shard is opened. Peak host memory is then about the largest shard's converted bytes plus a
constant, not the model.

On-disk layout of a streamed port (``write_streamed``), chosen because orbax writes a pytree in
one call and has no "append these leaves" API:

    OUT/streamed.json          {"format": "weight_port.streamed/1",
                                "parts": [{"dir": "part_00000", "source": "model-00001-of-00004.safetensors",
                                           "leaves": [["params", "dense", "kernel"], ...]}, ...]}
    OUT/part_00000/            an ordinary orbax StandardCheckpointer checkpoint of that part's
                               {collection: nested dict} variables
    ...

``load_streamed(OUT)`` restores every part and merges them into the same variables, bit for bit,
as the non-streamed port's checkpoint (it also restores a plain orbax checkpoint unchanged).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from weight_port.pairing import Leaf, PlannedLayer
from weight_port.sources import ShardedState

FORMAT = "weight_port.streamed/1"
MANIFEST = "streamed.json"

# A target sharding for each converted leaf: one Sharding for all, a pytree mirroring the
# variables ({collection: {...: Sharding}}), or a function of the leaf path
# (collection, *module path, name) -> Sharding.
ShardingSpec = object


class _Subset(Mapping):
    """A read-only view of ``state`` limited to ``keys`` (no tensor is read until asked for)."""

    def __init__(self, state: Mapping, keys: list[str]):
        self._state, self._keys = state, [k for k in keys if k in state]
        self._set = set(self._keys)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self._state[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._set

    def shape(self, key):
        from weight_port.sources import shape_of

        return shape_of(self._state, key)


def _owned_keys(layer: PlannedLayer) -> list[str]:
    return [layer.torch_key(t.torch_name) for t in layer.rule.tensors] + \
        [layer.torch_key(n) for n in layer.rule.dropped]


def _leaves(layer: PlannedLayer) -> list[Leaf]:
    return [layer.flax_leaf(t.collection, t.flax_name) for t in layer.rule.tensors]


def groups(plan, state: Mapping, *, by: str = "auto") -> list[tuple[str, list[PlannedLayer]]]:
    """The plan's layers split into conversion groups, in order: ``[(name, layers), ...]``.

    by="shard" (the default for a ShardedState): one group per shard file, a layer going with the
    shard of its first tensor (a layer split across shards reads its other tensor lazily from the
    next shard); by="layer" (the default otherwise): one group per layer. Layers none of whose
    tensors the source has go in the first group, so a missing key fails before anything is
    written.
    """
    if by == "auto":
        by = "shard" if isinstance(state, ShardedState) else "layer"
    if by == "shard" and not isinstance(state, ShardedState):
        raise TypeError(f"by='shard' needs a sharded checkpoint (*.index.json), got {type(state).__name__}")
    if by not in ("shard", "layer"):
        raise ValueError(f"by must be 'auto', 'shard' or 'layer', got {by!r}")
    if by == "layer":
        return [(layer.info.torch_path or "<root>", [layer]) for layer in plan.layers] or [("<empty>", [])]
    named: dict[str, list[PlannedLayer]] = {name: [] for name in state.shards()}
    first = next(iter(named))
    for layer in plan.layers:
        present = [k for k in _owned_keys(layer)[: len(layer.rule.tensors)] if k in state]
        named[state.shard_of(present[0]) if present else first].append(layer)
    return list(named.items())


def convert_groups(plan, state: Mapping, group_list: list[tuple[str, list[PlannedLayer]]], *,
                   dtype=None, allow_nonfinite: bool = False, copy: bool = False
                   ) -> Iterator[tuple[str, dict[Leaf, object]]]:
    """Yield ``(group name, {leaf: jax array in Flax layout})`` per group, converting lazily.

    Each group goes through ``PortPlan.to_flax`` on a sub-plan of its layers, so the checks
    (missing, unexpected, mis-shaped, non-finite) are the full port's: source keys no layer owns
    and Flax leaves no layer produces are reported with the first group.
    """
    from flax import traverse_util

    owned: set[str] = set(plan.tied)
    produced: set[Leaf] = set()
    for layer in plan.layers:
        owned.update(_owned_keys(layer))
        produced.update(_leaves(layer))
    orphan_keys = [k for k in state.keys() if k not in owned]
    unclaimed = [leaf for leaf in plan.target.shapes if leaf not in produced]
    collections = tuple(sorted(plan.target.collections()))
    for i, (name, layers) in enumerate(group_list):
        keys = [k for layer in layers for k in _owned_keys(layer)]
        # a tied tensor may be stored under one of its other names only (PortPlan.to_flax reads it there)
        keys += [a for a, c in plan.tied.items() if c in set(keys)]
        leaves = {leaf for layer in layers for leaf in _leaves(layer)}
        if i == 0:
            keys += orphan_keys
            leaves.update(unclaimed)
        sub = replace(plan, layers=layers,
                      target=replace(plan.target, shapes={k: v for k, v in plan.target.shapes.items()
                                                          if k in leaves}))
        variables = sub.to_flax(_Subset(state, keys), collections=collections, dtype=dtype,
                                allow_nonfinite=allow_nonfinite, copy=copy)
        yield name, traverse_util.flatten_dict(variables)


def sharding_for(spec: ShardingSpec, leaf: Leaf):
    """The target sharding of ``leaf`` under ``spec`` (see ShardingSpec); KeyError naming the
    leaf when a pytree spec has no entry for it."""
    import jax

    if isinstance(spec, jax.sharding.Sharding):
        return spec
    if callable(spec):
        return spec(leaf)
    node = spec
    for part in leaf:
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"sharding pytree has no entry for {'/'.join(leaf)} (stopped at {part!r})")
        node = node[part]
    return node


def put(x, sharding):
    """``jax.device_put(x, sharding)``, also for a sharding over other processes' devices (a
    jax.distributed job): there a device_put of an array held by one device would be a cross-host
    transfer, so this process builds just its own devices' shards from a host copy."""
    import jax
    import numpy as np

    if getattr(sharding, "is_fully_addressable", True):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(flat: dict[Leaf, object], spec: ShardingSpec) -> dict[Leaf, object]:
    """Move each array to its target sharding, dropping the host copy as soon as it is placed."""
    out = {}
    for leaf in list(flat):
        out[leaf] = put(flat.pop(leaf), sharding_for(spec, leaf))
    return out


def convert_placed(plan, state: Mapping, sharding: ShardingSpec, *, dtype=None,
                   allow_nonfinite: bool = False, copy: bool = False) -> dict[str, dict]:
    """Nested Flax variables, each leaf already on its target sharding; at most one group's
    converted tensors are on the host at a time (a layer, or a shard of a sharded checkpoint)."""
    from flax import traverse_util

    out: dict[Leaf, object] = {}
    for name, flat in convert_groups(plan, state, groups(plan, state), dtype=dtype,
                                     allow_nonfinite=allow_nonfinite, copy=copy):
        out.update(place(flat, sharding))
        _release(state, name)
    variables = traverse_util.unflatten_dict(out)
    variables.setdefault("params", {})
    return variables


def _release(state: Mapping, name: str) -> None:
    if isinstance(state, ShardedState):
        state.release(name)


def write_streamed(plan, state: Mapping, out: str | os.PathLike, *, dtype=None,
                   allow_nonfinite: bool = False) -> list[dict]:
    """Convert ``state`` group by group (a shard at a time for a sharded checkpoint) and write each
    group as its own orbax checkpoint under ``out`` plus the manifest (module docstring).

    Written into a temporary directory next to ``out`` and renamed into place when every part
    succeeded, so an error never leaves a partial ``out``. Returns the manifest's parts.
    """
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import traverse_util

    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"output {out} already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    parts: list[dict] = []
    try:
        root = tmp / "ckpt"
        root.mkdir()
        group_list = groups(plan, state, by="shard" if isinstance(state, ShardedState) else "layer")
        with ocp.StandardCheckpointer() as saver:
            for i, (name, flat) in enumerate(convert_groups(plan, state, group_list, dtype=dtype,
                                                            allow_nonfinite=allow_nonfinite)):
                if flat:
                    part = f"part_{i:05d}"
                    saver.save(root / part, traverse_util.unflatten_dict(
                        {k: np.asarray(v) for k, v in flat.items()}))
                    # orbax saves asynchronously: wait, so this part's arrays can be freed now
                    saver.wait_until_finished()
                    parts.append({"dir": part, "source": name, "leaves": [list(k) for k in flat]})
                del flat
                _release(state, name)
        (root / MANIFEST).write_text(json.dumps({"format": FORMAT, "parts": parts}, indent=1))
        os.rename(root, out)  # atomic on one filesystem
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return parts


def is_streamed(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_streamed(path: str | os.PathLike, *, sharding: ShardingSpec | None = None) -> dict[str, dict]:
    """Variables {collection: nested dict} from a streamed port (or a plain orbax checkpoint).

    With ``sharding``, each part's arrays are placed on their target shardings as the part is
    restored, so the whole model is never on the host at once.
    """
    import orbax.checkpoint as ocp
    from flax import traverse_util

    path = Path(path).absolute()
    if not is_streamed(path):
        restored = ocp.StandardCheckpointer().restore(path)
        if sharding is None:
            return restored
        return traverse_util.unflatten_dict(place(traverse_util.flatten_dict(restored), sharding))
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    out: dict[Leaf, object] = {}
    with ocp.StandardCheckpointer() as loader:
        for part in manifest["parts"]:
            flat = traverse_util.flatten_dict(loader.restore(path / part["dir"]))
            want = {tuple(leaf) for leaf in part["leaves"]}
            if set(flat) != want:
                raise ValueError(f"{path / part['dir']}: leaves differ from the manifest "
                                 f"(missing {sorted(want - set(flat))[:3]}, extra {sorted(set(flat) - want)[:3]})")
            out.update(place(flat, sharding) if sharding is not None else flat)
    variables = traverse_util.unflatten_dict(out)
    variables.setdefault("params", {})
    return variables


__all__ = ["FORMAT", "MANIFEST", "ShardingSpec", "convert_groups", "convert_placed", "groups",
           "is_streamed", "load_streamed", "place", "put", "sharding_for", "write_streamed"]
