"""Moving tensors between torch, numpy and JAX without silent dtype changes.

bfloat16 has no numpy dtype in torch's eyes (``.numpy()`` raises), so it crosses as a bit view
(int16 <-> ml_dtypes.bfloat16): no float32 round trip, no copy.
"""
from __future__ import annotations

import contextlib
import math

import ml_dtypes
import numpy as np
try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

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
    if torch is not None and isinstance(x, torch.Tensor):
        return torch_to_numpy(x)
    return np.asarray(x)


def _jax_keeps(dtype: np.dtype) -> bool:
    """Whether JAX can hold ``dtype`` as is (64-bit types need x64, else JAX narrows them)."""
    import jax

    return dtype.itemsize < 8 or bool(jax.config.jax_enable_x64)


def to_jax(a: np.ndarray, dtype=None, *, copy: bool = False):
    """One numpy array (often a lazy transpose/flip view of a torch tensor) -> a jax array.

    Does at most one copy. A C-contiguous input that needs no cast crosses by dlpack without any
    copy (the jax array then shares memory with the source tensor: pass copy=True if that tensor
    will be modified in place later). A strided view (a transposed kernel) is copied once by
    torch's blocked copy kernel and handed over by dlpack -- several times faster than numpy's
    np.ascontiguousarray followed by jnp.asarray's own copy (run it under single_threaded_torch
    when JAX work interleaves: see there). bfloat16 crosses as bits (ml_dtypes / torch
    bfloat16), never through float32.
    """
    import jax
    import jax.numpy as jnp

    if dtype is not None and np.dtype(dtype) != a.dtype:
        a = a.astype(dtype)  # the one copy (it is contiguous afterwards)
        copy = False  # ``a`` is ours now: nothing else can change it in place
    if jax.default_backend() != "cpu" or not _jax_keeps(a.dtype) or a.size == 0:
        return jnp.asarray(a)  # device transfer / x64-off narrowing: JAX's own rules apply
    t = torch_view(a)
    if not a.flags.c_contiguous and (t is None or a.size < 1 << 15):
        # small or negatively strided (np.flip) views: JAX's strided host transfer, one copy
        return jnp.asarray(a)
    if not a.flags.c_contiguous:
        # torch's blocked copy, then a zero-copy handover. (jnp.asarray of the view keeps
        # transfer staging buffers alive: on the ViT-L benchmark its peak RSS growth was ~1.3x
        # the model's bytes, this path's ~1.0x.)
        return jax.dlpack.from_dlpack(t.contiguous())
    if t is None:  # a dtype torch does not know: JAX's own conversion
        return jnp.asarray(a)
    if copy:
        t = t.clone()
    try:
        return jax.dlpack.from_dlpack(t)  # zero-copy: the jax array keeps ``t`` alive
    except Exception:  # unaligned or otherwise unsupported buffer: fall back to a copy
        return jnp.asarray(a)


@contextlib.contextmanager
def single_threaded_torch():
    """torch's intra-op threads set to 1 for the block, then restored.

    The port alternates torch copies with JAX calls tensor by tensor; torch's OpenMP workers
    spin-wait between parallel regions while JAX's own thread pool wakes, and on a small or busy
    machine the two pools starve each other (ViT-L, 2 cores: 6.8 s in ``.contiguous()`` instead
    of ~1 s). One thread per copy, with the plan's Flax trace on the other core, is faster.
    """
    if torch is None:  # nothing to starve
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_view(a: np.ndarray) -> torch.Tensor | None:
    """A torch tensor sharing ``a``'s memory (bfloat16 through an int16 bit view), or None."""
    if torch is None or any(s < 0 for s in a.strides):
        return None  # torch.from_numpy refuses negative strides (np.flip views)
    try:
        if a.dtype == _BF16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    except (TypeError, ValueError):
        return None


def all_finite(a: np.ndarray) -> bool:
    """True when ``a`` holds no NaN/Inf, without allocating a mask as large as ``a``.

    Any NaN or Inf makes the sum non-finite, so one streaming reduction decides the common case
    (torch's vectorised sum, ~2x numpy's pairwise sum here: 35 vs 65 ms for ViT-L's 1.1 GiB, one
    thread; numpy's buffered float32 sum for float16, float64 and what torch cannot view); only a
    non-finite sum -- a real NaN/Inf or a finite overflow -- needs the exact elementwise test.
    """
    if a.dtype.kind != "f" and a.dtype != _BF16:
        return True
    # float32 and bfloat16 (float32's exponent range) sum in their own dtype: torch accumulates in
    # float32 internally; sum(dtype=float32) would first cast the whole tensor (a full copy).
    t = torch_view(a) if a.dtype in (np.float32, _BF16) else None
    if t is not None and a.size:
        if math.isfinite(t.sum().item()):
            return True
    else:
        acc = np.float64 if a.dtype.itemsize == 8 else np.float32
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.sum(a, dtype=acc)):
                return True
    return bool(np.isfinite(a).all())
