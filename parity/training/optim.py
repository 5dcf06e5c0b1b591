"""Matching optimizers and LR schedules: torch.optim on one side, optax on the other.

Every convention difference between the two libraries is either handled here (and listed by
``conventions``) or refused by name. ``reference_update`` is torch's update formula in numpy with
one knob per known convention mistake, used to name the mistake when a Flax run diverges.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import jax.numpy as jnp
import optax
import torch

OPTIMIZERS = ("sgd", "sgd-momentum", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer + LR schedule, built identically for torch and optax.

    weight_decay=None means torch's default for that optimizer (0, or 1e-2 for AdamW); it is
    always passed explicitly to optax, whose adamw default (1e-4) differs from torch's.
    """

    name: str = "sgd-momentum"
    lr: float = 0.05
    momentum: float = 0.9  # SGD heavy-ball / nesterov, torch convention (weight of the old buffer)
    dampening: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | None = None
    schedule: str = "constant"
    step_size: int = 10  # "step" schedule: lr *= gamma every step_size steps
    gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.dampening != 0.0:
            # optax.trace has no dampening term, and torch skips dampening on the very first step
            # (buffer = g), so there is no stock optax equivalent: refuse by name.
            raise ValueError("momentum dampening != 0 has no optax equivalent (optax.trace accumulates "
                             "g + mu * b); use dampening=0, torch's default")
        if self.name == "nesterov" and self.momentum <= 0:
            raise ValueError("nesterov needs momentum > 0 (torch raises too)")

    @property
    def wd(self) -> float:
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 1e-2 if self.name == "adamw" else 0.0  # torch.optim defaults

    @property
    def mu(self) -> float:
        return self.momentum if self.name in ("sgd-momentum", "nesterov") else 0.0

    def lr_at(self, k: int, steps: int) -> float:
        """Closed-form LR of the k-th update (k = 0 for the first), the reference for both sides."""
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
        if self.schedule == "step":
            return self.lr * self.gamma ** (k // self.step_size)
        return self.lr

    def with_(self, **kw) -> "OptimizerSpec":
        return replace(self, **kw)


def torch_optimizer(spec: OptimizerSpec, params: Iterable[torch.nn.Parameter], steps: int):
    """(torch optimizer, scheduler or None). scheduler.step() is called after optimizer.step()."""
    params = list(params)
    if spec.name in ("sgd", "sgd-momentum", "nesterov"):
        opt = torch.optim.SGD(params, lr=spec.lr, momentum=spec.mu, dampening=spec.dampening,
                              nesterov=spec.name == "nesterov", weight_decay=spec.wd)
    elif spec.name == "adam":
        opt = torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.wd)
    else:
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.wd)
    if spec.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    elif spec.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=spec.step_size, gamma=spec.gamma)
    else:
        sched = None
    return opt, sched


