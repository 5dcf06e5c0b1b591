"""A golden bundle of diffusers' UNet2DConditionModel (tiny, from constructor arguments): recorded
with per-layer rows, verified against FlaxUNet2DConditionModel in a process where torch cannot be
imported (diffusers' Flax models import no torch) PASSes; a planted bug in the Flax variables
FAILs and is located from the bundle alone.

The torch side computes what the Flax port computes (diffusers_pairs.as_flax_computes: the
transformer norm's eps and GEGLU's GELU are the upstream findings test_diffusers.py names).
"""
from __future__ import annotations

import json

import pytest

import golden_hf_twins as twins
import parity
from diffusers_pairs import PAIRS, misported_variables
from test_golden_hf import _verify_without_torch

pytest.importorskip("diffusers")

PAIR = PAIRS["unet2d_condition"]
AS_IS = "as_is"  # diffusers' Flax models take NCHW and transpose inside


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tm, _, inputs = PAIR.build()
    return parity.record(tm, inputs, tmp_path_factory.mktemp("golden") / "unet", layers=True, input_layout=AS_IS,
                         name="unet2d_condition")


def test_twin_config_is_the_torch_sides():
    assert twins.UNET_CONFIG == PAIR.config


def test_unet_bundle_verifies_without_torch(recorded, tmp_path):
    proc = _verify_without_torch(recorded, "unet", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "PASS" and report["param_grads"] and report["input_grads"]
    assert report["first_divergence"] is None
    judged = [r for r in report["layers"] if r.get("torch_path")]
    assert len(judged) >= 5, report["layers"]


def test_planted_bug_in_the_unet_is_located_from_the_bundle(recorded):
    tm, fm, inputs = PAIR.build()
    report = parity.verify(recorded, fm, variables=misported_variables(PAIR, tm, fm, inputs))
    assert report.verdict == "FAIL", str(report)
    assert (report.first_divergence, report.divergence_kind) == (PAIR.misport, "forward"), str(report)
