"""Child process for test_dp_training: torch DDP (2 gloo processes) against the Flax step on a
2-device mesh. Run with XLA_FLAGS=--xla_force_host_platform_device_count=2. Prints JSON."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import optax
import torch

import train_pairs as tp
import verdict_pairs as vp
from dp_models import FlaxConvBN, TorchConvBN, TorchGlobalDoubleNorm
from planted import example_tokens, make_flax_tokens_renamed, make_torch_tokens
from parity.training.ddp import run_ddp
from parity.training.ddp_train import PlannedChecks, plan_checks
from parity.registry import PAIRS
from parity.tolerances import GRAD, NOISE_FLOORS, TRAIN_NOISE_FLOORS
from parity.training import OptimizerSpec

NOISY = "steps noise"  # the note of an update judged partly as gradient noise (parity.training.noise)


def _summary(report) -> dict:
    worst = [max(c.rel_norm for c in s.comparisons) for s in report.steps]
    return {"ok": report.ok, "findings": report.findings, "steps": len(report.steps), "worst": worst,
            "worst_max_rel": [max(c.max_rel for c in s.comparisons) for s in report.steps],
            "first_failure": report.first_failure.step if report.first_failure else None,
            "loss": report.loss, "stats": [len(s.stats) for s in report.steps],
            # noise floors (attention + Adam): per step the worst real (not below-floor) update
            # rel_norm, the updates with noise entries, and the failing comparisons
            "worst_real_update": [max((c.rel_norm for c in s.updates if not c.below_floor), default=0.0)
                                  for s in report.steps],
            "noisy": [sorted(c.name for c in s.updates if NOISY in c.note) for s in report.steps],
            "below_floor": [sorted(c.name for c in s.updates + s.stats if c.below_floor) for s in report.steps],
            "failed": [sorted(c.name for c in s.comparisons if not c.ok) for s in report.steps],
            "notes": report.notes}


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
    # Attention trained with Adam: the key bias's zero-in-theory gradient is noise that Adam
    # normalises into lr-sized steps (tests/test_train_noise_floor.py, single device).
    adam = OptimizerSpec("adam", lr=1e-2)
    mha = dict(torch_module=tp.make_torch_attention_classifier(), flax_module=tp.FlaxAttentionClassifier(),
               data=tp.attention_batches(), steps=3, optimizer=adam, input_layout="as_is")
    # q/k/v Linear attention: its k.bias is noise alone
    single_head = dict(torch_module=vp.make_torch_attention(), flax_module=vp.make_flax_attention(),
                       data=tp.attention_mse_batches(), steps=3, optimizer=adam, loss="mse", input_layout="as_is",
                       output_layout="as_is")
    torch.manual_seed(0)
    global_double_norm = TorchGlobalDoubleNorm()
    floor_cases = {
        "mha_adam_float64": dict(mha, dtype="float64"),
        "mha_adam_float32": dict(mha, dtype="float32"),
        "single_head_adam_float64": dict(single_head, dtype="float64"),
        # planted bugs: Adam's eps inside the square root (Flax side); the loss summed over replicas
        "mha_adam_eps_inside_sqrt": dict(mha, dtype="float64", flax_optimizer=optax.adam(1e-2, eps=0.0, eps_root=1e-8)),
        "single_head_adam_summed_loss": dict(single_head, dtype="float32", steps=2, torch_loss_reduction="sum"),
        # a BatchNorm after a BatchNorm (global statistics on both sides): bn2's running_mean is noise
        "double_norm": dict(torch_module=global_double_norm, flax_module=tp.FlaxDoubleNorm(),
                            data=tp.double_norm_batches(), steps=3, optimizer=OptimizerSpec("sgd-momentum", lr=0.05),
                            input_layout="as_is", dtype="float64"),
    }
    all_cases = {**cases, **floor_cases}
    # One start of the torch worker processes for every case (plan_checks + run_ddp, as
    # train_checks_data_parallel does); two floor cases' records are then judged again.
    checks = plan_checks([{**common, **c} for c in all_cases.values()])
    records = run_ddp(checks.jobs, world=checks.world)
    out = dict(zip(all_cases, map(_summary, checks.reports(records))))
    # No floors: noise judged as real, what the data-parallel path did before it used them.
    NOISE_FLOORS[GRAD] = replace(NOISE_FLOORS[GRAD], factor=0.0)
    TRAIN_NOISE_FLOORS["stats"] = replace(TRAIN_NOISE_FLOORS["stats"], factor=0.0)
    # one case per floor (each Flax side costs its compiles again)
    again = [list(all_cases).index(name) for name in ("single_head_adam_float64", "double_norm")]
    # (reports() only reads the records and the untouched torch modules: judging twice is safe)
    redo = PlannedChecks(checks.world, checks.mesh, [], [checks.prepared[i] for i in again])
    for i, report in zip(again, redo.reports([records[i] for i in again])):
        out[f"{list(all_cases)[i]}_no_floor"] = _summary(report)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
