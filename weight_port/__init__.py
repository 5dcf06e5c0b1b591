"""Convert PyTorch weights to Flax variables and back, by layer type and a naming rule.

Public API: torch_to_flax, flax_to_torch, build_plan/PortPlan, load_state (checkpoint sources),
register_rule/Rule/TensorMap, GroupedConvTranspose, and the named errors.
"""
from __future__ import annotations

import os

from collections.abc import Mapping

try:
    import torch
except ImportError:  # a Flax-only machine (parity verify): only the torch-side paths need torch
    torch = None

from weight_port.errors import (
    AmbiguousPairingError, AttributeMismatchError, CheckpointError, KernelLayoutError,
    FlattenOrderError, KeyMismatchError, NoRuleError, NonFiniteWeightError, PortError,
    ShapeMismatchError, UnsafeCheckpointError,
)
from weight_port.flax_layers import GroupedConvTranspose
from weight_port.call_order import first_consumers, torch_call_order
from weight_port.flax_tree import TRAIN_KWARGS, TrainModeError, call_kwargs, is_nnx, train_kwarg_of
from weight_port.keywords import Inputs, bind_keywords, keyword_call
from weight_port.layout import AS_IS, CHANNELS_FIRST, to_flax_layout, to_torch_layout
from weight_port.matching import Rename
from weight_port.naming import flax_path_str, torch_to_flax_path
from weight_port.nnx import nnx_variables, update_nnx
from weight_port.plan import PortPlan, build_plan
from weight_port.prefetch import Prefetch, worth_prefetching
from weight_port.plan_steps import tied_aliases
from weight_port.rules import LayerInfo, Rule, TensorMap, direct_rule, register_rule, rule_for
from weight_port.sources import ShardedState, load_state
from weight_port.streaming import convert_placed, load_streamed, put as put_sharded, write_streamed
if torch is not None:  # the torch-side pieces: the fx trace of flatten order, nn.MultiheadAttention's rule
    from weight_port.flatten import FlattenTraceWarning, find_flattened_linears
    import weight_port.attention  # noqa: E402,F401  (registers the nn.MultiheadAttention rule)
from weight_port.tensors import numpy_to_torch, to_numpy


