"""parity bench --layers: the per-layer speed profile's structure (never its speed)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from parity.benchmark import select_device
from parity.benchmark.layer_profile import KEYS, ProfileSettings, captured_layers, profile_layers
from parity.registry import PAIRS


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_every_paired_layer_is_timed_on_both_sides(name):
    pair = PAIRS[name]
    config = pair.config("tiny")
    torch_model, flax_model = pair.build(config)
    x = pair.example_input(config, batch=2)
    profile = profile_layers(torch_model, flax_model, x, input_layout=pair.input_layout,
                             output_layout=pair.out_layout(), device=select_device("cpu"), name=name,
                             settings=ProfileSettings.quick())
    # The layers that own weights are exactly the leaves of the torch model; each is paired.
    leaves = {n for n, m in torch_model.named_modules() if n and next(m.children(), None) is None}
    assert {t.name for t in profile.layers} == leaves
    assert profile.unpaired == []
    for t in profile.layers:
        assert t.parity == "ok", (t.name, t.parity)
        assert all(t.times[k] is not None and t.times[k] > 0 for k in KEYS), (t.name, t.times)
        assert t.ratio("fwd+bwd") is not None
    for k in KEYS:
        assert math.isclose(sum(t.share[k] for t in profile.layers), 1.0)
        assert profile.whole.times[k] is not None and profile.whole.times[k] > 0
        assert profile.layer_sum(k) == sum(t.times[k] for t in profile.layers)


def test_profile_runs_alone_exactly_the_layers_parity_check_runs_alone():
    """The profile times a layer alone on the very pairing and preparation of the per-layer
    analysis (parity.layers.isolated_layers): the layers it can run alone are the ones
    ``parity check`` ran alone, on the same Flax paths, and a layer the check refuses is refused
    with the same words. The ViT pair has both kinds of refusal (attention whose inputs differ in
    number, a GELU that is a function in Flax), so a divergence in either shows."""
    from parity.checker import check

    pair = PAIRS["vit"]
    config = pair.config("tiny")
    torch_model, flax_model = pair.build(config)
    x = pair.example_input(config, batch=2)
    layouts = dict(input_layout=pair.input_layout, output_layout=pair.out_layout())
    rows = check(torch_model, flax_model, x, lint=False, **layouts).layers
    captured = captured_layers(torch_model, flax_model, x, dtype="float32", device=select_device("cpu"), **layouts)
    assert [c.name for c in captured] == [r.name for r in rows]
    # The root's isolated verdict is the whole-model check (not rerun there), so compare below it.
    ran = {r.name: r.flax_path for r in rows if r.torch_path and r.isolated is not None}
    refused = {r.name: "; ".join(r.notes) for r in rows if r.torch_path and r.isolated is None}
    assert ran and refused, "the pair must have layers of both kinds, else this test checks nothing"
    assert {c.name: c.flax_path for c in captured if not c.is_root and c.flax is not None} == ran
    assert {c.name: c.note for c in captured if c.name in refused} == refused


def test_cli_writes_json_markdown_and_png(tmp_path, capsys):
    from parity.cli import main

    assert main(["bench", "--layers", "mlp", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "whole model" in out and "sum of 3 layers" in out
    (js,) = tmp_path.glob("layers_mlp_*.json")
    data = json.loads(js.read_text())
    assert set(data["whole_model_s"]) == set(KEYS)
    assert [row["name"] for row in data["layers"]] == ["layers.0", "layers.1", "layers.2"]
    assert len(list(tmp_path.glob("layers_mlp_*.md"))) == 1
    assert len(list(tmp_path.glob("layers_mlp_*.png"))) == 1


def test_own_pair_needs_an_input(capsys):
    from parity.cli import main

    assert main(["bench", "--torch", "torch_ref:ExplicitMLP", "--flax", "flax_impl:ExplicitMLP"]) == 2
    assert "exactly one of --input-shape and --example-input" in capsys.readouterr().err


def test_own_pair_layer_that_computes_something_else_is_flagged(tmp_path, capsys, monkeypatch):
    """A twin with tanh-approximate GELU where torch has the exact one: the profile still times
    every layer, but names the one whose output differs and exits 1 (its time means nothing)."""
    from parity.cli import main

    monkeypatch.chdir(Path(__file__).parent)  # --torch/--flax factories come from tests/planted.py
    own = ["bench", "--layers", "TorchBlock", "--torch", "planted:make_torch_block", "--input-shape", "4,8",
           "--quick"]
    assert main([*own, "--flax", "planted:make_flax_block", "--out", str(tmp_path / "ok")]) == 0
    assert main([*own, "--flax", "planted:make_flax_block_tanh", "--out", str(tmp_path / "bad")]) == 1
    assert "parity FAILED for 1 layer(s): act" in capsys.readouterr().out
    (js,) = (tmp_path / "bad").glob("layers_TorchBlock_*.json")
    rows = {row["name"]: row for row in json.loads(js.read_text())["layers"]}
    assert rows["act"]["parity"].startswith("FAIL") and rows["fc1"]["parity"] == "ok"
