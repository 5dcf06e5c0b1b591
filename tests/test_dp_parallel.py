"""Data-parallel parity on 8 simulated CPU devices (own process: XLA_FLAGS must precede JAX init),
and the clear errors in the 1-device main process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.checker import check
from parity._xla_flags import without_cpu_devices
from parity.data_parallel import DataParallelError, data_mesh
from parity.registry import PAIRS
from parity.tolerances import FORWARD, GRAD, tolerance_for

from child_process import once_per_run, one_line_error, run_json_child

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def child():
    # once per run, not once per xdist worker that gets some of these tests
    return once_per_run("dp_child", lambda _: run_json_child("dp_child.py", devices=8, timeout=300))


def test_child_has_eight_devices(child):
    assert child["devices"] == 8


@pytest.mark.parametrize("case,batch", [("convbn_train", 16), ("convbn_eval", 16), ("mlp", 8)])
def test_sharded_twin_agrees_with_torch_and_one_device(child, case, batch):
    res = child[case]
    assert res["per_device_batch"] == batch // 8  # the batch really was split over the mesh
    names = set(res["rows"])
    assert "dp8 output" in names and "dp8 output vs 1 device" in names
    assert any(n.startswith("dp8 grad") and n.endswith("vs 1 device") for n in names)
    bad = {n: r for n, r in res["rows"].items() if not r["ok"]}
    assert not bad and res["ok"], bad


def test_train_batchnorm_semantics_named(child):
    train, evaluation = child["convbn_train"], child["convbn_eval"]
    assert train["batchnorm"] == ["bn"]
    assert any(w.startswith("BatchNorm bn (flax bn): per-replica vs global") for w in train["warnings"])
    note = next(w for w in train["warnings"] if w.startswith("BatchNorm semantics"))
    assert "SyncBatchNorm" in note and "axis_name" in note
    assert "dp8 batch_stats bn/mean vs 1 device" in train["rows"]
    assert evaluation["batchnorm"] == []  # running statistics: nothing differs across replicas


def test_the_data_parallel_result_is_in_the_report_json(child):
    # report.data_parallel was set but missing from Report.to_dict (and so from --json)
    dp = child["convbn_train"]["json"]
    assert dp["n"] == 8 and dp["per_device_batch"] == 2
    assert dp["vs_torch"] and all("verdict" in c for c in dp["vs_torch"] + dp["vs_single"])
    assert [b["torch_path"] for b in dp["batchnorm"]] == child["convbn_train"]["batchnorm"]


def test_float64_train_batchnorm_check_gives_a_verdict(child):
    res = child["convbn_train_float64"]
    assert res["verdict"] == "PASS", res
    assert res["batchnorm"] == child["convbn_train"]["batchnorm"]  # the same semantics named


def test_torch_to_flax_places_on_named_sharding(child):
    placed = child["placed"]
    assert placed["equal"]
    assert placed["kernel_devices"] == 8 and placed["kernel_shard_shape"] == [16, 4]
    assert placed["bias_replicated"]


def test_too_few_devices_is_a_named_error():
    with pytest.raises(DataParallelError, match="xla_force_host_platform_device_count"):
        data_mesh(64)
    pair = PAIRS["mlp"]
    tm, fm = pair.build(pair.config("tiny"))
    with pytest.raises(DataParallelError, match="needs 64 devices"):
        check(tm, fm, pair.example_input(batch=64), layers=False, data_parallel=64,
              input_layout=pair.input_layout)


def test_cli_data_parallel(capsys):
    from parity.cli import main

    common = ["check", "mlp", "--dtype", "float32", "--no-layers", "--quiet", "--full"]
    assert main(common + ["--data-parallel", "1", "--batch", "3"]) == 0  # 1 device divides anything
    assert "dp1 output vs 1 device" in capsys.readouterr().out
    # this process's JAX is initialised with one CPU device: a clear setup error, exit 2
    assert main(common + ["--data-parallel", "2"]) == 2
    assert "needs 2 devices" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess:
    # no device count from outside: the command asks for its devices itself (--processes: per
    # process); the suite's other XLA flags stay (its compile settings: tests/run_dir.py)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = without_cpu_devices(env.get("XLA_FLAGS", ""))
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_two_processes_give_one_report(tmp_path):
    """--processes 2: the check as 2 processes x 4 simulated CPU devices of one jax.distributed job
    on localhost (gloo collectives), the data-parallel mesh of 8 spanning both; process 0 alone
    prints and writes the report, which equals the one-process run's on 8 devices. A conv +
    BatchNorm pair in train mode (dp_models): the batch statistics are where processes matter."""
    common = ("check", "--torch", "dp_models:TorchConvBN", "--flax", "dp_models:FlaxConvBN", "--name", "convbn",
              "--input-shape", "16,3,6,6", "--layout", "NC...", "--output-layout", "NC...", "--train",
              "--dtype", "float32", "--no-layers", "--data-parallel", "8", "--quiet")
    two = _cli(*common, "--processes", "2", "--json", str(tmp_path / "two.json"))
    assert two.returncode == 0, two.stdout + two.stderr
    rows = [ln.split()[:3] for ln in two.stdout.splitlines() if ln.startswith("convbn ")]
    assert rows == [["convbn", "float32", "train"]]  # one report, from process 0 only
    one = _cli(*common, "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stdout + one.stderr
    got, want = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    dp, dp1 = got["data_parallel"], want["data_parallel"]
    assert (dp["processes"], dp["devices_per_process"], dp["devices"], dp["per_device_batch"]) == (2, 4, 8, 2)
    assert (dp1["processes"], dp1["devices_per_process"]) == (1, 8)
    assert got["verdict"] == want["verdict"] == "PASS" and dp["ok"]
    assert [b["torch_path"] for b in dp["batchnorm"]] == [b["torch_path"] for b in dp1["batchnorm"]] == ["bn"]
    assert len(dp["vs_torch"] + dp["vs_single"]) == len(dp1["vs_torch"] + dp1["vs_single"]) > 0
    for c, c1 in zip(dp["vs_torch"] + dp["vs_single"], dp1["vs_torch"] + dp1["vs_single"]):
        assert c["name"] == c1["name"] and c["ok"] == c1["ok"] is True
        if c1["rel_norm"] > 1:
            # rounding noise only: the conv bias before a train-mode BatchNorm cancels (its gradient
            # is zero in exact arithmetic), so its relative error is a draw, not a figure to match
            continue
        # the same sharded program over other processes: within the table's tolerance
        tol = tolerance_for("float32", FORWARD if " output" in c["name"] else GRAD, "highest", "cpu")
        assert abs(c["rel_norm"] - c1["rel_norm"]) <= tol.rtol, c["name"]


@pytest.mark.parametrize("flags,match", [
    (("--processes", "2"), "--processes needs --data-parallel N"),
    (("--data-parallel", "8", "--processes", "3"), "the mesh's 8 devices do not split evenly over 3 processes"),
], ids=["without-data-parallel", "uneven"])
def test_cli_processes_errors_are_one_line(flags, match):
    assert match in one_line_error(_cli("check", "mlp", "--dtype", "float32", "--no-layers", *flags))
