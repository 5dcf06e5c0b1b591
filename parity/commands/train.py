"""``parity train {mlp,cnn,unet}``: train both twins side by side and compare every step.

``cnn`` is the real-data demo (sklearn digits, 8x8); ``mlp`` and ``unet`` use their tiny registry
configs on synthetic batches (``unet`` means unet-same-bn: the BatchNorm statistics are the point).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from parity.registry import PAIRS

_DEFAULT_PAIR = {"mlp": "mlp", "unet": "unet-same-bn"}
_DEFAULT_LR = {"sgd": 0.05, "sgd-momentum": 0.05, "nesterov": 0.05, "adam": 1e-3, "adamw": 1e-3}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from parity.training.optim import OPTIMIZERS, SCHEDULES

    p.add_argument("model", help="mlp, cnn (the digits demo), unet, or a registry pair name "
                   f"({', '.join(PAIRS)})")
    p.add_argument("--steps", type=int, default=None, help="default: 250 for cnn, 20 otherwise")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd-momentum")
    p.add_argument("--lr", type=float, default=None, help="default: 0.05 for SGD, 1e-3 for Adam(W)")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--weight-decay", type=float, default=None, help="default: torch's per optimizer")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--batch", type=int, default=None, help="default: 64 for cnn, 4 otherwise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PATH", help="write the overlaid per-step loss curves (PNG)")
    p.add_argument("--json", metavar="PATH", help="write the per-step report as JSON")


def run(args: argparse.Namespace) -> int:
    from parity.training import OptimizerSpec, train_check
    from parity.training.data import default_loss, synthetic_batches
    from parity.training.digits import digits_demo, plot_losses

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    spec = OptimizerSpec(args.optimizer, lr=args.lr if args.lr is not None else _DEFAULT_LR[args.optimizer],
                         schedule=args.schedule, weight_decay=args.weight_decay)
    if args.model == "cnn":
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
        data = synthetic_batches(pair, config, torch_model, batch=args.batch or 4, seed=args.seed)
        report = train_check(torch_model, flax_model, data, steps=args.steps or 20, optimizer=spec,
                             loss=default_loss(pair), dtype=args.dtype, input_layout=pair.layout, name=name)
        print(report)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_losses(report, args.plot)
        print(f"loss curves: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return 0 if report.ok else 1
