"""Usage errors of every command name the flag at fault, in one line, exit 2 (never a traceback):
built-in pairs mixed with your own pair's flags, your own pair missing one side, a pair name
where `parity port` wants a checkpoint. Decided before anything heavy runs: checked in-process."""
from __future__ import annotations

from pathlib import Path

import pytest

from parity.cli import main

TESTS = Path(__file__).parent


@pytest.mark.parametrize("argv, words", [
    # --input-shape belongs to your own pair; mlp is a built-in pair with its own input
    (["check", "mlp", "--input-shape", "2,x"], ["--input-shape is for your own pair", "MODEL 'mlp'", "not both"]),
    (["check", "mlp", "--torch", "a:b", "--flax", "c:d"], ["--torch, --flax are for your own pair"]),
    (["train", "mlp", "--input-shape", "2,3"], ["--input-shape is for your own pair", "MODEL 'mlp'"]),
    (["port", "x.pt", "--model", "mlp", "--flax", "a:b", "--out", "o"],
     ["--flax is for your own pair", "--model 'mlp'"]),
    # `parity port mlp`: a pair name where SOURCE goes (not "checking your own pair needs --torch")
    (["port", "mlp", "--out", "o"], ["SOURCE 'mlp' is not a file", "--model mlp"]),
    (["port", "test_cli_usage.py", "--out", "o"], ["SOURCE 'test_cli_usage.py' needs its architecture", "--model"]),
    (["port", "--out", "o"], ["--model NAME", "--torch and --flax"]),
    (["check", "--torch", "planted:make_torch_block", "--input-shape", "3,8"],
     ["your own pair needs --flax as well (--torch, --input-shape given)"]),
    (["port", "--flax", "a:b", "--out", "o"], ["your own pair needs --torch as well (--flax given)"]),
    # train's own pair: a SetupError that once escaped as a traceback
    (["train", "--torch", "planted:make_torch_block"], ["your own pair needs --flax as well"]),
], ids=["check-model-input-shape", "check-model-own-pair", "train-model-input-shape", "port-model-flax",
        "port-pair-name-as-source", "port-source-without-architecture", "port-nothing", "check-no-flax",
        "port-no-torch", "train-no-flax"])
def test_usage_error_names_the_flag_in_one_line(argv, words, capsys, monkeypatch):
    monkeypatch.chdir(TESTS)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parity: error:"), err
    assert all(w in err[0] for w in words), err
    assert not (TESTS / "o").exists()
