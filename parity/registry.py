"""The one registry of model pairs that tests, the CLI and the benchmarks all iterate over."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from model_configs import CNNConfig, MLPConfig, UNetConfig, ViTConfig
# weight_port.layout's two layout names, spelled here because importing weight_port imports torch
# and the registry must stay light (``parity --help``); tests/test_runtime_layout.py pins them equal.
CHANNELS_FIRST = "NC..."
AS_IS = "as_is"


def _mlp_input(cfg: MLPConfig, batch: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((batch, cfg.in_features))


def _image_input(cfg: CNNConfig | UNetConfig | ViTConfig, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Square images [N, C, H, W] (torch layout) of the config's channels and size."""
    return rng.standard_normal((batch, cfg.in_channels, cfg.image_size, cfg.image_size))


@dataclass(frozen=True)
class ModelPair:
    """A torch model and its Flax twin (Linen or NNX), built from one config, with its facts.

    make_input(config, batch, rng) returns a float64 array in torch layout ([N, F] or
    [N, C, H, W]). input_layout / output_layout: the torch-side layout of the input and of the
    output (weight_port.layout; output_layout None means "as input_layout"). loss: what the
    output is for training ("cross_entropy" on logits, "nll" on log-probabilities, "mse").
    train_mode: whether train and eval differ (BatchNorm, dropout): a bool, or a callable of the
    config. train_kwarg: the twin's train-mode keyword when its signature does not say.
    bench_batch: batch sizes per config size for the benchmarks.
    """

    name: str
    tiny: Callable[[], Any]
    full: Callable[[], Any]
    torch_cls: Callable[[], Any]
    flax_cls: Callable[[], Any]
    make_input: Callable[[Any, int, np.random.Generator], np.ndarray]
    input_layout: str
    output_layout: str | None = None
    loss: str = "cross_entropy"
    train_mode: bool | Callable[[Any], bool] = False
    train_kwarg: str | None = None
    bench_batch: dict[str, int] = field(default_factory=lambda: {"tiny": 2, "full": 1})

    @property
    def family(self) -> str:
        return self.name.split("-")[0]

    @property
    def layout(self) -> str:
        """The input layout (the name older callers use)."""
        return self.input_layout

    def out_layout(self) -> str:
        return self.output_layout or self.input_layout

    def config(self, size: str = "tiny"):
        if size not in ("tiny", "full"):
            raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
        return self.tiny() if size == "tiny" else self.full()

    def build(self, config=None, *, seed: int = 0):
        """(torch_module, flax_module): torch weights from torch.manual_seed(seed)."""
        import torch

        config = config if config is not None else self.tiny()
        torch.manual_seed(seed)
        return self.torch_cls()(config), self.flax_cls()(config)

    def example_input(self, config=None, *, batch: int = 2, seed: int = 0) -> np.ndarray:
        config = config if config is not None else self.tiny()
        return self.make_input(config, batch, np.random.default_rng(seed))

    def train_matters(self, config=None) -> bool:
        """Whether train mode computes something else than eval mode for this config."""
        config = config if config is not None else self.tiny()
        return bool(self.train_mode(config) if callable(self.train_mode) else self.train_mode)

    def modes(self, config=None) -> list[bool]:
        """train flags worth checking: [False], or [False, True] when train mode matters."""
        return [False, True] if self.train_matters(config) else [False]

    def has_batch_norm(self, config=None) -> bool:
        return bool(getattr(config if config is not None else self.tiny(), "batch_norm", False))


def _torch(name: str):
    import torch_ref

    return getattr(torch_ref, name)


def _flax(name: str):
    import flax_impl

    return getattr(flax_impl, name)


def _unet(name: str, **kw) -> ModelPair:
    return ModelPair(
        name=name,
        tiny=partial(UNetConfig.tiny, **kw),
        full=partial(UNetConfig.full, **kw),
        torch_cls=partial(_torch, "UNet"),
        flax_cls=partial(_flax, "UNet"),
        make_input=_image_input,
        input_layout=CHANNELS_FIRST,
        output_layout=CHANNELS_FIRST,  # per-pixel logits [N, classes, H, W]
        loss="cross_entropy",
        train_mode=lambda cfg: bool(cfg.batch_norm),
    )


PAIRS: dict[str, ModelPair] = {
    p.name: p
    for p in (
        ModelPair("mlp", MLPConfig.tiny, MLPConfig.full, partial(_torch, "ExplicitMLP"),
                  partial(_flax, "ExplicitMLP"), _mlp_input, AS_IS, loss="cross_entropy"),
        # The CNN ends in log_softmax: its output is log-probabilities [N, classes].
        ModelPair("cnn", CNNConfig.tiny, CNNConfig.full, partial(_torch, "CNN"),
                  partial(_flax, "CNN"), _image_input, CHANNELS_FIRST, output_layout=AS_IS, loss="nll"),
        _unet("unet-valid", padding="valid"),
        _unet("unet-same", padding="same"),
        _unet("unet-same-bn", padding="same", batch_norm=True),
        _unet("unet-valid-retain", padding="valid", retain_dim=True),
        # The stock nn.ConvTranspose up-sampling (the twin's default is the sub-pixel form of the
        # same math): kept so the benchmark shows what a naive port costs, side by side.
        _unet("unet-same-convtranspose", padding="same", upsample="conv_transpose"),
        # A small ViT whose Flax twin is written in NNX: patch conv (image in, channels-first),
        # tokens [N, T, D] inside, logits [N, classes] out. No dropout or BatchNorm: one mode.
        ModelPair("vit", ViTConfig.tiny, ViTConfig.full, partial(_torch, "ViT"), partial(_flax, "ViT"),
                  _image_input, CHANNELS_FIRST, output_layout=AS_IS, loss="cross_entropy"),
    )
}


def select(names: list[str] | tuple[str, ...] | str) -> list[ModelPair]:
    """Pairs by exact name or family ("unet" selects every unet-*); "all" selects everything."""
    if isinstance(names, str):
        names = [names]
    chosen: list[ModelPair] = []
    for name in names:
        hits = list(PAIRS.values()) if name == "all" else [
            p for p in PAIRS.values() if p.name == name or p.family == name
        ]
        if not hits:
            raise KeyError(f"unknown model {name!r}; choose from all, {', '.join(sorted({p.family for p in PAIRS.values()} | set(PAIRS)))}")
        chosen.extend(p for p in hits if p not in chosen)
    return chosen
