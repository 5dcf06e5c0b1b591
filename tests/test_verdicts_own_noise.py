"""The twin's own rounding noise counts on every slice of a float32 check (tolerances.
OWN_NOISE_EVERYWHERE): a twin computing the same function with worse float32 rounding than ATen
(HF's Flax BERT at BERT-base size: XLA's value-projection weight gradient 50-130 eps off float64 on
a few rows where torch's is 6-16 eps) passes, and says so; the same twin with a real error fails.
The twin's float64 run is float64 throughout: a Linen ``dtype`` field equal to the checked dtype is
cloned to float64 for it (parity.pair.PreparedPair.twin_in)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

import parity

SHIFT = 256.0  # (x + c) @ W - c * sum(W): x @ W in exact arithmetic, ~c/|x| times its float32 rounding


class TorchLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 16, bias=False)

    def forward(self, x):
        return self.fc(x)


class ShiftedDense(nn.Module):
    """torch's Linear computed as (x + c) @ W - c * colsum(W): the same function, rounded worse."""

    dtype: jnp.dtype = jnp.float32
    error: float = 0.0  # a real error: W scaled by (1 + error) in the product

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.zeros, (64, 16)).astype(self.dtype)
        x = x.astype(self.dtype)
        return (x + SHIFT) @ (k * (1 + self.error)) - SHIFT * k.sum(0)


class FC(nn.Module):
    dtype: jnp.dtype = jnp.float32
    error: float = 0.0

    @nn.compact
    def __call__(self, x):
        return ShiftedDense(dtype=self.dtype, error=self.error, name="fc")(x)


X = np.random.default_rng(0).standard_normal((8, 64))


def test_a_twin_rounding_worse_than_torch_passes_on_its_own_noise():
    r = parity.check(TorchLinear(), FC(), X, input_layout="as_is", layers=False, lint=False)
    assert r.verdict == "PASS", str(r)
    out = r.outputs[0]
    # torch's noise alone would not have passed it: the twin's own noise decided, and it says so
    assert "within the twin's own rounding noise only" in out.note, out.note
    assert any("twin's own" in w for w in r.warnings), r.warnings


def test_the_twin_with_a_real_error_still_fails():
    # 1e-4 relative in the weights: far above any float32 rounding, in the twin's float64 run too
    r = parity.check(TorchLinear(), FC(error=1e-4), X, input_layout="as_is", layers=False, lint=False)
    assert r.verdict == "FAIL"


def test_the_twins_float64_run_is_float64_throughout():
    # FC(dtype=float32) would compute its float64 run in float32 again (every astype): cloned to
    # float64, its own noise is its float32 rounding, not ~0.
    from parity.pair import CheckOptions, prepare

    pair = prepare(TorchLinear(), FC(), X, CheckOptions(input_layout="as_is"))
    assert pair.twin_in("float64").module.dtype == jnp.float64
    assert pair.twin_in("float32") is pair.twin
    # a twin declared below the checked dtype keeps it: computing in bfloat16 must show
    low = prepare(TorchLinear(), FC(dtype=jnp.bfloat16), X, CheckOptions(input_layout="as_is"))
    assert low.twin_in("float64").module.dtype == jnp.bfloat16


