"""parity.check on correct pairs: verdicts, per-layer rows, report text/JSON, plot, tolerance
policy (table, overrides, fp64-reference mode) and the numerics environment."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

import parity
import planted
from parity.judge import judge, measured
from parity.plot import plot_layers
from parity.registry import PAIRS
from parity.tolerances import REFERENCE, FORWARD, GRAD, TOLERANCES, Tolerance, tolerance_for
from weight_port.layout import AS_IS


def _pair(name: str, batch: int = 2):
    pair = PAIRS[name]
    cfg = pair.config("tiny")
    tm, fm = pair.build(cfg)
    return pair, tm, fm, pair.example_input(cfg, batch=batch)


@pytest.fixture(scope="module")
def cnn_report():
    pair, tm, fm, x = _pair("cnn")
    return parity.check(tm, fm, x, dtype="float32", input_layout=pair.layout, name="cnn")


def test_correct_cnn_passes_with_a_row_per_layer_in_execution_order(cnn_report):
    r = cnn_report
    assert r.ok and r.first_divergence is None, str(r)
    assert [row.name for row in r.layers] == ["conv1", "conv2", "dense1", "dense2", "<root>"]
    dense1 = r.layer("dense1")
    # Isolated needs torch's flattened (C, H, W) input permuted to the twin's (H, W, C) order.
    assert dense1.isolated.ok and dense1.grad_isolated.ok and dense1.flax_path == "dense1"
    # every layer's output cotangent compared, but the root's (the seeded one on both sides)
    assert all((row.grad_accumulated is None) == (row.name == "<root>") for row in r.layers)
    assert {c.name for c in r.param_grads} == {f"grad {n}" for n, _ in PAIRS["cnn"].build()[0].named_parameters()}


def test_report_text_json_and_env(cnn_report):
    text = str(cnn_report)
    assert "parity cnn [float32, eval]: PASS" in text and "iso fwd" in text and "dense1" in text
    d = json.loads(cnn_report.to_json())
    assert d["ok"] is True and d["first_divergence"] is None
    assert [row["name"] for row in d["layers"]][-1] == "<root>"
    env = d["env"]
    for key in ("jax_default_matmul_precision", "jax_enable_x64", "torch_matmul_allow_tf32",
                "torch_cudnn_allow_tf32", "torch_device", "jax_backend", "versions"):
        assert key in env
    assert env["jax_default_matmul_precision"] == "highest" and env["torch_matmul_allow_tf32"] is False


def test_plot_is_a_png(cnn_report, tmp_path):
    out = plot_layers(cnn_report, tmp_path / "layers.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_refuses_a_report_without_layers():
    pair, tm, fm, x = _pair("mlp")
    r = parity.check(tm, fm, x, input_layout=AS_IS, layers=False)
    assert r.layers == [] and r.first_divergence is None
    with pytest.raises(ValueError, match="no per-layer rows"):
        plot_layers(r, "unused.png")


def _mlp_with_wrong_bias():
    """The mlp pair (batch 4: live ReLUs) and variables with layers.1's bias negated."""
    pair, tm, fm, x = _pair("mlp", batch=4)
    variables = planted.port(tm, fm, x, AS_IS)
    bias = np.asarray(variables["params"]["layers_1"]["bias"])
    return tm, fm, x, planted._set(variables, ("params", "layers_1", "bias"), -bias - 1.0)


def test_assert_parity_raises_with_the_table():
    tm, fm, x, variables = _mlp_with_wrong_bias()
    with pytest.raises(AssertionError, match=r"first divergence: layers.1"):
        parity.assert_parity(tm, fm, x, dtype="float64", input_layout=AS_IS, variables=variables)


# --- tolerance policy ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(TOLERANCES), ids=lambda k: "-".join(k))
def test_every_table_entry_has_a_reason(key):
    assert len(TOLERANCES[key].reason) > 20


@pytest.mark.parametrize("dtype, precision", [("float64", "highest"), ("float32", "highest"),
                                              ("float16", "highest"), ("bfloat16", "highest"),
                                              ("float32", "default"), ("float32", "tensorfloat32")])
def test_table_covers_each_dtype_and_tf32(dtype, precision):
    for kind in (FORWARD, GRAD):
        assert tolerance_for(dtype, kind, precision)
    if dtype != "float64":
        assert tolerance_for(dtype, REFERENCE, precision).k is not None


