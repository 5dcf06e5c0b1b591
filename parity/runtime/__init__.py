"""One execution engine per framework: run a torch module or its Flax twin (Linen or NNX) on a
pytree of inputs, forward and backward, optionally recording every layer call.

Used by the checker, the per-layer analysis and training parity (and the benchmarks). Layout
conversion is weight_port.layout's (re-exported here); which layout each tensor has is decided
in parity.runtime.layouts.

The torch runner is imported on first use (module ``__getattr__``): the Flax side imports this
package on machines without torch (parity verify).
"""
import importlib

from parity.runtime.flax_runner import (FlaxCall, FlaxRun, FlaxTwin, call_key, flax_inputs,
                                        forward_backward, is_nnx, output_shapes, param_grads_for, wanted_grads,
                                        to_host, value_and_grad_fn)
from parity.runtime.layouts import ActivationLayouts, declared, input_layouts, output_layouts
from parity.runtime.tree import (as_args, canonical_path, flatten, input_paths, map_with_path, match_outputs,
                                 structure)
from weight_port import TRAIN_KWARGS, TrainModeError, call_kwargs, train_kwarg_of
from weight_port.layout import (AS_IS, CHANNELS_FIRST, LayoutError, to_flax_layout,
                                to_torch_layout)

__all__ = ["AS_IS", "CHANNELS_FIRST", "ActivationLayouts", "FlaxCall", "FlaxRun", "FlaxTwin",
           "LayoutError", "TRAIN_KWARGS", "TensorRef", "TorchCall", "TorchOp", "TorchRun", "TrainModeError", "as_args",
           "call_key", "call_kwargs", "canonical_path", "declared", "flatten", "flax_inputs", "forward_backward",
           "input_layouts", "input_paths", "is_nnx", "map_with_path", "match_outputs", "output_layouts", "param_grads_for", "wanted_grads",
           "output_shapes", "random_cotangents", "run_torch", "structure", "to_flax_layout",
           "to_host", "to_torch_layout", "torch_inputs", "train_kwarg_of", "train_mode_matters", "value_and_grad_fn"]

_TORCH_SIDE = {"TensorRef": "torch_ops", "TorchOp": "torch_ops", "TorchCall": "torch_runner", "TorchRun": "torch_runner",
               "random_cotangents": "torch_runner", "run_torch": "torch_runner", "torch_inputs": "torch_runner",
               "train_mode_matters": "torch_runner"}


def __getattr__(name: str):
    if name in _TORCH_SIDE:
        return getattr(importlib.import_module(f"parity.runtime.{_TORCH_SIDE[name]}"), name)
    raise AttributeError(f"module 'parity.runtime' has no attribute {name!r}")
