"""Child process for test_dp_training: torch DDP (2 gloo processes) against the Flax step on a
2-device mesh. Run with XLA_FLAGS=--xla_force_host_platform_device_count=2. Prints JSON."""
from __future__ import annotations

import json

import numpy as np
import torch

from dp_models import FlaxConvBN, TorchConvBN
from parity.data_parallel.train import train_checks_data_parallel
from parity.registry import PAIRS


def _summary(report) -> dict:
    return {"ok": report.ok, "findings": report.findings, "steps": len(report.steps),
            "worst": [max(c.rel_norm for c in s.comparisons) for s in report.steps],
            "first_failure": report.first_failure.step if report.first_failure else None}


def main() -> None:
    rng = np.random.default_rng(0)
    pair = PAIRS["mlp"]
    tm, fm = pair.build(pair.config("tiny"), seed=1)
    mlp_data = [(rng.standard_normal((8, 4)), rng.integers(0, 5, 8)) for _ in range(3)]
    torch.manual_seed(0)
    bn_data = [(rng.standard_normal((8, 3, 6, 6)), rng.integers(0, 2, (8, 6, 6))) for _ in range(2)]
    common = dict(data_parallel=2, dtype="float64")
    reports = train_checks_data_parallel([
        dict(torch_module=tm, flax_module=fm, data=mlp_data, steps=3, input_layout="as_is", **common),
        dict(torch_module=tm, flax_module=fm, data=mlp_data, steps=2, input_layout="as_is",
             torch_loss_reduction="sum", **common),
        dict(torch_module=TorchConvBN(), flax_module=FlaxConvBN(), data=bn_data, steps=2, input_layout="NC...",
             **common),
    ])
    print(json.dumps(dict(zip(("mlp", "mlp_summed_loss", "convbn"), map(_summary, reports)))))


if __name__ == "__main__":
    main()
