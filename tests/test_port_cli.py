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
