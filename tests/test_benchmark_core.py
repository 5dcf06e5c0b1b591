"""parity.benchmark: timing statistics, device selection, configs, first-result check, report files.

Fast (tiny MLP only); never imports bench/ (the benchmark suite itself).
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity.benchmark import (BenchConfig, BenchResult, DeviceError, Timing, check_first_value,
                              cpu_config, make_step, measure, prepare, run_benchmarks, select_device,
                              summarize)
from parity.benchmark.report import file_stem, markdown, write_report
from parity.benchmark.runner import environment
from parity.benchmark.workloads import VariantUnavailable
from parity.registry import PAIRS


def test_summarize_median_and_quartiles():
    med, q1, q3 = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (med, q1, q3) == (3.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        summarize([])


def test_measure_times_first_call_apart_and_keeps_warmup_untimed():
    ticks = itertools.count()
    clock = lambda: float(next(ticks))  # noqa: E731 - every clock read advances one "second"
    calls = []
    t = measure(lambda: calls.append(1), warmup=2, min_rounds=3, max_rounds=3, min_time_s=0.0, clock=clock)
    assert len(calls) == 1 + 2 + 3
    assert t.rounds == 3 and len(t.warmup_s) == 2
    assert t.first_call_s == 1.0 and t.median_s == 1.0 and t.iqr_s == 0.0


def test_measure_adds_rounds_until_min_time():
    ticks = itertools.count()
    t = measure(lambda: None, warmup=0, min_rounds=2, max_rounds=50, min_time_s=10.0,
                clock=lambda: float(next(ticks)))
    assert t.rounds == 10


def test_unknown_or_missing_devices_are_one_line_errors():
    with pytest.raises(DeviceError):
        select_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda"):
            select_device("cuda")
    assert select_device("cpu").describe()["jax_backend"] == "cpu"


def test_cli_cuda_without_cuda_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from parity.cli import main

    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parity: error:") and "\n" not in err


def test_cpu_configs_are_valid_and_smaller_than_full():
    for pair in PAIRS.values():
        cfg = cpu_config(pair)
        if pair.family == "unet":
            assert cfg.image_size <= 140 and max(cfg.channels) <= 128
            cfg.output_size(cfg.image_size)  # raises if the unpadded UNet cannot take this size


def test_bench_config_rejects_bad_input():
    with pytest.raises(ValueError):
        BenchConfig(batches=(0,))
    with pytest.raises(ValueError):
        BenchConfig(variants=("torch-jit",))


def test_train_steps_start_from_the_same_loss():
    device = select_device("cpu")
    pair = PAIRS["mlp"]
    prep = prepare(pair, pair.config("tiny"), 3, device)
    jax_step, torch_step = make_step(prep, "jax-jit", "train"), make_step(prep, "torch-eager", "train")
    for step in (jax_step, torch_step):
        step()
        step()  # a second step must not change the recorded first value
    ok, text = check_first_value(jax_step.first_value(), torch_step.first_value(), "float32")
    assert ok, text
    with pytest.raises(VariantUnavailable):
        make_step(prep, "torch-channels_last", "forward")  # [N, F] input
    assert jax_step.flops()[0] and torch_step.flops()[0]


def test_jax_step_counts_flops_before_backend_rewrites_and_its_own_peak():
    """Seen on an H200: the compiled module's convolutions are cuDNN custom calls that XLA's
    count omits (0.047 GFLOP for an 814 GFLOP UNet step), and memory_stats()'s peak is
    process-wide, so every row after the UNet reported the UNet's 18 GiB. The step now counts the
    lowered HLO and reads the executable's own memory analysis."""
    device = select_device("cpu")
    pair = PAIRS["cnn"]
    big = jax.device_put(jnp.zeros((64, 2**20), jnp.float32))  # 256 MiB held across the step
    prep = prepare(pair, pair.config("tiny"), 2, device)
    step = make_step(prep, "jax-jit", "forward")
    step()
    flops, source = step.flops()
    assert flops and "before backend rewrites" in source
    # Same order as torch's own count (XLA skips the taps that fall on zero padding and counts
    # elementwise ops; torch counts matmul/conv only): the GPU bug was a factor of 17000.
    torch_flops = make_step(prep, "torch-eager", "forward").flops()[0]
    assert 0.5 * torch_flops <= flops <= 2 * torch_flops
    peak, peak_source = step.peak_bytes()
    param_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(prep.variables))
    assert peak_source.startswith("XLA compiled.memory_analysis()")
    assert param_bytes <= peak < big.nbytes
    big.delete()


