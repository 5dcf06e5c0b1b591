"""What training parity reports: per step the comparisons (StepResult), and the run (TrainReport)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from parity.judge import Comparison
from parity.training.optim import OptimizerSpec


@dataclass
class StepResult:
    """Comparisons of one optimizer step (1-based). Tensors are named and laid out as in torch."""

    step: int
    torch_loss: float
    flax_loss: float
    scalars: list[Comparison]  # loss, lr, grad_norm
    updates: list[Comparison]  # "update <param>": p_t - p_{t-1}
    stats: list[Comparison]  # BatchNorm running_mean / running_var after the step

    @property
    def comparisons(self) -> list[Comparison]:
        return self.scalars + self.updates + self.stats

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def worst(self, comps: list[Comparison]) -> Comparison | None:
        """Failures first, then the largest real relative error: a tensor below its noise floor
        (zero in exact arithmetic) comes last, its rel_norm being a ratio of two noises."""
        return max(comps, key=lambda c: (not c.ok, not c.below_floor, c.rel_norm), default=None)

    def scalar(self, name: str) -> Comparison:
        return next(c for c in self.scalars if c.name == name)

    def to_dict(self) -> dict:
        w_u, w_s = self.worst(self.updates), self.worst(self.stats)
        return {
            "step": self.step, "ok": self.ok, "torch_loss": self.torch_loss, "flax_loss": self.flax_loss,
            "scalars": [c.to_dict() for c in self.scalars],
            "worst_update": w_u.to_dict() if w_u else None,
            "worst_stat": w_s.to_dict() if w_s else None,
            "failures": [c.to_dict() for c in self.comparisons if not c.ok],
        }


@dataclass
class TrainReport:
    """Per-step comparison of a torch and a Flax training run from the same initial weights."""

    model: str
    dtype: str
    optimizer: OptimizerSpec
    loss: str
    steps: list[StepResult]
    conventions: list[str] = field(default_factory=list)  # handled convention differences
    findings: list[str] = field(default_factory=list)  # named mistakes (BatchNorm audit, optimizer)
    notes: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    torch_module: Any = field(default=None, repr=False)  # trained copy
    flax_variables: Any = field(default=None, repr=False)  # trained variables

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def first_failure(self) -> StepResult | None:
        return next((s for s in self.steps if not s.ok), None)

    @property
    def torch_losses(self) -> list[float]:
        return [s.torch_loss for s in self.steps]

    @property
    def flax_losses(self) -> list[float]:
        return [s.flax_loss for s in self.steps]

    def max_loss_diff(self, upto: int) -> float:
        """max |loss_flax - loss_torch| over steps 1..upto."""
        return max((s.scalar("loss").max_abs for s in self.steps[:upto]), default=0.0)

    def to_dict(self) -> dict:
        first = self.first_failure
        return {
            "model": self.model, "dtype": self.dtype, "ok": self.ok, "loss": self.loss,
            "optimizer": self.optimizer.__dict__ | {"weight_decay": self.optimizer.wd},
            "first_failure": first.step if first else None,
            "conventions": self.conventions, "findings": self.findings, "notes": self.notes,
            "steps": [s.to_dict() for s in self.steps], "env": self.env,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    def __str__(self) -> str:
        o = self.optimizer
        first = self.first_failure
        lines = [f"train parity {self.model} [{self.dtype}, {o.name} lr={o.lr:g} {o.schedule}, "
                 f"{len(self.steps)} steps, loss {self.loss}]: {'PASS' if self.ok else 'FAIL'}"]
        if first:
            bad = [c.name for c in first.comparisons if not c.ok]
            lines.append(f"  first failure at step {first.step}: {', '.join(bad)[:200]}")
        lines.append(f"  {'step':>5} {'torch loss':>12} {'flax loss':>12} {'|dloss|':>9} {'lr rel':>8} "
                     f"{'gnorm rel':>9} {'worst update rel_norm':>30} {'stats rel':>9}  ok")
        for s in self._rows_to_show():
            wu, ws = s.worst(s.updates), s.worst(s.stats)
            lines.append(
                f"  {s.step:5d} {s.torch_loss:12.6g} {s.flax_loss:12.6g} {s.scalar('loss').max_abs:9.2e} "
                f"{s.scalar('lr').rel_norm:8.1e} {s.scalar('grad_norm').rel_norm:9.2e} "
                f"{(_rel(wu) + ' ' + wu.name.removeprefix('update ')[:20]) if wu else '':>30} "
                f"{_rel(ws) if ws else '-':>9}  {'ok' if s.ok else 'FAIL'}")
        if first:
            for c in first.comparisons:
                if not c.ok:
                    lines.append(f"      step {first.step} {c.name}: worst at {list(c.worst_index)} torch "
                                 f"{c.expected_at_worst:.6g} flax {c.actual_at_worst:.6g}, rel_norm "
                                 f"{c.rel_norm:.2e} ({c.tolerance})")
        lines += [f"  finding: {f}" for f in self.findings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _rows_to_show(self) -> list[StepResult]:
        n = len(self.steps)
        keep = {1, 2, 3, 5, n} | {10**k for k in range(1, 6)} | {k * 50 for k in range(1, 200)}
        first = self.first_failure
        if first:
            keep.add(first.step)
        return [s for s in self.steps if s.step in keep]


def _rel(c: Comparison) -> str:
    # An update that is all gradient noise (parity.training.noise) has no meaningful ratio.
    return f"{'<floor':>9}" if c.below_floor else f"{c.rel_norm:9.2e}"
