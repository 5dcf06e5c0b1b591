"""The real-data demo: the CNN pair trained on sklearn's bundled 8x8 digits in both frameworks."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch

from model_configs import CNNConfig
from parity.registry import PAIRS
from parity.runtime import FlaxTwin, flax_inputs
from parity.tolerances import TRAIN_LOSS, train_tolerance
from parity.training.data import epoch_batches, load_digits_split
from parity.training.check import train_check
from parity.training._report import TrainReport
from parity.training.optim import OptimizerSpec

# 8x8 inputs: two 2x2 pools leave 2x2 maps; small widths keep a few hundred steps in seconds.
DIGITS_CNN = CNNConfig(in_channels=1, image_size=8, features=(8, 16), hidden=32, num_classes=10)


@dataclass
class DigitsResult:
    report: TrainReport
    torch_accuracy: float
    flax_accuracy: float
    n_test: int

    def __str__(self) -> str:
        return (f"{self.report}\n  test accuracy ({self.n_test} held-out digits): "
                f"torch {self.torch_accuracy:.4f}   flax {self.flax_accuracy:.4f}")


def digits_demo(*, steps: int = 300, optimizer: OptimizerSpec | None = None, dtype: str = "float32",
                batch: int = 64, seed: int = 0) -> DigitsResult:
    """Train the CNN twins from one torch init on digits; per-step parity plus test accuracies."""
    optimizer = optimizer or OptimizerSpec("sgd-momentum", lr=0.05)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=seed)
    pair = PAIRS["cnn"]
    tm, fm = pair.build(DIGITS_CNN, seed=seed)
    data = epoch_batches(x_tr, y_tr, batch=batch, steps=steps, seed=seed)
    report = train_check(tm, fm, data, steps=steps, optimizer=optimizer, loss=pair.loss, dtype=dtype,
                         input_layout=pair.input_layout, name="cnn-digits")
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    with torch.no_grad():
        t_pred = report.torch_module.eval()(torch.as_tensor(x_te, dtype=tdtype)).argmax(1).numpy()
    with jax.enable_x64(dtype == "float64"):
        xf = flax_inputs((x_te,), {"input[0]": pair.input_layout},
                         jnp.float64 if dtype == "float64" else jnp.float32)
        out, _ = FlaxTwin(fm, train=False).apply(report.flax_variables, xf)
        f_pred = np.asarray(out.argmax(-1))
    return DigitsResult(report, float((t_pred == y_te).mean()), float((f_pred == y_te).mean()), len(y_te))


def plot_losses(report: TrainReport, path: str, *, title: str | None = None) -> None:
    """Overlay the per-step losses (top) and plot |loss_flax - loss_torch| per step (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(report.steps) + 1)
    t, f = np.array(report.torch_losses), np.array(report.flax_losses)
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    a.plot(steps, t, label="torch", lw=2.5, alpha=0.6)
    a.plot(steps, f, label="flax", lw=1, ls="--", color="k")
    a.set_ylabel("training loss")
    a.legend()
    a.set_title(title or f"{report.model}: {report.optimizer.name} lr={report.optimizer.lr:g}, {report.dtype}")
    diff = np.abs(f - t)
    b.semilogy(steps, np.where(diff > 0, diff, np.nan), ".", ms=3, label="|flax - torch|")
    # The policy line: the loss check is norm-relative, so the allowed |difference| is rel_norm(k) * |loss|.
    allowed = [train_tolerance(report.dtype, TRAIN_LOSS, int(k)).rel_norm * abs(v) for k, v in zip(steps, t)]
    b.semilogy(steps, allowed, "r-", lw=1, label="tolerance (grows with step)")
    b.set_xlabel("optimizer step")
    b.set_ylabel("abs loss difference")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DIGITS_CNN", "DigitsResult", "digits_demo", "plot_losses"]
