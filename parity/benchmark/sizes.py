"""Benchmark sizes per model family: CPU-sized and accelerator-sized configs and batches.

These are model facts the registry should carry (STYLE.md 16): a pair's ``bench_batch["gpu"]``
wins where the registry declares it; until every pair does, GPU batches live here, keyed by the
registry family, and nothing else in the benchmark asks which family a model is.
"""
from __future__ import annotations

import dataclasses

from model_configs import UNetConfig, ViTConfig

# --size gpu: one batch per family. UNet at 3x256x256 batch 8 and ViT-B/16 at batch 32 (the
# issue's sizes); MLP and CNN are small enough that only large batches keep a GPU busy.
GPU_BATCHES: dict[str, tuple[int, ...]] = {"unet": (8,), "vit": (32,), "cnn": (512,), "mlp": (4096,)}
GPU_DEFAULT_BATCHES = (32,)


def _valid_unet_size(cfg: UNetConfig, at_least: int) -> UNetConfig:
    """The smallest image size >= at_least that an unpadded (valid) UNet accepts."""
    size = at_least
    while True:
        try:
            cfg.output_size(size)
            return dataclasses.replace(cfg, image_size=size)
        except ValueError:
            size += 1


def cpu_config(pair):
    """A config that runs in seconds per step on a few CPU cores but is not toy-sized:
    MLP and CNN at their full (paper) sizes; UNets with channels (16, 32, 64, 128) at ~128 px;
    the ViT at ViT-Ti/16 size (DeiT-Tiny: dim 192, 12 blocks, 3 heads, 224 px), since a
    ViT-B/16 train step takes seconds on two cores."""
    full = pair.config("full")
    if isinstance(full, ViTConfig):
        return dataclasses.replace(full, dim=192, heads=3, mlp_dim=768)
    if not isinstance(full, UNetConfig):
        return full
    cfg = dataclasses.replace(full, in_channels=3, channels=(16, 32, 64, 128), image_size=128)
    return _valid_unet_size(cfg, 128) if cfg.padding == "valid" else cfg


def gpu_config(pair):
    """Accelerator sizes: every model at its full config; UNets with 3 input channels at 256 px
    (paper channels; an unpadded UNet at the smallest size >= 256 it accepts)."""
    full = pair.config("full")
    if not isinstance(full, UNetConfig):
        return full
    cfg = dataclasses.replace(full, in_channels=3, image_size=256)
    return _valid_unet_size(cfg, 256) if cfg.padding == "valid" else cfg


def sized_config(pair, size: str):
    """The config of ``pair`` for a benchmark size (tiny, cpu, full or gpu)."""
    if size == "cpu":
        return cpu_config(pair)
    if size == "gpu":
        return gpu_config(pair)
    return pair.config(size)


def default_batches(pair, size: str, on_cpu: bool, quick: bool) -> tuple[int, ...]:
    """Batch sizes when neither --batch nor --model-batch names them."""
    if quick:
        return (2,)
    if size == "gpu":
        # A registry entry that declares its GPU batch wins over the family table.
        declared = (getattr(pair, "bench_batch", None) or {}).get("gpu")
        if declared is not None:
            return tuple(declared) if isinstance(declared, (tuple, list)) else (int(declared),)
        return GPU_BATCHES.get(pair.family, GPU_DEFAULT_BATCHES)
    return (2, 8) if on_cpu else (8, 32)


def parse_model_batches(specs: list[str]) -> dict[str, tuple[int, ...]]:
    """['unet=8', 'mlp=1024,4096'] -> {'unet': (8,), 'mlp': (1024, 4096)}; ValueError names the bad one."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        try:
            batches = tuple(int(v) for v in values.split(",")) if sep and name else ()
        except ValueError:
            batches = ()
        if not batches or any(b < 1 for b in batches):
            raise ValueError(f"--model-batch {spec!r}: expected MODEL=N[,N...] with positive N, e.g. unet=8")
        out[name] = batches
    return out