def torch_to_flax(
    source,
    flax_module,
    example_input=None,
    *,
    input_layout: str | None = None,  # None: read off the layer receiving each input
    flatten: Mapping[str, tuple[int, ...] | None] | None = None,
    dtype=None,
    torch_module: torch.nn.Module | None = None,
    rename: Rename = None,
    allow_nonfinite: bool = False,
    check_attributes: str = "error",
    copy: bool | None = None,
    sharding=None,
):
    """Flax variables {"params": ..., "batch_stats": ...} holding the source's weights.

    source: a torch module, a state_dict, or a checkpoint path (.safetensors, .pt/.pth, a sharded
    *.index.json, or a directory holding one). With a file or state_dict, pass ``torch_module``
    (architecture only; its weights are ignored) for torch layer types, or leave it out and the
    layer types are read off the Flax twin (flatten order comes from the twin's jaxpr either way;
    FlattenOrderError when it cannot tell). flax_module: a linen Module (abstract-initialised on
    the channels-last [N, *S, C] equivalent of the torch-layout ``example_input`` [N, C, *S], or a
    tuple of inputs) or an nnx.Module (then an nnx.State is returned and the module is left
    untouched; with ``example_input`` it is also called abstractly, for execution order and
    flatten order). A large in-memory source is converted on worker threads while the plan is
    built (weight_port.prefetch); the result is the same bits. dtype: optional target dtype (default: keep the
    source's). copy: None (default) copies every tensor when the source is a torch module or an
    in-memory state_dict -- the caller still holds those tensors, and an in-place update
    (optimizer.step(), a train-mode BatchNorm forward) would otherwise silently change the
    "immutable" JAX arrays -- and hands layout-unchanged tensors over zero-copy when the port
    loaded them from a file itself. copy=False forces zero-copy (you promise not to mutate).
    sharding: place each converted tensor on its target sharding as it is converted (one
    jax.sharding.Sharding for all, a pytree of them mirroring the variables, or a function of the
    leaf path (collection, *module path, name)); the host copy is dropped per layer (per shard
    for a sharded checkpoint), so the whole model never sits in one host buffer
    (weight_port.streaming).
    """
    if copy is None:
        copy = not isinstance(source, (str, os.PathLike))
    if isinstance(source, torch.nn.Module):
        torch_module = source
    state = load_state(source)
    # Convert what the plan cannot change while the plan traces the Flax twin (two cores busy).
    # (not with ``sharding``: prefetching converts the whole model on the host)
    prefetch = (Prefetch(torch_module, state, dtype=dtype, copy=copy, check_finite=not allow_nonfinite)
                if torch_module is not None and sharding is None and worth_prefetching(state) else None)
    try:
        # Keyword inputs (Inputs): both top modules called with them, the torch class restored after.
        with keyword_call(torch_module, flax_module, example_input) as (tm, fm, args):
            plan = build_plan(
                tm, fm, args, input_layout=input_layout, flatten=flatten,
                state=state, rename=rename, check_attributes=check_attributes,
            )
    except BaseException:
        if prefetch is not None:
            prefetch.cancel()
        raise
    if sharding is not None:
        from weight_port.streaming import convert_placed

        variables = convert_placed(plan, state, sharding, dtype=dtype, allow_nonfinite=allow_nonfinite,
                                   copy=copy)
    else:
        variables = plan.to_flax(state, dtype=dtype, allow_nonfinite=allow_nonfinite, copy=copy,
                                 precomputed=prefetch.result() if prefetch is not None else None)
    if flax_module is not None and is_nnx(flax_module):
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
    input_layout: str | None = None,  # None: read off the layer receiving each input
    flatten: Mapping[str, tuple[int, ...]] | None = None,
    rename: Rename = None,
) -> dict[str, torch.Tensor]:
    """A state_dict for ``torch_module.load_state_dict(..., strict=True)`` from Flax variables.

    variables: linen variables {collection: tree}, an nnx.Module, or an nnx.State. Without
    flax_module/example_input the plan comes from the torch module alone, with the Flax target
    read off ``variables`` and flatten order inferred from the torch graph. A transposed conv's
    kernel layout (Flax transpose_kernel=True or not; HF FlaxConv1D's [out, in]) is then read off
    the shapes; KernelLayoutError when in == out makes them alike -- pass the Flax module (or a
    plan) for those. A grouped transposed conv has one layout (GroupedConvTranspose's
    [*k, in/g, out]); any other kernel is refused by name (GroupedKernelLayoutError).
    """
    if is_nnx(variables):
        from weight_port.nnx import nnx_variables

        flax_module = flax_module if flax_module is not None else variables
        variables = nnx_variables(variables)
    elif is_nnx(variables, "State"):
        variables = _state_to_variables(variables)
    if plan is None:
        with keyword_call(torch_module, flax_module, example_input) as (tm, fm, args):
            plan = build_plan(
                tm, fm, args, variables=variables,
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
    "AmbiguousPairingError",
    "AS_IS",
    "AttributeMismatchError",
    "bind_keywords",
    "build_plan",
    "call_kwargs",
    "CHANNELS_FIRST",
    "CheckpointError",
    "convert_placed",
    "direct_rule",
    "find_flattened_linears",
    "first_consumers",
    "FlattenOrderError",
    "FlattenTraceWarning",
    "flax_path_str",
    "flax_to_torch",
    "GroupedConvTranspose",
    "Inputs",
    "is_nnx",
    "KernelLayoutError",
    "KeyMismatchError",
    "LayerInfo",
    "load_state",
    "load_streamed",
    "nnx_variables",
    "NonFiniteWeightError",
    "NoRuleError",
    "numpy_to_torch",
    "PortError",
    "PortPlan",
    "put_sharded",
    "register_rule",
    "Rule",
    "rule_for",
    "ShapeMismatchError",
    "ShardedState",
    "TensorMap",
    "tied_aliases",
    "to_flax_layout",
    "to_numpy",
    "to_torch_layout",
    "torch_call_order",
    "torch_to_flax",
    "torch_to_flax_path",
    "train_kwarg_of",
    "TRAIN_KWARGS",
    "TrainModeError",
    "UnsafeCheckpointError",
    "update_nnx",
    "write_streamed",
]
