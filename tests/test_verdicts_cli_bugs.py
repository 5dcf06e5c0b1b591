"""The bug list of issue 10, each with the test that failed before its fix: PARITY_DEBUG's
traceback, factories returning the wrong kind of object, damaged .pt files, strict JSON, and
output paths checked before the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parity.cli import main
from weight_port.errors import CheckpointError, UnsafeCheckpointError
from weight_port.sources import load_pt

TESTS = Path(__file__).parent
# A pair the port cannot pair (an MLP block against an attention twin): fails inside the run.
UNPORTABLE = ["check", "--torch", "planted:make_torch_block", "--flax", "verdict_pairs:make_flax_attention",
              "--input-shape", "3,8", "--quiet", "--no-layers"]


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("parity: error:")]


def test_parity_debug_prints_the_promised_traceback(monkeypatch, capsys):
    monkeypatch.chdir(TESTS)
    monkeypatch.delenv("PARITY_DEBUG", raising=False)
    assert main(UNPORTABLE) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "PARITY_DEBUG=1 for the traceback" in err
    monkeypatch.setenv("PARITY_DEBUG", "1")
    assert main(UNPORTABLE) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and len(_error_lines(err)) == 1


@pytest.mark.parametrize("torch_spec,flax_spec,expected", [
    ("verdict_pairs:make_tensor", "planted:make_flax_block",
     "--torch 'verdict_pairs:make_tensor': the factory returned a torch Tensor of shape (3, 8), "
     "expected a torch.nn.Module"),
    ("planted:make_torch_block", "verdict_pairs:make_tensor",
     "--flax 'verdict_pairs:make_tensor': the factory returned a torch Tensor of shape (3, 8), "
     "expected a Flax module"),
    ("planted:make_flax_block", "planted:make_torch_block", "the two are swapped"),
], ids=["torch-factory-returns-tensor", "flax-factory-returns-tensor", "swapped"])
def test_a_factory_of_the_wrong_kind_is_named_not_blamed_on_the_input(monkeypatch, capsys, torch_spec,
                                                                       flax_spec, expected):
    monkeypatch.chdir(TESTS)
    assert main(["check", "--torch", torch_spec, "--flax", flax_spec, "--input-shape", "3,8", "--quiet"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert expected in line and "--input-shape" not in line, line


@pytest.fixture
def saved(tmp_path) -> bytes:
    path = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("cut", [10, 500, -100], ids=["header", "middle", "end"])
def test_a_truncated_pt_is_named_incomplete(tmp_path, saved, cut):
    # Cut near the end, torch itself says only "OSError: [Errno 22] Invalid argument".
    path = tmp_path / "cut.pt"
    path.write_bytes(saved[:cut])
    with pytest.raises(CheckpointError) as info:
        load_pt(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert str(path) in str(info.value) and "not a complete torch checkpoint" in str(info.value)


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n" * 10, b"\x80\x02garbage" * 5, b""],
                         ids=["text", "pickle-like", "empty"])
def test_a_garbage_pt_is_not_called_unsafe(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_pt(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert str(path) in str(info.value) and "not a valid torch checkpoint" in str(info.value)


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_report_is_strict_json(monkeypatch, capsys, tmp_path):
    # A NaN input fills the report with infinite errors: they must not be written as Infinity/NaN.
    monkeypatch.chdir(TESTS)
    out = tmp_path / "report.json"
    assert main(["check", "--torch", "planted:make_torch_block", "--flax", "planted:make_flax_block",
                 "--example-input", "verdict_pairs:nan_block_input", "--quiet", "--json", str(out)]) == 3
    report = _strict(out.read_text())
    assert report["verdict"] == "INVALID" and report["outputs"][0]["max_abs"] == "inf"


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing-dir", "parent-is-file", "is-dir", "unwritable"])
def test_output_paths_are_checked_before_the_run(monkeypatch, capsys, tmp_path, flag, where):
    monkeypatch.chdir(TESTS)
    (tmp_path / "file").write_text("")
    path = {"missing-dir": tmp_path / "nope" / "r.out", "parent-is-file": tmp_path / "file" / "r.out",
            "is-dir": tmp_path, "unwritable": Path("/proc/parity-report.out")}[where]
    if where == "unwritable" and not Path("/proc").is_dir():
        pytest.skip("needs a directory nobody can write in (/proc)")
    before = sorted(tmp_path.rglob("*"))
    code = main(["check", "--torch", "planted:make_torch_block", "--flax", "planted:make_flax_block",
                 "--input-shape", "3,8", flag, str(path)])  # not --quiet: progress would show a run
    captured = capsys.readouterr()
    assert code == 2
    (line,) = _error_lines(captured.err)
    assert flag in line and str(path) in line
    assert captured.out == "" and "[1/1]" not in captured.err  # nothing ran, nothing printed
    assert sorted(tmp_path.rglob("*")) == before  # nothing half-written
