"""``parity train {mlp,cnn,unet}``: train both twins side by side and compare every step.

``cnn`` is the real-data demo (sklearn digits, 8x8); ``mlp`` and ``unet`` use their tiny registry
configs on synthetic batches (``unet`` means unet-same-bn: the BatchNorm statistics are the point).
``--data-parallel N``: torch DDP on N gloo processes against the Flax step on an N-device mesh,
for any registry pair (``cnn`` then means the registry pair on synthetic batches) or your own.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from parity.registry import PAIRS

_DEFAULT_PAIR = {"mlp": "mlp", "unet": "unet-same-bn"}
_DEFAULT_LR = {"sgd": 0.05, "sgd-momentum": 0.05, "nesterov": 0.05, "adam": 1e-3, "adamw": 1e-3}


def run(args: argparse.Namespace) -> int:
    from parity.training import OptimizerSpec, train_check
    from parity.training.data import default_loss, synthetic_batches
    from parity.training.digits import digits_demo, plot_losses

    if args.data_parallel:  # before JAX initialises: on CPU the N devices are simulated
        from parity.data_parallel import request_cpu_devices
        request_cpu_devices(args.data_parallel)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    spec = OptimizerSpec(args.optimizer, lr=args.lr if args.lr is not None else _DEFAULT_LR[args.optimizer],
                         schedule=args.schedule, weight_decay=args.weight_decay)
    if args.torch or args.flax or args.example_input or args.input_shape:
        report = _own_pair(args, spec)
        print(report)
    elif args.model is None:
        raise ValueError("give a MODEL or your own pair with --torch/--flax")
    elif args.model == "cnn" and not args.data_parallel:  # the digits demo runs on one device
        result = digits_demo(steps=args.steps or 250, optimizer=spec, dtype=args.dtype,
                             batch=args.batch or 64, seed=args.seed)
        report = result.report
        print(result)
    else:
        name = _DEFAULT_PAIR.get(args.model, args.model)
        if name not in PAIRS:
            raise KeyError(f"unknown model {args.model!r}; choose from mlp, cnn, unet, {', '.join(PAIRS)}")
        pair = PAIRS[name]
        config = pair.config("tiny")
        torch_model, flax_model = pair.build(config, seed=args.seed)
        n = args.data_parallel
        data = synthetic_batches(pair, config, torch_model, batch=args.batch or (2 * n if n else 4), seed=args.seed)
        report = train_check(torch_model, flax_model, data, steps=args.steps or (5 if n else 20), optimizer=spec,
                             loss=default_loss(pair), dtype=args.dtype, input_layout=pair.input_layout,
                             output_layout=pair.out_layout(), train_kwarg=pair.train_kwarg, name=name,
                             data_parallel=n)
        print(report)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_losses(report, args.plot)
        print(f"loss curves: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return 0 if report.ok else 1


def _own_pair(args: argparse.Namespace, spec):
    """train_check on --torch/--flax: the example input every step, labels drawn once per batch
    from the torch output's class axis (1), so the two twins see identical batches. With
    --data-parallel N the example input is the global batch (its batch a multiple of N)."""
    import numpy as np
    import torch

    from parity.commands.check import own_pair, refuse_models_with_own_pair
    from parity.runtime import as_args, flatten, torch_inputs
    from parity.training import train_check

    refuse_models_with_own_pair(args, args.model, "MODEL", "MODEL")
    own = own_pair(args)
    torch_model, flax_model, x = own.torch_model, own.flax_model, own.example_input
    loss = args.loss or "cross_entropy"
    with torch.no_grad():
        dtype = next((p.dtype for p in torch_model.parameters() if p.is_floating_point()), torch.float32)
        out = next(iter(flatten(torch_model.eval()(*torch_inputs(as_args(x), dtype, grads=False))).values()))
    rng = np.random.default_rng(args.seed)
    n = max(1, args.batch or 4)
    if loss == "mse":
        data = [(x, rng.standard_normal(tuple(out.shape))) for _ in range(n)]
    else:
        shape = (out.shape[0], *out.shape[2:])
        data = [(x, rng.integers(0, out.shape[1], size=shape)) for _ in range(n)]
    n_dp = args.data_parallel
    return train_check(torch_model, flax_model, data, steps=args.steps or (5 if n_dp else 20), optimizer=spec,
                       loss=loss, dtype=args.dtype, name=own.name, data_parallel=n_dp, **own.facts())
