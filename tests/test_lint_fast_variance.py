"""The fast-variance trap: a Flax norm computing E[x^2] - E[x]^2 (use_fast_variance=True) against
torch's two-pass variance is named where the check's input makes it matter, and only there."""
from __future__ import annotations

import flax.linen as nn
import numpy as np
import pytest
import torch

import parity
from parity.lint import lint_pair


class TorchNormed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.fc(x))


class FlaxNormed(nn.Module):
    fast: bool = True

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=self.fast, name="norm")(nn.Dense(8, name="fc")(x))


def _model() -> TorchNormed:
    torch.manual_seed(0)
    m = TorchNormed()
    with torch.no_grad():
        m.fc.bias.fill_(3000.0)  # every row's mean ~3000 with a spread ~1: one-pass cancels
    return m


X = np.random.default_rng(0).standard_normal((4, 8))


def _kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def test_fast_variance_is_named_where_the_input_has_a_large_mean():
    found = [f for f in lint_pair(_model(), FlaxNormed(), X, input_layouts="as_is") if f.kind == "fast-variance"]
    assert len(found) == 1, found
    assert found[0].torch_where == "norm" and found[0].flax_where == "norm"
    assert "use_fast_variance=False" in found[0].message


@pytest.mark.parametrize("fast, bias", [(False, 3000.0), (True, 0.0)], ids=["two-pass twin", "small mean"])
def test_no_fast_variance_finding_where_it_cannot_matter(fast, bias):
    m = _model()
    with torch.no_grad():
        m.fc.bias.fill_(bias)
    assert "fast-variance" not in _kinds(lint_pair(m, FlaxNormed(fast=fast), X, input_layouts="as_is"))


def test_the_lint_reads_the_norms_inputs_in_its_one_torch_forward():
    # the inline ops and the norms' inputs come from the same forward (a second one cost
    # BERT-base 0.3 s per check)
    m = _model()
    calls = []
    handle = m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        found = lint_pair(m, FlaxNormed(), X, input_layouts="as_is")
    finally:
        handle.remove()
    assert "fast-variance" in _kinds(found)
    assert len(calls) == 1


def test_a_check_reads_the_lints_torch_side_off_the_run_it_judges():
    # parity.check's lint takes the ops and the norms' inputs from the float32 run it judges:
    # torch runs twice (float32, and the float64 reference), not a third time for the lint. The
    # hook travels with the module into the check's private copies.
    m = _model()
    calls = []
    handle = m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        r = parity.check(m, FlaxNormed(), X, input_layout="as_is", layers=False)
    finally:
        handle.remove()
    assert any(w.startswith("trap: fast-variance at torch norm / Flax norm") for w in r.warnings), r.warnings
    assert len(calls) == 2


def test_check_prints_the_finding_and_strict_fails():
    r = parity.check(_model(), FlaxNormed(), X, input_layout="as_is", strict=True, layers=False)
    assert any(w.startswith("trap: fast-variance at torch norm / Flax norm") for w in r.warnings), r.warnings
    assert r.verdict == "FAIL"


class TorchBN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x))


class FlaxBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8, name="fc")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)


def test_reading_train_mode_inputs_leaves_running_statistics_alone():
    torch.manual_seed(0)
    m = TorchBN().train()
    with torch.no_grad():
        m.fc.bias.fill_(3000.0)
    before = {k: v.clone() for k, v in m.bn.state_dict().items()}
    found = lint_pair(m, FlaxBN(), X, input_layouts="as_is", train=True)
    assert "fast-variance" in _kinds(found)
    for k, v in m.bn.state_dict().items():
        assert torch.equal(v, before[k]), k
