"""Tolerances scale with the tensor: a small tensor cannot hide a large error under an absolute
bound or an input-sized noise floor, and a large one is not failed for rounding in its near-zero
elements."""
from __future__ import annotations

import flax.linen as nn
import numpy as np
import torch

import parity
from parity.judge import Table, judge
from parity.tolerances import FORWARD, GRAD, tolerance_for


class Scaled(torch.nn.Module):
    """A model whose output is legitimately small (a diffusion-style 1e-6 output scale)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * 1e-6


def _flax_scaled(factor: float):
    class FlaxScaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="fc")(x) * factor

    return FlaxScaled()


def test_small_output_fifty_percent_off_fails_and_the_correct_twin_passes():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    wrong = parity.check(Scaled(), _flax_scaled(1.5e-6), x, dtype="float32")
    assert not wrong.ok, str(wrong)
    assert not wrong.outputs[0].ok and not next(c for c in wrong.param_grads if c.name == "grad fc.weight").ok
    assert wrong.outputs[0].judge == "reference"  # measured noise, no floor sized for the inputs
    right = parity.check(Scaled(), _flax_scaled(1e-6), x, dtype="float32")
    assert right.ok, str(right)


def test_the_table_never_scales_atol_and_an_atol_only_pass_is_inconclusive():
    tol = tolerance_for("float32", GRAD)
    rng = np.random.default_rng(0)
    small = rng.standard_normal(64) * 1e-6
    # torch.testing semantics: atol is absolute, so a 1e-6-sized tensor 50% off is within it...
    c = judge("g", small * 1.5, small, Table(tol))
    # ... and without measured noise that is no evidence: INCONCLUSIVE, not PASS
    assert c.ok and c.inconclusive and c.verdict == "INCONCLUSIVE" and "atol" in c.note
    # a caller's own rtol/atol decide (their atol, their choice), as in torch.testing
    assert judge("g", small * 1.5, small, tol.override(1e-4, 1e-4)).verdict == "ok"
    # a 1e-3 relative error of an O(1) tensor fails the table
    big = rng.standard_normal(64)
    assert not judge("g", big * (1 + 1e-3), big, Table(tol)).ok
    assert judge("y", small * 1.5, small, Table(tolerance_for("float32", FORWARD))).inconclusive
