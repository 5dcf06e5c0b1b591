"""Run this interpreter as on a host where torch is not installed (a JAX-only machine).

No finder finds torch, so ``importlib.util.find_spec("torch")`` is None (what transformers asks
before it decides to import torch) and ``import torch`` raises ModuleNotFoundError, exactly as a
missing install: weight_port and transformers take their torch-free paths. A finder that raised
instead would break libraries that probe for torch and run fine without it. Used by the torch-free
verify tests (tests/no_torch/sitecustomize.py) and ``parity bench --golden-cost``.
"""
from __future__ import annotations

import sys


class _HideTorch:
    """A meta-path finder as it would be without torch installed: torch and below are not found."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
        return getattr(self._finder, attr)


def hide_torch() -> None:
    """From now on this interpreter finds no torch (modules already imported stay)."""
    sys.meta_path[:] = [f if isinstance(f, _HideTorch) or not hasattr(f, "find_spec") else _HideTorch(f)
                        for f in sys.meta_path]
