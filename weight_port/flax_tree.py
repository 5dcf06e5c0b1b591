"""What the Flax twin expects: variable shapes per collection and the module at each path.

Shapes come from ``jax.eval_shape`` of init (no random weights are materialized), and the module
objects from a method interceptor during that same abstract init, so layer types and attributes
(e.g. ConvTranspose.transpose_kernel) are read from the Flax side without running anything.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util


@dataclass(frozen=True)
class FlaxTarget:
    """shapes: {(collection, *module_path, leaf): ShapeDtypeStruct}; modules: {path: Module}."""

    shapes: dict[tuple[str, ...], jax.ShapeDtypeStruct]
    modules: dict[tuple[str, ...], nn.Module]

    def collections(self) -> set[str]:
        return {k[0] for k in self.shapes}


def call_kwargs(flax_module: nn.Module, train: bool) -> dict[str, Any]:
    """Pass ``train=`` only to twins whose __call__ takes it (the project's convention)."""
    params = inspect.signature(type(flax_module).__call__).parameters
    return {"train": train} if "train" in params else {}


def abstract_target(flax_module: nn.Module, flax_inputs: tuple[np.ndarray, ...]) -> FlaxTarget:
    """Abstract init of ``flax_module`` on channels-last ``flax_inputs``."""
    modules: dict[tuple[str, ...], nn.Module] = {}

    def record(next_fun, args, kwargs, context):
        modules.setdefault(tuple(context.module.path), context.module)
        return next_fun(*args, **kwargs)

    specs = tuple(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in flax_inputs)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
        variables = jax.eval_shape(
            lambda r, *xs: flax_module.init(r, *xs, **call_kwargs(flax_module, False)), rngs, *specs
        )
    flat = traverse_util.flatten_dict(dict(variables))
    return FlaxTarget(shapes=dict(flat), modules=modules)
