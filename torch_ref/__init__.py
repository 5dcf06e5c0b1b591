"""PyTorch reference models (channels-first, NCHW)."""
from torch_ref.cnn import CNN
from torch_ref.mlp import ExplicitMLP
from torch_ref.unet import UNet
from torch_ref.vit import ViT

__all__ = ["CNN", "ExplicitMLP", "UNet", "ViT"]
