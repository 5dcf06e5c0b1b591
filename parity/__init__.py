"""torchjax-parity: prove a Flax port computes what its PyTorch model computes.

Public API: check, assert_parity, record and verify (golden bundles: parity.golden), Report,
Comparison and judge (the one judge), LogitMetrics (Report.logits), the prepared pair (prepare,
PreparedPair, CheckOptions), VerifyOptions, registry helpers, and the execution engine
(parity.runtime: FlaxTwin, layouts). Heavy imports are lazy: ``import parity`` loads no framework until a name is used.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "check": "parity.checker",
    "assert_parity": "parity.checker",
    "Report": "parity.report",
    "prepare": "parity.pair",
    "PreparedPair": "parity.pair",
    "CheckOptions": "parity.pair",
    "Comparison": "parity.judge",
    "LogitMetrics": "parity._logits",
    "judge": "parity.judge",
    "LayerRow": "parity.layers",
    "plot_layers": "parity.plot",
    "UsageError": "parity.errors",
    "train_check": "parity.training",
    "TrainReport": "parity.training",
    "OptimizerSpec": "parity.training",
    "Tolerance": "parity.tolerances",
    "TOLERANCES": "parity.tolerances",
    "tolerance_for": "parity.tolerances",
    "PAIRS": "parity.registry",
    "ModelPair": "parity.registry",
    "pin_numerics": "parity.numerics",
    "FlaxTwin": "parity.runtime",
    "Inputs": "weight_port.keywords",
    "LayoutError": "parity.runtime",
    "TrainModeError": "parity.runtime",
    "CHANNELS_FIRST": "parity.runtime",
    "AS_IS": "parity.runtime",
    "numerics_env": "parity.numerics",
    "record": "parity.golden",
    "verify": "parity.golden",
    "VerifyOptions": "parity.golden",
    "BundleError": "parity.golden",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
