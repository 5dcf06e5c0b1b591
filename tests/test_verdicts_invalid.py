"""INVALID verdicts (NaN / Inf anywhere), all-zero warnings, and every warning printed under the
verdict in the CLI table and the pytest plugin (issue 10, item 2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import parity
import planted
import verdict_pairs as vp
from parity.cli import main

TESTS = Path(__file__).parent
BLOCK_X = planted.block_input(np.random.default_rng(0))


@pytest.mark.parametrize("wrong_twin", [planted.FlaxBlock(approximate=True), planted.FlaxBlock(eps=1e-6)],
                         ids=["tanh-gelu", "layernorm-eps-1e-6"])
def test_all_nan_input_is_invalid_even_for_a_wrong_twin(wrong_twin):
    # NaN == NaN used to count as agreement: every element "matched" and the wrong twin passed.
    r = parity.check(planted.make_torch_block(), wrong_twin, np.full((3, 8), np.nan), input_layout="as_is")
    assert not r.ok
    assert r.verdict == "INVALID"
    assert r.invalid == "NaN in input[0]"
    assert "INVALID: NaN in input[0]" in str(r).splitlines()[0]
    assert r.to_dict()["verdict"] == "INVALID"


def test_the_first_nonfinite_layer_is_named():
    # Finite input whose LayerNorm variance overflows float32: the first NaN is made by `norm`.
    r = parity.check(planted.make_torch_block(), planted.FlaxBlock(), 1e25 * BLOCK_X, input_layout="as_is")
    assert r.verdict == "INVALID" and not r.ok
    assert r.invalid.endswith("of layer norm"), r.invalid


def test_a_finite_correct_twin_still_passes():
    r = parity.check(planted.make_torch_block(), planted.FlaxBlock(), BLOCK_X, input_layout="as_is")
    assert r.verdict == "PASS" and r.ok and r.invalid is None


def test_all_zero_outputs_and_gradients_are_flagged():
    r = parity.check(vp.TorchDead(), vp.FlaxDead(), np.random.default_rng(0).standard_normal((3, 8)),
                     input_layout="as_is")
    assert r.verdict == "PASS"  # both sides agree; the warnings say the agreement proves little
    assert any(w.startswith("torch out is all zeros") for w in r.warnings), r.warnings
    assert any(w.startswith("grad input[0] is all zeros") for w in r.warnings), r.warnings
    assert any(w.startswith("grad fc.weight is all zeros") for w in r.warnings), r.warnings


def test_cli_exit_3_and_invalid_row_for_a_nan_input(monkeypatch, capsys):
    monkeypatch.chdir(TESTS)
    code = main(["check", "--torch", "planted:make_torch_block", "--flax", "verdict_pairs:make_flax_block_tanh",
                 "--example-input", "verdict_pairs:nan_block_input", "--quiet", "--no-layers"])
    out = capsys.readouterr().out
    assert code == 3, out
    row = next(ln for ln in out.splitlines() if ln.startswith("TorchBlock"))
    assert row.endswith("INVALID (NaN in input[0])"), row
    assert "1 INVALID" in out and "PASS" not in out


def test_cli_prints_the_layernorm_eps_finding_under_a_float32_pass(monkeypatch, capsys):
    # Large activations: eps 1e-6 vs 1e-5 is under float32's measured noise, so the model's
    # numbers pass (--no-layers: the per-layer rows run in float64, where the difference is
    # measurable and the row fails); the port's finding must still be in front of the user.
    monkeypatch.chdir(TESTS)
    code = main(["check", "--torch", "planted:make_torch_block", "--flax", "verdict_pairs:make_flax_block_eps6",
                 "--example-input", "verdict_pairs:large_block_input", "--dtype", "float32", "--quiet",
                 "--no-layers"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    row = next(i for i, ln in enumerate(lines) if ln.startswith("TorchBlock"))
    assert lines[row].endswith("PASS  [judge: reference]"), lines[row]
    assert lines[row + 1].startswith("    warning: weight port:"), lines
    assert "eps=1e-05" in lines[row + 1] and "epsilon=1e-06" in lines[row + 1]


PLUGIN_TESTS = """
import numpy as np
import planted
import verdict_pairs

X = verdict_pairs.large_block_input()

def test_pass_with_warning(parity):
    parity(planted.make_torch_block(), planted.FlaxBlock(eps=1e-6), X, input_layout="as_is", layers=False)

def test_fail(parity):
    parity(planted.make_torch_block(), planted.FlaxBlock(eps=1e-6, approximate=True), X,
           input_layout="as_is", dtype="float64")
"""


def test_plugin_prints_warnings_on_pass_and_failure_and_the_report_once(pytester, request):
    pytester.syspathinsert(str(request.path.parent))
    pytester.makepyfile(test_pairs=PLUGIN_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    # Failure: the report (with its warning) exactly once, no exception chain. Counted in the
    # failures section: pytest's short summary repeats the message's first line (in full under CI=true).
    failures = text.split("parity warnings")[0]  # FAILURES section; the summaries come after
    assert failures.count("parity TorchBlock [float64, eval]: FAIL") == 1, text
    assert "During handling of the above exception" not in text
    # Pass: the eps finding in the terminal summary.
    result.stdout.fnmatch_lines(["*parity warnings*", "*test_pass_with_warning*PASS with 1 warning*",
                                 "*warning: weight port: 1 attribute mismatch*epsilon=1e-06*"])
    # And on the failure, under its report (once there, once in the pass's summary section).
    assert failures.count("warning: weight port: 1 attribute mismatch") == 1
    assert text.split("parity warnings")[1].count("warning: weight port: 1 attribute mismatch") >= 1
