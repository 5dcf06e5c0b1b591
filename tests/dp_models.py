"""Tiny BatchNorm twins for the data-parallel tests (importable: DDP workers unpickle them)."""
from __future__ import annotations

import atexit
import os
import sys

import flax.linen as nn
import torch
import torch.distributed as dist

from flax_impl.batchnorm import BatchNorm
from torch_ref import ExplicitMLP
from train_pairs import TorchDoubleNorm


class _GlobalStats:
    """Train-mode statistics of the global batch of the DDP process group: what
    torch.nn.SyncBatchNorm computes, which refuses CPU tensors (torch 2.13: "expected input tensor
    to be on GPU or XPU or privateuseone"), so a gloo run on CPU needs this one.

    The mean first, then the centred second moment, each a differentiable all-reduce of per-rank
    sums (torch.distributed.nn.functional.all_reduce: its backward all-reduces the gradient, so
    every rank's input gets the gradient of the global statistics). Two passes, as torch's
    BatchNorm: E[(x - m)^2], not E[x^2] - m^2. Outside a process group: the plain BatchNorm.
    Input [N, C, *S] (channels on axis 1).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, *range(2, x.ndim))
        per_channel = (1, -1) + (1,) * (x.ndim - 2)  # [C] -> broadcastable against [N, C, *S]
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype)
        dist.all_reduce(count)  # rows x positions over every rank
        mean = all_reduce(x.sum(dims)) / count
        centred = x - mean.view(per_channel)
        var = all_reduce((centred * centred).sum(dims)) / count  # biased: normalises the batch
        with torch.no_grad():  # torch's update: the unbiased variance into running_var
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * count / (count - 1))
            self.num_batches_tracked += 1
        y = centred / torch.sqrt(var + self.eps).view(per_channel)
        return y * self.weight.view(per_channel) + self.bias.view(per_channel) if self.affine else y


class GlobalBatchNorm2d(_GlobalStats, torch.nn.BatchNorm2d):
    """BatchNorm2d with global-batch statistics under DDP (_GlobalStats). Input [N, C, H, W]."""


class GlobalBatchNorm1d(_GlobalStats, torch.nn.BatchNorm1d):
    """BatchNorm1d with global-batch statistics under DDP (_GlobalStats). Input [N, C]."""


class TorchGlobalDoubleNorm(TorchDoubleNorm):
    """tests/train_pairs.py's BatchNorm-after-BatchNorm model (bn2's running_mean zero in exact
    arithmetic) with global-batch BatchNorms, the semantics of its Flax twin on a sharded batch."""

    def __init__(self):
        super().__init__()  # BatchNorm init draws no random numbers: replacing them keeps fc/head
        self.bn1 = GlobalBatchNorm1d(8, affine=False)
        self.bn2 = GlobalBatchNorm1d(8)


class TorchConvBN(torch.nn.Module):
    """Conv -> BatchNorm -> ReLU -> 1x1 conv; ``global_bn``: the BatchNorm is GlobalBatchNorm2d."""

    def __init__(self, global_bn: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = (GlobalBatchNorm2d if global_bn else torch.nn.BatchNorm2d)(4)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class FlaxConvBN(nn.Module):
    """The twin: under jit on a batch sharded over a mesh its BatchNorm sees the global batch."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = BatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(x, use_running_average=not train)
        return nn.Conv(2, (1, 1), name="head")(nn.relu(x))


def _in_ddp_worker() -> bool:
    """Whether this process is a torch DDP worker (python -m parity.training.ddp), not the
    test or the parent that plans and judges the check."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "parity.training.ddp"


class MLPDiesAtExit(ExplicitMLP):
    """The registry MLP whose DDP workers abort when their interpreter exits, after their results
    are sent: what gloo's "terminate called without an active exception" does to a worker (a
    SIGABRT at exit). Unpickling it in a worker registers the abort."""

    def __setstate__(self, state):
        super().__setstate__(state)
        if _in_ddp_worker():
            atexit.register(os.abort)


class MLPDiesInStep(ExplicitMLP):
    """The registry MLP whose DDP workers exit with code 3 at their first forward: no result is
    ever sent."""

    def forward(self, x):
        if _in_ddp_worker():
            os._exit(3)
        return super().forward(x)
