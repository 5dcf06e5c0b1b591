"""Training parity with gradients that are zero in exact arithmetic: Adam turns their rounding
noise into lr-sized steps that differ between frameworks; the noise floor carried through the
optimizer (parity.training.noise) keeps correct attention twins passing while real bugs FAIL."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import optax
import pytest

import train_pairs as tp
import verdict_pairs as vp
from parity.tolerances import GRAD, NOISE_FLOORS, TRAIN_NOISE_FLOORS
from parity.training import OptimizerSpec, train_check
from parity.training.noise import adam_step_bound

STEPS = 3
ADAM = OptimizerSpec("adam", lr=1e-2)
NOISY = "steps noise"  # the note an update with noise entries carries


def _mha(dtype, spec=ADAM, flax_module=None, flax_optimizer=None):
    """nn.MultiheadAttention classifier: the k third of in_proj_bias is noise, inside one tensor."""
    return train_check(tp.make_torch_attention_classifier(), flax_module or tp.FlaxAttentionClassifier(),
                       tp.attention_batches(), steps=STEPS, optimizer=spec, dtype=dtype, input_layout="as_is",
                       flax_optimizer=flax_optimizer, name="mha")


def _single_head(dtype, spec=ADAM):
    """q/k/v Linear attention: k.bias is a tensor of noise alone."""
    return train_check(vp.make_torch_attention(), vp.make_flax_attention(), tp.attention_mse_batches(),
                       steps=STEPS, optimizer=spec, loss="mse", dtype=dtype, input_layout="as_is",
                       output_layout="as_is", name="attention")


def _noisy(report, param):
    return [c for s in report.steps for c in s.updates if c.name == f"update {param}" and NOISY in c.note]


# (pair, optimizer, dtype). AdamW and SGD in float32 only: the larger floor, the harder case for
# "still catches a real error", and each case costs a compile of its training step.
CASES = [("mha", "adam", "float64"), ("mha", "adam", "float32"), ("mha", "adamw", "float32"),
         ("mha", "sgd-momentum", "float32"), ("single-head", "adam", "float64"),
         ("single-head", "adam", "float32")]


@pytest.mark.parametrize("pair,optimizer,dtype", CASES, ids=["-".join(c) for c in CASES])
def test_correct_attention_twin_trains_the_same(pair, optimizer, dtype):
    spec = OptimizerSpec(optimizer, lr=1e-2 if optimizer.startswith("adam") else 0.05)
    report = (_mha if pair == "mha" else _single_head)(dtype, spec)
    assert report.ok, str(report)
    if optimizer.startswith("adam"):
        # The floor was needed, and used only on the key bias entries (zero by shift invariance).
        param = "attn.in_proj_bias" if pair == "mha" else "k.bias"
        assert len(_noisy(report, param)) == STEPS
        assert any("gradient noise" in n for n in report.notes)
    if pair == "single-head" and optimizer == "adam":
        # k.bias is noise alone: below its floor, and never the "worst update" of the table
        # (its rel_norm would be a ratio of two noises).
        assert all(c.below_floor for c in _noisy(report, "k.bias"))
        assert all(s.worst(s.updates).name != "update k.bias" for s in report.steps)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_without_the_gradient_floor_adam_fails_on_the_key_bias(monkeypatch, dtype):
    # What the floor is for: with factor 0 the Adam-normalised noise steps are compared as real.
    monkeypatch.setitem(NOISE_FLOORS, GRAD, replace(NOISE_FLOORS[GRAD], factor=0.0))
    report = _single_head(dtype)
    assert not report.ok
    assert [c.name for c in report.steps[0].updates if not c.ok] == ["update k.bias"]


def test_without_the_adam_step_allowance_the_noise_entries_fail(monkeypatch):
    monkeypatch.setitem(TRAIN_NOISE_FLOORS, "adam", replace(TRAIN_NOISE_FLOORS["adam"], factor=0.0))
    report = _mha("float32")
    assert not report.ok
    assert "update attn.in_proj_bias" in [c.name for c in report.first_failure.updates if not c.ok]


def test_a_backward_only_bug_in_the_attention_branch_still_fails():
    # float32: the larger floor; the bug changes every attention gradient, not only noise entries.
    report = _mha("float32", flax_module=tp.FlaxAttentionClassifierMirroredGrad())
    assert not report.ok and report.first_failure.step == 1
    bad = [c.name for c in report.steps[0].updates if not c.ok]
    assert "update attn.in_proj_weight" in bad and "update head.weight" not in bad


def test_a_planted_adam_eps_mistake_on_attention_is_detected_and_named():
    report = _mha("float64", flax_optimizer=optax.adam(1e-2, eps=0.0, eps_root=1e-8))
    assert not report.ok
    named = [f for f in report.findings if f.startswith("optimizer convention:")]
    assert named and "Adam eps placement" in named[0], "\n".join(report.findings)


@pytest.mark.parametrize("k", [1, 2, 5, 50])
def test_adam_step_bound_is_the_largest_step(k):
    b1, b2 = ADAM.betas
    bound = adam_step_bound(b1, b2, k)

    def step(g):  # |m_hat| / sqrt(v_hat) after the gradient sequence g (oldest first)
        w = np.arange(k)[::-1]
        m = (1 - b1) * np.sum(b1**w * g) / (1 - b1**k)
        v = (1 - b2) * np.sum(b2**w * g * g) / (1 - b2**k)
        return abs(m) / np.sqrt(v)

    rng = np.random.default_rng(k)
    largest = max(step(rng.standard_normal(k)) for _ in range(200))
    assert largest <= bound or largest == pytest.approx(bound)  # (k = 1: every step is 1, rounded)
    # Cauchy-Schwarz is attained by g_j proportional to (b1/b2)^(k-j): the bound is tight.
    assert step((b1 / b2) ** np.arange(k)[::-1]) == pytest.approx(bound)
    assert adam_step_bound(b1, b2, 1) == pytest.approx(1.0)


# --- BatchNorm running statistics that are zero in exact arithmetic ------------------------------
def _double_norm(dtype, flax_module=None):
    return train_check(tp.make_torch_double_norm(), flax_module or tp.FlaxDoubleNorm(), tp.double_norm_batches(),
                       steps=STEPS, optimizer=OptimizerSpec("sgd-momentum", lr=0.05), dtype=dtype,
                       input_layout="as_is", name="double-norm")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_zero_in_theory_running_mean_passes(dtype):
    report = _double_norm(dtype)
    assert report.ok, str(report)
    for step in report.steps:
        noise = next(c for c in step.stats if c.name == "bn2.running_mean")
        assert noise.below_floor and noise.ok
        assert step.worst(step.stats).name != "bn2.running_mean"  # no noise ratio in the table


def test_without_the_stats_floor_the_running_mean_fails(monkeypatch):
    monkeypatch.setitem(TRAIN_NOISE_FLOORS, "stats", replace(TRAIN_NOISE_FLOORS["stats"], factor=0.0))
    report = _double_norm("float64")
    assert not report.ok
    assert [c.name for c in report.steps[0].stats if not c.ok] == ["bn2.running_mean"]


def test_a_momentum_mistake_on_the_noise_layer_still_fails():
    # torch's momentum (0.1) passed as Flax's: bn2's running_var is wrong from step 1.
    report = _double_norm("float32", tp.FlaxDoubleNorm(bn2_momentum=0.1))
    assert not report.ok and report.first_failure.step == 1
    assert "bn2.running_var" in [c.name for c in report.steps[0].stats if not c.ok]
