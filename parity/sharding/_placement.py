"""Placement: a Flax twin's variables ported straight into their shardings, inputs batch-sharded.

One Placement per sharded run: ``port`` converts the bundle's (or a checkpoint's) weights layer
by layer with weight_port.convert_placed, each converted tensor going to its NamedSharding as
soon as it exists (a device receives only its slice: no replicated full copy per device);
``place`` does the same for variables given as they are; ``inputs`` splits the batch axis of the
(Flax-layout, batch-first) inputs over "data". ``record`` is what the report keeps of it.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from parity.data_parallel import DataParallelError, batch_size
from parity.sharding._mesh import DATA, describe_mesh, make_mesh
from parity.sharding._rules import Note, ShardOptions, plan_specs
from weight_port import convert_placed, put_sharded


def _partition(dims) -> PartitionSpec:
    return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in dims))


def _json_spec(dims) -> list:
    return [None if not axes else axes[0] if len(axes) == 1 else list(axes) for axes in dims]


class Placement:
    """The mesh, the options, and (once a plan is known) every leaf's PartitionSpec."""

    def __init__(self, mesh, options: ShardOptions | None = None):
        self.mesh = make_mesh(mesh)
        self.options = options or ShardOptions()
        self.specs: dict[tuple[str, ...], tuple] = {}
        self.notes: list[Note] = []
        self.input_specs: dict[str, list] = {}
        self.shapes: dict[str, list[int]] = {}
        self.shard_shapes: dict[str, list[int]] = {}

    def sharding(self, leaf: tuple[str, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, _partition(self.specs.get(tuple(leaf), ())))

    def port(self, plan, weights) -> dict:
        """``plan.to_flax(weights)``, each leaf converted and placed on its sharding per layer."""
        self.specs, self.notes = plan_specs(plan, self.mesh, self.options)
        return self._seen(convert_placed(plan, weights, self.sharding))

    def place(self, plan, variables) -> dict:
        """Variables given as they are ({collection: nested dict}), each leaf put on its sharding."""
        self.specs, self.notes = plan_specs(plan, self.mesh, self.options)
        flat = traverse_util.flatten_dict(dict(variables))
        return self._seen(traverse_util.unflatten_dict(
            {leaf: put_sharded(v, self.sharding(leaf)) for leaf, v in flat.items()}))

    def _seen(self, variables) -> dict:
        # what one device really holds of each leaf (the test of "each device holds its share")
        for leaf, v in traverse_util.flatten_dict(dict(variables)).items():
            self.shapes["/".join(leaf)] = list(v.shape)
            self.shard_shapes["/".join(leaf)] = list(v.addressable_shards[0].data.shape)
        return variables

    def inputs(self, tree):
        """Inputs (Flax layout, batch first) with the batch axis split over "data" when the mesh
        has it and it divides the batch; replicated otherwise (with a note)."""
        n = self.mesh.shape.get(DATA, 1)
        try:
            batch = batch_size(tree)
        except DataParallelError as exc:
            batch = None
            if n > 1:
                self.notes.append(Note("inputs", f"{exc}: inputs replicated"))
        split = n > 1 and batch is not None and batch % n == 0
        if n > 1 and batch is not None and not split:
            self.notes.append(Note("inputs", f"batch {batch} is not divisible by {DATA}={n}: inputs replicated"))

        def put(path, x):
            if not hasattr(x, "shape"):
                return x
            batched = split and np.ndim(x) >= 1 and np.shape(x)[0] == batch
            self.input_specs["input" + jax.tree_util.keystr(path)] = [DATA] if batched else []
            return put_sharded(x, NamedSharding(self.mesh, PartitionSpec(DATA) if batched else PartitionSpec()))

        return jax.tree_util.tree_map_with_path(put, tree)

    def record(self) -> dict:
        """The report's ``env["sharding"]``: mesh, style, rules, every leaf's PartitionSpec (one
        entry per dimension: null = whole, an axis, or a list of axes), its shape and the shape one
        device holds of it, the inputs' specs, and the notes."""
        return {"mesh": dict(self.mesh.shape), "devices": int(self.mesh.devices.size),
                "processes": jax.process_count(), "devices_per_process": len(self.mesh.local_devices),
                "platform": self.mesh.devices.flat[0].platform, "style": self.options.style,
                "rules": [r.text for r in self.options.rules],
                "specs": {"/".join(leaf): _json_spec(dims) for leaf, dims in self.specs.items()},
                "shapes": dict(self.shapes), "shard_shapes": dict(self.shard_shapes), "inputs": dict(self.input_specs),
                "notes": [n.to_dict() for n in self.notes]}

    def summary(self, most: int = 5) -> list[str]:
        """Report warnings: one line for the run, then the notes (the first ``most``)."""
        split = sum(any(d for d in dims) for dims in self.specs.values())
        procs = jax.process_count()
        head = (f"sharded: mesh {describe_mesh(self.mesh)} ({self.mesh.devices.size} "
                f"{self.mesh.devices.flat[0].platform} devices"
                + (f" in {procs} processes, {len(self.mesh.local_devices)} each" if procs > 1 else "")
                + f"), style {self.options.style}"
                + (f", {len(self.options.rules)} rule(s)" if self.options.rules else "")
                + f"; {split} of {len(self.specs)} variables split, the rest replicated; inputs "
                + ("split over data" if any(self.input_specs.values()) else "replicated")
                + " (per-variable PartitionSpecs in the JSON report, env.sharding)")
        lines = [head] + [f"sharding {n.where}: {n.text}" for n in self.notes[:most]]
        if len(self.notes) > most:
            lines.append(f"sharding: {len(self.notes) - most} more notes in env.sharding.notes")
        return lines


__all__ = ["Placement"]
