"""train_check: port torch's initial weights, train both twins on identical batches, compare per step.

The entry point: validates the options (TrainSettings), then runs the one training loop
(parity.training._loop) with torch stepped in this process (LocalStepper) or by torch DDP
workers against the sharded Flax step (parity.training.ddp_train).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import optax
import torch

from parity.runtime.layouts import LayoutSpec
from parity.training._loop import train_pair
from parity.training._settings import TrainSettings
from parity.training._report import TrainReport
from parity.training._stepper import Batch, LocalStepper
from parity.training.ddp_train import train_check_data_parallel
from parity.training.optim import OptimizerSpec


def train_check(
    torch_module: torch.nn.Module,
    flax_module: nn.Module,
    data: Sequence[Batch] | Callable[[int], Batch],
    *,
    steps: int = 10,
    optimizer: OptimizerSpec | str = "sgd-momentum",
    loss: str = "cross_entropy",
    dtype: str = "float64",
    input_layout: LayoutSpec = None,
    output_layout: LayoutSpec = None,
    train_kwarg: str | None = None,
    rename=None,
    flax_optimizer: optax.GradientTransformation | None = None,
    precision: str = "highest",
    name: str | None = None,
    data_parallel: int | None = None,
) -> TrainReport:
    """Train ``torch_module`` and its Flax twin side by side for ``steps`` steps and compare.

    data: a sequence of (x, y) batches, cycled, or a callable step -> (x, y). x is the torch
    module's input in torch layout (one array, or a tuple of positional inputs; integer leaves
    such as token ids are fed as they are); y holds class labels ([N] or [N, H, W], int) for "cross_entropy"
    (logits) and "nll" (log-probabilities), or targets shaped like the torch output for "mse".
    optimizer: an OptimizerSpec or an optimizer name (OPTIMIZERS); its optax twin is built here
    unless ``flax_optimizer`` is given (to test your own optax setup against torch's).
    input_layout / output_layout: as in parity.check (declared, or inferred); the loss reads the
    output (its first leaf when the model returns a pytree: logits of a ModelOutput). The Flax
    twin (Linen or NNX) runs in train mode through its train keyword (found from its signature,
    or ``train_kwarg``); rename is passed to the port.
    The torch module is copied, never mutated. Both sides run in train mode (BatchNorm uses batch
    statistics and updates running ones) with dropout held deterministic.
    data_parallel=N: torch DistributedDataParallel on N local gloo processes against the Flax step
    under jit on the batch sharded over an N-device mesh (parity.training.ddp_train; the batch a
    multiple of N, JAX needs N devices: on CPU XLA_FLAGS=--xla_force_host_platform_device_count=N
    before JAX initialises, which the CLI sets itself).
    """
    settings = TrainSettings(steps=steps, optimizer=optimizer, loss=loss, dtype=dtype, input_layout=input_layout,
                             output_layout=output_layout, train_kwarg=train_kwarg, rename=rename,
                             flax_optimizer=flax_optimizer, precision=precision, name=name)
    if data_parallel is not None:
        return train_check_data_parallel(torch_module, flax_module, data, data_parallel=data_parallel,
                                         **settings.keywords())
    return train_pair(torch_module, flax_module, data, settings, partial(LocalStepper, settings=settings))



__all__ = ["train_check"]
