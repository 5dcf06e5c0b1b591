"""Golden bundles of real Hugging Face pairs (tiny configs from config objects, never the hub):
GPT-2 with its tied LM head and BERT, recorded with keyword inputs (parity.Inputs, Flax-only
constants included), verified where torch cannot be imported; a planted bug in the Flax variables
FAILs and is located from the bundle alone."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import traverse_util

import golden_hf_twins as twins
import parity
import weight_port
from hf_pairs import HFPair, T, ids, mask, pos, PAIRS

HERE = Path(__file__).parent
ROOT = HERE.parent


def _bert_inputs() -> parity.Inputs:
    import torch

    types = torch.zeros(2, T, dtype=torch.long)
    types[:, T // 2:] = 1  # two segments: the token-type embedding matters
    # FlaxBertModule requires the position ids that BertModel computes itself: a Flax-only constant
    return parity.Inputs(ids(), attention_mask=mask(), token_type_ids=types, flax_only=dict(position_ids=pos()))


GOLDEN = {
    "gpt2": PAIRS["gpt2"],  # GPT2LMHeadModel: lm_head tied to transformer.wte
    "bert": HFPair("bert", twins.bert_config, "BertModel", "bert:FlaxBertModule", _bert_inputs,
                   "encoder.layer.1.attention.self.value"),
}
FACTORY = {"gpt2": twins.gpt2, "bert": twins.bert}


@pytest.fixture(scope="module", params=list(GOLDEN))
def recorded(request, tmp_path_factory):
    """(name, bundle path): recorded once per pair, with per-layer rows."""
    name = request.param
    tm, _, inputs = GOLDEN[name].build("float32")
    path = parity.record(tm, inputs, tmp_path_factory.mktemp("golden") / name, layers=True, name=name)
    return name, path


def test_configs_are_the_torch_sides():
    assert twins.gpt2_config().to_dict() == PAIRS["gpt2"].config().to_dict()


def test_bundle_records_the_keyword_call(recorded):
    name, path = recorded
    m = json.loads((path / "manifest.json").read_text())
    kw = m["inputs"]["keywords"]
    assert kw["positional"] == 1
    if name == "gpt2":
        assert kw["keys"] == ["attention_mask", "position_ids"] and m["plan"]["tied"] == {
            "lm_head.weight": "transformer.wte.weight"}
    else:
        assert kw["keys"] == ["attention_mask", "token_type_ids"]
        assert kw["flax_only"] == {"dict": [["position_ids", {"leaf": "flax_only['position_ids']"}]]}
        run = parity.golden.read_bundle(path).tensors("run.safetensors")
        assert run["main|flax_only|flax_only['position_ids']"].tolist() == pos().tolist()


def _verify_without_torch(path: Path, name: str, json_out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "no_torch"), str(HERE), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "parity.cli", "verify", str(path), "--flax",
                           f"golden_hf_twins:{name}", "--full", "--json", str(json_out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_verify_without_torch_passes(recorded, tmp_path):
    name, path = recorded
    proc = _verify_without_torch(path, name, tmp_path / "r.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "PASS" and report["param_grads"]
    assert {c["judge"] for c in report["outputs"] + report["param_grads"]} == {"reference"}
    # per-layer rows from the bundle alone, every one within its noise
    assert report["first_divergence"] is None and len(report["layers"]) > 10
    if name == "gpt2":  # the tie is in the manifest, not in the weights: the rows judge wte whole-model
        # (said by wte's row, the one that holds it: the rows above leave its gradient to it)
        said = [r["name"] for r in report["layers"] if any("transformer.wte.weight is tied" in n for n in r["notes"])]
        assert said == ["transformer.wte"], said
    if name == "gpt2":  # CausalLMOutput.logits, inferred: the metrics without being asked for
        (m,) = report["logits"]
        assert m["path"] == "out.logits" and m["shape"] == [2, T, 64]
        assert m["top1"] == 1.0 and m["topk"] == 1.0 and m["kl_max"] < 1e-10
        assert f"logits out.logits [2, {T}, 64]: top-1 1.0000" in proc.stdout
    else:
        assert report["logits"] == []


def _planted(name: str):
    """(Flax module, its variables with the weight of the pair's ``misport`` layer scaled by
    1 + 1e-3), ported from the torch model the bundle was recorded from."""
    pair = GOLDEN[name]
    tm, fm, inputs = pair.build("float32")
    with weight_port.keywords.keyword_call(copy.deepcopy(tm), fm, inputs) as (t2, f2, args):
        plan = weight_port.build_plan(t2, f2, args)
    variables = plan.to_flax(tm.state_dict())
    layer = next(lay for lay in plan.layers if lay.info.torch_path == pair.misport)
    leaf = next(t.flax_name for t in layer.rule.tensors if t.torch_name == "weight")
    flat = traverse_util.flatten_dict(variables["params"])
    key = (*layer.info.flax_path, *leaf.split("/"))
    flat[key] = flat[key] * 1.001
    return fm, {**variables, "params": traverse_util.unflatten_dict(flat)}


def test_planted_bug_fails_and_is_located_from_the_bundle(recorded):
    name, path = recorded
    fm, bad = _planted(name)
    report = parity.verify(path, fm, variables=bad)
    assert report.verdict == "FAIL", str(report)
    assert (report.first_divergence, report.divergence_kind) == (GOLDEN[name].misport, "forward"), str(report)


def test_verify_runs_the_twin_truly_in_float64(recorded, monkeypatch):
    """The twin's own-noise run is float64 with HF's dtype=float32 field cloned to float64, as
    parity.check's (FlaxTwin.computing_in): with the variables cast alone every Dense computed in
    float32 again, the twin's own noise was not measured, and a GPT-2-medium-size twin FAILed
    verify on attention weight gradients that parity.check PASSes. The per-layer rows run the twin
    as declared, as parity.check's rows do (they judge what the port computes)."""
    import jax
    import jax.numpy as jnp

    import parity.golden._verify as v

    name, path = recorded
    seen, real = [], v.forward_backward

    def spy(twin, variables, *a, **kw):
        leaf = next(x for x in jax.tree_util.tree_leaves(variables) if jnp.issubdtype(x.dtype, jnp.floating))
        seen.append((str(leaf.dtype), str(jnp.dtype(twin.module.dtype))))
        return real(twin, variables, *a, **kw)

    class Eager(v.ModelJudge):  # the own-noise run whether or not a tensor needs it (lazy otherwise)
        def _own_noise_may_pass(self, c):
            return self._own_noise is not None

    monkeypatch.setattr(v, "forward_backward", spy)
    monkeypatch.setattr(v, "ModelJudge", Eager)
    assert parity.verify(path, FACTORY[name]()).verdict == "PASS"
    assert ("float64", "float64") in seen, seen
