"""The options of one training-parity run as one value (TrainSettings), validated once for every path."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import jax
import optax
import torch

from parity.numerics import pinned
from parity.pair import TORCH_DTYPES
from parity.runtime.layouts import LayoutSpec
from parity.training._losses import LOSSES
from parity.training.optim import OptimizerSpec

DTYPES = ("float32", "float64")  # training parity's dtypes (torch and Flax both in it)


@dataclass(frozen=True)
class TrainSettings:
    """The options of one training-parity run as one value (train_check's keywords), validated."""

    steps: int = 10
    optimizer: OptimizerSpec | str = "sgd-momentum"  # a name becomes OptimizerSpec(name)
    loss: str = "cross_entropy"
    dtype: str = "float64"
    input_layout: LayoutSpec = None
    output_layout: LayoutSpec = None
    train_kwarg: str | None = None
    rename: Any = None
    flax_optimizer: optax.GradientTransformation | None = None  # None: optax_optimizer(optimizer)
    precision: str = "highest"
    name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, str):
            object.__setattr__(self, "optimizer", OptimizerSpec(self.optimizer))
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def keywords(self) -> dict:
        """The settings as train_check keywords."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @contextlib.contextmanager
    def numerics(self) -> Iterator[None]:
        """x64 for float64, JAX precision pinned, no TF32: what every training-parity run runs in."""
        x64 = jax.enable_x64(True) if self.dtype == "float64" else contextlib.nullcontext()
        with x64, pinned(precision=self.precision, tf32=False):
            yield
