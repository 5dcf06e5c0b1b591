"""Which parts of a training update are rounding noise: the gradient noise floor carried through
the optimizer (parity.tolerances.TRAIN_NOISE_FLOORS).

A gradient that is zero in exact arithmetic (the key bias of softmax attention) is rounding noise
in both frameworks. SGD passes that noise on scaled by lr, so the update gets an absolute floor.
Adam normalises it: m / sqrt(v) of pure noise is O(1), so the entry moves by up to ~lr in a
direction each framework draws differently. Those entries are found from torch's own first moment
and judged by Adam's largest possible step; every other entry keeps the table's tolerance.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from parity.judge import Comparison, judge
from parity.tolerances import GRAD, TRAIN_NOISE_FLOORS, Tolerance, forward_noise_floor, noise_floor
from parity.training.optim import OptimizerSpec


def loss_gradient_floor(dtype: str, out_cotangent_norm: float, input_norm: float) -> float:
    """Noise floor of one step's parameter gradients: ||dL/d output|| and ||batch|| (float leaves)."""
    return noise_floor(dtype, GRAD, out_cotangent_norm, input_norm)


def stats_floors(dtype: str, stats: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Noise floor of each BatchNorm running statistic ("<path>.running_mean" / "...running_var",
    torch's values), from the statistics' own scale (TRAIN_NOISE_FLOORS["stats"])."""
    factor = TRAIN_NOISE_FLOORS["stats"].factor
    out = {}
    for name, value in stats.items():
        path, kind = name.rsplit(".", 1)
        mean, var = stats.get(f"{path}.running_mean"), stats.get(f"{path}.running_var")
        if mean is None or var is None:
            continue
        second = np.abs(var) + np.square(mean)  # E[x^2] per channel: the size of what was averaged
        scale = np.sqrt(second) if kind == "running_mean" else second
        out[name] = factor * forward_noise_floor(dtype, float(np.linalg.norm(scale)))
    return out


def adam_step_bound(b1: float, b2: float, k: int) -> float:
    """max |m_hat / sqrt(v_hat)| after k >= 1 steps, over all gradient sequences.

    m = (1-b1) sum b1^(k-j) g_j, v = (1-b2) sum b2^(k-j) g_j^2; Cauchy-Schwarz with weights
    b2^(k-j) gives |m| / sqrt(v) <= (1-b1) / sqrt(1-b2) * sqrt(sum_i (b1^2/b2)^i), and the bias
    corrections multiply by sqrt(1-b2^k) / (1-b1^k). Equals 1 at k = 1 (the step is sign(g))."""
    s = sum((b1 * b1 / b2) ** i for i in range(k))
    return (1 - b1) / (1 - b1**k) * math.sqrt((1 - b2**k) / (1 - b2)) * math.sqrt(s)


class UpdateNoise:
    """Tracks, per torch-named parameter, how much of each update is gradient rounding noise.

    Call ``observe`` once per step with torch's gradients (before its optimizer step) and the
    parameters both sides had before it, then ``compare`` each update.
    """

    def __init__(self, spec: OptimizerSpec):
        self.spec = spec
        self.adam = spec.name in ("adam", "adamw")
        self.rule = TRAIN_NOISE_FLOORS["adam" if self.adam else "linear"]
        self.noise = 0.0  # the gradient floor accumulated as the optimizer accumulates gradients
        self.m: dict[str, np.ndarray] = {}  # torch's first moment (Adam), float64
        self.step = 0
        self.lr = 0.0
        self.floor_now = 0.0
        self.masks: dict[str, np.ndarray] = {}
        self.bounds: dict[str, np.ndarray | float] = {}

    def observe(self, lr: float, grad_floor: float, t_grads: Mapping[str, np.ndarray],
                t_prev: Mapping[str, np.ndarray], f_prev: Mapping[str, np.ndarray]) -> None:
        """One optimizer step: lr used, this step's gradient floor, torch's loss gradients and the
        parameters of each side before the step (all by torch name, torch layout)."""
        s = self.spec
        self.step += 1
        self.lr, self.floor_now = lr, grad_floor
        if not self.adam:
            first = self.step == 1
            self.noise = grad_floor if first else s.mu * self.noise + grad_floor
            step_noise = grad_floor + s.mu * self.noise if s.name == "nesterov" else self.noise
            self.bounds = {n: self.rule.factor * lr * step_noise for n in t_grads}
            return
        b1, b2 = s.betas
        self.noise = b1 * self.noise + (1 - b1) * grad_floor
        # Per-entry noise step: Adam's largest step, or smaller when eps dominates sqrt(v_hat).
        n_hat = self.noise / (1 - b1**self.step)
        step = lr * min(adam_step_bound(b1, b2, self.step), n_hat / s.eps)
        for n, g in t_grads.items():
            g = np.asarray(g, np.float64)
            if s.name == "adam" and s.wd:  # coupled L2: the moment sees g + wd * p
                g = g + s.wd * t_prev[n]
            self.m[n] = b1 * self.m.get(n, 0.0) + (1 - b1) * g
            self.masks[n] = np.abs(self.m[n]) <= self.noise
            drift = s.wd * lr * np.abs(f_prev[n] - t_prev[n]) if s.name == "adamw" else 0.0
            self.bounds[n] = self.rule.factor * step + drift

    def compare(self, name: str, param: str, flax_update, torch_update, tol: Tolerance) -> Comparison:
        """Compare one parameter's update under ``tol`` with this step's noise allowance."""
        if not self.adam:
            return judge(name, flax_update, torch_update, tol.with_floor(float(self.bounds.get(param, 0.0))))
        mask = self.masks.get(param)
        if mask is None or not mask.any():
            return judge(name, flax_update, torch_update, tol)
        f, t = np.asarray(flax_update, np.float64), np.asarray(torch_update, np.float64)
        if f.shape != t.shape or not (np.isfinite(f).all() and np.isfinite(t).all()):
            return judge(name, f, t, tol)  # its own shape / NaN verdict
        bound = np.broadcast_to(self.bounds[param], t.shape)
        # The determined entries under the table; the noise entries (zeroed here) on their own.
        comp = judge(name, np.where(mask, 0.0, f), np.where(mask, 0.0, t), tol)
        excess = np.where(mask, np.abs(f - t) - bound, -np.inf)
        over = int(np.sum(excess > 0))
        note = (f"{int(mask.sum())}/{mask.size} entries have a first moment under the gradient noise "
                f"floor ({self.noise:.2e}): Adam steps noise, judged by |d| <= {float(bound.max()):.2e}")
        if over:
            with np.errstate(divide="ignore"):  # a zero allowance: any noise step is over it
                ratio = float(np.max(np.abs(f - t)[mask] / bound[mask]))
            worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), t.shape))
            return replace(comp, ok=False, mismatches=comp.mismatches + over, worst_index=worst,
                           expected_at_worst=float(t[worst]), actual_at_worst=float(f[worst]),
                           max_abs=max(comp.max_abs, float(np.max(np.abs(f - t)))),
                           score=max(comp.score, ratio),
                           note=f"{note}; {over} over it")
        # Every entry noise: nothing real to show a relative error of (the summary says <floor).
        floor = float(np.linalg.norm(bound[mask])) if mask.all() else 0.0
        return replace(comp, note=note, floor=floor)
