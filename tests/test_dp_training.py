"""Data-parallel training parity: torch DDP (gloo, 2 local processes) against the Flax train step
on a batch sharded over 2 simulated devices; the planted replica mistakes are named."""
from __future__ import annotations

import pytest

from child_process import run_json_child


@pytest.fixture(scope="module")
def child():
    return run_json_child("dp_train_child.py", devices=2, timeout=600)


def test_ddp_and_sharded_flax_agree_per_step(child):
    mlp = child["mlp"]
    assert mlp["steps"] == 3 and mlp["ok"], mlp
    assert mlp["findings"] == []


def test_loss_summed_across_replicas_is_named(child):
    res = child["mlp_summed_loss"]
    assert not res["ok"] and res["first_failure"] == 1
    assert any("summed over the 2 replicas instead of averaged" in f for f in res["findings"])
    assert not any("BatchNorm" in f for f in res["findings"])


def test_per_replica_batchnorm_is_named(child):
    res = child["convbn"]
    assert not res["ok"] and res["first_failure"] == 1
    finding = next(f for f in res["findings"] if f.startswith("step 1: BatchNorm bn:"))
    assert "per-replica" in finding and "SyncBatchNorm" in finding and "axis_name" in finding
    assert not any("summed" in f for f in res["findings"])
