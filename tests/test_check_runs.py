"""What a check runs, and what each run computes: a float32 check with per-layer rows computes the
twin's whole-model parameter gradients once (in float32, for the verdict); its float64 rows run
records every layer but leaves them out (the rows take each layer's from the layer run alone)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import parity
import parity.checker as checker
from test_layer_runs import Stack, TorchStack


def test_float64_rows_run_leaves_the_twins_parameter_gradients_out(monkeypatch):
    calls = []
    real = checker.forward_backward

    def spy(twin, variables, args, cots, *, capture=False, param_grads=None, **kw):
        calls.append((capture, str(jax.tree_util.tree_leaves(variables)[0].dtype), param_grads))
        return real(twin, variables, args, cots, capture=capture, param_grads=param_grads, **kw)

    monkeypatch.setattr(checker, "forward_backward", spy)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    r = parity.check(TorchStack(), Stack(), x, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", r.summary()
    whole = [c for c in calls if not c[0]]
    rows = [c for c in calls if c[0]]
    assert [c[1] for c in whole] == ["float32"] and whole[0][2] is None  # every gradient, for the verdict
    assert [c[1] for c in rows] == ["float64"] and rows[0][2] is not None  # the rows' run ...
    assert not rows[0][2](("blocks_0", "fc", "kernel"))  # ... computes no parameter gradient
    assert r.layer("blocks.1.fc").grad_isolated is not None  # each layer's backward, from the layer run alone
    assert len(r.param_grads) == sum(1 for _ in TorchStack().parameters())  # the whole model's, judged


def test_a_cast_pair_copies_each_weight_once_in_its_dtype():
    from parity.pair import _copy_in

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight  # tied, as an LM head is
            self.norm = torch.nn.BatchNorm1d(3)
            self.norm.weight.requires_grad_(False)

    m = Tied()
    c = _copy_in(m, torch.float64)
    assert c.head.weight is c.emb.weight  # still one tensor
    assert not c.norm.weight.requires_grad and c.emb.weight.requires_grad
    assert isinstance(c.emb.weight, torch.nn.Parameter)
    assert c.norm.num_batches_tracked.dtype == torch.int64  # integers stay integers
    for (n, a), b in zip(m.state_dict().items(), c.state_dict().values()):
        assert a.data_ptr() != b.data_ptr(), n  # a copy, never the caller's storage
        assert torch.equal(a.to(b.dtype), b), n
        assert b.dtype == (torch.float64 if a.is_floating_point() else a.dtype), n
    same = _copy_in(m, torch.float32)  # already in the dtype: still a copy
    assert same.emb.weight.data_ptr() != m.emb.weight.data_ptr()


def test_the_torch_copies_are_freed_once_run_and_the_rows_still_locate(monkeypatch):
    from parity.pair import PreparedPair

    freed, real = [], PreparedPair.free_torch_weights

    def spy(self):
        before = sum(p.numel() for p in self.torch_module.parameters())
        real(self)
        freed.append((self.dtype, before, sum(p.numel() for p in self.torch_module.parameters())))

    monkeypatch.setattr(PreparedPair, "free_torch_weights", spy)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    tm = TorchStack()
    r = parity.check(tm, Stack(tanh_at=1), x, input_layout="as_is", lint=False)
    n = sum(p.numel() for p in tm.parameters())
    # the float64 copy once recorded, then the checked-dtype one once the probe has run: all of each
    assert freed == [("float64", n, 0), ("float32", n, 0)]
    assert all(p.numel() for p in tm.parameters())  # never the caller's module
    assert (r.verdict, r.first_divergence) == ("FAIL", "blocks.1"), r.summary()


class _TorchFC(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


class _Float32Only(nn.Module):
    """A twin that refuses float64 (torch's float64 run works: the model is judged by it)."""

    @nn.compact
    def __call__(self, x):
        if x.dtype != jnp.float32:
            raise TypeError(f"float32 only, got {x.dtype}")
        return nn.Dense(4, name="fc")(x)


def test_rows_of_a_twin_that_cannot_run_in_float64_are_made_in_the_checked_dtype():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    r = parity.check(_TorchFC(), _Float32Only(), x, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", r.summary()
    assert r.reference == "float64"  # the model judged against torch's float64 run
    assert any("float64 run of the per-layer rows failed" in w and "TypeError" in w for w in r.warnings), r.warnings
    fc = r.layer("fc")
    assert fc.isolated is not None and fc.isolated.ok  # and the rows still made, in float32


def test_the_twins_float64_variables_are_made_after_torchs_float64_run(monkeypatch):
    # With rows, torch's float64 run holds its float64 weights and gradients: the twin's float64
    # variables (the model's size in float64 again) are made after it, when the twin's side runs
    # (GPT-2-medium: 2.8 GB off the check's peak), and the rows still run on float64 variables.
    from parity.pair import PreparedPair

    seen = []
    run_torch = PreparedPair.run_torch

    def spy(self, *a, **kw):
        if self.dtype == "float64":
            seen.append({str(v.dtype) for v in jax.tree_util.tree_leaves(self.variables)})
        return run_torch(self, *a, **kw)
    monkeypatch.setattr(PreparedPair, "run_torch", spy)
    rows_vars = []
    analyze = checker.analyze_layers

    def spy_rows(t_calls, f_run, twin, variables, *a, **kw):
        rows_vars.append({str(v.dtype) for v in jax.tree_util.tree_leaves(variables)})
        return analyze(t_calls, f_run, twin, variables, *a, **kw)
    monkeypatch.setattr(checker, "analyze_layers", spy_rows)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    r = parity.check(TorchStack(), Stack(), x, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", r.summary()
    assert seen == [{"float32"}], seen  # the reference's one torch run, the twin's variables not cast yet
    assert rows_vars == [{"float64"}], rows_vars
