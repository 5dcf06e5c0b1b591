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
