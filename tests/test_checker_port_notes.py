"""What the checker reads off the port plan when the port provides it: pairing notes (pairings
not made by name) become report warnings; tied parameters are judged whole-model, not per layer."""
from __future__ import annotations

import numpy as np

import parity
import parity.checker
import planted


def _with_plan_attrs(monkeypatch, **attrs):
    real = parity.checker.build_plan

    def build(*a, **kw):
        plan = real(*a, **kw)
        for k, v in attrs.items():
            setattr(plan, k, v)
        return plan

    monkeypatch.setattr(parity.checker, "build_plan", build)


def test_pairing_notes_are_report_warnings(monkeypatch):
    _with_plan_attrs(monkeypatch, pairing_notes=["fc2 -> Dense_1: by shape and execution order"])
    x = planted.block_input(np.random.default_rng(0))
    r = parity.check(planted.make_torch_block(), planted.FlaxBlock(), x, dtype="float64", layers=False)
    assert r.ok
    assert "weight port pairing: fc2 -> Dense_1: by shape and execution order" in r.warnings
    assert "fc2 -> Dense_1" in str(r)


def test_tied_parameters_are_not_judged_by_one_layer_alone(monkeypatch):
    _with_plan_attrs(monkeypatch, tied={"fc2.weight": "fc1.weight"})
    x = planted.block_input(np.random.default_rng(0))
    r = parity.check(planted.make_torch_block(), planted.FlaxBlock(), x, dtype="float64")
    assert r.ok, r
    # Both names of the tied tensor: torch's gradient is the sum over every use of it.
    assert any("fc2.weight is tied (alias of fc1.weight)" in n for n in r.layer("fc2").notes)
    assert any("fc1.weight is tied (shared)" in n for n in r.layer("fc1").notes)
    # The layer's other parameters are still judged alone; the tied total is judged whole-model.
    assert r.layer("fc1").grad_isolated is not None
    assert {c.name for c in r.param_grads} >= {"grad fc1.weight", "grad fc2.weight"}
