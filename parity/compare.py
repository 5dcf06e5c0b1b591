"""The one comparison helper: torch-layout vs Flax-layout arrays, reported by path and worst element."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from parity.tolerances import Tolerance
from weight_port.layout import AS_IS, to_torch_layout
from weight_port.tensors import to_numpy


@dataclass(frozen=True)
class Comparison:
    """Error of one tensor. Indices are in torch layout (e.g. [N, C, H, W])."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    rel_norm: float
    mismatches: int
    worst_index: tuple[int, ...]
    expected_at_worst: float
    actual_at_worst: float
    tolerance: str
    ok: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _as_float64(x) -> np.ndarray:
    return np.asarray(to_numpy(x), dtype=np.float64)


def compare(
    name: str, flax_value, torch_value, tol: Tolerance, *, layout: str = AS_IS
) -> Comparison:
    """Compare a Flax result (Flax layout) against the torch reference (torch layout).

    The Flax value is converted to torch layout here and nowhere else, so every reported index
    means the same thing to a PyTorch user. Arithmetic is in float64 so the error of the error
    measure does not leak into the verdict.
    """
    actual = _as_float64(to_torch_layout(to_numpy(flax_value), layout))
    expected = _as_float64(torch_value)
    if actual.shape != expected.shape:
        raise ValueError(f"{name}: shape mismatch, flax {actual.shape} (torch layout) vs torch {expected.shape}")
    diff = np.abs(actual - expected)
    nonfinite = ~np.isfinite(actual) | ~np.isfinite(expected)
    same_nonfinite = nonfinite & ((actual == expected) | (np.isnan(actual) & np.isnan(expected)))
    diff = np.where(same_nonfinite, 0.0, np.where(nonfinite, np.inf, diff))
    denom = np.abs(expected)
    rel = np.divide(diff, denom, out=np.where(diff > 0, np.inf, 0.0), where=denom > 0)
    norm_ref = float(np.linalg.norm(np.where(nonfinite, 0.0, expected)))
    norm_diff = float(np.linalg.norm(np.where(np.isinf(diff), 0.0, diff))) if diff.size else 0.0
    rel_norm = norm_diff / norm_ref if norm_ref > 0 else (0.0 if norm_diff == 0 else np.inf)
    if np.isinf(diff).any():
        rel_norm = np.inf
    if tol.rtol is not None:
        bad = diff > tol.atol + tol.rtol * denom
    else:
        bad = np.zeros(diff.shape, dtype=bool)
    mismatches = int(bad.sum())
    ok = mismatches == 0 and (tol.rel_norm is None or rel_norm <= tol.rel_norm)
    if diff.size:
        # Worst element: the most out-of-tolerance one when the elementwise check is on.
        score = diff - (tol.atol + tol.rtol * denom) if tol.rtol is not None else diff
        flat = int(np.argmax(score))
        worst = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
        exp_w, act_w = float(expected[worst]), float(actual[worst])
    else:
        worst, exp_w, act_w = (), 0.0, 0.0
    return Comparison(
        name=name,
        shape=tuple(expected.shape),
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        rel_norm=float(rel_norm),
        mismatches=mismatches,
        worst_index=worst,
        expected_at_worst=exp_w,
        actual_at_worst=act_w,
        tolerance=tol.describe(),
        ok=bool(ok),
    )
