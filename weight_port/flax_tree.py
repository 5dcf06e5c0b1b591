"""What the Flax twin expects: variable shapes per collection and the module at each path.

Shapes come from one abstract trace of init (``jax.make_jaxpr``: no random weights are
materialized), the module objects and their call order from a method interceptor during that same
trace, and flatten-then-Dense sites from its jaxpr (weight_port.jaxpr_flatten) -- so layer types,
attributes (e.g. ConvTranspose.transpose_kernel), execution order and flatten order are all read
from the Flax side without running anything.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.extend import core as jcore

from weight_port.jaxpr_flatten import Flatten, find_flattened_denses

Path = tuple[str, ...]


@dataclass(frozen=True)
class FlaxTarget:
    """shapes: {(collection, *module_path, leaf): ShapeDtypeStruct}; modules: {path: Module}.

    order: module paths in the order the twin first calls them (traced), or None when no call was
    traced (a target read off variables, an NNX twin without an example input). flatten: the
    Dense paths fed by a flatten, as the twin's jaxpr shows them.
    """

    shapes: dict[tuple[str, ...], jax.ShapeDtypeStruct]
    modules: dict[tuple[str, ...], nn.Module]
    order: tuple[Path, ...] | None = None
    flatten: dict[Path, Flatten] = field(default_factory=dict)

    def collections(self) -> set[str]:
        return {k[0] for k in self.shapes}


def is_nnx(obj, kind: str = "Module") -> bool:
    """Whether ``obj`` is an nnx.Module (or nnx.<kind>), without importing flax.nnx (~0.4 s cold):
    if nnx was never imported, nothing can be an instance of its classes."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, getattr(nnx, kind))


# Train-mode keywords a twin's __call__ may take, and whether the value is ``train`` itself or
# its negation (``deterministic=True`` and ``use_running_average=True`` mean eval mode).
TRAIN_KWARGS: dict[str, bool] = {"train": False, "training": False, "deterministic": True,
                                 "use_running_average": True}


class TrainModeError(TypeError):
    """train=True asked of a twin that has no way to be told (no train keyword, no train())."""


def train_kwarg_of(flax_module) -> str | None:
    """The train-mode keyword of the twin's ``__call__`` (first of TRAIN_KWARGS it takes), or None."""
    params = inspect.signature(type(flax_module).__call__).parameters
    return next((k for k in TRAIN_KWARGS if k in params), None)


def call_kwargs(flax_module, train: bool, train_kwarg: str | None = None) -> dict[str, Any]:
    """Keyword arguments that put the twin in train or eval mode.

    train_kwarg: the keyword to use (one of TRAIN_KWARGS, or any keyword meaning "train" when it
    is True); default: found from ``__call__``'s signature. A twin without one gets no keyword;
    whether that is acceptable for train=True is the caller's decision (see require_train_mode).
    """
    params = inspect.signature(type(flax_module).__call__).parameters
    if train_kwarg is None:
        train_kwarg = train_kwarg_of(flax_module)
        if train_kwarg is None:
            return {}
    elif train_kwarg not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise TrainModeError(f"train_kwarg={train_kwarg!r}: {type(flax_module).__name__}.__call__ takes "
                             f"no such keyword (it takes {', '.join(list(params)[1:]) or 'nothing'})")
    inverted = TRAIN_KWARGS.get(train_kwarg, False)
    return {train_kwarg: (not train) if inverted else train}


def _key_str(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree) -> list[tuple[str, ...]]:
    """Paths of a pytree's leaves, in jax's flattening order (the order of a jaxpr's vars)."""
    return [tuple(_key_str(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract_target(
    flax_module: nn.Module, flax_inputs: tuple[np.ndarray, ...], *, channels_last: tuple[bool, ...] = ()
) -> FlaxTarget:
    """Abstract init of ``flax_module`` on channels-last ``flax_inputs``.

    channels_last: per input, whether it is the channels-last form of a channels-first torch input
    (so a flatten of it feeds the Dense in another order than torch's).
    """
    modules: dict[tuple[str, ...], nn.Module] = {}

    def record(next_fun, args, kwargs, context):
        # setdefault at entry: insertion order is first-call (execution) order, parents first
        modules.setdefault(tuple(context.module.path), context.module)
        return next_fun(*args, **kwargs)

    specs = tuple(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in flax_inputs)

    def init(*xs):
        # Keys made inside the trace: concrete ones (jax.random.key outside) would compile XLA
        # seeding computations, ~0.1 s in a cold process, for values nobody reads.
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        return flax_module.init(rngs, *xs, **call_kwargs(flax_module, False))

    with nn.intercept_methods(record):
        closed, variables = jax.make_jaxpr(init, return_shape=True)(*specs)
    jaxpr = closed.jaxpr
    leaf_of_var = {v: leaf for v, leaf in zip(jaxpr.outvars, leaf_paths(variables))
                   if not isinstance(v, jcore.Literal)}  # a constant-initialised leaf is a Literal
    inputs = jaxpr.invars[len(jaxpr.invars) - len(specs):]
    cl = {v for v, flag in zip(inputs, channels_last) if flag}
    flat = traverse_util.flatten_dict(dict(variables))
    return FlaxTarget(shapes=dict(flat), modules=modules, order=tuple(modules),
                      flatten=find_flattened_denses(jaxpr, leaf_of_var, cl))
