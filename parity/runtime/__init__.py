"""One execution engine per framework: run a torch module or its Flax twin (Linen or NNX) on a
pytree of inputs, forward and backward, optionally recording every layer call.

Used by the checker, the per-layer analysis and training parity (and the benchmarks). Layout
conversion is weight_port.layout's (re-exported here); which layout each tensor has is decided
in parity.runtime.layouts.
"""
from parity.runtime.flax_runner import (FlaxCall, FlaxRun, FlaxTwin, call_key, flax_inputs,
                                        forward_backward, is_nnx, output_shapes,
                                        value_and_grad_fn)
from parity.runtime.layouts import ActivationLayouts, declared, input_layouts, output_layouts
from parity.runtime.torch_ops import TensorRef, TorchOp
from parity.runtime.torch_runner import (TorchCall, TorchRun, input_paths, random_cotangents,
                                         run_torch, torch_inputs, train_mode_matters)
from parity.runtime.tree import as_args, flatten, map_with_path, structure
from weight_port import TRAIN_KWARGS, TrainModeError, call_kwargs, train_kwarg_of
from weight_port.layout import (AS_IS, CHANNELS_FIRST, LayoutError, to_flax_layout,
                                to_torch_layout)

__all__ = ["AS_IS", "CHANNELS_FIRST", "ActivationLayouts", "FlaxCall", "FlaxRun", "FlaxTwin",
           "LayoutError", "TRAIN_KWARGS", "TensorRef", "TorchCall", "TorchOp", "TorchRun", "TrainModeError", "as_args",
           "call_key", "call_kwargs", "declared", "flatten", "flax_inputs", "forward_backward",
           "input_layouts", "input_paths", "is_nnx", "map_with_path", "output_layouts",
           "output_shapes", "random_cotangents", "run_torch", "structure", "to_flax_layout",
           "to_torch_layout", "torch_inputs", "train_kwarg_of", "train_mode_matters", "value_and_grad_fn"]
