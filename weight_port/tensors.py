"""Moving tensors between torch, numpy and JAX without silent dtype changes.

bfloat16 has no numpy dtype in torch's eyes (``.numpy()`` raises), so it crosses as a bit view
(int16 <-> ml_dtypes.bfloat16): no float32 round trip, no copy.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

_BF16 = np.dtype(ml_dtypes.bfloat16)


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a copy only for non-CPU tensors). Keeps dtype and strides."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16)
    return t.numpy()


def numpy_to_torch(a: np.ndarray) -> torch.Tensor:
    """A torch tensor with ``a``'s dtype and values (copied, so the result is writable)."""
    a = np.array(a, copy=True, order="C")  # jax-backed arrays are read-only; torch wants writable
    if a.dtype == _BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(x) -> np.ndarray:
    """torch tensor, jax array or numpy array -> numpy array (no copy where avoidable)."""
    if isinstance(x, torch.Tensor):
        return torch_to_numpy(x)
    return np.asarray(x)
