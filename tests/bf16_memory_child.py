"""Child process for test_port_bf16_memory: port a bfloat16 torch MLP, print peak RSS growth.

    python tests/bf16_memory_child.py WIDTH LAYERS

A tiny port runs first so one-off costs (XLA client, jit caches, thread pools) are in the
baseline, not in the growth. Prints one JSON line with the model's bytes and the growth.
"""
from __future__ import annotations

import json
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    # Linux: writing 5 resets VmHWM (the peak RSS) to the current RSS, so the float32 weights
    # torch builds before .to(bfloat16) do not hide the port's own peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _mlp(width: int, layers: int):
    import torch

    from flax_impl.mlp import ExplicitMLP
    from model_configs import MLPConfig
    from torch_ref.mlp import ExplicitMLP as TorchMLP

    cfg = MLPConfig(in_features=width, features=(width,) * layers)
    return TorchMLP(cfg).to(torch.bfloat16), ExplicitMLP(cfg)


def main(width: int, layers: int) -> None:
    import torch

    import weight_port as wp

    small_t, small_f = _mlp(8, 2)
    wp.torch_to_flax(small_t, small_f, torch.zeros(1, 8, dtype=torch.bfloat16), input_layout="as_is")
    torch_model, flax_model = _mlp(width, layers)
    model_bytes = sum(t.numel() * t.element_size() for t in torch_model.state_dict().values())
    _reset_peak()
    before = _status("VmRSS")
    variables = wp.torch_to_flax(torch_model, flax_model, torch.zeros(1, width, dtype=torch.bfloat16),
                                 input_layout="as_is")
    growth = _status("VmHWM") - before
    dtypes = sorted({str(a.dtype) for a in __import__("jax").tree.leaves(variables)})
    print(json.dumps({"model_bytes": model_bytes, "peak_growth": growth, "dtypes": dtypes}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
