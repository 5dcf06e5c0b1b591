"""Tensors that are zero in exact arithmetic (rounding noise on both sides) are judged by measured
noise and pass for a correct twin; small real errors and cotangent-only bugs must FAIL."""
from __future__ import annotations

import copy
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import parity
import parity.runtime.torch_runner as torch_runner
import planted
import verdict_pairs as vp
from parity.cli import main
import parity.checker as checker
import parity.pair as pair_module
from parity.pair import CheckOptions
from weight_port import build_plan

TESTS = Path(__file__).parent
ATTN_X = vp.attention_input(np.random.default_rng(0))
UNIT_X = np.random.default_rng(1).standard_normal((3, 8))
CENTERED_X = vp.centered_input(np.random.default_rng(2))
MODES = pytest.mark.parametrize("dtype,reference", [("float64", None), ("float32", None), ("float32", "float64")],
                                ids=["float64", "float32", "float32-fp64-reference"])


@MODES
def test_correct_attention_twin_passes_with_its_zero_key_bias_gradient(dtype, reference):
    r = parity.check(vp.make_torch_attention(), vp.make_flax_attention(), ATTN_X, input_layout="as_is",
                     dtype=dtype, reference=reference)
    assert r.ok, str(r)
    kbias = next(c for c in r.param_grads if c.name == "grad k.bias")
    # Zero in exact arithmetic: its rel_norm is a ratio of two noises (~1), yet it is judged by
    # measured noise, not a relative bound, and passes.
    assert kbias.judge == "reference" and kbias.ok and kbias.rel_norm > 1e-3


