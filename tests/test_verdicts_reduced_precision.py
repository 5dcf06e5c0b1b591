"""Reduced-precision float32 (TF32 on a GPU) is judged against a float64 reference, not by a
fixed bound: an H200 run of `parity check all --precision default` FAILED six correct UNet rows
(gradients 1-8% apart through ReLU masks that TF32 rounding flips, while every layer alone agreed
to 3e-4). CPUs have no TF32, so the dispatch is tested here with the predicate forced."""
from __future__ import annotations

import jax
import numpy as np

import parity
import parity.checker as checker
from parity.numerics import REDUCED_FLOAT32_NOTE, numerics_env, pinned, reduced_float32
from parity.registry import PAIRS
from weight_port import torch_to_flax


def _env(precision: str, tf32: bool | None = None) -> dict:
    with pinned(precision=precision, tf32=tf32):
        return numerics_env()


def test_reduced_float32_only_where_the_hardware_has_reduced_passes():
    assert reduced_float32("float32", _env("default"), "gpu")
    assert reduced_float32("float32", _env("highest", tf32=True), "gpu")  # torch's TF32 alone
    assert reduced_float32("float32", _env("high"), "tpu")
    assert not reduced_float32("float32", _env("highest"), "gpu")
    assert not reduced_float32("float32", _env("default"), "cpu")  # no TF32 on a CPU
    assert not reduced_float32("float64", _env("default"), "gpu")
    assert not reduced_float32("bfloat16", _env("default"), "gpu")


def _cnn():
    pair = PAIRS["cnn"]
    torch_model, flax_model = pair.build()
    return pair, torch_model, flax_model, pair.example_input()


def test_tf32_check_switches_to_the_float64_reference_and_says_so(monkeypatch):
    monkeypatch.setattr(checker, "reduced_float32", lambda *a: True)
    pair, torch_model, flax_model, x = _cnn()
    r = parity.check(torch_model, flax_model, x, input_layout=pair.input_layout, precision="default")
    assert r.reference == "float64", "a TF32 check must be judged against float64"
    assert REDUCED_FLOAT32_NOTE in r.warnings and REDUCED_FLOAT32_NOTE in str(r)
    assert r.ok, str(r)
    # An explicit rtol/atol is the user's own bound: no switch then.
    own = parity.check(torch_model, flax_model, x, input_layout=pair.input_layout, precision="default",
                       rtol=1e-2, atol=1e-2, layers=False)
    assert own.reference is None and REDUCED_FLOAT32_NOTE not in own.warnings


def test_tf32_reference_verdict_still_fails_a_wrong_twin(monkeypatch):
    monkeypatch.setattr(checker, "reduced_float32", lambda *a: True)
    pair, torch_model, flax_model, x = _cnn()
    variables = torch_to_flax(torch_model, flax_model, x, input_layout=pair.input_layout)
    path = next(p for p, _ in jax.tree_util.tree_leaves_with_path(variables) if "kernel" in jax.tree_util.keystr(p))
    # A 1% error in one conv kernel: far above TF32 noise, far below an O(1) layout bug.
    wrong = jax.tree_util.tree_map_with_path(lambda p, a: a * 1.01 if p == path else a, variables)
    r = parity.check(torch_model, flax_model, x, input_layout=pair.input_layout, precision="default",
                     variables=wrong, layers=False)
    assert r.reference == "float64" and not r.ok, str(r)
    assert not np.isnan([c.rel_norm for c in r.outputs]).any()
