"""Single-layer parity over grids of configs: Linear, Conv2d, ConvTranspose2d, BatchNorm2d, flatten->Linear."""
from __future__ import annotations

import itertools

import flax.linen as nn
import pytest
import torch

from flax_impl.layers import torch_conv_transpose_padding
from layer_helpers import layer_report
from weight_port.layout import AS_IS


def _x(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_linear(bias, dtype):
    r = layer_report(torch.nn.Linear(5, 3, bias=bias), lambda: nn.Dense(3, use_bias=bias),
                     _x(4, 5), dtype=dtype, layout=AS_IS)
    assert r.ok, str(r)


CONV_GRID = [
    (stride, padding, dilation)
    for stride, padding, dilation in itertools.product((1, 2), (0, 1, (1, 2)), (1, 2))
]


@pytest.mark.parametrize("stride, padding, dilation", CONV_GRID)
def test_conv2d(stride, padding, dilation):
    pad = (padding, padding) if isinstance(padding, int) else padding
    torch_layer = torch.nn.Conv2d(3, 4, (3, 2), stride=stride, padding=padding, dilation=dilation)
    r = layer_report(
        torch_layer,
        # torch pads symmetrically by (ph, pw); Flax takes explicit (low, high) pairs per dim.
        lambda: nn.Conv(4, (3, 2), strides=stride, padding=[(pad[0], pad[0]), (pad[1], pad[1])],
                        kernel_dilation=dilation),
        _x(2, 3, 9, 8),
    )
    assert r.ok, str(r)


CONV_T_GRID = [
    (k, s, p, op)
    for k, s, p, op in itertools.product((2, 3, 4), (1, 2), (0, 1), (0, 1))
    if op < s  # torch requires output_padding < stride
]


@pytest.mark.parametrize("k, s, p, op", CONV_T_GRID, ids=[f"k{k}-s{s}-p{p}-op{op}" for k, s, p, op in CONV_T_GRID])
@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose2d(k, s, p, op, transpose_kernel):
    torch_layer = torch.nn.ConvTranspose2d(3, 4, k, stride=s, padding=p, output_padding=op)
    pad = torch_conv_transpose_padding((k, k), (p, p), (op, op))
    r = layer_report(
        torch_layer,
        lambda: nn.ConvTranspose(4, (k, k), strides=(s, s), padding=pad, transpose_kernel=transpose_kernel),
        _x(2, 3, 5, 6),
    )
    assert r.ok, str(r)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batchnorm2d(train, dtype):
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():  # non-trivial affine params and running stats
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    r = layer_report(
        bn,
        # torch momentum 0.1 weighs the new batch; Flax momentum 0.9 weighs the old average.
        lambda: nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False),
        _x(4, 3, 5, 5) * 3 + 1,
        dtype=dtype, train=train, train_kw="use_running_average",
    )
    assert r.ok, str(r)


class _TorchConvFlatDense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.dense = torch.nn.Linear(5 * 4 * 6, 7)

    def forward(self, x):
        return self.dense(torch.flatten(self.conv(x), 1))


class _FlaxConvFlatDense(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(5, (3, 3), padding="VALID", name="conv")(x)
        return nn.Dense(7, name="dense")(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flatten_then_linear(dtype):
    import parity

    r = parity.check(_TorchConvFlatDense(), _FlaxConvFlatDense(), _x(2, 3, 6, 8), dtype=dtype)
    assert r.ok, str(r)
