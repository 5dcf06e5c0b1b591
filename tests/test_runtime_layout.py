"""Layouts are declared or inferred from layer kinds and shapes, never from a tensor's ndim."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import registry
from parity.runtime import input_layouts, output_layouts
from weight_port import layout
from weight_port.layout import (AS_IS, CHANNELS_FIRST, INHERIT, LayoutError, kind_layout,
                                layout_from_shapes, to_flax_layout, to_torch_layout)


def test_registry_spells_the_layout_names_of_the_layout_module():
    assert (registry.CHANNELS_FIRST, registry.AS_IS) == (layout.CHANNELS_FIRST, layout.AS_IS)


def test_channels_first_round_trip():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert to_flax_layout(x, CHANNELS_FIRST).shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(to_torch_layout(to_flax_layout(x, CHANNELS_FIRST), CHANNELS_FIRST), x)


@pytest.mark.parametrize("fn", [to_flax_layout, to_torch_layout])
def test_channels_first_on_a_2d_tensor_is_an_error_not_a_no_op(fn):
    with pytest.raises(LayoutError, match="needs \\[N, C, \\*spatial\\]"):
        fn(np.zeros((2, 3)), CHANNELS_FIRST, "input[0]")


def test_unknown_layout_is_an_error():
    with pytest.raises(LayoutError, match="unknown layout"):
        to_flax_layout(np.zeros((2, 3, 4)), "NHWC")


@pytest.mark.parametrize("cls, expected", [
    (torch.nn.Conv2d, CHANNELS_FIRST), (torch.nn.BatchNorm2d, CHANNELS_FIRST),
    (torch.nn.MaxPool2d, CHANNELS_FIRST), (torch.nn.Upsample, CHANNELS_FIRST),
    (torch.nn.Linear, AS_IS), (torch.nn.LayerNorm, AS_IS), (torch.nn.Embedding, AS_IS),
    (torch.nn.MultiheadAttention, AS_IS), (torch.nn.ReLU, INHERIT), (torch.nn.Dropout, INHERIT),
    (torch.nn.Identity, INHERIT), (torch.nn.GELU, INHERIT), (torch.nn.BatchNorm1d, INHERIT),
    (torch.nn.Sequential, None),
])
def test_layer_kind_table(cls, expected):
    assert kind_layout(cls) == expected


def test_subclass_inherits_its_kind():
    class MyConv(torch.nn.Conv2d):
        pass

    assert kind_layout(MyConv) == CHANNELS_FIRST


def test_layout_from_shapes_is_none_when_square():
    assert layout_from_shapes((2, 5, 7), (2, 7, 5)) == CHANNELS_FIRST
    assert layout_from_shapes((2, 5, 7), (2, 5, 7)) == AS_IS
    assert layout_from_shapes((2, 6, 6), (2, 6, 6)) is None  # T == D: either layout fits


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class _TokenNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)

    def forward(self, ids, h):
        return self.emb(ids) + self.fc(h)


class _Opaque(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_input_layout_from_the_consuming_layer():
    assert input_layouts(_ConvNet(), (torch.zeros(1, 3, 5, 5),)) == {"input[0]": CHANNELS_FIRST}
    got = input_layouts(_TokenNet(), (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, 4)))
    assert got == {"input[0]": AS_IS, "input[1]": AS_IS}  # integer ids; a Linear eats features-last


def test_ambiguous_input_layout_names_the_leaf_and_the_flag():
    with pytest.raises(LayoutError, match=r"input\[0\].*input_layout=.*--layout"):
        input_layouts(_Opaque(), (torch.zeros(2, 3, 4),))


def test_declared_input_layout_per_leaf_and_for_all_float_leaves():
    x = (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 3, 4))
    assert input_layouts(_Opaque(), x, {"input[1]": CHANNELS_FIRST})["input[1]"] == CHANNELS_FIRST
    # one string applies to float leaves only: token ids stay as they are
    assert input_layouts(_Opaque(), x, CHANNELS_FIRST) == {"input[0]": AS_IS, "input[1]": CHANNELS_FIRST}
    with pytest.raises(LayoutError, match="names no leaf"):
        input_layouts(_Opaque(), x, {"input[7]": AS_IS})


def test_output_layout_from_shapes_and_the_square_case():
    assert output_layouts(None, {"out": (2, 4, 3, 3)}, {"out": (2, 3, 3, 4)}) == {"out": CHANNELS_FIRST}
    with pytest.raises(LayoutError, match=r"out.*--output-layout"):
        output_layouts(None, {"out": (2, 4, 4)}, {"out": (2, 4, 4)})
    assert output_layouts(None, {"out": (2, 4, 4)}, {"out": (2, 4, 4)}, lambda p: AS_IS) == {"out": AS_IS}
    assert output_layouts({"out": AS_IS}, {"out": (2, 4, 4)}, {"out": (2, 4, 4)}) == {"out": AS_IS}
