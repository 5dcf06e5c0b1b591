"""Static audit of the Flax twin's BatchNorm layers against torch's, found via the port plan.

The plan's Flax target records the module object at every path during its abstract init (an
``nn.intercept_methods`` hook), so the audit reads classes and attributes without running a step.
"""
from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import torch
from flax import nnx

from flax_impl.batchnorm import BatchNorm as TorchExactBatchNorm
from weight_port import PortPlan


@dataclass(frozen=True)
class BNFinding:
    """One convention mismatch of one BatchNorm layer; ``name`` is the convention."""

    torch_path: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.name} at {self.torch_path}: {self.detail}"


def audit_batch_norms(plan: PortPlan) -> tuple[list[str], list[BNFinding]]:
    """(torch paths of the BatchNorm layers, findings). Empty findings: torch-exact statistics."""
    paths, findings = [], []
    for layer in plan.layers:
        tm, fm = layer.info.torch_module, layer.info.flax_module
        if not isinstance(tm, torch.nn.modules.batchnorm._BatchNorm):
            continue
        path = layer.info.torch_path
        paths.append(path)
        if not tm.track_running_stats:
            continue
        if isinstance(fm, TorchExactBatchNorm):
            pass
        elif isinstance(fm, (nn.BatchNorm, nnx.BatchNorm)):
            api = "flax.linen" if isinstance(fm, nn.BatchNorm) else "flax.nnx"
            findings.append(BNFinding(path, f"biased running_var (stock {api}.BatchNorm)",
                                      "Flax stores the biased batch variance; torch stores the unbiased "
                                      "one (x n/(n-1)), so Flax's running var is low by (n-1)/n per "
                                      "update; use flax_impl.batchnorm.BatchNorm"))
            if fm.use_fast_variance:
                findings.append(BNFinding(path, "fast variance (use_fast_variance=True)",
                                          "E[x^2] - E[x]^2 instead of torch's two-pass mean((x-mean)^2)"))
        else:
            findings.append(BNFinding(path, "unknown BatchNorm class",
                                      f"{type(fm).__name__}: statistics convention not known statically"))
            continue
        if tm.momentum is None:
            findings.append(BNFinding(path, "cumulative moving average (torch momentum=None)",
                                      "torch averages over all batches; Flax has no equivalent"))
        else:
            want = 1.0 - tm.momentum  # torch weights the NEW value by momentum, Flax the OLD one
            got = float(fm.momentum)
            if abs(got - want) > 1e-12:
                if abs(got - tm.momentum) <= 1e-12:
                    findings.append(BNFinding(path, "BatchNorm momentum convention",
                                              f"torch momentum={tm.momentum:g} (weight of the new batch) "
                                              f"was passed to Flax as {got:g}; Flax's momentum weights the "
                                              f"old running value, use {want:g}"))
                else:
                    findings.append(BNFinding(path, "BatchNorm momentum mismatch",
                                              f"Flax momentum {got:g}, torch {tm.momentum:g} needs {want:g}"))
        if abs(float(fm.epsilon) - tm.eps) > 0:
            findings.append(BNFinding(path, "BatchNorm epsilon mismatch",
                                      f"Flax epsilon {fm.epsilon:g}, torch eps {tm.eps:g}"))
    return paths, findings


__all__ = ["BNFinding", "audit_batch_norms"]
