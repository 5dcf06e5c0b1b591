"""Flax NNX targets: read an nnx.Module twin's variables as a port target, and write them back.

NNX keeps variables on the module objects instead of in a {collection: tree} dict. Params are
``nnx.Param`` (linen's "params") and BatchNorm running statistics ``nnx.BatchStat`` named
mean/var (linen's "batch_stats"), so the linen rules apply unchanged once each variable is given
the collection of its type. List attributes appear as integer path entries (``layers/0/kernel``),
which the naming rule ``a/b/0/c`` covers.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx, traverse_util

from weight_port.flax_tree import FlaxTarget

_COLLECTIONS = ((nnx.BatchStat, "batch_stats"), (nnx.Param, "params"))


def collection_of(variable: nnx.Variable) -> str:
    """linen collection name of an nnx variable (its type, e.g. "params", "batch_stats")."""
    for cls, name in _COLLECTIONS:
        if isinstance(variable, cls):
            return name
    return type(variable).__name__.lower()


def _value(var: nnx.Variable):
    return var.get_value()  # flax >= 0.12: ``.value`` is deprecated


def _variables(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            yield tuple(str(p) for p in path), node


def nnx_target(model: nnx.Module) -> FlaxTarget:
    """Shapes per (collection, *path, leaf) and the nnx module objects per path."""
    shapes = {}
    for path, var in _variables(model):
        shapes[(collection_of(var), *path)] = jax.ShapeDtypeStruct(_value(var).shape, _value(var).dtype)
    modules = {tuple(str(p) for p in path): node for path, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Module)}
    return FlaxTarget(shapes=shapes, modules=modules)


def nnx_variables(model: nnx.Module) -> dict:
    """{collection: nested dict} of the model's current values (linen-style variables)."""
    flat = {(collection_of(var), *path): _value(var) for path, var in _variables(model)}
    return traverse_util.unflatten_dict(flat)


def update_nnx(model: nnx.Module, variables: Mapping) -> nnx.State:
    """Write linen-style variables into ``model``'s nnx Variables in place; returns nnx.state."""
    flat = traverse_util.flatten_dict(dict(variables))
    for path, var in _variables(model):
        key = (collection_of(var), *path)
        if key in flat:
            var.set_value(flat[key])
    return nnx.state(model)


__all__ = ["collection_of", "nnx_target", "nnx_variables", "update_nnx"]
