"""Makes ``import torch`` fail in this interpreter: put this folder on PYTHONPATH to run code as
on a machine where torch is not installed (parity verify must work there)."""
import sys


class _NoTorch:
    """A meta-path finder that refuses torch and everything below it, as a missing install does."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"No module named {name!r} (blocked: this process runs without torch)")
        return None


sys.meta_path.insert(0, _NoTorch())
