"""PyTorch reference models (channels-first, NCHW)."""
from torch_ref.cnn import CNN
from torch_ref.mlp import ExplicitMLP
from torch_ref.unet import UNet

__all__ = ["CNN", "ExplicitMLP", "UNet"]
