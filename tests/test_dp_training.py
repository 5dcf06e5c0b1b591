"""Data-parallel training parity: torch DDP (gloo, 2 local processes) against the Flax train step
on a batch sharded over 2 simulated devices; the planted replica mistakes are named."""
from __future__ import annotations

import pytest

from child_process import once_per_run, run_json_child


@pytest.fixture(scope="module")
def child():
    # once per run, not once per xdist worker that gets some of these tests (~30 s of CPU)
    return once_per_run("dp_train_child", lambda _: run_json_child("dp_train_child.py", devices=2, timeout=600))


@pytest.mark.parametrize("case,steps,loss", [("mlp", 3, "cross_entropy"), ("mlp_mse", 2, "mse")])
def test_ddp_and_sharded_flax_agree_per_step(child, case, steps, loss):
    res = child[case]
    assert res["steps"] == steps and res["loss"] == loss
    assert res["ok"] and res["findings"] == [], res


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


def test_global_batchnorm_under_ddp_matches_sharded_flax(child):
    """The same Conv+BN model and data as the per-replica case, its BatchNorm all-reducing the
    statistics over the gloo group (SyncBatchNorm's semantics on CPU): every step passes, the
    running statistics compared at each."""
    res = child["convbn_global"]
    assert res["stats"] == [2, 2]  # running_mean and running_var compared per step
    assert res["ok"] and res["findings"] == [], res


def test_own_pair_pytree_inputs_rename_mse(child):
    """Your own pair as `parity train --torch/--flax/--example-input --loss mse` passes it: token
    ids and a mask (a tuple of inputs, split row-wise over the replicas), renamed Flax modules."""
    res = child["own_pair_tokens"]
    assert res["steps"] == 2 and res["loss"] == "mse"
    assert res["ok"] and res["findings"] == [], res


# --- noise floors (parity.training.noise) under data_parallel: attention trained with Adam --------
NOISY = "update attn.in_proj_bias"  # the key third of it has a zero-in-theory gradient


@pytest.mark.parametrize("case", ["mha_adam_float64", "mha_adam_float32", "single_head_adam_float64"])
def test_correct_attention_twin_with_adam_passes_under_ddp(child, case):
    """The key bias's gradient is rounding noise that Adam normalises into lr-sized steps drawn
    differently by each side: judged by the single-device floors, fed with torch's DDP-averaged
    gradients, every step passes, and the floor was used (on the key bias only) at every step."""
    res = child[case]
    assert res["ok"] and res["findings"] == [], res
    param = "update k.bias" if case.startswith("single_head") else NOISY
    assert res["noisy"] == [[param]] * 3
    assert any(n.startswith("gradient noise:") for n in res["notes"])
    if case.startswith("single_head"):  # k.bias is noise alone: below its floor at every step
        assert res["below_floor"] == [[param]] * 3


def test_without_the_gradient_floor_the_ddp_key_bias_fails(child):
    """The same records judged with NOISE_FLOORS[GRAD] zeroed (what the data-parallel path did
    before it used the floors): the key bias fails, and only it."""
    res = child["single_head_adam_float64_no_floor"]
    assert not res["ok"] and res["first_failure"] == 1
    assert res["failed"][0] == ["update k.bias"]


def test_zero_in_theory_running_mean_passes_under_ddp(child):
    """BatchNorm after BatchNorm, global statistics on both sides (tests/dp_models.py): bn2's
    running_mean is rounding noise, judged by the statistics floor (below it) at every step;
    without that floor it fails, and only it."""
    res, bare = child["double_norm"], child["double_norm_no_floor"]
    assert res["ok"] and res["findings"] == [] and res["stats"] == [4] * 3, res
    assert all("bn2.running_mean" in names for names in res["below_floor"])
    assert not bare["ok"] and bare["first_failure"] == 1
    assert bare["failed"][0] == ["bn2.running_mean"]


