"""The per-layer rows of a low-precision check keep torch's float32 probe of each parameter
gradient as its per-slice sums (parity.judge.ProbeSums), reduced as autograd finishes it, not as a
float32 copy of the model's gradients; the verdicts and numbers are the ones the whole probe gives."""
from __future__ import annotations

import numpy as np
import pytest

import parity
import parity.checker as checker
from parity.judge import Measured, NoEvidence, ProbeSums, judge, reduce_probe
from parity.registry import PAIRS

RULE = Measured(k=4.0, rho=1.0, eps=float(np.finfo(np.float64).eps), noise_scale=2.0 ** -29)


def _case(shape, seed=0, bug=0.0):
    """(flax, torch float64 = the reference, torch's float32 probe), parameter-gradient-like."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(shape)
    probe = (ref * (1 + rng.standard_normal(shape) * 6e-8)).astype(np.float32)
    flax = ref * (1 + rng.standard_normal(shape) * 1e-16)
    flax.flat[0] += bug * abs(ref.flat[0])
    return flax, ref, probe


@pytest.mark.parametrize("shape", [(7, 5), (5,), (3, 4, 2), (1, 6)])
@pytest.mark.parametrize("bug", [0.0, 1e-9])
def test_sums_judge_exactly_as_the_whole_probe(shape, bug):
    flax, ref, probe = _case(shape, bug=bug)
    own = dict(flax_probe=flax * (1 + 1e-12), flax_reference=flax)
    whole = judge("g", flax, ref, RULE, reference=ref, probe=probe, axis=0, **own)
    sums = reduce_probe(probe, ref, 0)
    assert isinstance(sums, ProbeSums)
    assert judge("g", flax, ref, RULE, reference=ref, probe=sums, axis=0, **own) == whole
    assert whole.ok == (bug == 0.0), whole  # the planted error is found by the sums as by the probe


def test_a_probe_that_is_not_finite_stays_whole():
    flax, ref, probe = _case((4, 3))
    probe[1, 2] = np.nan
    kept = reduce_probe(probe, ref, 0)
    assert isinstance(kept, np.ndarray) and kept.shape == (4, 3)


def test_a_value_that_is_not_finite_needs_the_whole_probe():
    """The judge's masked path reads the probe's values: with its sums alone it says so (the rows
    then judge that tensor by the table) instead of judging on sums that include the NaN."""
    flax, ref, probe = _case((4, 3))
    flax[0, 0] = np.nan
    with pytest.raises(NoEvidence, match="not finite"):
        judge("g", flax, ref, RULE, reference=ref, probe=reduce_probe(probe, ref, 0), axis=0)


def test_sums_taken_along_another_axis_are_refused():
    flax, ref, probe = _case((4, 3))
    with pytest.raises(NoEvidence, match="axis"):
        judge("g", flax, ref, RULE, reference=ref, probe=reduce_probe(probe, ref, 1), axis=0)


def test_rows_of_a_float32_check_hold_the_probe_as_sums_and_let_each_gradient_go(monkeypatch):
    seen = {}
    analyze = checker.analyze_layers

    def spy(*args, **kwargs):
        seen["probe"] = dict(kwargs["rows"].probe_params)
        seen["t64"] = kwargs["param_grads"]
        seen["before"] = sorted(seen["t64"])
        return analyze(*args, **kwargs)
    monkeypatch.setattr(checker, "analyze_layers", spy)
    pair = PAIRS["mlp"]
    tm, fm = pair.build()
    r = parity.check(tm, fm, pair.example_input(), input_layout=pair.input_layout,
                     output_layout=pair.out_layout(), layers=True)
    assert r.verdict == "PASS", str(r)
    names = [n for n, p in tm.named_parameters()]
    assert sorted(seen["probe"]) == sorted(names)
    assert all(isinstance(v, ProbeSums) for v in seen["probe"].values()), seen["probe"]
    assert all(row.grad_isolated is None or row.grad_isolated.judge == "reference" for row in r.layers)
    # torch's float64 gradients, each let go once its row judged it (the model's size in float64)
    assert seen["before"] == sorted(names) and seen["t64"] == {}, seen["t64"]
