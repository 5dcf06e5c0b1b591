"""Flax (Linen) twins of torch_ref, channels-last (NHWC), with the same submodule names."""
from flax_impl.cnn import CNN
from flax_impl.mlp import ExplicitMLP
from flax_impl.unet import UNet

__all__ = ["CNN", "ExplicitMLP", "UNet"]