def test_tolerance_refuses_rtol_without_atol():
    with pytest.raises(ValueError):
        Tolerance(rtol=1e-3)
    with pytest.raises(ValueError):
        tolerance_for("float32", FORWARD).override(rtol=1e-3)
    with pytest.raises(KeyError, match="no tolerance"):
        tolerance_for("int8", FORWARD)


def test_per_call_override_decides_the_verdict():
    tm, fm, x, variables = _mlp_with_wrong_bias()
    kw = dict(dtype="float64", input_layout=AS_IS, variables=variables, layers=False)
    r = parity.check(tm, fm, x, rtol=1e3, atol=1e3, **kw)
    assert r.ok, str(r)  # a huge override lets even the wrong bias pass
    assert r.outputs[0].tolerance == "rtol=1000 atol=1000"
    assert not parity.check(tm, fm, x, rtol=1e-3, atol=1e-3, **kw).ok


def test_compare_reports_worst_element_in_torch_layout():
    tol = tolerance_for("float32", FORWARD)
    t = np.zeros((1, 2, 3, 4))
    f = np.zeros((1, 3, 4, 2))  # Flax layout [N, H, W, C]
    f[0, 1, 2, 1] = 1.0
    c = judge("x", f, t, tol, layout="NC...")
    assert not c.ok and c.worst_index == (0, 1, 1, 2) and c.mismatches == 1 and c.score > 1


def test_fp64_reference_mode_passes_float16_and_judges_relative_to_torch():
    tm, fm, x, variables = _mlp_with_wrong_bias()
    r = parity.check(tm, fm, x, dtype="float16", input_layout=AS_IS, reference="float64")
    assert r.ok, str(r)
    assert r.reference == "float64" and "vs fp64" in r.outputs[0].note
    bad = parity.check(tm, fm, x, dtype="float16", input_layout=AS_IS, reference="float64",
                       variables=jax.tree_util.tree_map(lambda a: np.asarray(a, np.float16), variables))
    assert not bad.ok and bad.first_divergence == "layers.1"  # layers are analysed in float64


def test_warns_when_the_two_sides_use_different_precision():
    pair, tm, fm, x = _pair("mlp")
    r = parity.check(tm, fm, x, input_layout=AS_IS, precision="highest", tf32=True, layers=False)
    assert any("different matmul precision" in w for w in r.warnings)
    same = parity.check(tm, fm, x, input_layout=AS_IS, precision="default", layers=False)
    assert not any("different" in w for w in same.warnings) and same.env["torch_matmul_allow_tf32"]
    # pinned only for the call: the suite's settings are back.
    assert not torch.backends.cuda.matmul.allow_tf32


def test_warns_when_flax_variables_are_at_another_dtype():
    pair, tm, fm, x = _pair("mlp")
    from weight_port import build_plan

    variables = build_plan(tm, fm, torch.as_tensor(x).float(), input_layout=AS_IS).to_flax(tm.state_dict())
    r = parity.check(tm, fm, x, dtype="float64", input_layout=AS_IS, variables=variables, layers=False)
    assert any("variables are float32" in w for w in r.warnings)


def test_float64_gradient_that_is_zero_in_exact_arithmetic_passes_but_a_real_error_fails():
    # An attention key bias: softmax ignores a per-query constant, so its gradient is rounding
    # noise on both sides (measured on tiny HF BERT: ~4e-19 vs 8e-20); no relative bound judges
    # it. The float32 probe's own noise on it (~3e-10), scaled to float64, is the yardstick.
    rule = measured(tolerance_for("float64", REFERENCE), "float64", probe_dtype="float32")
    ref, probe = np.array([-4e-19, 1e-19]), np.array([3e-10, -2e-10])
    assert judge("grad key.bias", np.array([8e-20, -3e-19]), ref, rule, reference=ref, probe=probe).ok
    assert not judge("grad key.bias", np.array([1e-8, 0.0]), ref, rule, reference=ref, probe=probe).ok
    one = np.array([1.0])
    assert not judge("grad w", np.array([1.0 + 1e-8]), one, rule, reference=one, probe=one + 1e-7).ok
