"""Convert PyTorch weights to Flax variables and back, by layer type and a naming rule.

Public API: torch_to_flax, flax_to_torch, build_plan/PortPlan, load_state (checkpoint sources),
register_rule/Rule/TensorMap, GroupedConvTranspose, and the named errors.
"""
from __future__ import annotations

import os

from collections.abc import Mapping

import torch

from weight_port.errors import (
    AttributeMismatchError, CheckpointError, KeyMismatchError, NoRuleError, NonFiniteWeightError,
    PortError, ShapeMismatchError, UnsafeCheckpointError,
)
from weight_port.flatten import FlattenTraceWarning
from weight_port.flax_layers import GroupedConvTranspose
from weight_port.layout import AS_IS, CHANNELS_FIRST, to_flax_layout, to_torch_layout
from weight_port.matching import Rename
from weight_port.naming import torch_to_flax_path
from weight_port.plan import PortPlan, build_plan
from weight_port.rules import LayerInfo, Rule, TensorMap, direct_rule, register_rule
from weight_port.sources import load_state
import weight_port.attention  # noqa: E402,F401  (registers the nn.MultiheadAttention rule)
from weight_port.tensors import numpy_to_torch, to_numpy


def _is_nnx(module) -> bool:
    from flax import nnx

    return isinstance(module, nnx.Module)


def torch_to_flax(
    source,
    flax_module,
    example_input=None,
    *,
    input_layout: str = CHANNELS_FIRST,
    flatten: Mapping[str, tuple[int, ...]] | None = None,
    dtype=None,
    torch_module: torch.nn.Module | None = None,
    rename: Rename = None,
    allow_nonfinite: bool = False,
    check_attributes: str = "error",
    copy: bool | None = None,
):
    """Flax variables {"params": ..., "batch_stats": ...} holding the source's weights.

    source: a torch module, a state_dict, or a checkpoint path (.safetensors, .pt/.pth, a sharded
    *.index.json, or a directory holding one). With a file or state_dict, pass ``torch_module``
    (architecture only; its weights are ignored) for torch layer types and flatten detection, or
    leave it out and the layer types are read off the Flax twin. flax_module: a linen Module
    (abstract-initialised on the channels-last [N, *S, C] equivalent of the torch-layout
    ``example_input`` [N, C, *S], or a tuple of inputs) or an nnx.Module (then an nnx.State is
    returned and the module is left untouched). dtype: optional target dtype (default: keep the
    source's). copy: None (default) copies every tensor when the source is a torch module or an
    in-memory state_dict -- the caller still holds those tensors, and an in-place update
    (optimizer.step(), a train-mode BatchNorm forward) would otherwise silently change the
    "immutable" JAX arrays -- and hands layout-unchanged tensors over zero-copy when the port
    loaded them from a file itself. copy=False forces zero-copy (you promise not to mutate).
    """
    if copy is None:
        copy = not isinstance(source, (str, os.PathLike))
    if isinstance(source, torch.nn.Module):
        torch_module = source
    state = load_state(source)
    plan = build_plan(
        torch_module, flax_module, example_input, input_layout=input_layout, flatten=flatten,
        state=state, rename=rename, check_attributes=check_attributes,
    )
    variables = plan.to_flax(state, dtype=dtype, allow_nonfinite=allow_nonfinite, copy=copy)
    if flax_module is not None and _is_nnx(flax_module):
        from flax import nnx

        from weight_port.nnx import update_nnx

        return update_nnx(nnx.clone(flax_module), variables)
    return variables


def flax_to_torch(
    variables,
    torch_module: torch.nn.Module,
    flax_module=None,
    example_input=None,
    *,
    plan: PortPlan | None = None,
    input_layout: str = CHANNELS_FIRST,
    flatten: Mapping[str, tuple[int, ...]] | None = None,
    rename: Rename = None,
) -> dict[str, torch.Tensor]:
    """A state_dict for ``torch_module.load_state_dict(..., strict=True)`` from Flax variables.

    variables: linen variables {collection: tree}, an nnx.Module, or an nnx.State. Without
    flax_module/example_input the plan comes from the torch module alone, with the Flax target
    read off ``variables`` and flatten order inferred from the torch graph; pass them (or a plan)
    when a transposed conv uses transpose_kernel=True or has groups.
    """
    from flax import nnx

    from weight_port.nnx import nnx_variables

    if isinstance(variables, nnx.Module):
        flax_module = flax_module if flax_module is not None else variables
        variables = nnx_variables(variables)
    elif isinstance(variables, nnx.State):
        variables = _state_to_variables(variables)
    if plan is None:
        plan = build_plan(
            torch_module, flax_module, example_input, variables=variables,
            input_layout=input_layout, flatten=flatten, rename=rename, check_attributes="ignore",
        )
    return {k: numpy_to_torch(v) for k, v in plan.to_torch(variables).items()}


def _state_to_variables(state) -> dict:
    from flax import nnx, traverse_util

    from weight_port.nnx import collection_of

    flat = {}
    for path, var in nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state():
        flat[(collection_of(var), *(str(p) for p in path))] = var.get_value() if hasattr(var, "get_value") else var
    return traverse_util.unflatten_dict(flat)


__all__ = [
    "AS_IS",
    "AttributeMismatchError",
    "CHANNELS_FIRST",
    "CheckpointError",
    "FlattenTraceWarning",
    "GroupedConvTranspose",
    "KeyMismatchError",
    "LayerInfo",
    "NoRuleError",
    "NonFiniteWeightError",
    "PortError",
    "PortPlan",
    "Rule",
    "ShapeMismatchError",
    "TensorMap",
    "UnsafeCheckpointError",
    "build_plan",
    "direct_rule",
    "flax_to_torch",
    "load_state",
    "register_rule",
    "to_flax_layout",
    "to_numpy",
    "to_torch_layout",
    "torch_to_flax",
    "torch_to_flax_path",
]
