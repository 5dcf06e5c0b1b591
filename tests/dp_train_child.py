"""Child process for test_dp_training: torch DDP (2 gloo processes) against the Flax step on a
2-device mesh. Run with XLA_FLAGS=--xla_force_host_platform_device_count=2. Prints JSON."""
from __future__ import annotations

import json

import numpy as np
import torch

from dp_models import FlaxConvBN, TorchConvBN
from planted import example_tokens, make_flax_tokens_renamed, make_torch_tokens
from parity.data_parallel.train import train_checks_data_parallel
from parity.registry import PAIRS


def _summary(report) -> dict:
    worst = [max(c.rel_norm for c in s.comparisons) for s in report.steps]
    return {"ok": report.ok, "findings": report.findings, "steps": len(report.steps), "worst": worst,
            "worst_max_rel": [max(c.max_rel for c in s.comparisons) for s in report.steps],
            "first_failure": report.first_failure.step if report.first_failure else None,
            "loss": report.loss, "stats": [len(s.stats) for s in report.steps]}


def main() -> None:
    rng = np.random.default_rng(0)
    pair = PAIRS["mlp"]
    tm, fm = pair.build(pair.config("tiny"), seed=1)
    mlp_data = [(rng.standard_normal((8, 4)), rng.integers(0, 5, 8)) for _ in range(3)]
    mse_data = [(rng.standard_normal((8, 4)), rng.standard_normal((8, 5))) for _ in range(2)]
    torch.manual_seed(0)
    bn_data = [(rng.standard_normal((8, 3, 6, 6)), rng.integers(0, 2, (8, 6, 6))) for _ in range(2)]
    torch.manual_seed(0)
    per_replica_bn = TorchConvBN()
    torch.manual_seed(0)
    global_bn = TorchConvBN(global_bn=True)
    common = dict(data_parallel=2, dtype="float64")
    cases = {
        "mlp": dict(torch_module=tm, flax_module=fm, data=mlp_data, steps=3, input_layout="as_is"),
        "mlp_summed_loss": dict(torch_module=tm, flax_module=fm, data=mlp_data, steps=2, input_layout="as_is",
                                torch_loss_reduction="sum"),
        "mlp_mse": dict(torch_module=tm, flax_module=fm, data=mse_data, steps=2, input_layout="as_is", loss="mse"),
        "convbn": dict(torch_module=per_replica_bn, flax_module=FlaxConvBN(), data=bn_data, steps=2,
                       input_layout="NC..."),
        "convbn_global": dict(torch_module=global_bn, flax_module=FlaxConvBN(), data=bn_data, steps=2,
                              input_layout="NC..."),
        # your own pair as the CLI passes it: token ids + mask (a tuple of inputs split row-wise),
        # renamed Flax modules, mse on per-token outputs [N, T, 5]
        "own_pair_tokens": dict(torch_module=make_torch_tokens(), flax_module=make_flax_tokens_renamed(),
                                data=[(example_tokens(), rng.standard_normal((2, 7, 5)))], steps=2, loss="mse",
                                rename=[("emb", "tok"), ("head", "out_proj")],
                                input_layout={"input[1]": "as_is"}, output_layout="as_is"),
    }
    reports = train_checks_data_parallel([{**c, **common} for c in cases.values()])
    print(json.dumps(dict(zip(cases, map(_summary, reports)))))


if __name__ == "__main__":
    main()
