"""``parity train``: exit codes and output files."""
from __future__ import annotations

import json

from parity.cli import main


def test_train_mlp_passes(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["train", "mlp", "--steps", "3", "--dtype", "float64", "--json", str(out)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert json.loads(out.read_text())["ok"] is True


def test_train_cnn_digits_plot(capsys, tmp_path):
    png = tmp_path / "img" / "loss.png"
    assert main(["train", "cnn", "--steps", "4", "--batch", "16", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "PASS" in out and "test accuracy" in out and "torch" in out and "flax" in out


def test_bad_input_exits_2(capsys):
    assert main(["train", "nope", "--steps", "2"]) == 2
    assert main(["train", "mlp", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("parity: error:") == 2


def test_train_own_pair_with_token_inputs(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parent)
    code = main(["train", "--torch", "planted:make_torch_tokens", "--flax", "planted:make_flax_tokens",
                 "--example-input", "planted:example_tokens", "--steps", "3", "--dtype", "float64",
                 "--loss", "mse"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "train parity TorchTokenHead" in out and "PASS" in out
