"""What a check runs, and what each run computes: a float32 check with per-layer rows computes the
twin's whole-model parameter gradients once (in float32, for the verdict); its float64 rows run
records every layer but leaves them out (the rows take each layer's from the layer run alone)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import parity
import parity.checker as checker
from planted import FlaxTwoFC, TorchTwoFC
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


def test_rows_of_a_twin_computing_in_its_dtype_field_read_the_checked_run(monkeypatch):
    # On the rows' float64 variables such a twin computes in its dtype field all the same: the
    # checked run records its layers and the rows read it; no whole-model run of the twin in
    # float64 variables is made for them.
    calls = []
    real = checker.forward_backward

    def spy(twin, variables, args, cots, *, capture=False, param_grads=None, **kw):
        calls.append((capture, str(jax.tree_util.tree_leaves(variables)[0].dtype)))
        return real(twin, variables, args, cots, capture=capture, param_grads=param_grads, **kw)

    monkeypatch.setattr(checker, "forward_backward", spy)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    r = parity.check(TorchTwoFC(), FlaxTwoFC(), x, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", r.summary()
    assert calls[0] == (True, "float32"), calls  # the checked run, every layer recorded
    assert (True, "float64") not in calls, calls  # no rows' run of its own
    for name in ("fc1", "fc2"):
        row = r.layer(name)
        assert row.isolated is not None and row.isolated.ok and row.accumulated is not None, row
        assert row.grad_isolated is not None and row.grad_accumulated is not None, row
    # a layer computing in bfloat16 (a mis-port the checked run shows): located there
    bad = parity.check(TorchTwoFC(), FlaxTwoFC(low="fc1"), x, input_layout="as_is", lint=False)
    assert (bad.verdict, bad.first_divergence) == ("FAIL", "fc1"), bad.summary()


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
    c, shared = _copy_in(m, torch.float64)
    assert not shared
    assert c.head.weight is c.emb.weight  # still one tensor
    assert not c.norm.weight.requires_grad and c.emb.weight.requires_grad
    assert isinstance(c.emb.weight, torch.nn.Parameter)
    assert c.norm.num_batches_tracked.dtype == torch.int64  # integers stay integers
    for (n, a), b in zip(m.state_dict().items(), c.state_dict().values()):
        assert a.data_ptr() != b.data_ptr(), n  # a copy, never the caller's storage
        assert torch.equal(a.to(b.dtype), b), n
        assert b.dtype == (torch.float64 if a.is_floating_point() else a.dtype), n
    same, shared = _copy_in(m, torch.float32)  # already in the dtype: still a copy
    assert same.emb.weight.data_ptr() != m.emb.weight.data_ptr() and not shared
    # share=True (a check's pair): the caller's storage under the copy's own Parameter objects,
    # still tied, the buffers the copy's own
    kept, shared = _copy_in(m, torch.float32, share=True)
    assert shared and kept.emb.weight is not m.emb.weight and kept.head.weight is kept.emb.weight
    assert kept.emb.weight.data_ptr() == m.emb.weight.data_ptr()
    assert not kept.norm.weight.requires_grad and kept.emb.weight.requires_grad
    assert kept.norm.running_mean.data_ptr() != m.norm.running_mean.data_ptr()
    kept.emb.weight.data = torch.zeros(0)  # what free_torch_weights does: the caller's stays
    assert m.emb.weight.shape == (5, 3) and m.head.weight is m.emb.weight


class _TorchBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.bn = torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


class _FlaxBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4, use_bias=False, name="fc")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)


def test_a_check_holds_the_callers_weights_once_and_leaves_them_bit_for_bit(monkeypatch):
    # A check's pair keeps the caller's weight storage (the model once, not twice); its noise
    # probe nudges those weights in place and must move them back even where it is the pair's
    # last run (a private copy is left nudged then: it is freed next).
    from parity.pair import PreparedPair

    runs, real = [], PreparedPair.run_torch

    def spy(self, **kw):
        shares = any(p.data_ptr() == q.data_ptr() for p, q in zip(self.torch_module.parameters(), tm.parameters()))
        runs.append((self.dtype, shares, kw.get("perturb") is not None, kw.get("restore", True)))
        return real(self, **kw)

    monkeypatch.setattr(PreparedPair, "run_torch", spy)
    for tm, fm, x, train in [
        (TorchStack(), Stack(), np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32), False),
        (_TorchBN(), _FlaxBN(), np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32), True),
    ]:
        before = {k: v.clone() for k, v in tm.state_dict().items()}
        runs.clear()
        mode = dict(train=True, train_kwarg="train") if train else {}
        r = parity.check(tm, fm, x, input_layout="as_is", lint=False, **mode)
        assert r.verdict == "PASS", r.summary()
        # the float32 runs (the checked one and, with rows, the nudged probe, its last) are on
        # the caller's storage; the float64 reference on a copy of its own
        assert ("float32", True, True, False) in runs and ("float32", True, False, True) in runs, runs
        assert all(not shares for dt, shares, *_ in runs if dt == "float64"), runs
        after = tm.state_dict()
        assert after.keys() == before.keys()
        for k, v in before.items():  # weights moved back bit for bit; train-mode statistics untouched
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
        assert all(p.grad is None for p in tm.parameters())


def test_the_torch_copies_are_freed_once_run_and_the_rows_still_locate(monkeypatch):
    from parity.pair import PreparedPair

    freed, real = [], PreparedPair.free_torch_weights

    def held(module) -> int:  # elements of storage (a freed weight's stand-in holds one)
        return sum(p.untyped_storage().nbytes() // p.element_size() for p in module.parameters())

    def spy(self):
        before = held(self.torch_module)
        real(self)
        freed.append((self.dtype, before, held(self.torch_module)))

    monkeypatch.setattr(PreparedPair, "free_torch_weights", spy)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    tm = TorchStack()
    r = parity.check(tm, Stack(tanh_at=1), x, input_layout="as_is", lint=False)
    n, k = sum(p.numel() for p in tm.parameters()), len(list(tm.parameters()))
    # the float64 copy's weights went during its run, as their gradients came (a one-element
    # stand-in each is left when it is freed); the checked-dtype one once the probe has run
    assert freed == [("float64", k, 0), ("float32", n, 0)]
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


@pytest.mark.parametrize("given,large", [(False, True), (False, False), (True, True)],
                         ids=["ported-large", "ported-small", "callers-variables"])
def test_no_twin_variables_are_held_through_torchs_float64_run(monkeypatch, given, large):
    # With rows, torch's float64 run holds its float64 weights and gradients. The twin's float64
    # variables (the model's size in float64 again) are made after it, when the twin's side runs
    # (GPT-2-medium: 2.8 GB off the check's peak). A large model's checked-dtype ones, which the
    # twin never runs on again, are freed before it and ported again in float64 when they are
    # needed (GPT-2-medium: 1.35 GB); a smaller model's are kept and cast, with no second port
    # (BERT-base: 1.0 s). The caller's own variables cannot be ported again: kept, and cast.
    import gc
    import weakref

    import parity._spill as spill_module
    from parity.pair import PreparedPair

    if large:  # the model is "large" from 1 byte on
        monkeypatch.setattr(spill_module, "SPILL_BYTES", 1)
    seen, alive, checked, ports = [], [], [], []
    run_torch, prepare, port = PreparedPair.run_torch, checker.prepare, PreparedPair.port_variables

    def spy_port(self, *a, **kw):
        ports.append(a)
        return port(self, *a, **kw)
    monkeypatch.setattr(PreparedPair, "port_variables", spy_port)

    def spy_prepare(*a, **kw):
        pair = prepare(*a, **kw)
        checked.extend(weakref.ref(v) for v in jax.tree_util.tree_leaves(pair.variables))
        return pair

    def spy(self, *a, **kw):
        if self.dtype == "float64":
            gc.collect()
            seen.append({str(v.dtype) for v in jax.tree_util.tree_leaves(self.variables)})
            alive.append(sum(r() is not None for r in checked))
        return run_torch(self, *a, **kw)
    monkeypatch.setattr(checker, "prepare", spy_prepare)
    monkeypatch.setattr(PreparedPair, "run_torch", spy)
    rows_vars = []
    analyze = checker.analyze_layers

    def spy_rows(t_calls, f_run, twin, variables, *a, **kw):
        rows_vars.append({str(v.dtype) for v in jax.tree_util.tree_leaves(variables)})
        return analyze(t_calls, f_run, twin, variables, *a, **kw)
    monkeypatch.setattr(checker, "analyze_layers", spy_rows)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    tm, fm = TorchStack(), Stack()
    variables = None
    if given:
        variables = fm.init(jax.random.PRNGKey(1), jnp.asarray(x))
        with torch.no_grad():
            for p in tm.parameters():
                p.mul_(0)  # the caller's variables decide the twin's side: a planted difference
    r = parity.check(tm, fm, x, input_layout="as_is", lint=False, variables=variables)
    if given:  # the caller's variables were used and kept: the port of torch's weights would pass
        assert r.verdict == "FAIL", r.summary()
        assert seen == [{"float32"}] and alive[0] == len(checked), (seen, alive)
        assert ports == [], ports
    elif large:
        assert r.verdict == "PASS", r.summary()
        assert seen == [set()] and alive == [0], (seen, alive)  # no twin variables in any dtype
        assert ports == [("float64",)], ports  # ported again, straight to float64
    else:  # the checked-dtype ones alone (no float64 copy yet), cast later: never ported again
        assert r.verdict == "PASS", r.summary()
        assert seen == [{"float32"}] and alive[0] == len(checked), (seen, alive)
        assert ports == [], ports
    assert rows_vars == [{"float64"}], rows_vars


class _ScaleInBackward(torch.autograd.Function):
    """x * module.scale, whose backward reads the module's weight from its ctx (not an input:
    autograd does not wait for it before finishing that weight's gradient)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x * module.scale.detach()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.module.scale, None