def test_run_and_report_write_named_files(tmp_path):
    device = select_device("cpu")
    cfg = BenchConfig(models=("mlp",), batches=(2,), size="tiny",
                      variants=("torch-eager", "torch-channels_last", "jax-jit"),
                      warmup=0, min_rounds=1, max_rounds=1, min_time_s=0.0)
    results, gates = run_benchmarks(cfg, device, log=lambda s: None)
    assert all(g.ok for g in gates)
    status = {(r.phase, r.variant): r.status for r in results}
    assert status[("train", "jax-jit")] == "ok" and status[("train", "torch-channels_last")] == "n/a"
    paths = write_report(results, gates, environment(device, cfg), tmp_path, quick=True)
    for path in paths.values():
        assert path.exists() and path.stat().st_size > 0
        assert "cpu-" in path.name and "threads_float32_torch-" in path.name and "_jax-" in path.name and path.stem.endswith("_quick")
    # A CPU has no peak table entry: MFU n/a, and the report says why.
    assert all(r.mfu is None for r in results)
    assert "MFU n/a: no peak table for CPUs" in paths["markdown"].read_text()


def test_mfu_uses_one_flop_count_per_row_against_the_given_peak():
    device = select_device("cpu")
    cfg = BenchConfig(models=("mlp",), batches=(2,), size="tiny", phases=("forward",),
                      variants=("torch-eager", "jax-jit"), peak_tflops=0.5,
                      warmup=0, min_rounds=1, max_rounds=1, min_time_s=0.0)
    results, _ = run_benchmarks(cfg, device, log=lambda s: None)
    assert len({r.model_flops for r in results}) == 1 and results[0].model_flops
    for r in results:
        assert r.mfu == r.model_flops / r.median_s / 0.5e12
    env = environment(device, cfg)
    assert env["peak"]["tflops"] == 0.5 and "--peak-tflops" in env["peak"]["source"]
    assert "| MFU |" in markdown(results, env, ["torch-eager", "jax-jit"])


def _result(variant: str, median: float, status: str = "ok") -> BenchResult:
    t = Timing(1.0, (), (median,), median, median * 0.9, median * 1.1) if status == "ok" else None
    return BenchResult("cnn", "forward", 8, variant, "float32", status, timing=t,
                       reason="" if status == "ok" else "boom")


def test_markdown_ratios_to_the_fastest_in_the_row():
    env = environment(select_device("cpu"), BenchConfig())
    rows = [_result("torch-eager", 0.004), _result("jax-jit", 0.002), _result("torch-compile", 0, "failed")]
    text = markdown(rows, env, ["torch-eager", "torch-compile", "jax-jit"])
    line = next(l for l in text.splitlines() if l.startswith("| cnn | forward | 8 |"))
    assert "2.00x" in line and "**2 (0.4) 1.00x**" in line and "failed" in line
    assert "torch-compile: failed: boom" in text
    assert file_stem(env, "bfloat16").startswith(f"cpu-{env['threads']['torch_intra_op']}threads_bfloat16_torch-")


def test_timing_dict_round_trips_numbers():
    t = Timing(2.0, (1.0,), (0.1, 0.3), 0.2, 0.15, 0.25)
    d = t.to_dict()
    assert np.isclose(d["iqr_s"], 0.1) and d["rounds"] == 2
    assert dataclasses.asdict(t)["first_call_s"] == 2.0


def test_labelled_bfloat16_run_passes_its_gate_and_is_named_so():
    """The --bf16 run: weights and inputs in bfloat16 on both sides, gated by a bfloat16 check
    (numpy does not count bfloat16 as floating: an engine that asks numpy gives it no cotangent)."""
    device = select_device("cpu")
    cfg = BenchConfig(models=("mlp",), batches=(2,), size="tiny", dtype="bfloat16", phases=("train",),
                      variants=("torch-eager", "jax-jit"), warmup=0, min_rounds=1, max_rounds=1,
                      min_time_s=0.0)
    results, gates = run_benchmarks(cfg, device, log=lambda s: None)
    assert [g.dtype for g in gates] == ["bfloat16"] and all(g.ok for g in gates), gates
    assert {r.status for r in results} == {"ok"} and {r.dtype for r in results} == {"bfloat16"}
