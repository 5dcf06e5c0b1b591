"""parity.lint on NNX twins: submodules are located through the engine's NNX capture (a named
scope per submodule call), so inline ops and conv geometry are named like Linen's, not <root>."""
from __future__ import annotations

import torch
from flax import nnx

from parity.lint import lint_pair


class _TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Conv2d(4, 4, 1)
        self.act = torch.nn.GELU()  # exact (erf)

    def forward(self, x):
        return self.act(self.fc(x))


class _TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mlp = _TorchMLP()

    def forward(self, x):
        return self.mlp(self.conv(x))


class _TorchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TorchBlock()

    def forward(self, x):
        return self.block(x)


class _NNXMLP(nnx.Module):
    def __init__(self, exact: bool, rngs: nnx.Rngs):
        self.fc = nnx.Conv(4, 4, (1, 1), rngs=rngs)
        self.exact = exact

    def __call__(self, x):  # [N, H, W, C]
        return nnx.gelu(self.fc(x), approximate=not self.exact)  # inline: no module of its own


class _NNXBlock(nnx.Module):
    def __init__(self, stride: int, padding, exact: bool, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=stride, padding=padding, rngs=rngs)
        self.mlp = _NNXMLP(exact, rngs)

    def __call__(self, x):
        return self.mlp(self.conv(x))


class _NNXModel(nnx.Module):
    def __init__(self, stride: int = 2, padding=1, exact: bool = True):
        self.block = _NNXBlock(stride, padding, exact, nnx.Rngs(0))

    def __call__(self, x):
        return self.block(x)


def _lint(twin, size: int = 8):
    torch.manual_seed(0)
    return lint_pair(_TorchModel().eval(), twin, torch.randn(2, 3, size, size), input_layouts="NC...")


def test_correct_nnx_twin_has_no_finding():
    assert _lint(_NNXModel()) == []


def test_nnx_inline_tanh_gelu_is_located_to_its_module():
    # Without the per-submodule scopes every NNX equation sits at the root: "<root> (inline gelu)".
    found = [f for f in _lint(_NNXModel(exact=False)) if f.kind == "gelu"]
    assert [(f.torch_where, f.flax_where) for f in found] == [("block.mlp.act", "block/mlp (inline gelu)")]


def test_nnx_conv_with_wrong_stride_is_found():
    found = [f for f in _lint(_NNXModel(stride=1)) if f.kind == "conv-geometry"]
    assert [(f.torch_where, f.flax_where) for f in found] == [("block.conv", "block/conv")]
    assert "stride: torch (2, 2), Flax (1, 1)" in found[0].message


def test_nnx_same_padding_with_stride_is_found():
    found = [f for f in _lint(_NNXModel(padding="SAME")) if f.kind == "conv-padding"]
    assert [(f.torch_where, f.flax_where) for f in found] == [("block.conv", "block/conv")] * 2
