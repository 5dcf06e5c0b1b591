"""The one tolerance table: (dtype, matmul precision, what is compared) -> Tolerance.

A comparison passes when every criterion that is set holds:
  elementwise  |a - b| <= atol + rtol * |b|      (rtol and atol always come together)
  norm-wise    ||a - b|| / ||b|| <= rel_norm
Each entry carries the reason for its numbers. Nothing outside this file holds a tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Tolerance:
    rtol: float | None = None
    atol: float | None = None
    rel_norm: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        # Like torch.testing: an rtol without an atol (or the reverse) is a half-specified check
        # that fails on exact zeros or passes anything large; refuse it.
        if (self.rtol is None) != (self.atol is None):
            raise ValueError("rtol and atol must be given together")
        if self.rtol is None and self.rel_norm is None:
            raise ValueError("a Tolerance needs rtol/atol, rel_norm, or both")

    def override(self, rtol: float | None = None, atol: float | None = None) -> "Tolerance":
        if rtol is None and atol is None:
            return self
        if (rtol is None) != (atol is None):
            raise ValueError("rtol and atol must be given together")
        return replace(self, rtol=rtol, atol=atol, reason=f"per-call override (was: {self.reason})")

    def describe(self) -> str:
        parts = []
        if self.rtol is not None:
            parts.append(f"rtol={self.rtol:g} atol={self.atol:g}")
        if self.rel_norm is not None:
            parts.append(f"rel_norm<={self.rel_norm:g}")
        return ", ".join(parts)


FORWARD, GRAD = "forward", "grad"

# Key: (dtype name, JAX matmul precision / TF32 state, FORWARD or GRAD).
TOLERANCES: dict[tuple[str, str, str], Tolerance] = {
    ("float64", "highest", FORWARD): Tolerance(
        rel_norm=1e-10,
        reason="float64 eps is 2.2e-16; reduction order differs between XLA and ATen, which "
        "costs a few ulps per accumulation, far below 1e-10 for the model sizes we check",
    ),
    ("float64", "highest", GRAD): Tolerance(
        rel_norm=1e-10, reason="same as forward: backward is a same-sized chain of reductions"
    ),
    ("float32", "highest", FORWARD): Tolerance(
        rtol=1e-5, atol=1e-5,
        reason="float32 eps is 1.2e-7; different summation orders of a few hundred terms give "
        "~1e-6 relative differences, so 1e-5 leaves ~10x headroom and still catches any layout bug",
    ),
    ("float32", "highest", GRAD): Tolerance(
        rtol=1e-4, atol=1e-4,
        reason="gradients are sums over the whole batch and spatial extent (one more reduction "
        "level than the forward), so order-dependent rounding is ~10x the forward's",
    ),
}


def tolerance_for(dtype: str, kind: str, precision: str = "highest") -> Tolerance:
    """Look up the table; a missing entry is an error, never a silent default."""
    key = (dtype, precision, kind)
    if key not in TOLERANCES:
        known = ", ".join("/".join(k) for k in TOLERANCES)
        raise KeyError(f"no tolerance for {'/'.join(key)}; known: {known}")
    return TOLERANCES[key]