def optax_schedule(spec: OptimizerSpec, steps: int) -> Callable:
    """The optax mirror of torch's scheduler. optax reads the update count before incrementing
    it and torch steps its scheduler after the update, so both use lr(0) for the first update."""
    if spec.schedule == "cosine":
        # torch CosineAnnealingLR uses a recursive (chainable) form; optax the closed form.
        # Equal in exact arithmetic; the per-step LR is compared so any drift shows.
        return optax.cosine_decay_schedule(spec.lr, decay_steps=steps, alpha=0.0)
    if spec.schedule == "step":
        # Not optax.exponential_decay: measured, it returns a float32 LR even under x64 (2e-8
        # relative off torch's float64 LR). The staircase formula itself, in the default float.
        return lambda count: spec.lr * jnp.power(spec.gamma, count // spec.step_size)
    return optax.constant_schedule(spec.lr)


def optax_optimizer(spec: OptimizerSpec, steps: int) -> optax.GradientTransformation:
    """optax transformation that computes torch.optim's update for ``spec``."""
    lr = optax_schedule(spec, steps)
    wd = spec.wd
    if spec.name in ("sgd", "sgd-momentum", "nesterov"):
        # torch SGD: g += wd * p (coupled, before momentum); b = mu * b + g (b = g at step 1);
        # p -= lr * b, or lr * (g + mu * b) for nesterov. optax.trace: t = g + mu * t (t0 = 0, so
        # t = g at step 1), nesterov output g + mu * t: the same recurrences when dampening = 0.
        sgd = optax.sgd(lr, momentum=spec.mu or None, nesterov=spec.name == "nesterov")
        return optax.chain(optax.add_decayed_weights(wd), sgd) if wd else sgd
    b1, b2 = spec.betas
    if spec.name == "adam":
        # torch Adam: weight_decay is L2 added to the gradient BEFORE the moments (coupled):
        # add_decayed_weights first, then optax.adam; NOT optax.adamw. eps: torch adds it to
        # sqrt(v_hat), optax.adam's eps is outside the sqrt too; eps_root (inside) stays 0.
        adam = optax.adam(lr, b1=b1, b2=b2, eps=spec.eps, eps_root=0.0)
        return optax.chain(optax.add_decayed_weights(wd), adam) if wd else adam
    # torch AdamW: p *= 1 - lr_t * wd, then the Adam step. optax.adamw: update = adam + wd * p,
    # then * -lr_t: the same p - lr_t * wd * p. mask=None decays every leaf, like torch's single
    # param group (biases and norm scales included); wd passed explicitly (defaults differ).
    return optax.adamw(lr, b1=b1, b2=b2, eps=spec.eps, eps_root=0.0, weight_decay=wd, mask=None)


def conventions(spec: OptimizerSpec) -> list[str]:
    """Each convention difference relevant to ``spec``, with how it is handled (for the report)."""
    out = []
    if spec.mu:
        out.append("SGD momentum: torch b = mu*b + (1-dampening)*g, p -= lr*b; optax.trace b = g + mu*b "
                   "then * -lr: equal with dampening=0 (refused otherwise)")
    if spec.name == "nesterov":
        out.append("nesterov: torch steps with g + mu*b (b already updated); optax.trace(nesterov=True) "
                   "returns g + mu*t: same formula")
    if spec.name.startswith("sgd") or spec.name == "nesterov":
        if spec.wd:
            out.append("SGD weight_decay: torch adds wd*p to the gradient before momentum == "
                       "optax.add_decayed_weights chained before optax.sgd")
    if spec.name in ("adam", "adamw"):
        out.append("Adam eps: torch adds eps to sqrt(v_hat) (outside the root); optax eps is outside "
                   "too and eps_root (inside) is 0")
        out.append("Adam bias correction: both divide m by 1-b1^t and v by 1-b2^t (torch folds it "
                   "into the step size: same math, different rounding)")
    if spec.name == "adam" and spec.wd:
        out.append("Adam weight_decay is coupled L2 (added to g before the moments): "
                   "add_decayed_weights before optax.adam, not optax.adamw")
    if spec.name == "adamw":
        out.append(f"AdamW decoupled decay: torch p *= 1 - lr*wd; optax.adamw adds wd*p to the update "
                   f"before * -lr (same), mask=None (all params, like torch); wd={spec.wd:g} passed "
                   "explicitly (torch default 1e-2, optax default 1e-4)")
    if spec.schedule != "constant":
        out.append(f"LR schedule '{spec.schedule}': torch scheduler.step() after optimizer.step(), optax "
                   "schedule(count) before incrementing: both use lr(0) first; LR compared per step")
    return out


# --- numpy reference of torch's update, with one knob per known mistake -------------------------
@dataclass
class _RefState:
    buf: dict[str, np.ndarray] = field(default_factory=dict)
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)


