"""Single-layer parity: wrap one torch layer and one Flax layer under the same name, then check.

The wrapper names the layer ``layer`` on both sides, so the port's name rule pairs them.
"""
from __future__ import annotations

import flax.linen as nn
import torch

import parity
from parity.report import Report
from weight_port.layout import CHANNELS_FIRST


class TorchWrap(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, post=None):
        super().__init__()
        self.layer = layer
        self.post = post

    def forward(self, x):
        y = self.layer(x)
        return self.post(y) if self.post is not None else y


class FlaxWrap(nn.Module):
    """``make_layer`` is a zero-arg callable building the Flax layer inside setup."""

    make_layer: object
    post: object = None
    train_kw: str | None = None  # e.g. "use_running_average" for BatchNorm

    def setup(self) -> None:
        self.layer = self.make_layer()

    def __call__(self, x, train: bool = False):
        if self.train_kw == "use_running_average":
            y = self.layer(x, use_running_average=not train)
        else:
            y = self.layer(x)
        return self.post(y) if self.post is not None else y


def layer_report(torch_layer, make_flax_layer, x, *, dtype="float64", train=False,
                 layout=CHANNELS_FIRST, variables=None, train_kw=None, post=None) -> Report:
    """parity.check of one layer; x is a torch-layout tensor/array."""
    return parity.check(
        TorchWrap(torch_layer),
        FlaxWrap(make_flax_layer, post=post, train_kw=train_kw),
        x, dtype=dtype, train=train, input_layout=layout, variables=variables,
        name=type(torch_layer).__name__,
        layers=False,  # per-layer rows add nothing for a one-layer wrapper, and cost a compile
    )
