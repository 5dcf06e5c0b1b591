"""flax_impl.batchnorm.BatchNorm against torch BatchNorm2d; the audit and train_check name planted
BatchNorm convention mistakes (stock Flax layer, torch momentum passed as Flax momentum) with their drift."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_impl.batchnorm import BatchNorm
from parity.tolerances import TRAIN_STATS, train_tolerance
from parity.training import OptimizerSpec, audit_batch_norms, train_check
from weight_port.plan import build_plan


def _torch_bn_steps(x: np.ndarray, n_steps: int):
    bn = torch.nn.BatchNorm2d(x.shape[1]).double().train()
    outs = [bn(torch.as_tensor(x * (k + 1))).detach().numpy() for k in range(n_steps)]
    return bn, outs


def _flax_bn_steps(module: nn.Module, x: np.ndarray, n_steps: int):
    xf = jnp.asarray(np.moveaxis(x, 1, -1))  # [N, C, H, W] -> [N, H, W, C]
    v = module.init(jax.random.key(0), xf, use_running_average=True)
    # Start from float64 statistics (torch's, after .double()): stock Flax inits them in float32.
    v = jax.tree_util.tree_map(lambda a: a.astype(xf.dtype), v)
    outs = []
    for k in range(n_steps):
        y, upd = module.apply(v, xf * (k + 1), use_running_average=False, mutable=["batch_stats"])
        v = {**v, **upd}
        outs.append(np.moveaxis(np.asarray(y), -1, 1))
    return v, outs


def test_torch_exact_batchnorm_matches_torch_statistics(x64, rng):
    x = rng.standard_normal((3, 4, 5, 5)) + 2.0
    tol = train_tolerance("float64", TRAIN_STATS, 3).rel_norm
    bn, t_outs = _torch_bn_steps(x, 3)
    v, f_outs = _flax_bn_steps(BatchNorm(momentum=0.9, epsilon=1e-5), x, 3)
    for t, f in zip(t_outs, f_outs):
        assert np.linalg.norm(f - t) / np.linalg.norm(t) <= tol
    for name, leaf in (("running_mean", "mean"), ("running_var", "var")):
        t = getattr(bn, name).numpy()
        assert np.linalg.norm(np.asarray(v["batch_stats"][leaf]) - t) / np.linalg.norm(t) <= tol, name


def test_stock_flax_batchnorm_running_var_is_biased(x64, rng):
    """The convention the torch-exact layer fixes: stock Flax stores var * (n-1)/n at each update."""
    x = rng.standard_normal((2, 3, 2, 2))
    n = 2 * 2 * 2
    bn, _ = _torch_bn_steps(x, 1)
    v, _ = _flax_bn_steps(nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False), x, 1)
    t_var = bn.running_var.numpy()
    stock = np.asarray(v["batch_stats"]["var"])
    # one update from 1: torch 0.9 + 0.1 * s2 * n/(n-1); stock 0.9 + 0.1 * s2
    np.testing.assert_allclose((stock - 0.9), (t_var - 0.9) * (n - 1) / n, rtol=1e-12)


def test_fast_variance_refused(rng):
    with pytest.raises(ValueError, match="two-pass"):
        BatchNorm(use_fast_variance=True).init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=False)


class _TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x))


class _FlaxNet(nn.Module):
    make_bn: object

    def setup(self):
        self.conv = nn.Conv(3, (3, 3), padding="SAME", use_bias=False)
        self.bn = self.make_bn()

    def __call__(self, x, train: bool = False):
        return self.bn(self.conv(x), use_running_average=not train)


@pytest.mark.parametrize("make_bn, expected", [
    (lambda: BatchNorm(momentum=0.9), []),
    (lambda: nn.BatchNorm(momentum=0.9, use_fast_variance=False), ["biased running_var"]),
    (lambda: nn.BatchNorm(momentum=0.9), ["biased running_var", "fast variance"]),
    (lambda: BatchNorm(momentum=0.1), ["BatchNorm momentum convention"]),
    (lambda: BatchNorm(momentum=0.9, epsilon=1e-3), ["BatchNorm epsilon mismatch"]),
], ids=["torch-exact", "stock", "stock-fast-variance", "momentum-0.1", "eps"])
def test_audit_names_batchnorm_conventions(make_bn, expected):
    plan = build_plan(_TorchNet(), _FlaxNet(make_bn), torch.zeros(2, 1, 4, 4), check_attributes="ignore")
    paths, findings = audit_batch_norms(plan)
    assert paths == ["bn"]
    assert sorted(f.name.split(" (")[0] for f in findings) == sorted(expected)


@pytest.mark.parametrize("make_bn, words", [
    (lambda: nn.BatchNorm(momentum=0.9, use_fast_variance=False), "biased running_var"),
    (lambda: BatchNorm(momentum=0.1), "BatchNorm momentum convention"),
], ids=["stock-flax-batchnorm", "momentum-0.1"])
def test_train_check_names_planted_batchnorm_mistake_with_drift(make_bn, words, rng):
    # Per-pixel 3-class logits straight out of conv -> BN: the running stats feed nothing else,
    # so the failure is in the statistics alone.
    data = [(rng.standard_normal((2, 1, 4, 4)), rng.integers(0, 3, size=(2, 4, 4)))]
    report = train_check(_TorchNet(), _FlaxNet(make_bn), data, steps=2,
                         optimizer=OptimizerSpec("sgd", lr=0.1), dtype="float64", name="conv-bn")
    assert not report.ok
    assert any(c.name == "bn.running_var" and not c.ok for c in report.steps[0].stats)
    assert not any(c.name.startswith("update") and not c.ok for s in report.steps for c in s.updates)
    named = [f for f in report.findings if words in f]
    assert named and "max_rel" in named[0] and "out of tolerance from step 1" in named[0], report.findings


def test_train_check_torch_exact_batchnorm_passes(rng):
    data = [(rng.standard_normal((2, 1, 4, 4)), rng.integers(0, 3, size=(2, 4, 4)))]
    report = train_check(_TorchNet(), _FlaxNet(lambda: BatchNorm(momentum=0.9)), data, steps=3,
                         optimizer=OptimizerSpec("sgd-momentum", lr=0.1), dtype="float64")
    assert report.ok and not report.findings, str(report)


def test_two_pass_variance_survives_a_large_mean_in_float32():
    """float32 data with mean 3000: E[x^2] - E[x]^2 cancels to garbage (even negative, then NaN
    under rsqrt); the two-pass variance of flax_impl.batchnorm.BatchNorm stays as close to the
    float64 truth as torch's own float32 BatchNorm (judged by the fp64-reference rule: both sides
    round the mean of 3000s differently, so the float32 elementwise table cannot be the judge)."""
    from parity.judge import judge, measured
    from parity.tolerances import REFERENCE, tolerance_for

    x = (np.random.default_rng(0).standard_normal((16, 3, 4, 4)) + 3000.0).astype(np.float32)
    t_out = torch.nn.BatchNorm2d(3).train()(torch.as_tensor(x)).detach().numpy()
    ref = torch.nn.BatchNorm2d(3).double().train()(torch.as_tensor(x, dtype=torch.float64)).detach().numpy()
    _, (f_out,) = _flax_bn_steps(BatchNorm(momentum=0.9, epsilon=1e-5), x, 1)
    rule = measured(tolerance_for("float32", REFERENCE), "float32")
    c = judge("bn output", f_out, t_out, rule, reference=ref, probe=t_out, axis=1)  # per channel
    assert c.ok, str(c)
