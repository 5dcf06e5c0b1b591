"""``parity port``: exit codes, the orbax output, and no partial output after an error."""
from __future__ import annotations

import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors.torch import save_file

import weight_port as wp
from parity.cli import main
from parity.registry import PAIRS


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    pair = PAIRS["cnn"]
    torch_model, flax_model = pair.build(pair.config("tiny"), seed=3)
    d = tmp_path_factory.mktemp("ckpt")
    save_file(torch_model.state_dict(), str(d / "cnn.safetensors"))
    return pair, torch_model, flax_model, d / "cnn.safetensors"


def _leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".tmp")]


def test_port_writes_orbax_checkpoint(cnn, tmp_path, capsys):
    pair, torch_model, flax_model, path = cnn
    out = tmp_path / "flax_ckpt"
    assert main(["port", str(path), "--model", "cnn", "--out", str(out)]) == 0
    assert "ported" in capsys.readouterr().out
    restored = ocp.StandardCheckpointer().restore(out)
    expected = wp.torch_to_flax(torch_model, flax_model, pair.example_input(batch=1), input_layout=pair.layout)
    from flax import traverse_util

    a, b = traverse_util.flatten_dict(restored), traverse_util.flatten_dict(expected)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
    assert _leftovers(tmp_path) == []
    # an existing output is never overwritten
    assert main(["port", str(path), "--model", "cnn", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def _fails(argv, capsys, match: str, out) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parity: error:") and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists() and _leftovers(out.parent) == []


def test_port_errors_exit_2_without_partial_output(cnn, tmp_path, capsys):
    pair, torch_model, _, path = cnn
    out = tmp_path / "out"
    _fails(["port", str(path), "--model", "mlp", "--out", str(out)], capsys, "KeyMismatchError", out)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-7])
    _fails(["port", str(cut), "--model", "cnn", "--out", str(out)], capsys, "cut.safetensors", out)
    unsafe = tmp_path / "model.pt"
    torch.save(torch_model, unsafe)
    _fails(["port", str(unsafe), "--model", "cnn", "--out", str(out)], capsys, "UnsafeCheckpointError", out)
    sd = {k: v.clone() for k, v in torch_model.state_dict().items()}
    next(v for v in sd.values() if v.is_floating_point())[...] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(sd, str(nan))
    _fails(["port", str(nan), "--model", "cnn", "--out", str(out)], capsys, "NonFiniteWeightError", out)
    assert main(["port", str(nan), "--model", "cnn", "--out", str(out), "--allow-nonfinite"]) == 0
    _fails(["port", str(tmp_path / "nope.pt"), "--model", "cnn", "--out", str(tmp_path / "o2")],
           capsys, "does not exist", tmp_path / "o2")


OWN_PAIR = '''
import torch, flax.linen as nn


class T(torch.nn.Module):
    """Registers its layers in the reverse of the order it runs them."""

    def __init__(self):
        super().__init__()
        self.last = torch.nn.Linear(4, 3)
        self.first = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.last(torch.relu(self.first(x)))


class F(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        return nn.Dense(3)(nn.relu(h))


def make_torch():
    torch.manual_seed(0)
    return T()


def make_flax():
    return F()


def example():
    return torch.randn(2, 4)
'''


@pytest.fixture
def own_pair(tmp_path, monkeypatch):
    (tmp_path / "port_cli_own_pair.py").write_text(OWN_PAIR)
    monkeypatch.chdir(tmp_path)  # the CLI finds factories like `python -m` finds modules
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    yield importlib.import_module("port_cli_own_pair")
    sys.modules.pop("port_cli_own_pair", None)


def test_port_own_pair_prints_plan_and_writes_checkpoint(own_pair, tmp_path, capsys):
    out = tmp_path / "own_ckpt"
    argv = ["port", "--torch", "port_cli_own_pair:make_torch", "--flax", "port_cli_own_pair:make_flax",
            "--example-input", "port_cli_own_pair:example", "--out", str(out), "--plan"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "first.weight" in printed and "Dense_0/kernel" in printed and "execution order" in printed
    restored = ocp.StandardCheckpointer().restore(out)
    t = own_pair.make_torch()
    np.testing.assert_array_equal(np.asarray(restored["params"]["Dense_0"]["kernel"]),
                                  t.first.weight.detach().numpy().T)
    np.testing.assert_array_equal(np.asarray(restored["params"]["Dense_1"]["kernel"]),
                                  t.last.weight.detach().numpy().T)


def test_port_own_pair_usage_errors(own_pair, tmp_path, capsys):
    out = tmp_path / "o"
    _fails(["port", "--torch", "port_cli_own_pair:make_torch", "--example-input",
            "port_cli_own_pair:example", "--out", str(out)], capsys, "--flax", out)
    _fails(["port", "--torch", "port_cli_own_pair:make_torch", "--flax", "port_cli_own_pair:make_flax",
            "--out", str(out)], capsys, "--example-input", out)
    _fails(["port", "--torch", "port_cli_own_pair:nope", "--flax", "port_cli_own_pair:make_flax",
            "--input-shape", "2,4", "--out", str(out)], capsys, "nope", out)
