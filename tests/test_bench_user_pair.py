"""``parity bench --torch/--flax`` without --layers: the benchmark grid on your own pair (here tiny
HF transformers models from bench/hf_pairs.py, built from configs): parity gate first, pytree
inputs (token ids + a padded mask) and outputs (a ModelOutput), every variant's first result
checked against jax.jit's. Structure and verdicts only, never speed; torch.compile is left to
the bench run (its first call takes ~30 s here)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]  # bench.hf_pairs is found like `python -m` finds modules
BERT = ["--torch", "bench.hf_pairs:bert_tiny_torch", "--flax", "bench.hf_pairs:bert_tiny_flax",
        "--example-input", "bench.hf_pairs:bert_tiny_input"]
WRONG = '''
import copy
from transformers.models.bert.modeling_flax_bert import FlaxBertModule
from bench import hf_pairs

def bert_tiny_flax_wrong_eps():
    config = copy.deepcopy(hf_pairs._bert_config("tiny"))
    config.layer_norm_eps = 1e-3  # torch's is 1e-12: every LayerNorm computes something else
    return FlaxBertModule(config)
'''


def _bench(argv: list[str]) -> tuple[int, str, str]:
    from parity.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bench", *argv])
    return code, out.getvalue(), err.getvalue()


def _results(out_dir: Path) -> dict:
    (path,) = out_dir.glob("BertModel_*.json")  # named by the pair, beside the registry grid's files
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def bert_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("bert_grid")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        code, stdout, _ = _bench([*BERT, "--quick", "--out", str(out)])
    return code, stdout, _results(out)


def test_grid_on_tiny_hf_bert_gates_then_times_every_variant(bert_grid):
    code, stdout, data = bert_grid
    assert code == 0, stdout
    (g,) = data["parity_gates"]
    assert g["ok"] and g["model"] == "BertModel" and g["batch"] == 2
    rows = {(r["phase"], r["variant"]): r for r in data["results"]}
    # --quick: every variant but torch-compile
    assert set(rows) == {(p, v) for p in ("forward", "train") for v in ("torch-eager", "torch-channels_last", "jax-jit")}
    for phase in ("forward", "train"):
        assert rows[phase, "jax-jit"]["status"] == "ok" and rows[phase, "jax-jit"]["check"] == "reference"
        assert rows[phase, "torch-eager"]["status"] == "ok"
        assert rows[phase, "torch-eager"]["model_flops"]  # FLOPs (and so MFU with a peak) as for built-ins
        # token ids are not an image: channels_last is n/a, with the reason
        cl = rows[phase, "torch-channels_last"]
        assert cl["status"] == "n/a" and "4-D [N, C, H, W]" in cl["reason"]
    # the forward check compared both float output leaves of the ModelOutput
    assert "2/2 leaves agree" in rows["forward", "torch-eager"]["check"]
    assert data["environment"]["own_pair"]["torch"] == "bench.hf_pairs:bert_tiny_torch"
    assert "[gate] BertModel b2 float32: PASS" in stdout


def test_train_row_first_value_is_the_same_loss_on_both_sides(bert_grid):
    """The train row's first value is the loss at the initial weights (summed MSE over the output
    leaves against fixed targets): torch-eager's must agree with jax.jit's, or the row fails."""
    _, _, data = bert_grid
    rows = {(r["phase"], r["variant"]): r for r in data["results"]}
    train = rows["train", "torch-eager"]
    assert train["status"] == "ok", train["reason"]
    assert train["check"].startswith("max_abs") and "vs jax-jit" in train["check"]


def test_a_different_loss_fails_the_first_value_check():
    """The check above can fail: a torch step whose targets differ from the Flax step's gives a
    different first loss, and check_first_value says so."""
    from bench import hf_pairs
    from parity.benchmark import check_first_value, make_step, select_device
    from parity.benchmark.workloads import prepare_own

    prep = prepare_own(hf_pairs.bert_tiny_torch(), hf_pairs.bert_tiny_flax(), hf_pairs.bert_tiny_input(),
                       select_device("cpu"), name="bert-tiny")
    assert set(prep.targets) == {"out.last_hidden_state", "out.pooler_output"}
    jax_step = make_step(prep, "jax-jit", "train")
    jax_step()
    same = make_step(prep, "torch-eager", "train")
    same()
    ok, text = check_first_value(jax_step.first_value(), same.first_value(), "float32")
    assert ok, text
    prep.targets = {p: t + 1.0 for p, t in prep.targets.items()}
    other = make_step(prep, "torch-eager", "train")
    other()
    ok, text = check_first_value(jax_step.first_value(), other.first_value(), "float32")
    assert not ok, text


def test_wrong_twin_fails_the_gate_and_exits_1(tmp_path, monkeypatch):
    (tmp_path / "bench_wrong_twin.py").write_text(WRONG)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(ROOT)
    argv = [*BERT, "--quick", "--out", str(tmp_path / "out")]
    argv[3] = "bench_wrong_twin:bert_tiny_flax_wrong_eps"
    code, stdout, _ = _bench(argv)
    assert code == 1
    assert "[gate] BertModel b2 float32: FAIL" in stdout and "parity gate FAILED for: BertModel b2" in stdout
    data = _results(tmp_path / "out")
    assert not data["parity_gates"][0]["ok"]
    assert {r["status"] for r in data["results"]} == {"failed"}  # nothing timed
    assert {r["reason"] for r in data["results"]} == {"parity gate failed"}


def test_input_shape_pair_runs_the_grid(tmp_path, monkeypatch):
    """--input-shape (a random float input) on a plain torch/Flax pair (tests/planted.py): the
    built-in path's one-input, one-output case through the own-pair grid."""
    monkeypatch.chdir(Path(__file__).parent)
    code, stdout, _ = _bench(["--torch", "planted:make_torch_block", "--flax", "planted:make_flax_block",
                              "--input-shape", "4,8", "--quick", "--name", "block", "--out", str(tmp_path)])
    assert code == 0, stdout
    (path,) = tmp_path.glob("block_*.json")
    rows = {(r["phase"], r["variant"]): r for r in json.loads(path.read_text())["results"]}
    assert {k: r["status"] for k, r in rows.items() if r["variant"] != "torch-channels_last"} == {
        (p, v): "ok" for p in ("forward", "train") for v in ("torch-eager", "jax-jit")}
    assert "[4, 8]" in rows["forward", "torch-channels_last"]["reason"]


