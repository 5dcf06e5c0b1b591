"""A bfloat16 port holds bfloat16 bytes only: no float32 round trip (same bits, twice the memory)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 1.1x the model's bytes: the one converted copy (Linear kernels are transposed, so they cannot be
# views) plus allocator slack; a float32 round trip needs at least 2x more on top.
BF16_PORT_PEAK_FACTOR = 1.1


def test_bf16_port_peak_memory_is_one_bf16_copy():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "bf16_memory_child.py"), "2048", "8"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dtypes"] == ["bfloat16"]
    assert result["peak_growth"] <= BF16_PORT_PEAK_FACTOR * result["model_bytes"], (
        f"peak RSS grew {result['peak_growth'] >> 20} MiB porting a {result['model_bytes'] >> 20} MiB "
        "bfloat16 model")
