"""The data-parallel mesh: N devices on one "data" axis, batch sharded, parameters replicated."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parity._xla_flags import FORCE_DEVICES, with_cpu_devices
from weight_port import put_sharded

AXIS = "data"


class DataParallelError(ValueError):
    """A data-parallel run that cannot be set up: too few devices, a batch N does not divide."""


def request_cpu_devices(n: int) -> None:
    """Ask XLA for ``n`` simulated CPU devices. Only effective before JAX initialises its backends
    (the first jax.devices() / computation), which is why the CLI calls it before any work and
    tests run multi-device cases in their own process with XLA_FLAGS set."""
    os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), n, replace=False)


def data_mesh(n: int, devices=None) -> Mesh:
    """A 1-D mesh of the first ``n`` devices (of the default backend) on axis "data"."""
    if n < 1:
        raise DataParallelError(f"data_parallel must be >= 1, got {n}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise DataParallelError(
            f"data_parallel={n} needs {n} devices, JAX has {len(devices)} ({devices[0].platform}); on CPU "
            f"set XLA_FLAGS={FORCE_DEVICES}={n} before JAX initialises (the parity CLI does this itself)")
    return Mesh(np.array(devices[:n]), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data", the rest whole: [N, ...] -> N/n per device."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def shard_batch(tree, mesh: Mesh, batch: int, where: str = "input"):
    """Place every array leaf of ``tree`` (Flax layout, batch first) on the mesh: leaves whose
    leading axis is the batch are split over "data", others (scalars, per-model constants)
    replicated. On a mesh over several processes (jax.distributed) each process builds only its
    own devices' shards (weight_port.put_sharded). DataParallelError, naming the leaf, when the batch does not divide evenly."""
    n = mesh.devices.size
    if batch % n:
        raise DataParallelError(f"{where}: batch {batch} is not a multiple of data_parallel={n}")

    def put(path, x):
        if not hasattr(x, "shape"):
            return x
        batched = np.ndim(x) >= 1 and np.shape(x)[0] == batch
        return put_sharded(x, batch_sharded(mesh) if batched else replicated(mesh))

    return jax.tree_util.tree_map_with_path(put, tree)


def replicate(tree, mesh: Mesh):
    """Every leaf whole on every device of the mesh (a mesh over several processes included)."""
    return jax.tree_util.tree_map(lambda x: put_sharded(x, replicated(mesh)), tree)


def batch_size(args: tuple) -> int:
    """The leading dimension shared by the input leaves (Flax layout); DataParallelError if none."""
    sizes = {int(np.shape(x)[0]) for x in jax.tree_util.tree_leaves(args)
             if hasattr(x, "shape") and np.ndim(x) >= 1}
    if len(sizes) != 1:
        raise DataParallelError(f"cannot tell the batch size: input leading dimensions {sorted(sizes)}")
    return sizes.pop()


def per_device_batch(args) -> int:
    """Rows of the batch each device holds (the first array leaf's first addressable shard):
    batch / N when the batch is really split, the whole batch when it was replicated."""
    leaf = next(x for x in jax.tree_util.tree_leaves(args) if hasattr(x, "addressable_shards"))
    return int(leaf.addressable_shards[0].data.shape[0])
