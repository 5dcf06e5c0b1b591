"""Makes ``import torch`` fail in this interpreter: put this folder on PYTHONPATH to run code as
on a machine where torch is not installed (parity verify must work there).

Exactly as a missing install: no finder finds torch, so ``importlib.util.find_spec("torch")`` is
None (what transformers asks before it decides to import torch) and ``import torch`` raises
ModuleNotFoundError ("No module named 'torch'"). A finder that raised instead would break
libraries that probe for torch and run fine without it.
"""
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


sys.meta_path[:] = [_HideTorch(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
