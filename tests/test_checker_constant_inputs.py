"""An input whose elements are all equal cannot show that the twin uses it: the report says so."""
from __future__ import annotations

import flax.linen as nn
import torch

import parity


class Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, mask):  # x [N, T, D], mask [N, T] int
        return (self.fc(x) * mask[..., None]).sum(1)


class IgnoresMask(nn.Module):
    """A mis-port: the mask is accepted and dropped."""

    @nn.compact
    def __call__(self, x, mask):
        return nn.Dense(3, name="fc")(x).sum(1)


def _inputs(mask):
    torch.manual_seed(0)
    return (torch.randn(2, 5, 4), mask)


def test_all_ones_mask_passes_a_twin_that_ignores_it_but_the_report_says_why():
    report = parity.check(Masked(), IgnoresMask(), _inputs(torch.ones(2, 5, dtype=torch.long)), dtype="float32")
    assert report.ok  # nothing to see on this input ...
    hits = [w for w in report.warnings if "input[1] is constant" in w]
    assert hits and "every element 1" in hits[0]  # ... and the report names the input that hid it
    assert hits[0] in str(report)  # printed, not only in the JSON


def test_a_padded_mask_catches_the_same_twin_and_raises_no_warning():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    report = parity.check(Masked(), IgnoresMask(), _inputs(mask), dtype="float32")
    assert not report.ok
    assert not [w for w in report.warnings if "is constant" in w]


class PerSampleSum(torch.nn.Module):
    def forward(self, x):  # [N, F] -> [N, 1]: one sum per sample
        return x.sum(dim=1, keepdim=True)


class WholeSum(nn.Module):
    """A mis-port: sums the whole batch, broadcast back to [N, 1]."""

    @nn.compact
    def __call__(self, x):
        return x.sum() * (x[:, :1] * 0 + 1)


def test_batch_of_one_hides_a_batch_mixing_twin_and_the_report_says_so():
    one = parity.check(PerSampleSum(), WholeSum(), torch.randn(1, 6), dtype="float32")
    assert one.ok and any("batch size 1" in w for w in one.warnings)
    two = parity.check(PerSampleSum(), WholeSum(), torch.randn(2, 6), dtype="float32")
    assert not two.ok and not any("batch size 1" in w for w in two.warnings)
