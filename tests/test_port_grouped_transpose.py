"""Grouped transposed convs (torch ConvTransposeNd(groups>1)): ported in the one per-group layout
the port knows (weight_port.flax_layers.GroupedConvTranspose, kernel [*k, in/g, out]), or refused
by name -- a Flax ConvTranspose(transpose_kernel=True) twin in either direction, and, without the
Flax module, a kernel of any other shape (read as [*k, in/g, out] it would be reshaped into a
wrong tensor of the wrong shape)."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

import weight_port as wp
from weight_port.errors import GroupedKernelLayoutError
from weight_port.flax_layers import GroupedConvTranspose


class TorchUp(torch.nn.Module):
    def __init__(self, cin: int = 4, cout: int = 4, groups: int = 2):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(cin, cout, 2, stride=2, groups=groups)

    def forward(self, x):
        return self.up(x)


class FlaxTransposedUp(nn.Module):
    """The wrong twin: Flax's ConvTranspose has no groups; transpose_kernel=True stores [*k, out, in]."""

    features: int = 4

    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(self.features, (2, 2), strides=(2, 2), transpose_kernel=True, name="up")(x)


class FlaxGroupedUp(nn.Module):
    features: int = 4
    groups: int = 2

    @nn.compact
    def __call__(self, x):
        return GroupedConvTranspose(self.features, (2, 2), strides=(2, 2), feature_group_count=self.groups,
                                    name="up")(x)


def _x(cin: int = 4):
    return torch.randn(1, cin, 4, 4)


def _transposed_variables():
    # What a transpose_kernel=True twin holds: kernel [2, 2, out=4, in=4].
    return FlaxTransposedUp().init(jax.random.key(0), np.zeros((1, 4, 4, 4), np.float32))


def test_transpose_kernel_twin_refused_torch_to_flax():
    with pytest.raises(GroupedKernelLayoutError, match=r"torch up \(groups=2\) -> flax up .*transpose_kernel=True"):
        wp.torch_to_flax(TorchUp(), FlaxTransposedUp(), _x())


def test_transpose_kernel_twin_refused_flax_to_torch_with_module():
    # flax_to_torch ignores attribute checks (eps, momentum); this one is a layout, refused anyway
    # (it used to return up.weight [4, 4, 2, 2] for a torch weight of [4, 2, 2, 2]).
    with pytest.raises(GroupedKernelLayoutError, match=r"torch up \(groups=2\)"):
        wp.flax_to_torch(_transposed_variables(), TorchUp(), FlaxTransposedUp(), _x())


def test_transposed_kernel_refused_flax_to_torch_without_module():
    # Without the module the grouped layout [*k, in/g, out] = [.., 2, 4] is the only one; a
    # [2, 2, 4, 4] kernel used to be reshaped into up.weight [8, 2, 2, 2] and returned.
    with pytest.raises(GroupedKernelLayoutError, match=r"torch up \(groups=2\) -> flax up kernel \(2, 2, 4, 4\)"):
        wp.flax_to_torch(_transposed_variables(), TorchUp())


@pytest.mark.parametrize("cin,cout,groups", [(4, 4, 2), (6, 4, 2), (6, 6, 3)])
def test_grouped_twin_round_trips_with_and_without_module(cin, cout, groups):
    # in == out is not ambiguous here (one grouped layout): no KernelLayoutError, and the
    # per-group axis order comes back exactly.
    torch.manual_seed(0)
    t = TorchUp(cin, cout, groups)
    twin = FlaxGroupedUp(cout, groups)
    variables = wp.torch_to_flax(t, twin, _x(cin))
    for back in (wp.flax_to_torch(variables, t), wp.flax_to_torch(variables, t, twin, _x(cin))):
        assert all(torch.equal(back[k], v) for k, v in t.state_dict().items())


def test_grouped_twin_computes_torch_numbers():
    import parity

    torch.manual_seed(0)
    report = parity.check(TorchUp(6, 4, 2), FlaxGroupedUp(4, 2), _x(6), input_layout="NC...", layers=False)
    assert report.ok, report


def test_flax_to_torch_refuses_a_tensor_of_the_wrong_torch_shape():
    # The net behind the layout checks: the plan knows every torch shape, and flax -> torch
    # names a tensor the rules produced in another one (here variables of a wider twin than
    # the module the plan was built from; it used to return fc.weight [6, 3] for a [5, 3] layer).
    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 5)

        def forward(self, x):
            return self.fc(x)

    class Twin(nn.Module):
        features: int = 5

        @nn.compact
        def __call__(self, x):
            return nn.Dense(self.features, name="fc")(x)

    wide = Twin(6).init(jax.random.key(0), np.zeros((1, 3), np.float32))
    shapes = r"flax -> torch: .*torch fc.weight: \(6, 3\) from flax, \(5, 3\) in torch"
    with pytest.raises(wp.ShapeMismatchError, match=shapes):
        wp.flax_to_torch(wide, Torch(), Twin(), torch.zeros(1, 3), input_layout="as_is")
