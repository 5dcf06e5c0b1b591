"""Framework-free config dataclasses, one per model, shared by the torch and Flax twins."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MLPConfig:
    """The Flax-basics ExplicitMLP: Dense per entry of ``features``, relu between."""

    in_features: int = 4  # torch needs it up front; Flax infers it at init
    features: tuple[int, ...] = (3, 4, 5)

    @classmethod
    def tiny(cls) -> "MLPConfig":
        # Hidden layers of 3-4 ReLU units were all dead on the seeded example input, so the
        # check compared zeros (the all-zero gradient warnings said so); 8 units keep them alive.
        return cls(in_features=4, features=(8, 8, 5))

    @classmethod
    def full(cls) -> "MLPConfig":
        return cls(in_features=784, features=(1024, 1024, 10))


@dataclass(frozen=True)
class CNNConfig:
    """The classic Flax MNIST CNN: conv-relu-avgpool x2, flatten, dense-relu, dense, log_softmax."""

    in_channels: int = 1
    image_size: int = 28  # must be divisible by 4 (two 2x2 average pools)
    features: tuple[int, int] = (32, 64)
    hidden: int = 256
    num_classes: int = 10

    @classmethod
    def tiny(cls) -> "CNNConfig":
        return cls(image_size=12, features=(4, 8), hidden=16, num_classes=10)

    @classmethod
    def full(cls) -> "CNNConfig":
        return cls()

    @property
    def flat_features(self) -> int:
        side = self.image_size // 4
        return self.features[1] * side * side


@dataclass(frozen=True)
class UNetConfig:
    """A configurable UNet.

    padding="valid": the original paper (unpadded 3x3 convs, encoder features center-cropped to
    the decoder size before concatenation, 2x2 stride-2 transposed convs).
    padding="same": padded 3x3 convs and 3x3 stride-2 transposed convs (padding 1,
    output_padding 1), so every skip connection lines up without cropping.
    """

    in_channels: int = 1
    num_classes: int = 2
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024)
    padding: Literal["valid", "same"] = "valid"
    batch_norm: bool = False
    retain_dim: bool = False  # bilinear resize of the output to the input size
    image_size: int = 572  # the size the example-input maker uses
    # How the Flax twin computes its stride-2 transposed convs (torch ignores it): "subpixel" is
    # one stride-1 conv + depth-to-space (flax_impl.subpixel); "conv_transpose" is Flax's stock
    # nn.ConvTranspose, a conv over the zero-dilated input whose backward XLA:CPU runs ~10-20x
    # slower (the whole CPU train step ~2x; bench/unet_upsample.py). Same parameters, same math.
    upsample: Literal["subpixel", "conv_transpose"] = "subpixel"

    def __post_init__(self) -> None:
        if self.padding not in ("valid", "same"):
            raise ValueError(f"UNetConfig.padding must be 'valid' or 'same', got {self.padding!r}")
        if self.upsample not in ("subpixel", "conv_transpose"):
            raise ValueError(f"UNetConfig.upsample must be 'subpixel' or 'conv_transpose', got {self.upsample!r}")
        if len(self.channels) < 2:
            raise ValueError(f"UNetConfig.channels needs at least 2 levels, got {self.channels!r}")

    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        base = dict(in_channels=2, num_classes=3, channels=(4, 8, 16))
        base.update(overrides)
        base.setdefault("image_size", 60 if base.get("padding", "valid") == "valid" else 16)
        return cls(**base)

    @classmethod
    def full(cls, **overrides) -> "UNetConfig":
        base: dict = dict()
        base.update(overrides)
        base.setdefault("image_size", 572 if base.get("padding", "valid") == "valid" else 256)
        return cls(**base)

    def output_size(self, size: int) -> int:
        """Spatial output size for a square input of ``size`` (before retain_dim)."""
        if self.padding == "same":
            return size
        levels = len(self.channels)
        for _ in range(levels - 1):
            size -= 4
            if size <= 0 or size % 2:
                raise ValueError("input too small or odd before a pool")
            size //= 2
        size -= 4
        for _ in range(levels - 1):
            size = size * 2 - 4
        if size <= 0:
            raise ValueError("input too small for this UNet")
        return size


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer: patch conv stem, class token, pre-LN blocks, head on the class token.

    full() is ViT-B/16 (image 224, patch 16, dim 768, depth 12, heads 12, mlp 3072).
    """

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig: dim={self.dim} is not divisible by heads={self.heads}")

    @classmethod
    def tiny(cls, **overrides) -> "ViTConfig":
        base = dict(image_size=16, patch_size=4, in_channels=3, dim=16, depth=2, heads=2,
                    mlp_dim=32, num_classes=10)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def full(cls, **overrides) -> "ViTConfig":
        return cls(**overrides)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2
