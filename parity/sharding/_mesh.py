"""Mesh strings ("data=2,model=4") and the jax.sharding.Mesh they name; ShardingError."""
from __future__ import annotations

import math
import re

from parity._xla_flags import FORCE_DEVICES
from parity.errors import UsageError

DATA, MODEL = "data", "model"  # the batch / FSDP axis and the tensor-parallel axis of the rule table
_AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ShardingError(UsageError):
    """A sharded run that cannot be set up: a bad --mesh string, a mesh that needs more devices
    than JAX has, a --shard-rule that does not parse, names an axis the mesh lacks, or matches no
    parameter (one line, exit 2; never a verdict)."""


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """``"data=2,model=4"`` -> ``(("data", 2), ("model", 4))``: axis names and sizes in mesh order.
    Needs no JAX (the CLI reads the device count before JAX initialises)."""
    axes: list[tuple[str, int]] = []
    for part in str(text).split(","):
        name, eq, size = part.strip().partition("=")
        name, size = name.strip(), size.strip()
        if not eq or not _AXIS.fullmatch(name) or not size.isdigit() or int(size) < 1:
            raise ShardingError(f"--mesh {text!r}: each entry is NAME=SIZE with SIZE >= 1 "
                                f"(e.g. data=2,model=4); {part.strip()!r} is not")
        if name in dict(axes):
            raise ShardingError(f"--mesh {text!r}: axis {name!r} given twice")
        axes.append((name, int(size)))
    return tuple(axes)


def mesh_devices(text: str) -> int:
    """How many devices the mesh string needs (the product of its axis sizes)."""
    return math.prod(size for _, size in parse_mesh(text))


def make_mesh(mesh, devices=None):
    """A jax.sharding.Mesh from a mesh string (over the first devices of the default backend) or
    a Mesh given as is; ShardingError when the string is bad or needs more devices than exist."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    if isinstance(mesh, Mesh):
        return mesh
    if not isinstance(mesh, str):
        raise ShardingError(f"mesh must be a string like 'data=2,model=4' or a jax.sharding.Mesh, "
                            f"got {type(mesh).__name__}")
    axes = parse_mesh(mesh)
    need = math.prod(s for _, s in axes)
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < need:
        hint = (f"; on CPU set XLA_FLAGS={FORCE_DEVICES}={need} before JAX initialises (the parity CLI does "
                "this itself when nothing set it)" if devices[0].platform == "cpu" else "")
        raise ShardingError(f"--mesh {mesh!r} needs {need} devices, JAX has {len(devices)} "
                            f"({devices[0].platform}){hint}")
    return Mesh(np.array(devices[:need]).reshape([s for _, s in axes]), tuple(n for n, _ in axes))


def describe_mesh(mesh) -> str:
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


__all__ = ["DATA", "MODEL", "ShardingError", "describe_mesh", "make_mesh", "mesh_devices", "parse_mesh"]
