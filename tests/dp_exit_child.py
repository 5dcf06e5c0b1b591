"""Child process for test_dp_training's worker-exit tests: torch DDP workers (2 gloo processes)
that die at exit after sending their results, or before sending any, against the Flax step on a
2-device mesh. Run with XLA_FLAGS=--xla_force_host_platform_device_count=2. Prints JSON."""
from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from dp_models import MLPDiesAtExit, MLPDiesInStep
from parity.training.ddp_train import train_check_data_parallel
from parity.registry import PAIRS


def main() -> None:
    rng = np.random.default_rng(0)
    pair = PAIRS["mlp"]
    config = pair.config("tiny")
    _, fm = pair.build(config)
    data = [(rng.standard_normal((8, 4)), rng.integers(0, 5, 8)) for _ in range(2)]
    common = dict(data=data, data_parallel=2, steps=2, input_layout="as_is")
    out = {}
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = train_check_data_parallel(MLPDiesAtExit(config), fm, **common)
    out["dies_at_exit"] = {"ok": report.ok, "steps": len(report.steps), "findings": report.findings,
                           "warnings": [[w.category.__name__, str(w.message)] for w in seen]}
    torch.manual_seed(1)
    try:
        train_check_data_parallel(MLPDiesInStep(config), fm, **common)
        out["dies_in_step"] = {"error": None}
    except RuntimeError as e:
        out["dies_in_step"] = {"error": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