def reference_update(spec: OptimizerSpec, state: _RefState, t: int, lr: float,
                     params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
                     *, nesterov: bool | None = None, mu: float | None = None, damp: float = 0.0,
                     wd_mode: str | None = None, wd: float | None = None, eps_inside: bool = False,
                     bias_correction: bool = True, ema: bool = False) -> dict[str, np.ndarray]:
    """Update (p_new - p) of torch's formula at step t (1-based), float64; mutates ``state``."""
    wd = spec.wd if wd is None else wd
    adam = spec.name in ("adam", "adamw")
    wd_mode = wd_mode or ("decoupled" if spec.name == "adamw" else "coupled")
    nesterov = spec.name == "nesterov" if nesterov is None else nesterov
    mu = spec.mu if mu is None else mu
    out = {}
    for k, p in params.items():
        p = np.asarray(p, np.float64)
        g = np.asarray(grads[k], np.float64)
        if wd_mode == "coupled":
            g = g + wd * p
        if adam:
            b1, b2 = spec.betas
            m = b1 * state.m.get(k, 0.0) + (1 - b1) * g
            v = b2 * state.v.get(k, 0.0) + (1 - b2) * g * g
            state.m[k], state.v[k] = m, v
            mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
            d = mh / (np.sqrt(vh + spec.eps) if eps_inside else np.sqrt(vh) + spec.eps)
        elif mu:
            if ema:  # an EMA trace from zero: b = mu*b + (1-mu)*g from the first step on
                b = mu * state.buf.get(k, 0.0) + (1 - mu) * g
            else:  # torch: b = g at the first step, dampening only afterwards
                b = g if k not in state.buf else mu * state.buf[k] + (1 - damp) * g
            state.buf[k] = b
            d = g + mu * b if nesterov else b
        else:
            d = g
        delta = -lr * d
        if wd_mode == "decoupled":
            delta = delta - lr * wd * p
        elif wd_mode == "decoupled-unscaled":
            delta = delta - wd * p
        out[k] = delta
    return out


def suspect_variants(spec: OptimizerSpec) -> list[tuple[str, dict]]:
    """(name of the convention mistake, reference_update knobs) worth trying for ``spec``."""
    out: list[tuple[str, dict]] = []
    if spec.mu:
        if spec.name == "nesterov":
            out.append(("nesterov: heavy-ball update used where torch uses nesterov", dict(nesterov=False)))
        else:
            out.append(("nesterov: nesterov update used where torch uses heavy-ball", dict(nesterov=True)))
        out.append((f"momentum convention: torch momentum={spec.mu:g} passed as {1 - spec.mu:g}",
                    dict(mu=1 - spec.mu)))
        out.append(("momentum dampening: buffer accumulates (1-mu)*g after the first step "
                    "(torch dampening=mu)", dict(damp=spec.mu)))
        out.append(("momentum dampening: an EMA trace b = mu*b + (1-mu)*g (e.g. optax.ema) where torch "
                    "accumulates b = mu*b + g", dict(ema=True)))
    if spec.name in ("adam", "adamw"):
        out.append(("Adam eps placement: eps inside the square root (optax eps_root) where torch adds it "
                    "to sqrt(v_hat)", dict(eps_inside=True)))
        out.append(("Adam bias correction missing", dict(bias_correction=False)))
    if spec.name == "adamw":
        out.append(("weight decay coupled (L2 into the gradient, torch Adam style) where torch AdamW "
                    "decouples it", dict(wd_mode="coupled")))
        out.append(("decoupled weight decay not multiplied by the learning rate",
                    dict(wd_mode="decoupled-unscaled")))
    elif spec.name == "adam":
        if spec.wd:
            out.append(("weight decay decoupled (optax.adamw) where torch Adam couples it as L2",
                        dict(wd_mode="decoupled")))
        else:
            out.append(("optax.adamw default weight_decay=1e-4 applied where torch Adam has none",
                        dict(wd_mode="decoupled", wd=1e-4)))
    elif spec.wd:
        out.append(("weight decay decoupled where torch SGD couples it as L2", dict(wd_mode="decoupled")))
    if spec.schedule != "constant":
        out.append(("LR schedule off by one step (lr(t) used for update t, torch uses lr(t-1))",
                    dict(lr_shift=1)))
    return out


__all__ = ["OPTIMIZERS", "SCHEDULES", "OptimizerSpec", "conventions", "optax_optimizer",
           "optax_schedule", "reference_update", "suspect_variants", "torch_optimizer"]
