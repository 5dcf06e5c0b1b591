"""The parity Report: verdict, per-tensor comparisons, numerics environment; text and JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from parity.compare import Comparison
from parity.layers import LayerRow


@dataclass
class Report:
    """Result of one parity check. ``ok`` is False if any output, gradient or layer is out of tolerance."""

    model: str
    dtype: str
    mode: str  # "eval" or "train"
    outputs: list[Comparison]
    input_grads: list[Comparison] = field(default_factory=list)
    param_grads: list[Comparison] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    # Torch module path ("<root>" for the top module) of the first layer, in execution order,
    # whose isolated error is out of tolerance; divergence_kind says forward or backward.
    first_divergence: str | None = None
    divergence_kind: str | None = None
    reference: str | None = None  # "float64" when judged in fp64-reference mode
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
            "divergence_kind": self.divergence_kind,
            "reference": self.reference,
            "outputs": [c.to_dict() for c in self.outputs],
            "input_grads": [c.to_dict() for c in self.input_grads],
            "param_grads": [c.to_dict() for c in self.param_grads],
            "layers": [row.to_dict() if hasattr(row, "to_dict") else row for row in self.layers],
            "env": self.env,
            "warnings": self.warnings,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    def layer(self, name: str) -> LayerRow:
        """The row of one layer by torch path ("<root>" for the top module)."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the report; have {', '.join(r.name for r in self.layers)}")

    def __str__(self) -> str:
        mode = f"{self.dtype}, {self.mode}" + (", fp64 reference" if self.reference else "")
        lines = [f"parity {self.model} [{mode}]: {'PASS' if self.ok else 'FAIL'}"]
        if self.first_divergence:
            row = self.layer(self.first_divergence)
            comp = row.isolated if self.divergence_kind == "forward" else row.grad_isolated
            lines.append(
                f"  first divergence: {self.first_divergence} ({row.torch_type}, flax {row.flax_path}), "
                + ("forward: this layer alone on torch's input" if self.divergence_kind == "forward"
                   else "backward: this layer's VJP at torch's input and output cotangent")
                + f" is off by rel_norm {comp.rel_norm:.3e}, max_abs {comp.max_abs:.3e}"
            )
        lines.append(f"  {'tensor':<36} {'max_abs':>10} {'max_rel':>10} {'rel_norm':>10} {'bad':>6}  ok")
        for c in self.outputs + self.grads:
            lines.append(
                f"  {c.name[:36]:<36} {c.max_abs:10.3e} {c.max_rel:10.3e} {c.rel_norm:10.3e} "
                f"{c.mismatches:6d}  {'ok' if c.ok else 'FAIL'}"
            )
            if not c.ok:
                lines.append(
                    f"      worst at {list(c.worst_index)}: torch {c.expected_at_worst:.6g}, "
                    f"flax {c.actual_at_worst:.6g} ({c.tolerance}{'; ' + c.note if c.note else ''})"
                )
        if self.layers:
            lines.append("  layers, execution order (rel_norm; iso = Flax layer alone on torch's input, "
                         "acc = inherited through the Flax model):")
            lines.append(f"    {'layer':<26} {'type':<16} {'iso fwd':>9} {'acc fwd':>9} "
                         f"{'iso bwd':>9} {'acc bwd':>9}  ok")

            def num(c: Comparison | None) -> str:
                return f"{c.rel_norm:9.2e}" if c is not None else f"{'-':>9}"

            for row in self.layers:
                verdict = "ok" if row.ok else "FAIL " + "/".join(
                    k for k, good in (("fwd", row.forward_ok), ("bwd", row.backward_ok)) if not good)
                mark = "  <- first divergence" if row.name == self.first_divergence else ""
                lines.append(f"    {row.name[:26]:<26} {row.torch_type[:16]:<16} {num(row.isolated)} "
                             f"{num(row.accumulated)} {num(row.grad_isolated)} {num(row.grad_accumulated)}  "
                             f"{verdict}{mark}")
                for comp in (row.isolated, row.grad_isolated):
                    if comp is not None and not comp.ok:
                        where = f"worst at {list(comp.worst_index)}" if comp.worst_index else comp.note
                        lines.append(f"        {comp.name}: {where}: torch {comp.expected_at_worst:.6g}, "
                                     f"flax {comp.actual_at_worst:.6g} ({comp.tolerance})")
                for note in row.notes:
                    lines.append(f"        note: {note}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)
