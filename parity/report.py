"""The parity Report: verdict, per-tensor comparisons, numerics environment; text and JSON."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from parity._logits import LogitMetrics
from parity.judge import LOGITS, Comparison
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
    reference: str | None = None  # "float64" when the low-precision values were judged against a float64 run
    env: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # Where a NaN or Inf first appeared ("NaN in input input[0]"); None when every input,
    # output, gradient and layer activation is finite. Any such value makes the verdict INVALID.
    invalid: str | None = None
    # check(strict=True): the trap lint's findings (parity.lint); any makes a PASS a FAIL.
    strict_findings: list[str] = field(default_factory=list)
    # Top-1 / top-k agreement and KL per output leaf declared or inferred as logits (parity._logits);
    # one whose ``decided`` is set passed by the logit rule (its output comparison's judge is "logits").
    logits: list[LogitMetrics] = field(default_factory=list)
    # check(data_parallel=N): the sharded run (parity.data_parallel.DataParallelResult), else None.
    data_parallel: object = None

    @property
    def grads(self) -> list[Comparison]:
        return self.input_grads + self.param_grads

    @property
    def verdict(self) -> str:
        """"PASS", "FAIL", "INCONCLUSIVE" or "INVALID".

        INVALID: NaN on both sides of a compared tensor (NaN is not agreement, and no reference);
        a NaN or inf on one side only is that tensor's FAIL. INCONCLUSIVE: nothing failed, but
        some tensor passed the table only under its atol with no measured noise behind it
        (parity.judge): the evidence to call it a pass is missing, and the warning says how to
        get it."""
        nonfinite = next((c for c in self.outputs + self.grads if c.nonfinite), None)
        if self.invalid or nonfinite is not None:
            return "INVALID"
        layers_ok = all(getattr(row, "ok", True) for row in self.layers)
        good = all(c.ok for c in self.outputs + self.grads) and layers_ok and self.first_divergence is None
        good = good and not self.strict_findings
        if not good:
            return "FAIL"
        return "INCONCLUSIVE" if any(c.inconclusive for c in self.outputs + self.grads) else "PASS"

    @property
    def invalid_reason(self) -> str | None:
        if self.invalid:
            return self.invalid
        c = next((c for c in self.outputs + self.grads if c.nonfinite), None)
        return f"{c.note} {c.name}" if c is not None else None

    @property
    def ok(self) -> bool:
        """True only for PASS (an INVALID check is not a pass)."""
        return self.verdict == "PASS"

    def worst(self, comps: list[Comparison]) -> Comparison | None:
        return max(comps, key=lambda c: (not c.ok, c.rel_norm), default=None)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "mode": self.mode,
            "ok": self.ok,
            "verdict": self.verdict,
            "invalid": self.invalid_reason,
            "first_divergence": self.first_divergence,
            "divergence_kind": self.divergence_kind,
            "reference": self.reference,
            "outputs": [c.to_dict() for c in self.outputs],
            "input_grads": [c.to_dict() for c in self.input_grads],
            "param_grads": [c.to_dict() for c in self.param_grads],
            "layers": [row.to_dict() if hasattr(row, "to_dict") else row for row in self.layers],
            "env": self.env,
            "warnings": self.warnings,
            "strict_findings": self.strict_findings,
            "logits": [m.to_dict() for m in self.logits],
            "data_parallel": self.data_parallel.to_dict() if self.data_parallel is not None else None,
        }

    def to_json(self, **kw) -> str:
        return dumps(self.to_dict(), **kw)

    def layer(self, name: str) -> LayerRow:
        """The row of one layer by torch path ("<root>" for the top module)."""
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the report; have {', '.join(r.name for r in self.layers)}")

    def __str__(self) -> str:
        mode = f"{self.dtype}, {self.mode}"
        verdict = self.verdict
        lines = [f"parity {self.model} [{mode}]: {verdict}"
                 + (f": {self.invalid_reason} (no verdict on parity)" if verdict == "INVALID" else "")]
        if self.strict_findings:
            lines.append(f"  strict: {len(self.strict_findings)} trap finding(s) make this check fail "
                         "(listed below as 'trap:' warnings)")
        if self.first_divergence and verdict != "INVALID":  # NaN propagates: every layer "diverges"
            row = self.layer(self.first_divergence)
            comp = row.isolated if self.divergence_kind == "forward" else row.grad_isolated
            head = f"  first divergence: {self.first_divergence} ({row.torch_type}, flax {row.flax_path}), "
            if comp is None:  # located by accumulated error inside a layer that cannot run alone
                lines.append(head + "forward: this layer cannot run alone (" + "; ".join(row.notes)[:160]
                             + "); the error first appears inside it, with every layer before it in tolerance"
                             + (f" (its output: rel_norm {row.accumulated.rel_norm:.3e})" if row.accumulated else ""))
            else:
                lines.append(
                    head + ("forward: this layer alone on torch's input" if self.divergence_kind == "forward"
                            else "backward: this layer's VJP at torch's input and output cotangent")
                    + f" is off by rel_norm {comp.rel_norm:.3e}, max_abs {comp.max_abs:.3e}"
                )
        lines.append(f"  {'tensor':<36} {'max_abs':>10} {'max_rel':>10} {'rel_norm':>10} {'bad':>6} "
                     f"{'judge':>9}  ok")
        for c in self.outputs + self.grads:
            lines.append(
                f"  {c.name[:36]:<36} {c.max_abs:10.3e} {c.max_rel:10.3e} {c.rel_norm:10.3e} "
                f"{c.mismatches:6d} {c.judge:>9}  {c.verdict}"
            )
            if not c.ok or c.inconclusive or c.judge == LOGITS:  # a logit-rule pass shows what failed elementwise
                lines.append(
                    f"      worst at {list(c.worst_index)}: torch {c.expected_at_worst:.6g}, "
                    f"flax {c.actual_at_worst:.6g} ({c.tolerance}{'; ' + c.note if c.note else ''})"
                )
        for m in self.logits:
            lines.append(f"  logits {m.path} {list(m.shape)}: {m.describe()}"
                         + ("  <- the logit rule decided" if m.decided else ""))
        if self.layers:
            lines.append("  layers, execution order (rel_norm; iso = Flax layer alone on torch's input, "
                         "acc = inherited through the Flax model):")
            lines.append(f"    {'layer':<26} {'type':<16} {'iso fwd':>9} {'acc fwd':>9} "
                         f"{'iso bwd':>9} {'acc bwd':>9}  ok")

            def num(c: Comparison | None) -> str:
                return f"{'-':>9}" if c is None else f"{c.rel_norm:9.2e}"

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


def json_safe(value):
    """``value`` with every non-finite float as a string ("inf", "-inf", "nan"): JSON has no
    Infinity or NaN, and strict parsers (jq, JavaScript's JSON.parse) reject Python's."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(payload, **kw) -> str:
    """Strict JSON text of a report dict (or a list of them): non-finite numbers as strings."""
    return json.dumps(json_safe(payload), indent=2, default=str, allow_nan=False, **kw)
