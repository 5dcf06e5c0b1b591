"""Full-model parity per registry entry, dtype and mode: outputs, input grads, every param grad."""
from __future__ import annotations

import pytest

import torch

import parity
from parity.registry import PAIRS
from parity.runtime import FlaxTwin, as_args, flax_inputs, input_layouts, output_shapes, torch_inputs
from weight_port import torch_to_flax
from weight_port.layout import flax_shape

CASES = [
    pytest.param(pair, dtype, train, id=f"{name}-{dtype}-{'train' if train else 'eval'}")
    for name, pair in PAIRS.items()
    for dtype in ("float32", "float64")
    for train in pair.modes()
]


@pytest.mark.parametrize("pair, dtype, train", CASES)
def test_forward_and_gradients_match(pair, dtype, train):
    torch_model, flax_model = pair.build()
    x = pair.example_input()
    report = parity.check(torch_model, flax_model, x, dtype=dtype, train=train,
                          input_layout=pair.input_layout, output_layout=pair.out_layout(),
                          train_kwarg=pair.train_kwarg, name=pair.name)
    assert report.ok, str(report)
    # Every parameter's gradient was compared, and the input's.
    n_params = sum(1 for _ in torch_model.parameters())
    assert len(report.param_grads) == n_params
    assert len(report.input_grads) == 1
    assert report.dtype == dtype and report.env["jax_default_matmul_precision"] == "highest"
    # Not a vacuous pass: no output or gradient of a built-in pair is all zeros (a dead branch).
    assert not [w for w in report.warnings if "all zeros" in w], report.warnings


def test_registry_has_every_required_variant():
    names = set(PAIRS)
    assert {"mlp", "cnn", "unet-valid", "unet-same", "unet-same-bn", "unet-valid-retain"} <= names
    assert PAIRS["unet-same-bn"].modes() == [False, True] and PAIRS["unet-same"].modes() == [False]


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


def test_registry_entries_declare_layouts_that_match_their_twins():
    """Each entry's declared output layout agrees with what the shapes say (where they can)."""
    for pair in PAIRS.values():
        tm, fm = pair.build()
        args = torch_inputs(as_args(pair.example_input()), torch.float32, grads=False)
        assert input_layouts(tm, args) == {"input[0]": pair.input_layout}, pair.name
        variables = torch_to_flax(tm, fm, args[0].detach(), input_layout=pair.input_layout)
        (shape,) = [s.shape for s in output_shapes(FlaxTwin(fm), variables,
                                                     flax_inputs(args, {"input[0]": pair.input_layout})).values()]
        t_shape = tuple(tm.eval()(*args).shape)
        assert flax_shape(t_shape, pair.out_layout()) == tuple(shape), pair.name
