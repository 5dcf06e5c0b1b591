"""A bfloat16 port holds bfloat16 bytes only: no float32 round trip (same bits, twice the memory)."""
from __future__ import annotations

from child_process import run_json_child

# 1.1x the model's bytes: the one converted copy (Linear kernels are transposed, so they cannot be
# views) plus allocator slack; a float32 round trip needs at least 2x more on top.
BF16_PORT_PEAK_FACTOR = 1.1


def test_bf16_port_peak_memory_is_one_bf16_copy():
    result = run_json_child("bf16_memory_child.py", "2048", "8", timeout=120)
    assert result["dtypes"] == ["bfloat16"]
    assert result["peak_growth"] <= BF16_PORT_PEAK_FACTOR * result["model_bytes"], (
        f"peak RSS grew {result['peak_growth'] >> 20} MiB porting a {result['model_bytes'] >> 20} MiB "
        "bfloat16 model")
