"""The benchmark's vocabulary (variants, phases, sizes), framework-free so the CLI parser is instant."""
from __future__ import annotations

VARIANTS = ("torch-eager", "torch-channels_last", "torch-compile", "jax-jit")
PHASES = ("forward", "train")
# tiny: registry tiny configs (smoke runs); cpu: CPU-sized (runner.cpu_config); full: registry
# full / paper sizes; gpu: accelerator sizes with a batch per family (parity.benchmark.sizes).
SIZES = ("tiny", "cpu", "full", "gpu")
DTYPES = ("float32", "bfloat16")
