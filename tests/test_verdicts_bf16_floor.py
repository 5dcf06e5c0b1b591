"""bfloat16 checks judge what they claim to: every gradient is judged on its values by measured
noise (an a-priori floor once exceeded every UNet gradient, so none was judged), and bfloat16
layers run alone."""
from __future__ import annotations

import pytest

import parity
from parity.registry import PAIRS


def test_bfloat16_parameter_gradients_are_judged():
    pair = PAIRS["cnn"]
    torch_model, flax_model = pair.build()
    r = parity.check(torch_model, flax_model, pair.example_input(), input_layout=pair.input_layout,
                     dtype="bfloat16")
    assert r.ok, str(r)
    # Every gradient judged by measured noise against the float64 run, none by a floor.
    assert r.param_grads and all(c.judge == "reference" and c.score > 0 for c in r.grads), str(r)


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