def test_a_layer_row_counts_the_twins_own_noise_too():
    # The rows run in float64 with the twin as declared: ShiftedDense(dtype=float32) computes its
    # layer in float32 there (RowJudge.all_float32). Judged on torch's float32 noise alone the
    # layer's isolated row FAILed on a correct twin (BERT-base's pooler and diffusers' ControlNet
    # mid-block rows, the same rounding difference); its own noise (the layer cloned to float64,
    # run alone on the same inputs) counts, as it does for the model's tensors.
    r = parity.check(TorchLinear(), FC(), X, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", str(r)
    row = next(row for row in r.layers if row.torch_path == "fc")
    assert row.isolated is not None and row.isolated.ok
    assert "within the twin's own rounding noise only" in row.isolated.note, row.isolated.note


def test_a_layer_row_with_a_real_error_still_fails_and_is_located():
    r = parity.check(TorchLinear(), FC(error=1e-4), X, input_layout="as_is", lint=False)
    assert r.verdict == "FAIL" and r.first_divergence == "fc", str(r)


class FCNoFloat64(FC):
    """FC that cannot compute in float64 (its own-noise run raises): torch's noise alone decides."""

    @nn.compact
    def __call__(self, x):
        if jnp.dtype(self.dtype) == jnp.float64:
            raise TypeError("this twin has no float64 kernels")
        return ShiftedDense(dtype=self.dtype, error=self.error, name="fc")(x)


def test_verify_counts_and_names_the_twins_own_noise_as_check_does(tmp_path):
    bundle = parity.record(TorchLinear(), torch.as_tensor(X, dtype=torch.float32), tmp_path / "b",
                           input_layout="as_is", layers=False)
    r = parity.verify(bundle, FC(), layers=False)
    assert r.verdict == "PASS", str(r)
    assert "within the twin's own rounding noise only" in r.outputs[0].note, r.outputs[0].note
    assert any("rounding noise only, larger there than torch's" in w for w in r.warnings), r.warnings


def test_an_own_noise_run_that_raises_is_a_warning_in_check_and_verify(tmp_path):
    # torch's noise alone does not pass this twin (the test above): without its own run it FAILs,
    # and says why; verify raised here before
    r = parity.check(TorchLinear(), FCNoFloat64(), X, input_layout="as_is", layers=False, lint=False)
    assert r.verdict == "FAIL" and any("own-noise run (the other precision) failed (TypeError" in w
                                       for w in r.warnings), r.warnings
    bundle = parity.record(TorchLinear(), torch.as_tensor(X, dtype=torch.float32), tmp_path / "b",
                           input_layout="as_is", layers=False)
    v = parity.verify(bundle, FCNoFloat64(), layers=False)
    assert v.verdict == "FAIL" and any("own-noise run (the other precision) failed (TypeError" in w
                                       for w in v.warnings), v.warnings


def test_a_verify_without_rows_hands_its_variables_to_the_own_noise_run(tmp_path, monkeypatch):
    """Verify's last run of the twin (its own noise, no rows to follow) takes over the variables it
    ported and casts them a leaf at a time: the model is never held in both dtypes. A caller's
    variables stay the caller's."""
    import weakref

    import jax

    from parity.golden import _verify

    taken = []
    real = _verify._recast

    def spy(held, dtype):
        refs = [weakref.ref(a) for a in jax.tree_util.tree_leaves(held[0])]
        out = real(held, dtype)
        # during the run: nothing of verify's still holds a float32 leaf (its frame's name dropped)
        taken.append([r() is None for r in refs])
        return out

    monkeypatch.setattr(_verify, "_recast", spy)
    bundle = parity.record(TorchLinear(), torch.as_tensor(X, dtype=torch.float32), tmp_path / "b",
                           input_layout="as_is", layers=False)
    r = parity.verify(bundle, FC(), layers=False)
    assert r.verdict == "PASS" and len(taken) == 1, r.warnings  # the own-noise run took them over
    assert taken[0] and all(taken[0])  # and the float32 leaves were gone before it ran
    taken.clear()
    import weight_port

    mine = weight_port.torch_to_flax(TorchLinear(), FC(), torch.as_tensor(X, dtype=torch.float32), input_layout="as_is")
    assert parity.verify(bundle, FC(), layers=False, variables=mine).verdict == "PASS"
    assert taken == []  # the caller's variables are not consumed


def test_checks_own_noise_run_computes_only_the_gradients_it_judges_again(monkeypatch):
    """As verify's: fc's weight gradient passes only on the twin's own noise, fc2's on torch's
    alone, so the twin's float64 run computes and converts fc's gradient and no other."""
    import parity.checker as ck
    from test_golden import _TwoLinears

    computed, real = [], ck.forward_backward

    def spy(*a, **kw):
        f = real(*a, **kw)
        if kw.get("param_grads") is not None:
            computed.append(sorted(f.param_grads))
        return f

    monkeypatch.setattr(ck, "forward_backward", spy)
    r = parity.check(_TwoLinears.torch(), _TwoLinears.flax(), X, input_layout="as_is", layers=False, lint=False)
    assert r.verdict == "PASS", str(r)
    assert computed == [["fc"]], computed
    assert {c.name: c.ok for c in r.grads} == {"grad input": True, "grad fc.weight": True, "grad fc2.weight": True}


def test_with_rows_the_own_noise_run_takes_the_rows_float64_variables(monkeypatch):
    """A float32 check with rows holds the variables in float64 for its rows (each layer run
    alone): the twin's own float64 run takes those, not a second cast of the model (0.8 GB at
    BERT-base size). The twin computes in its dtype field, so its rows read the checked run,
    which records every layer: no other whole-model run of it is recorded."""
    import jax

    import parity.checker as ck

    seen, real = [], ck.forward_backward
    rows_vars, analyze = [], ck.analyze_layers

    def spy(twin, variables, *a, capture=False, **kw):
        seen.append((capture, jax.tree_util.tree_leaves(variables)))
        return real(twin, variables, *a, capture=capture, **kw)

    def spy_rows(t_calls, f_run, twin, variables, *a, **kw):
        rows_vars.append(jax.tree_util.tree_leaves(variables))
        return analyze(t_calls, f_run, twin, variables, *a, **kw)

    monkeypatch.setattr(ck, "forward_backward", spy)
    monkeypatch.setattr(ck, "analyze_layers", spy_rows)
    r = parity.check(TorchLinear(), FC(), X, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", str(r)
    assert "within the twin's own rounding noise only" in r.outputs[0].note
    recorded = [leaves for capture, leaves in seen if capture]
    own = [leaves for capture, leaves in seen if not capture and leaves[0].dtype == np.float64]
    assert len(recorded) == 1 and recorded[0][0].dtype == np.float32, [(c, ls[0].dtype) for c, ls in seen]
    assert len(own) == 1 and len(rows_vars) == 1 and rows_vars[0][0].dtype == np.float64
    assert all(a is b for a, b in zip(own[0], rows_vars[0]))


class TorchTwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 16, bias=False)
        self.other = torch.nn.Linear(64, 8, bias=False)

    def forward(self, x):
        return self.fc(x), self.other(x)


class TwoHeads(nn.Module):
    dtype: jnp.dtype = jnp.float32  # the own-noise run clones it with float64

    @nn.compact
    def __call__(self, x):
        return ShiftedDense(dtype=self.dtype, name="fc")(x), nn.Dense(8, use_bias=False, name="other")(x)


def test_gradients_that_passed_are_freed_before_the_twins_own_noise_run(monkeypatch):
    # The own-noise run is a whole-model float64 run: the gradients already judged (both sides'
    # and the float64 reference's) are dropped first, not held beside it (BERT-base: 1.6 GB).
    import parity.checker as checker

    seen = {}
    real_release, real_values = checker._release, checker._flax_values

    def release(run, ev, o):
        seen["ref"] = ev.ref
        return real_release(run, ev, o)

    def values(run, dname, keys=None, variables=None):
        seen["held"] = {"torch": set(run.torch.param_grads), "flax": set(run.f_p_grads),
                        "reference": set(seen["ref"].param_grads), "keys": set(keys)}
        return real_values(run, dname, keys, variables)

    monkeypatch.setattr(checker, "_release", release)
    monkeypatch.setattr(checker, "_flax_values", values)
    r = parity.check(TorchTwoHeads(), TwoHeads(), X, input_layout="as_is", layers=False, lint=False)
    assert r.verdict == "PASS", str(r)
    held = seen["held"]
    assert "param:other.weight" not in held["keys"]  # passed on torch's noise ...
    for side in ("torch", "flax", "reference"):  # ... and freed on every side before the run
        assert "other.weight" not in held[side], held
    pending = {k.removeprefix("param:") for k in held["keys"] if k.startswith("param:")}
    assert pending <= held["torch"] and pending <= held["reference"]  # what is judged again stays


class PlainShifted(nn.Module):
    """ShiftedDense without a dtype field: it computes in its kernel's dtype, so its float64
    rows run is its float64 run (PreparedPair.twin_in gives the twin as declared)."""

    error: float = 0.0

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.zeros, (64, 16))
        x = x.astype(k.dtype)
        return (x + SHIFT) @ (k * (1 + self.error)) - SHIFT * k.sum(0)


