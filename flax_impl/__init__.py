"""Flax twins of torch_ref (Linen; the ViT in NNX), channels-last (NHWC), same submodule names."""
from flax_impl.cnn import CNN
from flax_impl.mlp import ExplicitMLP
from flax_impl.unet import UNet
from flax_impl.vit import ViT

__all__ = ["CNN", "ExplicitMLP", "UNet", "ViT"]
