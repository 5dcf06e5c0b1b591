"""Golden parity bundles: record the torch side once (``parity.record``), verify a Flax twin
against it anywhere, torch or not (``parity.verify``). The bundle format: parity.golden._bundle.

``record`` needs torch and is imported on first use; ``verify`` and the bundle reader never import it.
"""
from __future__ import annotations

import importlib

from parity.golden._bundle import FORMAT, BundleError, BundleTooLarge, read_bundle
from parity.golden._no_torch import hide_torch

_LAZY = {"record": "parity.golden._record", "DEFAULT_MAX_BYTES": "parity.golden._record",
         "verify": "parity.golden._verify", "VerifyOptions": "parity.golden._verify"}

__all__ = ["BundleError", "BundleTooLarge", "DEFAULT_MAX_BYTES", "FORMAT", "VerifyOptions", "hide_torch", "read_bundle",
           "record", "verify"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parity.golden' has no attribute {name!r}")
