"""bfloat16 checks judge what they claim to. Gradients are compared, not swallowed by the noise floor. On an H200 (and here) the
bfloat16 `--fp64-reference` check of every UNet showed `grad rel -`: the model-wide floor
(16 eps(bf16) x ||output cotangent|| x ||input||) exceeded every parameter gradient, so none was
judged. Parameter gradients now get their own layer's floor, and bfloat16 norms are not read as 0."""
from __future__ import annotations

import pytest

import parity
from parity.registry import PAIRS


@pytest.mark.parametrize("reference", ["float64", None], ids=["fp64-reference", "table"])
def test_bfloat16_parameter_gradients_are_judged(reference):
    pair = PAIRS["cnn"]
    torch_model, flax_model = pair.build()
    r = parity.check(torch_model, flax_model, pair.example_input(), input_layout=pair.input_layout,
                     dtype="bfloat16", reference=reference)
    assert r.ok, str(r)
    judged = [c for c in r.param_grads if not c.below_floor]
    # None of the CNN's gradients is zero in theory: most must be judged on their values.
    assert len(judged) >= 0.75 * len(r.param_grads), [(c.name, c.floor) for c in r.param_grads]
    # Every floor is a real number above 0 (bfloat16 arrays were skipped as "not floating").
    assert all(c.floor > 0 for c in r.grads)


def test_bfloat16_layers_run_alone():
    """numpy does not count bfloat16 as floating, so every bfloat16 layer was refused with "torch
    gives (2, 16) bfloat16, the Flax layer takes (2, 16) bfloat16; not run alone"."""
    pair = PAIRS["cnn"]
    torch_model, flax_model = pair.build()
    r = parity.check(torch_model, flax_model, pair.example_input(), input_layout=pair.input_layout,
                     dtype="bfloat16")
    leaves = [row for row in r.layers if row.name != "<root>"]
    assert leaves and all(row.isolated is not None for row in leaves), [(row.name, row.notes) for row in leaves]
    assert not any("not run alone" in n for row in leaves for n in row.notes)
