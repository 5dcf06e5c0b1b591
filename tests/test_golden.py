"""Golden bundles (parity.record / parity.verify) on registry pairs: record then verify, verify
without torch, a planted bug located from the bundle alone, refused bundles, atomic writes."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import parity
import weight_port
from parity.golden import BundleError, BundleTooLarge, read_bundle
from parity.registry import select
from child_process import cli_in_process, one_line_error

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _record(name: str, out: Path, **kw) -> Path:
    pair = select([name])[0]
    torch_model, _ = pair.build(seed=0)
    return parity.record(torch_model, pair.example_input(seed=0), out, input_layout=pair.input_layout,
                         output_layout=pair.out_layout(), name=pair.name, **kw)


def _twin(name: str):
    pair = select([name])[0]
    return pair.flax_cls()(pair.tiny())


def _cli(*args: str, no_torch: bool = False) -> subprocess.CompletedProcess:
    """``parity *args``: in this process (parity.cli.main), or with ``no_torch`` through
    ``python -m parity.cli`` in a child where ``import torch`` fails (tests/no_torch/sitecustomize.py)."""
    if not no_torch:
        return cli_in_process(*args, cwd=ROOT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(TESTS / "no_torch"), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory) -> Path:
    return _record("mlp", tmp_path_factory.mktemp("golden") / "mlp", layers=True)


@pytest.mark.parametrize("name,dtype,layers", [("mlp", "float32", True), ("cnn", "float32", True),
                                               ("unet-same-bn", "float64", False)],
                         ids=["mlp-float32-layers", "cnn-float32-layers", "unet-same-bn-float64"])
def test_record_then_verify_passes(tmp_path, name, dtype, layers):
    path = _record(name, tmp_path / name, dtype=dtype, layers=layers)
    report = parity.verify(path, _twin(name))
    assert report.verdict == "PASS", str(report)
    assert report.dtype == dtype and report.outputs and report.param_grads
    # the measured-noise judge decided (a float64 reference or the float32 probe came with the bundle)
    assert {c.judge for c in report.outputs + report.grads} == {"reference"}
    assert bool(report.layers) == layers
    if layers:
        assert report.first_divergence is None
        assert {row.torch_path for row in report.layers} >= {"", *(p.split(".weight")[0] for p in
                                                                   read_bundle(path).tensors("weights.safetensors")
                                                                   if p.endswith(".weight"))}


def test_bundle_holds_hashed_files_and_plan_inputs(mlp_bundle):
    m = json.loads((mlp_bundle / "manifest.json").read_text())
    assert set(m["files"]) == {"weights.safetensors", "run.safetensors", "layers.safetensors"}
    assert m["dtype"] == "float32" and m["reference"] == "float64" and m["cotangent_seed"] == 1
    assert {e["path"]: e["kind"] for e in m["plan"]["modules"]}["layers.0"] == "linear"
    assert [p for p in m["plan"]["call_order"] if p][:3] == ["layers.0", "layers.1", "layers.2"]
    run = read_bundle(mlp_bundle).tensors("run.safetensors")
    assert {"main|input|input[0]", "main|out|out", "main|cot|out", "ref|out|out", "main|pgrad|layers.0.weight"} <= set(run)
    assert run["ref|out|out"].dtype == np.float64 and run["main|out|out"].dtype == np.float32


def test_cli_record_then_verify_without_torch(tmp_path):
    out = tmp_path / "b"
    proc = _cli("record", "mlp", "--out", str(out), "--layers")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; assert importlib.util.find_spec('torch') "
                            "is None; import torch"], env={**os.environ, "PYTHONPATH": str(TESTS / "no_torch")},
                           capture_output=True, text=True)
    # the child really has no torch, as a machine without it installed
    assert probe.returncode != 0 and "ModuleNotFoundError: No module named 'torch'" in probe.stderr
    proc = _cli("verify", str(out), "mlp", "--full", "--json", str(tmp_path / "r.json"), no_torch=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "layers.1" in proc.stdout  # per-layer rows printed
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "PASS"


def test_planted_bug_fails_and_is_located_from_the_bundle(mlp_bundle):
    pair = select(["mlp"])[0]
    torch_model, flax_model = pair.build(seed=0)
    variables = weight_port.torch_to_flax(torch_model, flax_model, pair.example_input(seed=0))
    params = dict(variables["params"])
    params["layers_1"] = {**params["layers_1"], "kernel": params["layers_1"]["kernel"] * 1.001}
    report = parity.verify(mlp_bundle, flax_model, variables={**variables, "params": params})
    assert report.verdict == "FAIL"
    assert report.first_divergence == "layers.1" and report.divergence_kind == "forward"


def test_twin_with_a_code_bug_exits_1_from_the_cli(tmp_path, mlp_bundle):
    # The port copies the bundle's weights, so the bug is in the twin's code: GELU for ReLU.
    (tmp_path / "bad_twin.py").write_text(
        "import flax.linen as nn\n"
        "from flax_impl.mlp import ExplicitMLP\n"
        "from parity.registry import select\n"
        "class GeluMLP(ExplicitMLP):\n"
        "    def __call__(self, x, train=False):\n"
        "        for i, layer in enumerate(self.layers):\n"
        "            x = layer(x)\n"
        "            x = nn.gelu(x) if i != len(self.layers) - 1 else x\n"
        "        return x\n"
        "def make():\n"
        "    return GeluMLP(select(['mlp'])[0].tiny())\n")
    proc = cli_in_process("verify", str(mlp_bundle), "--flax", "bad_twin:make", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "first divergence: <root>" in proc.stdout


def test_verify_takes_its_options_as_one_value(mlp_bundle):
    """parity.verify(path, twin, VerifyOptions(...)): the options travel as one frozen value (the
    CLI builds it once); keyword fields are still accepted and win over it."""
    from parity.golden import VerifyOptions
    from parity.sharding import ShardingError, ShardOptions

    twin = _twin("mlp")
    no_rows = VerifyOptions(layers=False, logits=["out"])
    assert no_rows.logits == ("out",)  # a list of leaves is kept as a tuple: the value stays hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        no_rows.layers = True
    plain = parity.verify(mlp_bundle, twin, no_rows)
    assert plain.verdict == "PASS" and plain.layers == [] and [m.path for m in plain.logits] == ["out"]
    rows = parity.verify(mlp_bundle, twin, no_rows, layers=True, logits=())  # the keywords win
    assert rows.layers and rows.logits == []
    with pytest.raises(TypeError, match="unknown verify option.*layer_rows.*known: .*layers"):
        parity.verify(mlp_bundle, twin, layer_rows=False)
    with pytest.raises(TypeError, match="options must be a VerifyOptions"):
        parity.verify(mlp_bundle, twin, {"layers": False})
    with pytest.raises(ShardingError, match="needs mesh="):  # it was ignored: an unsharded run
        parity.verify(mlp_bundle, twin, shard=ShardOptions(style="tp"))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_hash_is_refused(tmp_path, mlp_bundle):
    b = _copy(mlp_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["run.safetensors"]["sha256"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="run.safetensors: sha256 .* does not match"):
        parity.verify(b, _twin("mlp"))
    assert "does not match the manifest" in one_line_error(_cli("verify", str(b), "mlp"))


def test_truncated_file_is_refused(tmp_path, mlp_bundle):
    b = _copy(mlp_bundle, tmp_path / "b")
    data = (b / "weights.safetensors").read_bytes()
    (b / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="weights.safetensors: .* bytes, the manifest says .*truncated"):
        read_bundle(b)
    assert "truncated" in one_line_error(_cli("verify", str(b), "mlp"))


def test_flipped_byte_is_refused(tmp_path, mlp_bundle):
    b = _copy(mlp_bundle, tmp_path / "b")
    data = bytearray((b / "layers.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (b / "layers.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="layers.safetensors: sha256"):
        read_bundle(b)


def test_bundle_of_another_model_is_refused(mlp_bundle):
    with pytest.raises(BundleError, match="another model"):
        parity.verify(mlp_bundle, _twin("cnn"))
    with pytest.raises(BundleError, match="the bundle's weights do not fit this twin"):
        pair = select(["mlp"])[0]
        wider = dataclasses.replace(pair.tiny(), features=tuple(f + 1 for f in pair.tiny().features))
        parity.verify(mlp_bundle, pair.flax_cls()(wider))  # the same layers, other shapes
    line = one_line_error(_cli("verify", str(mlp_bundle), "cnn"))
    assert "another model" in line


def test_half_written_bundle_is_not_a_bundle(tmp_path, mlp_bundle):
    b = _copy(mlp_bundle, tmp_path / "b")
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        read_bundle(b)


def test_layer_cap_names_itself_and_leaves_nothing(tmp_path):
    out = tmp_path / "capped"
    with pytest.raises(BundleTooLarge, match="max_bytes=1000"):
        _record("mlp", out, layers=True, max_bytes=1000)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failing_write_leaves_no_bundle(tmp_path, monkeypatch):
    import safetensors.numpy

    from parity.golden._bundle import StreamedFile

    calls = []

    def save(tensors, filename):
        calls.append(filename)
        return real(tensors, filename)

    def fail(self):  # the run's file, written a tensor at a time: the weights are on disk already
        calls.append(self.name)
        raise OSError("disk full (planted)")

    real = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", save)
    monkeypatch.setattr(StreamedFile, "close", fail)
    out = tmp_path / "b"
    with pytest.raises(OSError, match="planted"):
        _record("mlp", out)
    assert len(calls) == 2 and calls[1] == "run.safetensors"
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_record_refuses_an_existing_directory(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="exists"):
        _record("mlp", tmp_path / "b")


# --- memory: what parity bench --golden-cost measures, held structurally ---------------------------
def test_record_copies_the_model_once(tmp_path, monkeypatch):
    """An eval-mode record makes one private copy of the model: the plan traces and the hooked
    forward run on it, and the float64 run converts it in place (a copy beside it doubled the
    model's bytes each time: 15 GiB and more at GPT-2-medium size)."""
    import copy

    import torch

    import parity.golden._record as rec

    copies, depth = [], [0]
    real = copy.deepcopy

    def counting(x, *a, **kw):  # the copies record makes, not the submodules copy.deepcopy recurses into
        if isinstance(x, torch.nn.Module) and depth[0] == 0:
            copies.append(type(x).__name__)
        depth[0] += 1
        try:
            return real(x, *a, **kw)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(rec.copy, "deepcopy", counting)
    _record("mlp", tmp_path / "b")
    assert len(copies) == 1, copies
    assert parity.verify(tmp_path / "b", _twin("mlp")).verdict == "PASS"


def test_record_writes_each_gradient_as_autograd_finishes_it(tmp_path, monkeypatch):
    """record's runs hand every parameter gradient to the bundle as autograd finishes it and hold
    none (the float64 run's are twice the model's bytes: GPT-2-medium's record peaked with the
    float32 and float64 gradients and the float64 model all at once), and the private copy's
    parameters are freed before the bundle is written (the outputs' autograd graph held them)."""
    import copy
    import weakref

    import torch

    import parity.golden._record as rec

    returned, params = [], []
    real_run, real_copy = rec.run_torch, copy.deepcopy

    def run(module, *a, **kw):
        t = real_run(module, *a, **kw)
        if kw.get("grads"):
            returned.append((dict(t.param_grads), [n for n, p in module.named_parameters() if p.grad is not None]))
        return t

    def private_copy(x, *a, **kw):
        out = real_copy(x, *a, **kw)
        if isinstance(x, torch.nn.Module) and not params:
            params.extend(weakref.ref(p) for p in out.parameters())
        return out

    alive = []

    def progress(msg):
        if msg == "writing the bundle":
            alive.append(sum(r() is not None for r in params))

    monkeypatch.setattr(rec, "run_torch", run)
    monkeypatch.setattr(rec.copy, "deepcopy", private_copy)
    _record("mlp", tmp_path / "b", progress=progress)
    assert len(returned) == 2 and all(held == ({}, []) for held in returned), returned  # main, then float64
    assert params and alive == [0], alive
    keys = read_bundle(tmp_path / "b").keys("run.safetensors")
    names = [n for n, _ in select(["mlp"])[0].build(seed=0)[0].named_parameters()]
    assert {f"{g}|pgrad|{n}" for g in ("main", "ref") for n in names} <= set(keys)
    assert parity.verify(tmp_path / "b", _twin("mlp")).verdict == "PASS"


def test_streamed_file_is_a_safetensors_file(tmp_path):
    """A bundle file written a tensor at a time reads back as safetensors writes it (the same keys,
    dtypes, shapes and values; a 0-d value as shape [1], as BundleWriter.add stores it), hashed."""
    import ml_dtypes
    from safetensors.numpy import load_file

    from parity.golden._bundle import BundleWriter

    tensors = {"main|out|out": np.arange(6, dtype=np.float32).reshape(2, 3).T, "ref|pgrad|w": np.ones((3, 5)),
               "main|input|input[0]": np.arange(4, dtype=np.int64), "empty": np.zeros((0, 2), np.float32),
               "loss": np.float64(2.5), "half": np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16)}
    with BundleWriter(tmp_path / "b") as w:
        f = w.stream("run.safetensors")
        f.update(tensors)
        f.close()
        w.add("weights.safetensors", {"w": np.ones(2, np.float32)})
        w.finish({})
    got = load_file(str(tmp_path / "b" / "run.safetensors"))
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == np.asarray(v).dtype and np.array_equal(got[k], np.ascontiguousarray(v)), k
    assert sorted(os.listdir(tmp_path / "b")) == ["manifest.json", "run.safetensors", "weights.safetensors"]
    assert read_bundle(tmp_path / "b").keys("run.safetensors") == sorted(tensors)  # sizes and hashes hold


