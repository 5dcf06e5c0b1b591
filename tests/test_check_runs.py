"""What a check runs, and what each run computes: a float32 check with per-layer rows computes the
twin's whole-model parameter gradients once (in float32, for the verdict); its float64 rows run
records every layer but leaves them out (the rows take each layer's from the layer run alone)."""
from __future__ import annotations

import jax
import numpy as np
import torch

import parity
import parity.checker as checker
from test_layer_runs import Stack, TorchStack


def test_float64_rows_run_leaves_the_twins_parameter_gradients_out(monkeypatch):
    calls = []
    real = checker.forward_backward

    def spy(twin, variables, args, cots, *, capture=False, param_grads=None, **kw):
        calls.append((capture, str(jax.tree_util.tree_leaves(variables)[0].dtype), param_grads))
        return real(twin, variables, args, cots, capture=capture, param_grads=param_grads, **kw)

    monkeypatch.setattr(checker, "forward_backward", spy)
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    r = parity.check(TorchStack(), Stack(), x, input_layout="as_is", lint=False)
    assert r.verdict == "PASS", r.summary()
    whole = [c for c in calls if not c[0]]
    rows = [c for c in calls if c[0]]
    assert [c[1] for c in whole] == ["float32"] and whole[0][2] is None  # every gradient, for the verdict
    assert [c[1] for c in rows] == ["float64"] and rows[0][2] is not None  # the rows' run ...
    assert not rows[0][2](("blocks_0", "fc", "kernel"))  # ... computes no parameter gradient
    assert r.layer("blocks.1.fc").grad_isolated is not None  # each layer's backward, from the layer run alone
    assert len(r.param_grads) == sum(1 for _ in TorchStack().parameters())  # the whole model's, judged