class _TorchScaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.scale = torch.nn.Parameter(torch.rand(8) + 0.5)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        # scale's one differentiable use is the later one: its gradient is finished (and, in a
        # run that frees weights as their gradients come, its weight freed) before the Function's
        # backward reads it
        return self.fc(_ScaleInBackward.apply(x, self) * self.scale)


class _FlaxScaled(nn.Module):
    @nn.compact
    def __call__(self, x):
        s = self.param("scale", nn.initializers.ones, (8,))
        return nn.Dense(4, name="fc")(x * jax.lax.stop_gradient(s) * s)


def test_a_backward_that_reads_a_freed_weight_is_made_again_keeping_the_weights(monkeypatch):
    # torch's float64 reference frees each weight as its gradient comes; a freed weight reads as
    # NaN, so this backward's input gradient is NaN: the reference is made again on a fresh copy
    # that keeps its weights, and the correct twin passes (with a NaN reference it would not)
    from parity.pair import PreparedPair

    runs = []
    real = PreparedPair.run_torch

    def spy(self, *a, **kw):
        runs.append((self.dtype, kw.get("free_weights", False)))
        return real(self, *a, **kw)
    monkeypatch.setattr(PreparedPair, "run_torch", spy)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    for layers in (False, True):
        runs.clear()
        r = parity.check(_TorchScaled(), _FlaxScaled(), x, input_layout="as_is", lint=False, layers=layers)
        assert r.verdict == "PASS", r.summary()
        assert [f for d, f in runs if d == "float64"] == [True, False], runs
        # judged against a float64 reference (a NaN one leaves the input gradient to the table)
        assert [c.judge for c in r.input_grads] == ["reference"], r.input_grads


def test_the_checked_dtype_variables_are_freed_before_the_twins_float64_rows_run(monkeypatch):
    # the rows run on the float64 variables (their exact cast): the checked dtype's are not held
    # beside them through the twin's float64 run (GPT-2-medium: 1.4 GB)
    pairs, held = [], []
    prepare, run_flax_side = checker.prepare, checker.run_flax_side

    def spy_prepare(*a, **kw):
        pairs.append(prepare(*a, **kw))
        return pairs[-1]

    def spy_run(run, grads, *, layers, **kw):
        if layers and run.pair.dtype == "float64":
            held.append(len(jax.tree_util.tree_leaves(pairs[0].variables)))
        return run_flax_side(run, grads, layers=layers, **kw)
    monkeypatch.setattr(checker, "prepare", spy_prepare)
    monkeypatch.setattr(checker, "run_flax_side", spy_run)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    r = parity.check(TorchStack(), Stack(), x, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", r.summary()
    assert held == [0], held
