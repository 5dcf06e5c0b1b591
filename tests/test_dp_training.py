"""Data-parallel training parity: torch DDP (gloo, 2 local processes) against the Flax train step
on a batch sharded over 2 simulated devices; the planted replica mistakes are named."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def child():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "dp_train_child.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