class _TwoLinears:
    """torch: fc(x) + fc2(x). The twin computes fc as (x + c) @ W - c * colsum(W): the same
    function rounded worse than ATen, so the output and fc's weight gradient pass only on the
    twin's own noise (tests/test_verdicts_own_noise.py), while fc2's and the input's gradients pass
    on torch's noise alone."""

    @staticmethod
    def torch():
        import torch

        class TwoLinears(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.fc = torch.nn.Linear(64, 16, bias=False)
                self.fc2 = torch.nn.Linear(64, 16, bias=False)

            def forward(self, x):
                return self.fc(x) + self.fc2(x)

        return TwoLinears()

    @staticmethod
    def flax():
        import flax.linen as nn

        class Shifted(nn.Module):
            @nn.compact
            def __call__(self, x):
                k = self.param("kernel", nn.initializers.zeros, (64, 16))
                return (x + 256.0) @ k - 256.0 * k.sum(0)

        class Twin(nn.Module):
            @nn.compact
            def __call__(self, x):
                return Shifted(name="fc")(x) + nn.Dense(16, use_bias=False, name="fc2")(x)

        return Twin()


def test_verify_runs_the_twins_own_noise_only_for_what_needs_it(tmp_path, mlp_bundle, monkeypatch):
    """parity.check's mechanism (parity.judge.ModelJudge): every tensor is judged on torch's noise
    first and freed once it passes; the twin's own-noise run (float64 for a float32 bundle: twice
    the model's bytes in variables, as much in gradients) runs once, for the tensors that failed
    there alone, and after the others were freed. A twin that passes on torch's noise never runs it."""
    import parity.golden._verify as v

    events, run_twin, drop = [], v._run_twin, v._FlaxSide.drop

    def spy_run(*a, **kw):
        dtype, keys = (list(a) + [None, None])[8:10]
        events.append(("run", str(np.dtype(dtype)) if dtype is not None else None, keys and sorted(keys)))
        return run_twin(*a, **kw)

    def spy_drop(self, key):
        events.append(("drop", key))
        return drop(self, key)

    computed, forward_backward = [], v.forward_backward

    def spy_fb(*a, **kw):
        f = forward_backward(*a, **kw)
        if kw.get("param_grads") is not None:
            computed.extend(f.param_grads)
        return f

    monkeypatch.setattr(v, "_run_twin", spy_run)
    monkeypatch.setattr(v._FlaxSide, "drop", spy_drop)
    monkeypatch.setattr(v, "forward_backward", spy_fb)
    bundle = parity.record(_TwoLinears.torch(), np.random.default_rng(0).standard_normal((8, 64)), tmp_path / "b",
                           input_layout="as_is")
    report = parity.verify(bundle, _TwoLinears.flax())
    assert report.verdict == "PASS", str(report)
    runs = [e for e in events if e[0] == "run"]
    assert runs == [("run", None, None), ("run", "float64", ["out", "param:fc.weight"])], events
    own = events.index(runs[1])
    # what passed on torch's noise was freed before the own-noise run; the rest once judged again
    assert {("drop", "input[0]"), ("drop", "param:fc2.weight")} <= set(events[:own])
    assert ("drop", "param:fc.weight") in events[own:] and ("drop", "param:fc.weight") not in events[:own]
    assert {c.name: c.ok for c in report.outputs + report.grads} == {
        "output": True, "grad input": True, "grad fc.weight": True, "grad fc2.weight": True}

    # the own-noise run computes the gradients it was asked for and no other (XLA leaves the rest
    # out of the program: a float64 run of all of them is twice the model's bytes)
    assert set(computed) == {"fc"}, computed

    events.clear()
    assert parity.verify(mlp_bundle, _twin("mlp")).verdict == "PASS"
    assert [e for e in events if e[0] == "run"] == [("run", None, None)]  # no own-noise run at all


def test_recorded_tensors_are_read_when_asked_and_never_kept(mlp_bundle):
    """verify's judged tensors: read from the file on each access, none held by the bundle, so
    a tensor the judge has dropped is freed for good."""
    b = read_bundle(mlp_bundle)
    grads = b.recorded("run.safetensors", "ref", "pgrad")
    assert set(grads) == {k.split("|", 2)[2] for k in b.keys("run.safetensors") if k.startswith("ref|pgrad|")}
    name = next(iter(grads))
    first = grads[name]
    assert first.dtype == np.float64 and grads.shape(name) == first.shape
    assert grads[name] is not first and np.array_equal(grads[name], first)
    assert not b._loaded.get("run.safetensors")  # nothing cached by the reads
    renamed = b.recorded("run.safetensors", "main", rename=lambda rest: rest if rest.startswith("out|") else None)
    assert list(renamed) == ["out|out"]


def test_bundle_reads_each_file_once(mlp_bundle):
    """verify asks for groups of run.safetensors several times: one read, every group a view of it."""
    b = read_bundle(mlp_bundle)
    first, again = b.group("run.safetensors", "main"), b.group("run.safetensors", "main")
    assert first and all(first[k] is again[k] for k in first)
    assert b.tensors("weights.safetensors", keep=False) is not b.tensors("weights.safetensors", keep=False)


def test_verify_rows_run_computes_no_whole_model_parameter_gradients(mlp_bundle, monkeypatch):
    # The rows take each layer's parameter gradients from its run alone: the recorded float64
    # run of the twin computes none (as parity.check's rows run), where it used to compute all
    # of them (twice the model's bytes) and never read them.
    import parity.golden._verify as v

    recorded, forward_backward = [], v.forward_backward

    def spy(*a, capture=False, **kw):
        f = forward_backward(*a, capture=capture, **kw)
        if capture:
            recorded.append(sorted(f.param_grads or {}))
        return f

    monkeypatch.setattr(v, "forward_backward", spy)
    report = parity.verify(mlp_bundle, _twin("mlp"))
    assert report.verdict == "PASS" and report.layers, str(report)
    assert recorded == [[]], recorded
    layers = [row for row in report.layers if row.torch_path.startswith("layers.")]
    assert layers and all(row.grad_isolated is not None and row.grad_isolated.ok for row in layers), str(report)


def test_verify_rows_read_the_probes_gradients_as_each_row_asks(mlp_bundle, monkeypatch):
    """The rows of a float32 bundle read its float32 probe's parameter gradients one at a time from
    the file (parity.golden's Recorded), never the model's worth of them at once; the same rows."""
    import parity.golden._verify as verify_mod
    from parity.golden._bundle import Recorded

    seen = {}
    analyze = verify_mod.analyze_layers

    def spy(*args, **kwargs):
        seen["probe"] = kwargs["rows"].probe_params
        return analyze(*args, **kwargs)
    monkeypatch.setattr(verify_mod, "analyze_layers", spy)
    report = parity.verify(mlp_bundle, _twin("mlp"), layers=True)
    assert report.verdict == "PASS", str(report)
    assert isinstance(seen["probe"], Recorded) and len(seen["probe"]) == 6, seen
    assert {c.judge for row in report.layers for c in [row.grad_isolated] if c is not None} == {"reference"}