def test_image_input_gets_channels_last_with_its_inferred_layout():
    """HF ViT: one [N, C, H, W] input, its layout inferred by the engine from the patch conv (no
    --layout), so torch channels_last runs, and its output leaves agree with jax.jit's."""
    from bench import hf_pairs
    from parity.benchmark import check_first_value, make_step, select_device
    from parity.benchmark.workloads import prepare_own

    prep = prepare_own(hf_pairs.vit_tiny_torch(), hf_pairs.vit_tiny_flax(), hf_pairs.vit_tiny_input(),
                       select_device("cpu"), name="vit-tiny")
    assert prep.in_layouts == {"input[0]": "NC..."} and prep.channels_last_input() is None
    steps = [make_step(prep, v, "forward") for v in ("jax-jit", "torch-channels_last")]
    for step in steps:
        step()
    ref, value = (s.first_value() for s in steps)
    assert set(value) == {"out.last_hidden_state", "out.pooler_output"}
    ok, text = check_first_value(ref, value, "float32")
    assert ok, text


@pytest.mark.parametrize("argv, words", [
    (["--torch", "bench.hf_pairs:bert_tiny_torch", "--example-input", "bench.hf_pairs:bert_tiny_input"],
     "needs --flax as well"),
    (["--torch", "bench.hf_pairs:no_such_factory", "--flax", "bench.hf_pairs:bert_tiny_flax",
      "--example-input", "bench.hf_pairs:bert_tiny_input"], "has no attribute 'no_such_factory'"),
    ([*BERT, "--batch", "4"], "does not take --batch"),
])
def test_bad_input_exits_2_with_one_readable_line(argv, words, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, _, err = _bench(argv)
    assert code == 2
    assert err.count("\n") == 1 and words in err, err
