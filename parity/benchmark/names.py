"""The benchmark's vocabulary (variants, phases, sizes), framework-free so the CLI parser is instant."""
from __future__ import annotations

VARIANTS = ("torch-eager", "torch-channels_last", "torch-compile", "jax-jit")
PHASES = ("forward", "train")
# tiny: registry tiny configs (smoke runs); cpu: CPU-sized (runner.cpu_config); full: registry
# full / paper sizes; gpu: accelerator sizes with a batch per family (parity.benchmark.sizes).
SIZES = ("tiny", "cpu", "full", "gpu")
DTYPES = ("float32", "bfloat16")
# The pairs `parity bench` times when --models is not given (the stock-ConvTranspose UNet next
# to the sub-pixel one, so the cost of a naive port shows side by side), and with --quick.
DEFAULT_MODELS = ("mlp", "cnn", "unet-same", "unet-same-convtranspose", "unet-same-bn", "vit")
QUICK_MODELS = ("mlp", "cnn", "unet-same-bn", "vit")
