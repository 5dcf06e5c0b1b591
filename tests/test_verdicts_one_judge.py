"""One judge (issue 17): each wrong verdict seen on main, as a test that failed before the judge.

False PASSes (a wrong twin passed) and false FAILs / INVALIDs (a correct twin did not pass),
judged by measured noise or the elementwise table, never by an a-priori floor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import judge_pairs as jp
import parity


def _check(tm, fm, x, **kw):
    kw.setdefault("input_layout", "as_is")
    kw.setdefault("lint", False)
    return parity.check(tm, fm, x, **kw)


# --- false PASS ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_finfo_min_mask_does_not_hide_a_missing_residual(dtype):
    torch.manual_seed(0)
    x, mask = jp.masked_attention_input(float(np.finfo(np.dtype(dtype)).min))
    tm = jp.TorchMaskedAttention()
    right = _check(tm, jp.FlaxMaskedAttention(), (x, mask), dtype=dtype)
    assert right.verdict == "PASS", str(right)
    wrong = _check(tm, jp.FlaxMaskedAttention(bug="no-residual"), (x, mask), dtype=dtype)
    assert wrong.verdict == "FAIL", str(wrong)
    assert not wrong.outputs[0].ok and not wrong.input_grads[0].ok


def test_a_users_rtol_atol_replace_the_table_and_nothing_else():
    # float32, a -1e9 mask, the user's own rtol/atol: a twin whose residual carries no gradient
    # passed under a noise floor of 1.3e5 that the override kept.
    torch.manual_seed(0)
    x, mask = jp.masked_attention_input(-1e9)
    r = _check(jp.TorchMaskedAttention(), jp.FlaxMaskedAttention(bug="residual-no-grad"), (x, mask),
               dtype="float32", rtol=1e-4, atol=1e-5)
    assert r.verdict == "FAIL", str(r)
    assert all(c.judge == "table" for c in r.outputs + r.grads)
    assert not next(c for c in r.input_grads if c.name.endswith("[0]")).ok


def test_without_a_float64_run_the_noise_is_measured_in_the_checked_dtype():
    # The float64 copy cannot run (a float32 constant inside): a twin 79% off at its 1e-6-sized
    # output passed under the a-priori floor. Now a one-ulp-nudged float32 run measures the noise.
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((4, 8))
    wrong = _check(jp.TorchFloat32Inside(), jp.FlaxFloat32Inside(factor=1.79e-6), x, dtype="float32")
    assert wrong.verdict == "FAIL", str(wrong)
    assert any("float64 reference run failed" in w and "nudged" in w for w in wrong.warnings), wrong.warnings
    assert wrong.outputs[0].judge == "reference"
    right = _check(jp.TorchFloat32Inside(), jp.FlaxFloat32Inside(), x, dtype="float32")
    assert right.verdict == "PASS", str(right)


def test_an_atol_only_pass_with_no_measured_noise_is_inconclusive_never_pass():
    # A float64 check whose float32 probe cannot run (a float64 constant inside): the table
    # decides, and a 1e-9-sized output 79% off is within its absolute atol.
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((4, 8))
    tm = jp.TorchFloat32Inside(factor=1e-9, dtype=torch.float64)
    wrong = _check(tm, jp.FlaxFloat32Inside(factor=1.79e-9), x, dtype="float64")
    assert wrong.verdict == "INCONCLUSIVE", str(wrong)
    assert wrong.outputs[0].inconclusive and "atol" in wrong.outputs[0].note
    assert any("float32 run that measures float64 noise failed" in w for w in wrong.warnings)
    right = _check(tm, jp.FlaxFloat32Inside(factor=1e-9), x, dtype="float64")
    assert right.verdict == "PASS", str(right)


def test_a_small_column_is_judged_on_its_own_scale():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((6, 8))
    tm = jp.TorchHead()
    assert _check(tm, jp.FlaxHead(), x, dtype="float32").verdict == "PASS"
    wrong = _check(tm, jp.FlaxHead(zero_rate=True), x, dtype="float32")
    assert wrong.verdict == "FAIL", str(wrong)
    out = wrong.outputs[0]
    assert not out.ok and out.worst_index[1] == 1  # the rate column, not the price
    # the head's gradients for the rate row are hidden no more either
    assert not next(c for c in wrong.param_grads if c.name == "grad head.weight").ok


def test_bn_var_plus_eps_fails_and_initial_statistics_are_named():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5))
    kw = dict(input_layout="NC...", output_layout="NC...")
    right = _check(jp.TorchConvBN(), jp.FlaxConvBN(), x, **kw)
    assert right.verdict == "PASS", str(right)
    assert any("initial values (mean 0, var 1)" in w for w in right.warnings)
    wrong = _check(jp.TorchConvBN(), jp.FlaxConvBN(wrong_bn=True), x, **kw)
    assert wrong.verdict == "FAIL", str(wrong)
    assert wrong.first_divergence == "bn"


def test_precision_default_on_cpu_is_judged_as_full_float32():
    # XLA:CPU float32 has no TF32: the TF32 entry (5e-3 norm-wise) let a 2e-3 error pass.
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((4, 8))
    r = _check(jp.TorchFloat32Inside(), jp.FlaxFloat32Inside(factor=1.002e-6), x, dtype="float32",
               precision="default", layers=False)
    assert r.verdict != "PASS", str(r)
    from parity.tolerances import FORWARD, tolerance_for
    assert tolerance_for("float32", FORWARD, "default", "cpu") == tolerance_for("float32", FORWARD, "highest")


# --- false FAIL ------------------------------------------------------------------------------------
def test_a_gradient_zero_in_exact_arithmetic_passes_in_float64():
    # diffusers' ResnetBlock2D pattern at one channel per group: temb_proj's gradient is rounding
    # noise (~1e-15); the per-layer floor from a noise cotangent failed it (rel 1.4).
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, temb = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((2, 6))
    r = _check(jp.TorchTimeBlock(), jp.FlaxTimeBlock(), (x, temb), dtype="float64",
               input_layout={"input[0]": "NC...", "input[1]": "as_is"}, output_layout="NC...")
    assert r.verdict == "PASS", str(r)
    g = next(c for c in r.param_grads if c.name == "grad temb_proj.weight")
    assert g.rel_norm > 1e-3 and g.judge == "reference"  # noise on both sides, judged as noise


@pytest.mark.parametrize("fill", [-np.inf, np.finfo(np.float32).min])
def test_an_additive_infinite_mask_is_no_reason_for_invalid(fill):
    torch.manual_seed(0)
    x, mask = jp.masked_attention_input(fill)
    r = _check(jp.TorchMaskedAttention(), jp.FlaxMaskedAttention(), (x, mask), dtype="float32")
    assert r.verdict == "PASS", str(r)


def test_identical_infinities_agree_and_one_sided_nan_fails_naming_flax():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 8))
    r = _check(jp.TorchBannedLogits(), jp.FlaxBannedLogits(), x, dtype="float32")
    assert r.verdict == "PASS", str(r)
    bad = _check(jp.TorchBannedLogits(), jp.FlaxBannedLogits(nan_flax=True), x, dtype="float32")
    assert bad.verdict == "FAIL", str(bad)
    assert "one side only (flax)" in bad.outputs[0].note
    assert any("first: NaN in Flax" in w for w in bad.warnings), bad.warnings


def test_a_minus_inf_pad_before_max_pool_passes():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5))
    r = _check(jp.TorchPadPool(), jp.FlaxPadPool(), x, input_layout="NC...", output_layout="NC...")
    assert r.verdict == "PASS", str(r)


def test_nan_on_both_sides_stays_invalid():
    torch.manual_seed(0)
    x = np.full((3, 8), np.nan)
    r = _check(jp.TorchBannedLogits(), jp.FlaxBannedLogits(), x, dtype="float32")
    assert r.verdict == "INVALID", str(r)


# --- float32 inside a float64 check ------------------------------------------------------------------
def test_float32_inside_a_float64_check_is_judged_by_float32_noise():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((3, 16))
    tm = jp.TorchRMSBlock()
    r = _check(tm, jp.FlaxRMSBlock(), x, dtype="float64")
    assert r.verdict == "PASS", str(r)
    assert any("computes in float32 inside, first in layer norm" in w for w in r.warnings), r.warnings
    assert r.layer("norm").isolated.ok and r.layer("norm").isolated.judge == "reference"
    # a planted 1e-5 error after the float32 part still fails, and is located
    wrong = _check(tm, jp.FlaxRMSBlock(fc2_bug=1e-5), x, dtype="float64")
    assert wrong.verdict == "FAIL", str(wrong)
    assert wrong.first_divergence in ("fc2", "<root>")


# --- the report says which judge decided ----------------------------------------------------------
def test_every_tensor_names_its_judge_and_the_cli_prints_it(capsys, monkeypatch):
    from pathlib import Path

    from parity.cli import main

    monkeypatch.chdir(Path(__file__).parent)
    code = main(["check", "--torch", "verdict_pairs:make_torch_attention", "--flax",
                 "verdict_pairs:make_flax_attention", "--input-shape", "2,5,8", "--layout", "as_is",
                 "--output-layout", "as_is", "--full", "--no-lint"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert " reference  ok" in out and "judge" in out
