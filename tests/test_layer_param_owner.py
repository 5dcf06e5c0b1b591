"""Each parameter's gradient is computed and judged once in the per-layer rows, in the innermost
row that can judge it (parity._layer_runs.split_params): a container reads its layers' parameters
without differentiating them, unless a layer holding them cannot run alone; then the container's
row judges them, as before."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import parity

D = 16
X = np.random.default_rng(0).standard_normal((8, D)).astype(np.float32)


# x @ k, whose kernel gradient is 0.1% too large: a gradient-only bug
_mm_wrong_grad = jax.custom_vjp(lambda x, k: x @ k)
_mm_wrong_grad.defvjp(lambda x, k: (x @ k, (x, k)), lambda res, g: (g @ res[1].T, (res[0].T @ g) * 1.001))


class ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class TorchOuter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = ScaledLinear(D, D, bias=False)
        self.fc = torch.nn.Linear(D, D, bias=False)

    def forward(self, x):
        return self.fc(torch.tanh(self.inner(x)))


class TorchTop(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.outer = TorchOuter()

    def forward(self, x):
        return self.outer(x)


class ScaledDense(nn.Module):
    """ScaledLinear's twin, handed its scale as an array: its inputs differ from torch's (two
    arrays, one tensor), so it cannot run alone."""

    features: int
    wrong_grad: bool = False

    @nn.compact
    def __call__(self, x, scale):
        k = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features))
        return (_mm_wrong_grad(x, k) if self.wrong_grad else x @ k) * scale


class FlaxOuter(nn.Module):
    wrong_grad: bool = False

    @nn.compact
    def __call__(self, x):
        h = ScaledDense(D, self.wrong_grad, name="inner")(x, jnp.asarray(2.0, x.dtype))
        return nn.Dense(D, use_bias=False, name="fc")(jnp.tanh(h))


class FlaxTop(nn.Module):
    wrong_grad: bool = False

    @nn.compact
    def __call__(self, x):
        return FlaxOuter(self.wrong_grad, name="outer")(x)


def _judged(monkeypatch) -> dict[str, list[str]]:
    """Row name -> the parameter gradients its isolated run judged (torch names)."""
    import parity.layers as layers

    judged: dict[str, list[str]] = {}
    comps = layers._param_grad_comps

    def spy(row, *args, **kwargs):
        out = comps(row, *args, **kwargs)
        judged.setdefault(row.name, []).extend(out)
        return out
    monkeypatch.setattr(layers, "_param_grad_comps", spy)
    return judged


def test_a_container_judges_the_parameters_of_a_layer_that_cannot_run_alone(monkeypatch):
    judged = _judged(monkeypatch)
    r = parity.check(TorchTop(), FlaxTop(wrong_grad=True), X, input_layout="as_is", lint=False)
    assert r.verdict == "FAIL", str(r)
    assert r.layer("outer.inner").isolated is None  # cannot run alone: its inputs differ
    # the inner kernel's gradient is the outer row's to judge, and its error is found there
    assert judged["outer"] == ["outer.inner.weight"], judged
    outer = r.layer("outer")
    assert outer.grad_isolated is not None and not outer.grad_isolated.ok, outer
    assert outer.grad_isolated.name == "grad outer.inner.weight (isolated)", outer
    # fc runs alone: its gradient is judged in its own row, not the outer one's again
    assert judged["outer.fc"] == ["outer.fc.weight"], judged
    assert r.layer("outer.fc").grad_isolated.ok


def test_a_correct_pair_judges_each_parameter_once(monkeypatch):
    judged = _judged(monkeypatch)
    r = parity.check(TorchTop(), FlaxTop(), X, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", str(r)
    names = [n for row in judged.values() for n in row]
    assert sorted(names) == ["outer.fc.weight", "outer.inner.weight"], judged