def test_cli_float64_attention_passes_and_shows_no_noise_ratio(monkeypatch, capsys):
    monkeypatch.chdir(TESTS)
    code = main(["check", "--torch", "verdict_pairs:make_torch_attention", "--flax",
                 "verdict_pairs:make_flax_attention", "--input-shape", "2,5,8", "--layout", "as_is",
                 "--output-layout", "as_is", "--dtype", "float64", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(ln for ln in out.splitlines() if ln.startswith("TorchAttention"))
    # the grad score column: the worst gradient's error over its measured-noise allowance
    assert float(row.split()[6]) <= 1.0, row


def _perturbed_variables(torch_model, flax_model, x, name: str, relative: float):
    """Flax variables ported from a copy of ``torch_model`` whose parameter ``name`` is scaled."""
    wrong = copy.deepcopy(torch_model)
    with torch.no_grad():
        wrong.get_parameter(name).mul_(1.0 + relative)
    plan = build_plan(wrong, flax_model, torch.as_tensor(x).float(), input_layout="as_is")
    return plan.to_flax(wrong.state_dict())


def test_a_known_small_weight_error_fails_at_float32():
    # One weight tensor off by a relative 1e-3: a float32 table loosened 1000x would pass it.
    tm, fm = planted.make_torch_block(), planted.FlaxBlock()
    variables = _perturbed_variables(tm, fm, UNIT_X, "fc1.weight", 1e-3)
    r = parity.check(tm, fm, UNIT_X, input_layout="as_is", dtype="float32", variables=variables)
    assert r.verdict == "FAIL"
    assert (r.first_divergence, r.divergence_kind) == ("fc1", "forward")


def test_layernorm_eps_1e_3_fails_at_float32():
    # eps 1e-3 vs torch's 1e-5 on unit-variance activations: ~5e-4 relative, a real error.
    r = parity.check(planted.make_torch_block(), planted.FlaxBlock(eps=1e-3), UNIT_X, input_layout="as_is",
                     dtype="float32")
    assert r.verdict == "FAIL"
    assert (r.first_divergence, r.divergence_kind) == ("norm", "forward")


def test_a_sign_flipped_cotangent_branch_only_a_random_cotangent_exposes(monkeypatch):
    tm, fm = planted.make_torch_block(), vp.FlaxBlockMirroredGrad()
    r = parity.check(tm, fm, UNIT_X, input_layout="as_is", dtype="float32")
    assert r.verdict == "FAIL"
    assert r.divergence_kind == "backward" and all(c.ok for c in r.outputs)
    # The same check with a ones cotangent (what a plain .sum() backward uses) sees nothing:
    # this is why the checker draws a random one, and what breaks if it stops doing so.
    monkeypatch.setattr(torch_runner, "random_cotangents",
                        lambda outputs, seed: {p: np.ones(o.shape) for p, o in outputs.items()})
    assert parity.check(tm, fm, UNIT_X, input_layout="as_is", dtype="float32").ok


# --- the forward floor: an output that is zero in exact arithmetic -----------------------------
def _centered(dtype, reference, variables=None):
    return parity.check(vp.make_torch_centered(), vp.make_flax_centered(), CENTERED_X, input_layout="as_is",
                        dtype=dtype, reference=reference, variables=variables)


@MODES
def test_correct_twin_with_a_zero_in_theory_output_passes(dtype, reference):
    r = _centered(dtype, reference)
    assert r.ok, str(r)
    # Both sides return rounding noise (their rel_norm is a ratio of two noises), judged by
    # measured noise, in the model's output and in the per-layer rows.
    (out,) = r.outputs
    assert out.judge == "reference" and out.ok and out.max_abs > 0 and out.rel_norm > 1e-3
    center = r.layer("center")
    assert center.isolated.judge == "reference" and center.isolated.ok


def test_the_noise_probe_is_nudged_where_float32_cancels_exactly():
    # Why the float32 probe of a float64 check moves a random half of every weight and input one
    # ulp toward zero: the centring twin's equal features cancel exactly in float32 (zero noise
    # measured) while float64 keeps an ulp of them. Nudged, every output slice shows its noise;
    # integer values (a mask, an index kept in a float) are left alone.
    run = checker.capture(vp.make_torch_centered(), vp.make_flax_centered(), CENTERED_X, dtype="float64",
                          input_layout="as_is", layers=False)
    o = CheckOptions(dtype="float64", layers=False)
    kw = dict(capture=False, cotangents=run.torch.cotangents)
    plain = checker._torch_only(run.pair, o, "float32", **kw).outputs["out"]
    nudged = checker._torch_only(run.pair, o, "float32", perturb=True, **kw).outputs["out"]
    assert (np.abs(plain).max(axis=1) == 0).any()  # some samples cancel exactly in float32
    assert (np.abs(nudged).max(axis=1) > 0).all()  # none does once nudged
    whole = checker._torch_only(run.pair, o, "float32", perturb=True, **kw)
    assert np.array_equal(whole.outputs["out"], nudged)  # seeded: the same probe every time


def test_the_nudged_probe_leaves_the_pair_bit_for_bit_as_it_was():
    # The probe of a float32 check nudges the pair's own float32 copy in place (no second copy
    # of the weights) and moves every nudged value back: the next run must see the same bits.
    run = checker.capture(vp.make_torch_centered(), vp.make_flax_centered(), CENTERED_X, dtype="float32",
                          input_layout="as_is", layers=False)
    tm = run.pair.torch_module
    with torch.no_grad():  # values where a one-ulp move toward zero is a subnormal or a signed zero
        first = next(tm.parameters())
        first.view(-1)[:4] = torch.tensor([1e-45, -1e-45, 3.5, -2.75])
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    probe, _ = run.pair.run_torch(grads=True, perturb=7)
    again, _ = run.pair.run_torch(grads=True)
    assert not np.array_equal(probe.outputs["out"], again.outputs["out"])  # the probe did move
    after = tm.state_dict()
    assert all(torch.equal(before[k], after[k]) and
               torch.equal(torch.signbit(before[k]), torch.signbit(after[k])) for k in before)
    assert all(p.grad is None for p in tm.parameters())  # the run's gradients are not kept twice
    # The last run of the pair's torch side (the rows' probe, freed after it) skips the pass that
    # moves every weight back: the same probe, the weights left nudged.
    o = CheckOptions(layers=False)
    assert o.seed + 7 == 7  # _torch_only's probe is the one above
    last = checker._torch_only(run.pair, o, "float32", capture=False, cotangents=probe.cotangents, perturb=True,
                               last=True)
    np.testing.assert_array_equal(last.outputs["out"], probe.outputs["out"])
    assert not all(torch.equal(before[k], v) for k, v in tm.state_dict().items())


def test_the_nudge_a_chunk_at_a_time_is_the_nudge_of_the_whole(monkeypatch):
    # Weights far larger than a chunk (as at full size) get the same draws, the same probe, and
    # are moved back bit for bit; a strided buffer is nudged whole.
    run = checker.capture(vp.make_torch_centered(), vp.make_flax_centered(), CENTERED_X, dtype="float32",
                          input_layout="as_is", layers=False)
    tm = run.pair.torch_module
    tm.register_buffer("strided", torch.linspace(0.1, 3.3, 40).reshape(8, 5).t())  # not contiguous
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    whole, _ = run.pair.run_torch(grads=True, perturb=7)
    monkeypatch.setattr(pair_module, "_NUDGE_CHUNK", 5)
    assert max(p.numel() for p in tm.parameters()) > 5
    chunked, _ = run.pair.run_torch(grads=True, perturb=7)
    np.testing.assert_array_equal(chunked.outputs["out"], whole.outputs["out"])
    for a, b in zip(chunked.param_grads.values(), whole.param_grads.values()):
        np.testing.assert_array_equal(a, b)
    after = tm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@MODES
def test_a_real_error_in_a_zero_in_theory_output_still_fails(dtype, reference):
    # One row of fc.weight off by a relative 1e-3: the features no longer cancel, and the
    # output differs by ~1e-3 |h|, far above a floor of 16 eps ||x||.
    variables = _perturbed_variables(vp.make_torch_centered(), vp.make_flax_centered(), CENTERED_X,
                                     "fc.weight", 0.0)
    wrong = jax.tree_util.tree_map(np.array, variables)
    wrong["params"]["fc"]["kernel"][:, 0] *= 1.0 + 1e-3  # Flax kernel [in, out]: output feature 0
    r = _centered(dtype, reference, wrong)
    assert r.verdict == "FAIL"
    (out,) = r.outputs
    # torch's output is still noise: the Flax side's error is what fails.
    assert not out.ok and out.judge == "reference"
    assert (r.first_divergence, r.divergence_kind) == ("fc", "forward")


def test_the_probe_keeps_its_masks_as_bits():
    # A bool per weight to move them back was 355 MB on GPT-2-medium through the rows' probe:
    # kept 8 to a byte, and unpacked to the very mask that moved them.
    t = torch.linspace(0.1, 9.9, 1001).reshape(7, 143)
    drawn = pair_module._nudge_mask(t.clone(), torch.Generator().manual_seed(3))
    (bits,) = pair_module._nudge(t, torch.Generator().manual_seed(3), keep=True)
    assert bits.nbytes == (1001 + 7) // 8
    assert torch.equal(pair_module._unpacked(bits, t), drawn) and drawn.any() and not drawn.all()
