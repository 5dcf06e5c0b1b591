"""parity.lint's resize traps: torch F.interpolate / nn.Upsample against jax.image.resize
(antialias when down-sampling, method, align_corners), each named with both locations."""
from __future__ import annotations

import flax.linen as nn
import jax
import pytest
import torch
import torch.nn.functional as F

import parity
from parity.lint import lint_pair


class _TorchBlock(torch.nn.Module):
    def __init__(self, factor: float, mode: str, align_corners: bool | None, antialias: bool):
        super().__init__()
        self.factor, self.mode, self.align_corners, self.antialias = factor, mode, align_corners, antialias

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.factor, mode=self.mode, align_corners=self.align_corners,
                             antialias=self.antialias)


class _TorchModel(torch.nn.Module):
    def __init__(self, factor: float = 0.5, mode: str = "bilinear", align_corners: bool | None = None,
                 antialias: bool = False):
        super().__init__()
        self.block = _TorchBlock(factor, mode, align_corners, antialias)

    def forward(self, x):
        return self.block(x)


class _FlaxBlock(nn.Module):
    factor: float
    method: str
    antialias: bool | None  # None: jax.image.resize's default (True)

    @nn.compact
    def __call__(self, x):  # [N, H, W, C]
        n, h, w, c = x.shape
        shape = (n, int(h * self.factor), int(w * self.factor), c)
        kw = {} if self.antialias is None else {"antialias": self.antialias}
        return jax.image.resize(x, shape, self.method, **kw)


class _FlaxModel(nn.Module):
    factor: float = 0.5
    method: str = "linear"
    antialias: bool | None = None

    @nn.compact
    def __call__(self, x):
        return _FlaxBlock(self.factor, self.method, self.antialias, name="block")(x)


_X = (2, 3, 8, 8)


def _found(torch_model, twin, kind: str):
    torch.manual_seed(0)
    found = lint_pair(torch_model.eval(), twin, torch.randn(*_X), input_layouts="NC...")
    return [f for f in found if f.kind == kind]


def _where(findings):
    return [(f.torch_where, f.flax_where) for f in findings]


_HERE = ("block (inline interpolate)", "block (inline resize)")


def test_antialias_named_when_down_sampling():
    # torch bilinear without antialias, jax.image.resize's default antialias=True, 8 -> 4.
    found = _found(_TorchModel(0.5), _FlaxModel(0.5), "resize-antialias")
    assert _where(found) == [_HERE]  # one finding per call, naming each down-sampled axis
    assert "8 -> 4" in found[0].message and "antialias=True" in found[0].message
    assert _found(_TorchModel(0.5), _FlaxModel(0.5, antialias=False), "resize-antialias") == []
    # It matters: the numbers differ, and agree once antialias matches.
    kw = dict(input_layout="NC...", layers=False, grads=False, lint=False)
    x = torch.randn(*_X)
    assert parity.check(_TorchModel(0.5), _FlaxModel(0.5), x, **kw).verdict == "FAIL"
    assert parity.check(_TorchModel(0.5), _FlaxModel(0.5, antialias=False), x, **kw).verdict == "PASS"


def test_antialias_not_named_when_up_sampling():
    # Up-sampling: jax's kernel scale is max(1, in/out) = 1 with or without antialias, so the
    # two sides compute the same numbers and no finding is made.
    assert _found(_TorchModel(2.0), _FlaxModel(2.0), "resize-antialias") == []
    kw = dict(input_layout="NC...", layers=False, grads=False, lint=False)
    assert parity.check(_TorchModel(2.0), _FlaxModel(2.0), torch.randn(*_X), **kw).verdict == "PASS"


@pytest.mark.parametrize("mode,method,words", [
    ("nearest", "linear", "torch mode='nearest', Flax jax.image.resize method='linear'"),
    ("bicubic", "cubic", "a=-0.75"),
    ("nearest", "nearest", "8 -> 4"),  # torch picks 2i, jax 2i + 1 when halving
])
def test_resize_method_named(mode, method, words):
    found = _found(_TorchModel(0.5, mode), _FlaxModel(0.5, method, antialias=False), "resize-method")
    assert _where(found) == [_HERE] * len(found) and len(found) >= 1
    assert any(words in f.message for f in found)


def test_agreeing_methods_are_not_named():
    assert _found(_TorchModel(2.0, "nearest"), _FlaxModel(2.0, "nearest"), "resize-method") == []
    # jax's 'cubic-pytorch' without antialias is torch's bicubic (a=-0.75, edge padding) ...
    twin = _FlaxModel(2.0, "cubic-pytorch", antialias=False)
    assert _found(_TorchModel(2.0, "bicubic"), twin, "resize-method") == []
    kw = dict(input_layout="NC...", layers=False, grads=False, lint=False)
    assert parity.check(_TorchModel(2.0, "bicubic"), twin, torch.randn(*_X), **kw).verdict == "PASS"
    # ... but with antialias (its default) jax runs plain 'cubic' (a=-0.5), even up-sampling.
    found = _found(_TorchModel(2.0, "bicubic"), _FlaxModel(2.0, "cubic-pytorch"), "resize-method")
    assert len(found) == 1 and "a=-0.5" in found[0].message


def test_align_corners_named():
    found = _found(_TorchModel(2.0, align_corners=True), _FlaxModel(2.0), "resize-align-corners")
    assert _where(found) == [_HERE]
    assert _found(_TorchModel(2.0, align_corners=False), _FlaxModel(2.0), "resize-align-corners") == []


def test_upsample_module_is_paired():
    class Up(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Upsample(scale_factor=0.5, mode="bilinear")

        def forward(self, x):
            return self.block(x)

    assert _where(_found(Up(), _FlaxModel(0.5), "resize-antialias")) == [("block", "block (inline resize)")]
