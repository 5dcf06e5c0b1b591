"""Full-model parity per registry entry, dtype and mode: outputs, input grads, every param grad."""
from __future__ import annotations

import pytest

import parity
from parity.registry import PAIRS

CASES = [
    pytest.param(pair, dtype, train, id=f"{name}-{dtype}-{'train' if train else 'eval'}")
    for name, pair in PAIRS.items()
    for dtype in ("float32", "float64")
    for train in ((False, True) if pair.has_batch_norm() else (False,))
]


@pytest.mark.parametrize("pair, dtype, train", CASES)
def test_forward_and_gradients_match(pair, dtype, train):
    torch_model, flax_model = pair.build()
    x = pair.example_input()
    report = parity.check(torch_model, flax_model, x, dtype=dtype, train=train,
                          input_layout=pair.layout, name=pair.name)
    assert report.ok, str(report)
    # Every parameter's gradient was compared, and the input's.
    n_params = sum(1 for _ in torch_model.parameters())
    assert len(report.param_grads) == n_params
    assert len(report.input_grads) == 1
    assert report.dtype == dtype and report.env["jax_default_matmul_precision"] == "highest"


def test_registry_has_every_required_variant():
    names = set(PAIRS)
    assert {"mlp", "cnn", "unet-valid", "unet-same", "unet-same-bn", "unet-valid-retain"} <= names
    assert PAIRS["unet-same-bn"].has_batch_norm() and not PAIRS["unet-same"].has_batch_norm()


def test_train_mode_is_really_different_from_eval():
    """Guards the train flag plumbing: BatchNorm in train mode uses batch stats on both sides."""
    import numpy as np
    import torch

    pair = PAIRS["unet-same-bn"]
    torch_model, _ = pair.build()
    x = torch.as_tensor(pair.example_input(), dtype=torch.float32)
    # Non-trivial running stats so eval and train differ.
    for m in torch_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    with torch.no_grad():
        eval_out = torch_model.eval()(x).numpy()
        train_out = torch_model.train()(x).numpy()
    assert not np.allclose(eval_out, train_out)


@pytest.mark.parametrize("name", ["unet-valid", "unet-same", "unet-valid-retain"])
def test_unet_output_sizes(name):
    pair = PAIRS[name]
    cfg = pair.config("tiny")
    torch_model, _ = pair.build(cfg)
    import torch

    out = torch_model(torch.as_tensor(pair.example_input(cfg), dtype=torch.float32))
    size = cfg.image_size if cfg.retain_dim else cfg.output_size(cfg.image_size)
    assert tuple(out.shape) == (2, cfg.num_classes, size, size)


def test_float64_check_does_not_leave_x64_on():
    import jax

    pair = PAIRS["mlp"]
    torch_model, flax_model = pair.build()
    assert not jax.config.jax_enable_x64
    report = parity.check(torch_model, flax_model, pair.example_input(), dtype="float64",
                          input_layout=pair.layout)
    assert report.ok and report.env["jax_enable_x64"]  # recorded as on during the check
    assert not jax.config.jax_enable_x64  # and restored afterwards
