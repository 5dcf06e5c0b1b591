"""Data-parallel parity on 8 simulated CPU devices (own process: XLA_FLAGS must precede JAX init),
and the clear errors in the 1-device main process."""
from __future__ import annotations

import pytest

from parity.checker import check
from parity.data_parallel import DataParallelError, data_mesh
from parity.registry import PAIRS

from child_process import once_per_run, run_json_child


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