class PlainFC(nn.Module):
    error: float = 0.0

    @nn.compact
    def __call__(self, x):
        return PlainShifted(error=self.error, name="fc")(x)


def test_with_rows_a_twin_computing_in_float64_as_declared_runs_float64_once(monkeypatch):
    # Its own-noise run and its rows' float64 run are one run: recorded, with the gradient the
    # judge asked for (a whole-model float64 run fewer; BERT-base: 2.6 s of 17.6).
    import jax

    import parity.checker as ck

    seen, real = [], ck.forward_backward

    def spy(twin, variables, *a, capture=False, param_grads=None, **kw):
        f = real(twin, variables, *a, capture=capture, param_grads=param_grads, **kw)
        if jax.tree_util.tree_leaves(variables)[0].dtype == np.float64:
            seen.append((capture, sorted(f.param_grads or {})))
        return f

    monkeypatch.setattr(ck, "forward_backward", spy)
    r = parity.check(TorchLinear(), PlainFC(), X, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", str(r)
    assert "within the twin's own rounding noise only" in r.outputs[0].note, r.outputs[0].note
    assert seen == [(True, ["fc"])], seen
    row = next(row for row in r.layers if row.torch_path == "fc")
    assert row.isolated is not None and row.isolated.ok, str(r)
    bad = parity.check(TorchLinear(), PlainFC(error=1e-4), X, input_layout="as_is", lint=False)
    assert bad.verdict == "FAIL" and bad.first_divergence == "fc", str(bad)


@jax.custom_vjp
def _matmul_shifted_grad(x, k):
    return x @ k


def _fwd(x, k):
    return x @ k, (x, k)


def _bwd(res, g):
    x, k = res
    # (x + c)^T g - c colsum(g): x^T g in exact arithmetic, its float32 rounding ~c/|x| times worse
    return g @ k.T, (x + SHIFT).T @ g - SHIFT * g.sum(0, keepdims=True)


_matmul_shifted_grad.defvjp(_fwd, _bwd)


class ShiftedGradDense(nn.Module):
    """torch's Linear (no bias) whose kernel gradient is computed the way ShiftedDense computes
    its output: the same function, rounded worse."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features)).astype(self.dtype)
        return _matmul_shifted_grad(x.astype(self.dtype), k)


class TorchBlockPair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = torch.nn.Sequential()
        self.block.add_module("fc_a", torch.nn.Linear(64, 32, bias=False))
        self.block.add_module("fc_b", torch.nn.Linear(32, 16, bias=False))

    def forward(self, x):
        return self.block(x)


class FlaxBlock(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ShiftedGradDense(32, dtype=self.dtype, name="fc_a")(x)
        return nn.Dense(16, use_bias=False, dtype=self.dtype, name="fc_b")(x)


class FlaxBlockPair(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return FlaxBlock(dtype=self.dtype, name="block")(x)


def test_a_containers_row_leaves_its_layers_parameter_gradients_to_their_own_rows(monkeypatch):
    # Each parameter's gradient is computed and judged once, in the innermost row that can judge
    # it: the block's row reads fc_a's and fc_b's kernels but does not differentiate them (a
    # container's row, GPT-2's transformer: the whole model, would otherwise compute and hold
    # every parameter's float64 gradient again). fc_a's gradient is rounded worse than torch's:
    # its own row's own run (cloned to float64) computes it.
    import parity._layer_runs as layer_runs
    import parity.layers as layers
    from flax import traverse_util

    made, split, own_run = {}, {}, layers._own_run

    def spy(job, rows, plan, failed):
        out = own_run(job, rows, plan, failed)
        if out is not None and out[1] is not None:
            made[job.torch_call.path] = set(traverse_util.flatten_dict(dict(out[1][0])))
        return out

    def spy_split(jobs, plan, calls):
        split_params(jobs, plan, calls)
        split.update((j.torch_call.path, (set(traverse_util.flatten_dict(dict(j.params))),
                                          set(traverse_util.flatten_dict(dict(j.fixed))))) for j in jobs)
    split_params = layer_runs.split_params
    monkeypatch.setattr(layers, "_own_run", spy)
    monkeypatch.setattr(layer_runs, "split_params", spy_split)
    r = parity.check(TorchBlockPair(), FlaxBlockPair(), X, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", str(r)
    block = r.layer("block")
    assert block.grad_isolated is not None and block.grad_isolated.ok, block
    assert split["block"] == (set(), {("fc_a", "kernel"), ("fc_b", "kernel")}), split
    assert split["block.fc_a"] == ({("kernel",)}, set()), split
    assert made.get("block.fc_a") == {("kernel",)}, made
    assert not made.get("block"), made  # nothing of the block's own failed


class ScaledDense(nn.Module):
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.zeros, (x.shape[-1], self.features)).astype(self.dtype)
        return x.astype(self.dtype) @ (k * (1 + 1e-4))  # a real error: 1e-4 relative in the weight


class WrongBlockPair(nn.Module):
    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x):
                return ScaledDense(16, name="fc_b")(ShiftedGradDense(32, name="fc_a")(x))
        return Block(name="block")(x)


def test_a_container_with_a_real_gradient_error_still_fails_there():
    # fc_b's kernel 1e-4 off: fc_a's kernel gradient through it is 1e-4 off in the block's row,
    # judged with the twin's own noise of that gradient (the block's own run computes it), and fails
    r = parity.check(TorchBlockPair(), WrongBlockPair(), X, input_layout="as_is", lint=False)
    assert r.verdict == "FAIL", str(r)
    assert r.first_divergence == "block.fc_b", str(r)
    block = r.layer("block")
    assert block.grad_isolated is not None and not block.grad_isolated.ok, block


def test_a_rows_passed_gradients_are_dropped_before_its_own_run():
    # what the block's row holds while its own run computes: fc_a's gradient (failed on torch's
    # noise alone, judged again), not fc_b's (passed: final)
    from parity.layers import _keep_grads_of
    from parity.pair import CheckOptions, prepare

    pair = prepare(TorchBlockPair(), FlaxBlockPair(), X, CheckOptions(input_layout="as_is"))
    block = {"fc_a": {"kernel": np.ones((64, 32))}, "fc_b": {"kernel": np.ones((32, 16))}}
    _keep_grads_of(block, ("block",), pair.plan, {"block.fc_a.weight"})
    assert list(block) == ["fc_a"] and list(block["fc_a"]) == ["kernel"], block
    _keep_grads_of(block, ("block",), pair.plan, set())
    assert block == {}
