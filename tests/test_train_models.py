"""Per registry model (tiny configs): N training steps agree in float64 and float32, BatchNorm
running statistics included. (Planted BatchNorm mistakes: test_train_batchnorm; the digits
demo, short: test_train_cli.)"""
from __future__ import annotations

import json

import pytest

from parity.registry import PAIRS
from parity.training import OptimizerSpec, train_check
from parity.training.data import default_loss, synthetic_batches

STEPS = {"mlp": 5, "cnn": 5, "unet-same-bn": 3, "unet-valid": 2}


def _run(name, dtype, steps=None, spec=OptimizerSpec("sgd-momentum", lr=0.05)):
    pair = PAIRS[name]
    cfg = pair.config("tiny")
    tm, fm = pair.build(cfg, seed=0)
    data = synthetic_batches(pair, cfg, tm, batch=2, n_batches=2)
    return train_check(tm, fm, data, steps=steps or STEPS[name], optimizer=spec, loss=default_loss(pair),
                       dtype=dtype, input_layout=pair.layout, name=name)


# unet-valid runs float64 only: float32 of the UNet family is covered by unet-same-bn, and each
# UNet case costs a multi-second XLA compile of its training step.
CASES = [(n, d) for n in STEPS for d in ("float64", "float32") if (n, d) != ("unet-valid", "float32")]


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_model_trains_the_same(name, dtype):
    report = _run(name, dtype)
    assert report.ok, str(report)
    assert any("dropout deterministic" in n for n in report.notes)
    if PAIRS[name].has_batch_norm():
        assert report.steps[-1].stats and not report.findings
    json.dumps(report.to_dict(), default=str)