def test_adam_eps_placement_under_ddp_fails_and_is_named(child):
    """optax.adam(eps=0, eps_root=1e-8) for torch's eps outside the root: the real updates of
    step 1 differ (the loss of step 1 does not), not hidden by the noise allowance; the replay of
    Flax's trajectory names the convention, as on one device."""
    res = child["mha_adam_eps_inside_sqrt"]
    assert not res["ok"] and res["first_failure"] == 1
    assert "loss" not in res["failed"][0]
    assert {"update attn.in_proj_weight", "update head.weight"} <= set(res["failed"][0])
    named = [f for f in res["findings"] if f.startswith("optimizer convention:")]
    assert named and "Adam eps placement" in named[0], res["findings"]


def test_summed_loss_with_adam_under_ddp_is_named(child):
    """Adam's step barely changes when the loss is doubled, but the loss and gradient norm do."""
    res = child["single_head_adam_summed_loss"]
    assert not res["ok"] and res["first_failure"] == 1
    assert {"loss", "grad_norm"} <= set(res["failed"][0])
    assert any("summed over the 2 replicas instead of averaged" in f for f in res["findings"])


# --- the workers' exit -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exit_child():
    return once_per_run("dp_exit_child", lambda _: run_json_child("dp_exit_child.py", devices=2, timeout=300))


def test_results_sent_before_the_workers_die_at_exit_still_give_a_verdict(exit_child):
    """Both DDP workers abort at exit after rank 0 sent every step's records (the crash gloo's
    teardown sometimes gives): the check still ends in its verdict, with one DDPExitWarning per
    dead rank, instead of an error that loses the results."""
    res = exit_child["dies_at_exit"]
    assert res["ok"] and res["steps"] == 2 and res["findings"] == [], res
    dead = [message for category, message in res["warnings"] if category == "DDPExitWarning"]
    assert len(dead) == 2 and all("results are kept" in m for m in dead), res["warnings"]


def test_workers_that_die_before_sending_end_in_an_error(exit_child):
    """Nothing sent, nothing judged: the error names the rank and its exit code."""
    error = exit_child["dies_in_step"]["error"]
    assert error is not None and "exited with 3" in error and "0 of 1 jobs were sent" in error, error


def test_train_check_keyword_dispatches_to_ddp():
    """parity.train_check(..., data_parallel=N) takes the DDP path: in this 1-device process it
    stops at the mesh with the named error, before any worker process starts."""
    import numpy as np

    import parity
    from parity.data_parallel import DataParallelError
    from parity.registry import PAIRS

    pair = PAIRS["mlp"]
    tm, fm = pair.build(pair.config("tiny"))
    data = [(np.zeros((64, 4)), np.zeros(64, dtype=np.int64))]
    with pytest.raises(DataParallelError, match="data_parallel=64 needs 64 devices"):
        parity.train_check(tm, fm, data, steps=1, input_layout="as_is", data_parallel=64)


@pytest.mark.parametrize("argv", [
    ["mlp"],
    ["--torch", "planted:make_torch_tokens", "--flax", "planted:make_flax_tokens_renamed", "--example-input",
     "planted:example_tokens", "--rename", "emb=tok", "--rename", "head=out_proj", "--layout", "input[1]=as_is",
     "--output-layout", "as_is", "--loss", "mse"],
], ids=["registry-pair", "own-pair"])
def test_cli_train_data_parallel_reaches_the_ddp_path(capsys, monkeypatch, argv):
    """`parity train ... --data-parallel 2`, registry or own pair, goes through
    train_check(data_parallel=2): in this 1-device process it stops at the mesh (exit 2, the
    device error), past the pair's loading and the data."""
    import os
    from pathlib import Path

    from parity.cli import main

    monkeypatch.chdir(Path(__file__).parent)  # planted.py is found like a user's module in the cwd
    # the command asks for simulated devices through XLA_FLAGS: restored after this test
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    assert main(["train", *argv, "--steps", "1", "--data-parallel", "2"]) == 2
    assert "data_parallel=2 needs 2 devices" in capsys.readouterr().err
