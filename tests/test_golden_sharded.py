"""Sharded verify (parity.verify(..., mesh=), parity verify --mesh) on 8 simulated CPU devices:
the same bundle verified sharded gives the unsharded verdict and numbers within the judge's
tolerance, the parameters sit on their shards (no replicated full copy per device), the user's
rules win, a planted bug FAILs sharded too, and a mesh or rule that cannot be used is a named
one-line error (exit 2). The 8-device runs happen in tests/shard_child.py (XLA_FLAGS must precede
JAX's initialisation; this process keeps its one device)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import parity
from parity._xla_flags import with_cpu_devices, without_cpu_devices
from parity.registry import select
from parity.sharding import ShardingError, ShardOptions, ShardRule, parse_mesh
from parity.tolerances import FORWARD, GRAD, tolerance_for

from child_process import once_per_run, run_json_child
from child_process import one_line_error

TESTS = Path(__file__).parent
ROOT = TESTS.parent
MESHES = ("data=2,model=4", "data=8")


def _record_and_run(directory: Path) -> dict:
    for name in ("mlp", "cnn"):  # batch 8: both meshes split the inputs over "data"
        pair = select([name])[0]
        torch_model, _ = pair.build(seed=0)
        parity.record(torch_model, pair.example_input(seed=0, batch=8), directory / name, layers=True,
                      input_layout=pair.input_layout, output_layout=pair.out_layout(), name=pair.name)
    return {**run_json_child("shard_child.py", str(directory), devices=8, timeout=600), "dir": str(directory)}


@pytest.fixture(scope="module")
def child() -> dict:
    return once_per_run("shard_child", _record_and_run)


def _expected_shard(shape, spec, mesh: dict) -> list[int]:
    axes = [() if d is None else (d,) if isinstance(d, str) else tuple(d) for d in spec]
    axes += [()] * (len(shape) - len(axes))
    return [n // math.prod(mesh[a] for a in ax) for n, ax in zip(shape, axes)]


def test_child_has_eight_devices(child):
    assert child["devices"] == 8


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_sharded_verify_equals_unsharded(child, name, mesh):
    plain, sharded = child[name]["unsharded"], child[name][mesh]
    assert plain["verdict"] == sharded["verdict"] == "PASS", sharded
    assert [c["name"] for c in sharded["comparisons"]] == [c["name"] for c in plain["comparisons"]]
    for p, s in zip(plain["comparisons"], sharded["comparisons"]):
        # the sharded twin's error against the bundle moves by at most its own rounding difference
        # from the unsharded twin, which the table's tolerance for this dtype and kind bounds
        tol = tolerance_for(plain["dtype"], GRAD if p["grad"] else FORWARD, "highest", "cpu")
        assert s["ok"] == p["ok"], s["name"]
        assert abs(s["max_abs"] - p["max_abs"]) <= tol.atol + tol.rtol * abs(p["expected_at_worst"]), s["name"]
        assert abs(s["rel_norm"] - p["rel_norm"]) <= tol.rtol, s["name"]
    # the per-layer rows from the bundle, judged on the sharded variables: the same rows, all ok
    assert sharded["layers"] == plain["layers"] and all(sharded["layers"].values())
    record = sharded["sharding"]
    assert record["mesh"] == dict(parse_mesh(mesh)) and record["devices"] == 8 and record["processes"] == 1
    assert record["inputs"] == {"input[0]": ["data"]}  # batch 8: split over "data"
    assert set(record["specs"]) == set(record["shard_shapes"]) and record["specs"]
    assert any("data" in spec for spec in record["specs"].values())
    assert plain["sharding"] is None and sharded["warnings"][0].startswith(f"sharded: mesh {mesh} (8 cpu devices)")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_report_records_what_each_device_holds(child, name):
    record = child[name]["data=2,model=4"]["sharding"]
    specs = record["specs"]
    # fsdp+tp: a Dense kernel [in, out] gets out over "model" and in over "data"
    assert specs[f"params/{'layers_0' if name == 'mlp' else 'dense1'}/kernel"] == ["data", "model"]
    assert all(spec == [None] for leaf, spec in specs.items() if leaf.endswith("/bias"))
    for leaf, spec in specs.items():  # read off the placed arrays' first addressable shard
        assert record["shard_shapes"][leaf] == _expected_shard(record["shapes"][leaf], spec, record["mesh"]), leaf
    # an axis that does not divide stays replicated, and the report says so
    last = "layers_2" if name == "mlp" else "dense2"
    assert specs[f"params/{last}/kernel"] == ["data", None]
    assert any(n["where"] == f"params/{last}/kernel" and "not divisible by model=4" in n["text"]
               for n in record["notes"])


def test_parameters_are_ported_straight_into_their_shards(child):
    placed = child["placed"]
    split = {leaf: a for leaf, a in placed.items() if any(a["spec"])}
    assert len(split) >= 3, placed
    for leaf, a in placed.items():
        assert a["equal"], leaf  # the same values as the unsharded port
        assert a["devices"] == 8
        assert a["shard_shapes"] == [_expected_shard(a["shape"], a["spec"], {"data": 2, "model": 4})], leaf
    for leaf, a in split.items():  # no device holds a full copy of a split parameter
        assert all(math.prod(s) < math.prod(a["shape"]) for s in a["shard_shapes"]), leaf
        assert a["bytes_on_devices"] < 8 * a["bytes"], leaf
    kernel = placed["['params']['layers_0']['kernel']"]
    assert kernel["spec"] == ["data", "model"] and kernel["bytes_on_devices"] == kernel["bytes"]  # 1/8 each


def test_user_rules_win_over_the_defaults(child):
    r = child["mlp_rule"]
    assert r["verdict"] == "PASS"
    specs, shards = r["sharding"]["specs"], r["sharding"]["shard_shapes"]
    assert specs["params/layers_0/kernel"] == ["model", "data"] and shards["params/layers_0/kernel"] == [1, 4]
    assert specs["params/layers_1/bias"] == ["model"] and shards["params/layers_1/bias"] == [2]
    assert specs["params/layers_1/kernel"] == ["data", "model"]  # no rule: the default
    assert specs["params/layers_2/bias"] == [None]  # [5] does not divide over model=4
    assert any("'.*/bias=model': axis 0 of [5] is not divisible" in w for w in r["warnings"])


def test_tensor_parallel_only_mesh_replicates_inputs(child):
    r = child["mlp_tp_model8"]
    assert r["verdict"] == "PASS"
    assert r["sharding"]["specs"]["params/layers_1/kernel"] == [None, "model"]
    assert r["sharding"]["shard_shapes"]["params/layers_1/kernel"] == [8, 1]
    assert r["sharding"]["inputs"] == {"input[0]": []}  # no "data" axis: inputs whole on every device


def test_a_batch_that_does_not_divide_is_replicated_with_a_note(child):
    odd = child["odd_batch"]
    assert odd["specs"] == {"input[0]": [], "input[1]['mask']": []} and all(odd["replicated"])
    assert odd["notes"] == ["batch 3 is not divisible by data=2: inputs replicated"]


def test_planted_bug_fails_sharded_and_is_located(child):
    r = child["planted"]
    assert r["verdict"] == "FAIL" and r["first_divergence"] == "layers.1"
    assert r["sharding"]["specs"]["params/layers_1/kernel"] == ["data", "model"]  # it really ran sharded


def test_sharding_errors_are_named(child):
    errors = child["errors"]
    assert errors["too_many_devices"].startswith("ShardingError: --mesh 'data=4,model=4' needs 16 devices, JAX has 8")
    assert errors["bad_mesh"].startswith("ShardingError: --mesh 'data=2,model': each entry is NAME=SIZE")
    assert errors["rule_matches_nothing"].startswith("ShardingError: --shard-rule '.*/attention/kernel=data' "
                                                     "decides no parameter")
    assert "the mesh has no axis 'model'" in errors["rule_unknown_axis"]
    assert "2 entries for params/layers_0/bias, which has 1 dimensions [8]" in errors["rule_too_long"]


@pytest.mark.parametrize("text,match", [("data", "NAME=SIZE"), ("data=0", "SIZE >= 1"), ("data=2,data=2", "twice"),
                                        ("data=2;model=4", "NAME=SIZE")])
def test_bad_mesh_strings(text, match):
    with pytest.raises(ShardingError, match=match):
        parse_mesh(text)


def test_rule_and_style_parsing():
    assert ShardRule.parse(".*/kernel=None,model").spec == ((), ("model",))
    assert ShardRule.parse("embed/embedding=data+model").spec == (("data", "model"),)
    assert ShardRule.parse(".*bias=").spec == ()
    with pytest.raises(ShardingError, match="bad regex"):
        ShardRule.parse("(=data")
    with pytest.raises(ShardingError, match="not None or mesh axes"):
        ShardRule.parse(".*=data-model")
    with pytest.raises(ShardingError, match="--shard-style 'zero'"):
        ShardOptions(style="zero")


# --- the command -----------------------------------------------------------------------------
def _cli(*args: str, devices: int | None = None) -> subprocess.CompletedProcess:
    # torch blocked (tests/no_torch): sharded verify runs where torch is not installed
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(TESTS / "no_torch"), str(ROOT)])}
    # no device count unless asked (the suite's other XLA flags stay)
    env["XLA_FLAGS"] = without_cpu_devices(env.get("XLA_FLAGS", ""))
    if devices is not None:
        env["XLA_FLAGS"] = with_cpu_devices(env["XLA_FLAGS"], devices)
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_sharded_verify_without_torch(child, tmp_path):
    # no XLA_FLAGS: the command asks for the mesh's 8 CPU devices itself
    proc = _cli("verify", str(Path(child["dir"]) / "cnn"), "cnn", "--mesh", "data=2,model=4",
                "--shard-rule", "params/conv2/kernel=None,None,model,data", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "PASS"
    record = report["env"]["sharding"]
    assert record["mesh"] == {"data": 2, "model": 4} and record["devices"] == 8
    assert record["specs"]["params/conv2/kernel"] == [None, None, "model", "data"]
    assert record["shard_shapes"]["params/conv2/kernel"] == [3, 3, 1, 4]


@pytest.mark.parametrize("flags,match", [
    (("--mesh", "data=2,,model=4"), "--mesh 'data=2,,model=4': each entry is NAME=SIZE"),
    (("--mesh", "data=4,model=4"), "needs 16 devices, JAX has 8"),
    (("--mesh", "data=8", "--shard-rule", "params/encoder/.*=data"), "decides no parameter"),
    (("--shard-rule", ".*=data"), "--shard-style and --shard-rule need --mesh"),
    (("--mesh", "data=8", "--processes", "3"), "the mesh's 8 devices do not split evenly over 3 processes"),
    (("--processes", "2"), "--processes needs --mesh"),
    # refused inside the processes of a job: the launcher passes the error on, once
    (("--mesh", "data=2,model=4", "--processes", "2", "--shard-rule", "params/encoder/.*=data"), "decides no parameter"),
], ids=["bad-mesh", "too-many-devices", "rule-matches-nothing", "rule-without-mesh", "processes-uneven",
        "processes-without-mesh", "processes-rule-matches-nothing"])
def test_cli_sharding_errors_are_one_line(child, flags, match):
    # 8 devices set from outside (as a user's XLA_FLAGS would): the command does not raise it
    line = one_line_error(_cli("verify", str(Path(child["dir"]) / "mlp"), "mlp", *flags, devices=8))
    assert match in line


def test_cli_two_processes_give_one_report(child, tmp_path):
    # 2 processes x 4 simulated CPU devices in one jax.distributed job (gloo collectives on
    # localhost), the mesh spanning both; process 0 alone prints and writes the report
    proc = _cli("verify", str(Path(child["dir"]) / "mlp"), "mlp", "--mesh", "data=2,model=4", "--processes", "2",
                "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [ln.split()[-3] for ln in proc.stdout.splitlines() if ln.startswith("mlp ")] == ["PASS"]  # one report
    report = json.loads((tmp_path / "r.json").read_text())
    record = report["env"]["sharding"]
    assert (record["processes"], record["devices_per_process"], record["devices"]) == (2, 4, 8)
    assert record["shard_shapes"]["params/layers_0/kernel"] == [2, 2]  # each process holds its devices' shards
    one = child["mlp"]["data=2,model=4"]  # the same mesh in one process
    assert report["verdict"] == one["verdict"] == "PASS"
    got = {c["name"]: c for c in report["outputs"] + report["input_grads"] + report["param_grads"]}
    for c in one["comparisons"]:
        tol = tolerance_for(one["dtype"], GRAD if c["grad"] else FORWARD, "highest", "cpu")
        assert abs(got[c["name"]]["rel_norm"] - c["rel_norm"]) <= tol.rtol, c["name"]
    assert {row["name"]: row["ok"] for row in report["layers"]} == one["layers"]
    assert all(row["isolated"] is not None for row in report["layers"])  # the rows really ran, not skipped
