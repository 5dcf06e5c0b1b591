"""Convert PyTorch weights to Flax variables and back, by layer type and a naming rule.

Public API: torch_to_flax, flax_to_torch, build_plan/PortPlan, register_rule/Rule/TensorMap,
and the named errors.
"""
from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import torch

from weight_port.errors import KeyMismatchError, NoRuleError, PortError
from weight_port.flatten import FlattenTraceWarning
from weight_port.layout import AS_IS, CHANNELS_FIRST, to_flax_layout, to_torch_layout
from weight_port.naming import torch_to_flax_path
from weight_port.plan import PortPlan, build_plan
from weight_port.rules import LayerInfo, Rule, TensorMap, register_rule
from weight_port.tensors import numpy_to_torch, to_numpy


def torch_to_flax(
    torch_module: torch.nn.Module,
    flax_module: nn.Module,
    example_input,
    *,
    input_layout: str = CHANNELS_FIRST,
    flatten: Mapping[str, tuple[int, ...]] | None = None,
    dtype=None,
) -> dict:
    """Flax variables {"params": ..., "batch_stats": ...} holding ``torch_module``'s weights.

    example_input: a torch-layout tensor ([N, C, H, W]) or a tuple of them; the Flax twin is
    abstract-initialised on the channels-last ([N, H, W, C]) equivalent. batch_stats appears only
    when the twin has that collection. dtype: optional target dtype (default: keep torch's).
    """
    plan = build_plan(torch_module, flax_module, example_input, input_layout=input_layout, flatten=flatten)
    return plan.to_flax(torch_module.state_dict(), dtype=dtype)


def flax_to_torch(
    variables: Mapping,
    torch_module: torch.nn.Module,
    flax_module: nn.Module | None = None,
    example_input=None,
    *,
    plan: PortPlan | None = None,
    input_layout: str = CHANNELS_FIRST,
    flatten: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """A state_dict for ``torch_module.load_state_dict(..., strict=True)`` from Flax variables.

    Without flax_module/example_input the plan comes from the torch module alone, with the Flax
    target read off ``variables`` and flatten order inferred from the torch graph; pass them (or
    a plan) when a transposed conv uses transpose_kernel=True.
    """
    if plan is None:
        plan = build_plan(
            torch_module, flax_module, example_input,
            variables=variables, input_layout=input_layout, flatten=flatten,
        )
    return {k: numpy_to_torch(v) for k, v in plan.to_torch(variables).items()}


__all__ = [
    "AS_IS",
    "CHANNELS_FIRST",
    "FlattenTraceWarning",
    "KeyMismatchError",
    "LayerInfo",
    "NoRuleError",
    "PortError",
    "PortPlan",
    "Rule",
    "TensorMap",
    "build_plan",
    "flax_to_torch",
    "register_rule",
    "to_flax_layout",
    "to_torch_layout",
    "torch_to_flax",
    "torch_to_flax_path",
]
