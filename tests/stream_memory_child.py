"""Child process for test_dp_streaming: port a synthetic sharded checkpoint, print peak RSS growth.

    python tests/stream_memory_child.py CKPT_DIR OUT_DIR WIDTH LAYERS MODE

MODE "streamed" is ``parity port``'s path for a sharded source (weight_port.write_streamed);
MODE "whole" converts the whole model then writes it (the path a non-sharded source takes), as
the contrast that shows the bound means something. Prints one JSON line. No torch model is
built (the plan reads layer types off the Flax twin), so the baseline holds no weights.
"""
from __future__ import annotations

import json
import resource
import sys


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(ckpt: str, out: str, width: int, layers: int, mode: str) -> None:
    import numpy as np

    import weight_port as wp
    from flax_impl.mlp import ExplicitMLP
    from parity.commands.port import write_orbax
    from model_configs import MLPConfig

    flax_model = ExplicitMLP(MLPConfig(in_features=width, features=(width,) * layers))
    state = wp.load_state(ckpt)
    plan = wp.build_plan(None, flax_model, np.zeros((1, width), np.float32), state=state)
    before = _peak_bytes()
    if mode == "streamed":
        wp.write_streamed(plan, state, out)
    else:
        write_orbax(plan.to_flax(state, copy=True), out)
    print(json.dumps({"mode": mode, "peak_growth": _peak_bytes() - before, "baseline": before}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
