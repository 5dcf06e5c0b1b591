"""scripts/gpu_check.sh and what it relies on: GPU sizes, per-model batches, the MFU peak table.

The script's full dry run (CPU, tiny sizes) runs in .ci/run, not here: it starts a dozen
interpreters. These tests cover its argument handling and the pieces it configures.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity.benchmark.peaks import mfu, peak_tflops
from parity.benchmark.runner import BenchConfig
from parity.benchmark.sizes import GPU_BATCHES, gpu_config, parse_model_batches
from parity.registry import PAIRS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PARITY_PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_script_usage_and_bad_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    help_ = _script("--help")
    assert help_.returncode == 0 and "--dry-run" in help_.stdout
    bad = _script("--bogus")
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_script_without_cuda_stops_with_a_clear_message():
    result = _script("--out", os.devnull)
    assert result.returncode != 0
    assert "sees no CUDA device" in result.stderr


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),  # must not fall into the generic H100 (SXM) entry
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
])
def test_peak_table_picks_the_most_specific_card(name, label):
    for precision in ("float32", "bfloat16"):
        value, source = peak_tflops(name, precision)
        assert value is not None and source.startswith(label + " ")
    # Tensor-core bf16 is always faster than plain fp32 (a swapped column would say otherwise).
    assert peak_tflops(name, "bfloat16")[0] > peak_tflops(name, "float32")[0]


def test_unknown_card_gets_mfu_na_with_the_reason():
    value, source = peak_tflops("Some Future GPU", "float32")
    assert value is None and "Some Future GPU" in source and "--peak-tflops" in source
    assert peak_tflops("Some Future GPU", "float32", override=123.0) == (123.0, "--peak-tflops 123")
    assert mfu(2 * 10**12, 1.0, None) is None
    assert mfu(2 * 10**12, 1.0, 4.0) == 0.5
    with pytest.raises(ValueError, match="--peak-tflops"):
        peak_tflops("NVIDIA H100 PCIe", "float32", override=0.0)


def test_gpu_sizes_and_per_model_batches():
    unet = PAIRS["unet-same"]
    cfg = gpu_config(unet)
    assert (cfg.in_channels, cfg.image_size, cfg.channels) == (3, 256, unet.config("full").channels)
    valid = gpu_config(PAIRS["unet-valid"])
    assert valid.image_size >= 256 and valid.output_size(valid.image_size) > 0
    gpu = BenchConfig(size="gpu", batches=())
    assert gpu.batches_for(unet, on_cpu=False) == GPU_BATCHES["unet"]
    assert gpu.batches_for(PAIRS["mlp"], on_cpu=False) == GPU_BATCHES["mlp"]
    # --model-batch: by pair name first, then family, then --batch.
    mb = parse_model_batches(["unet=4", "unet-same=16,32"])
    cfg = BenchConfig(size="gpu", batches=(2,), model_batches=mb)
    assert cfg.batches_for(unet) == (16, 32)
    assert cfg.batches_for(PAIRS["unet-valid"]) == (4,)
    assert cfg.batches_for(PAIRS["cnn"]) == (2,)
    for bad in ("unet", "unet=", "unet=0", "=8", "unet=a"):
        with pytest.raises(ValueError, match="--model-batch"):
            parse_model_batches([bad])
