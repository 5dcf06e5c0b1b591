"""NNX twins everywhere Linen works, and the train-mode keyword found from the twin's signature."""
from __future__ import annotations

import flax.linen as nn
import numpy as np
import pytest
import torch
from flax import nnx

import parity
from parity.runtime import TrainModeError
from parity.training import train_check


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # No bias before a BatchNorm (as real nets do): in train mode its gradient is exactly 0,
        # and two roundings of 0 have an unbounded relative error.
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


class NNXNet(nnx.Module):
    def __init__(self, eps: float = 1e-5, leaky: bool = False, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, epsilon=eps, use_running_average=True, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 4, 5, rngs=rngs)
        self.leaky = leaky

    def __call__(self, x):  # x: [N, H, W, C]
        h = self.bn(self.conv(x))
        h = nnx.leaky_relu(h) if self.leaky else nnx.relu(h)
        return self.fc(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nnx_twin_passes_with_per_layer_rows(dtype):
    r = parity.check(TorchNet(), NNXNet(rngs=nnx.Rngs(0)), _x(2, 3, 4, 4), dtype=dtype)
    assert r.ok, r
    for name in ("conv", "bn", "fc"):
        row = r.layer(name)
        assert row.isolated is not None and row.accumulated is not None, row
        assert row.grad_isolated is not None and row.grad_accumulated is not None, row


def test_nnx_planted_bug_is_located_in_its_layer():
    r = parity.check(TorchNet(), NNXNet(eps=1e-2, rngs=nnx.Rngs(0)), _x(2, 3, 4, 4), dtype="float64")
    assert not r.ok
    assert (r.first_divergence, r.divergence_kind) == ("bn", "forward")


def test_nnx_twin_in_train_mode_uses_batch_statistics():
    r = parity.check(TorchNet(), NNXNet(rngs=nnx.Rngs(0)), _x(4, 3, 4, 4), dtype="float64", train=True)
    assert r.ok, r
    assert r.mode == "train"


def test_nnx_assert_parity_and_train_check():
    parity.assert_parity(TorchNet(), NNXNet(rngs=nnx.Rngs(0)), _x(2, 3, 4, 4), dtype="float64", layers=False)
    rng = np.random.default_rng(0)
    data = [(_x(4, 3, 4, 4, seed=i), rng.integers(0, 5, size=4)) for i in range(2)]
    report = train_check(TorchNet(), NNXNet(rngs=nnx.Rngs(0)), data, steps=3, dtype="float64")
    # Forward, gradients and updates agree; nnx.BatchNorm stores the biased batch variance where
    # torch stores the unbiased one, which the check must catch and name.
    assert all(c.ok for s in report.steps for c in s.scalars + s.updates), report
    assert not report.ok and report.first_failure.step == 1
    assert any("biased running_var (stock flax.nnx.BatchNorm)" in f for f in report.findings), report


# --- train keyword -------------------------------------------------------------------------------
class TorchBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # No bias before the BatchNorm: in train mode its gradient is exactly 0 (see TorchNet).
        self.fc, self.bn = torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def _bn(x, use_running_average: bool):
    return nn.BatchNorm(use_running_average=use_running_average, momentum=0.9, epsilon=1e-5, name="bn")(
        nn.Dense(4, use_bias=False, name="fc")(x))


class TwinTrain(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return _bn(x, not train)


class TwinTraining(nn.Module):
    @nn.compact
    def __call__(self, x, training: bool = False):
        return _bn(x, not training)


class TwinDeterministic(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return _bn(x, deterministic)


class TwinUseRunningAverage(nn.Module):
    @nn.compact
    def __call__(self, x, use_running_average: bool = True):
        return _bn(x, use_running_average)


class TwinIsTraining(nn.Module):
    @nn.compact
    def __call__(self, x, is_training: bool = False):
        return _bn(x, not is_training)


class TwinNoKeyword(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _bn(x, True)


@pytest.mark.parametrize("cls", [TwinTrain, TwinTraining, TwinDeterministic, TwinUseRunningAverage])
def test_train_keyword_found_from_the_signature(cls):
    twin = cls()
    r = parity.check(TorchBN(), twin, _x(6, 3), dtype="float64", train=True, layers=False)
    assert r.ok, r
    r_eval = parity.check(TorchBN(), twin, _x(6, 3), dtype="float64", train=False, layers=False)
    assert r_eval.ok, r_eval


def test_a_twin_without_train_keyword_in_train_mode_is_an_error():
    with pytest.raises(TrainModeError, match="train_kwarg"):
        parity.check(TorchBN(), TwinNoKeyword(), _x(6, 3), dtype="float64", train=True)


def test_train_kwarg_names_a_keyword_of_another_name():
    twin = TwinIsTraining()
    r = parity.check(TorchBN(), twin, _x(6, 3), dtype="float64", train=True, train_kwarg="is_training",
                     layers=False)
    assert r.ok, r
    with pytest.raises(TrainModeError, match="no such keyword"):
        parity.check(TorchBN(), twin, _x(6, 3), dtype="float64", train=True, train_kwarg="nope")
