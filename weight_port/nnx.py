"""Flax NNX targets: read an nnx.Module twin's variables as a port target, and write them back.

NNX keeps variables on the module objects instead of in a {collection: tree} dict. Params are
``nnx.Param`` (linen's "params") and BatchNorm running statistics ``nnx.BatchStat`` named
mean/var (linen's "batch_stats"), so the linen rules apply unchanged once each variable is given
the collection of its type. List attributes appear as integer path entries (``layers/0/kernel``),
which the naming rule ``a/b/0/c`` covers.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx, traverse_util

from weight_port.flax_tree import FlaxTarget, call_kwargs, leaf_paths
from weight_port.jaxpr_flatten import find_flattened_denses

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


def nnx_target(model: nnx.Module, flax_inputs: tuple | None = None, *,
               channels_last: tuple[bool, ...] = ()) -> FlaxTarget:
    """Shapes per (collection, *path, leaf) and the nnx module objects per path.

    With ``flax_inputs`` (channels-last arrays), one abstract call of the model also gives the
    modules' execution order and the flatten-then-Dense sites (as linen's abstract init does).
    """
    shapes = {}
    for path, var in _variables(model):
        shapes[(collection_of(var), *path)] = jax.ShapeDtypeStruct(_value(var).shape, _value(var).dtype)
    modules = {tuple(str(p) for p in path): node for path, node in nnx.iter_graph(model)
               if isinstance(node, nnx.Module)}
    if flax_inputs is None:
        return FlaxTarget(shapes=shapes, modules=modules)
    order, flatten = _trace_call(model, flax_inputs, shapes, channels_last)
    return FlaxTarget(shapes=shapes, modules=modules, order=order, flatten=flatten)


@contextlib.contextmanager
def _recording_calls(types: set[type], on_call):
    """Wrap each module class's __call__ to call ``on_call(module, args, kwargs)`` at entry (NNX
    has no method interceptor; special methods are looked up on the class, so the class is
    patched, and restored on exit)."""
    saved = {}
    for cls in types:
        original = vars(cls)["__call__"]

        def wrapper(self, *args, __original=original, **kwargs):
            on_call(self, args, kwargs)
            return __original(self, *args, **kwargs)

        saved[cls] = original
        cls.__call__ = wrapper
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.__call__ = original


def _call_types(model: nnx.Module) -> set[type]:
    return {cls for node in _modules(model) for cls in type(node).__mro__
            if issubclass(cls, nnx.Module) and "__call__" in vars(cls)}


def _trace_call(model, flax_inputs, shapes, channels_last):
    graphdef, state = nnx.split(model)
    order: dict[tuple[str, ...], None] = {}

    def call(st, *xs):
        m = nnx.merge(graphdef, st)
        path_of = {id(node): tuple(str(p) for p in path) for path, node in nnx.iter_graph(m)
                   if isinstance(node, nnx.Module)}

        def note(module, _args, _kwargs):  # insertion order is first-call (execution) order
            if id(module) in path_of:
                order.setdefault(path_of[id(module)], None)

        kwargs = call_kwargs(m, False)  # eval mode, as linen's abstract init runs
        with _recording_calls(_call_types(m), note):
            return m(*xs, **kwargs)

    specs = tuple(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in flax_inputs)
    jaxpr = jax.make_jaxpr(call)(state, *specs).jaxpr
    leaf_of_var = {}
    for var, path in zip(jaxpr.invars, leaf_paths(state)):
        path = path[:-1] if path and path[-1] == "value" else path
        coll = next((c for c in ("params", "batch_stats") if (c, *path) in shapes), None)
        if coll is not None:
            leaf_of_var[var] = (coll, *path)
    inputs = jaxpr.invars[len(jaxpr.invars) - len(specs):]
    cl = {v for v, flag in zip(inputs, channels_last) if flag}
    return tuple(order), find_flattened_denses(jaxpr, leaf_of_var, cl)


class _Found(Exception):
    """Stops the consumer search's abstract call once every wanted input is found."""


def nnx_first_consumers(model: nnx.Module, inputs: tuple, wanted: list[int], layout_of) -> dict[int, str]:
    """{input index: layout_of(module)} for the first module with a known layout (layout_of
    returns one, else None) that receives input ``i`` itself, from one abstract call of
    ``model`` stopped there; what the call never reaches (or refuses) is left out."""
    graphdef, state = nnx.split(model)
    found: dict[int, str] = {}

    def call(st, *xs):
        m = nnx.merge(graphdef, st)
        ids = {id(xs[i]): i for i in wanted}

        def note(module, args, kwargs):
            layout = layout_of(module)
            if layout is None:
                return
            for leaf in jax.tree_util.tree_leaves((args, kwargs)):
                if id(leaf) in ids:
                    found.setdefault(ids[id(leaf)], layout)
            if len(found) == len(ids):
                raise _Found

        with _recording_calls(_call_types(m), note):
            return m(*xs, **call_kwargs(m, False))

    specs = tuple(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in inputs)
    try:
        jax.eval_shape(call, state, *specs)
    except _Found:
        pass
    except Exception:  # noqa: BLE001 -- refused before any consumer: the caller names the input
        pass
    return found


def _modules(model: nnx.Module):
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)]


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


__all__ = ["collection_of", "nnx_first_consumers", "nnx_target", "nnx_variables", "update_nnx"]
