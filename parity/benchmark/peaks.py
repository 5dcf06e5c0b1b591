"""Peak dense TFLOP/s per accelerator and precision, for the benchmark's MFU column.

MFU = model FLOPs per step / median step time / the card's peak for the precision that was
timed. Values are the vendors' datasheet numbers *without* 2:4 sparsity (datasheets often
print the sparse figure, twice these). float32 is timed with TF32 off (JAX 'highest', torch
allow_tf32=False), so its peak is the non-tensor-core FP32 rate; "tf32" is the tensor-core rate.
"""
from __future__ import annotations

import re

# (pattern on the device name, label, {precision: peak dense TFLOP/s}). First match wins, so
# the more specific names (H100 NVL, H100 PCIe) come before the generic H100 (SXM).
_PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"H200 NVL", "H200 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5}),
    (r"H200", "H200 SXM", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
    (r"H100 NVL", "H100 NVL", {"float32": 60.0, "tf32": 417.5, "bfloat16": 835.5}),
    (r"H100 PCIe", "H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    (r"H100", "H100 SXM", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
    (r"A100", "A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
)


def peak_tflops(device_name: str | None, precision: str, override: float | None = None
                ) -> tuple[float | None, str]:
    """(peak dense TFLOP/s or None, where it came from or why there is none).

    precision: "float32" (TF32 off), "tf32" or "bfloat16". ``override`` (the --peak-tflops
    flag) wins over the table.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return override, f"--peak-tflops {override:g}"
    if not device_name:
        return None, "device name unknown; give --peak-tflops"
    for pattern, label, peaks in _PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if precision not in peaks:
                return None, f"no {precision} peak for {label} in parity/benchmark/peaks.py"
            return peaks[precision], f"{label} datasheet, dense {precision}"
    return None, f"{device_name!r} is not in parity/benchmark/peaks.py; give --peak-tflops"


def mfu(model_flops: int | None, seconds: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when any input is missing)."""
    if not model_flops or not seconds or not peak:
        return None
    return model_flops / seconds / (peak * 1e12)
