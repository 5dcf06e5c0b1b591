"""The parity Report: verdict, per-tensor comparisons, numerics environment; text and JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from parity.compare import Comparison


@dataclass
class Report:
    """Result of one parity check. ``ok`` is False if any output, gradient or layer is out of tolerance."""

    model: str
    dtype: str
    mode: str  # "eval" or "train"
    outputs: list[Comparison]
    input_grads: list[Comparison] = field(default_factory=list)
    param_grads: list[Comparison] = field(default_factory=list)
    layers: list = field(default_factory=list)
    first_divergence: str | None = None
    env: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def grads(self) -> list[Comparison]:
        return self.input_grads + self.param_grads

    @property
    def ok(self) -> bool:
        layers_ok = all(getattr(row, "ok", True) for row in self.layers)
        return all(c.ok for c in self.outputs + self.grads) and layers_ok and self.first_divergence is None

    def worst(self, comps: list[Comparison]) -> Comparison | None:
        return max(comps, key=lambda c: (not c.ok, c.rel_norm), default=None)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "mode": self.mode,
            "ok": self.ok,
            "first_divergence": self.first_divergence,
            "outputs": [c.to_dict() for c in self.outputs],
            "input_grads": [c.to_dict() for c in self.input_grads],
            "param_grads": [c.to_dict() for c in self.param_grads],
            "layers": [row.to_dict() if hasattr(row, "to_dict") else row for row in self.layers],
            "env": self.env,
            "warnings": self.warnings,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    def __str__(self) -> str:
        head = f"parity {self.model} [{self.dtype}, {self.mode}]: {'PASS' if self.ok else 'FAIL'}"
        lines = [head]
        if self.first_divergence:
            lines.append(f"  first divergence: {self.first_divergence}")
        lines.append(f"  {'tensor':<36} {'max_abs':>10} {'max_rel':>10} {'rel_norm':>10} {'bad':>6}  ok")
        for c in self.outputs + self.grads:
            lines.append(
                f"  {c.name[:36]:<36} {c.max_abs:10.3e} {c.max_rel:10.3e} {c.rel_norm:10.3e} "
                f"{c.mismatches:6d}  {'ok' if c.ok else 'FAIL'}"
            )
            if not c.ok:
                lines.append(
                    f"      worst at {list(c.worst_index)}: torch {c.expected_at_worst:.6g}, "
                    f"flax {c.actual_at_worst:.6g} ({c.tolerance})"
                )
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)
