"""The one comparison helper: torch-layout vs Flax-layout arrays, reported by path and worst element."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from parity.tolerances import REFERENCE_NOISE_SHARE, Tolerance
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
    # Error over allowance, the worst criterion (elementwise or norm-wise): <= 1 passes. One
    # number per tensor that is comparable across dtypes, used for plots and ranking.
    score: float = 0.0
    note: str = ""
    # ||torch value|| and the absolute noise floor of the norm-wise criterion (0: none). A
    # tensor whose reference norm is at or below its floor is rounding noise on both sides (a
    # gradient that is zero in exact arithmetic): its rel_norm is a ratio of noises, not an error.
    ref_norm: float = 0.0
    floor: float = 0.0
    # "NaN" / "Inf" when either side holds one: the comparison is meaningless (see Report.verdict).
    nonfinite: str = ""
    # Passed only because the difference was under the a-priori noise floor (it would fail the
    # relative criteria): parity.check then judges the run against a float64 reference, which
    # measures the noise instead of assuming it (a tensor that is small, not cancelled, must not
    # hide a 50% error under a floor sized for its inputs).
    floored: bool = False
    # fp64-reference mode: the floor was not applied because the float64 run shows the tensor is
    # small, not noise (parity.tolerances.REFERENCE_NOISE_SHARE); it is judged on its values.
    floor_ignored: bool = False

    @property
    def below_floor(self) -> bool:
        return self.floor > 0 and self.ref_norm <= self.floor and not self.floor_ignored

    def to_dict(self) -> dict:
        return asdict(self)


def failed_comparison(name: str, reason: str, tol: Tolerance) -> Comparison:
    """A comparison that could not be made (shape or arity mismatch): always out of tolerance."""
    inf = float("inf")
    return Comparison(name=name, shape=(), max_abs=inf, max_rel=inf, rel_norm=inf, mismatches=-1,
                      worst_index=(), expected_at_worst=float("nan"), actual_at_worst=float("nan"),
                      tolerance=tol.describe(), ok=False, score=inf, note=reason)


def worst_of(comps: list[Comparison]) -> Comparison | None:
    """The comparison that decides a verdict: any failure first, then the highest score."""
    return max(comps, key=lambda c: (not c.ok, c.score, c.rel_norm), default=None)


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
    # NaN == NaN (or Inf == Inf) is never agreement: a NaN input makes both sides NaN whatever
    # they compute, so such an element counts as an infinite difference.
    diff = np.where(nonfinite, np.inf, diff)
    kind = ""
    if nonfinite.any():
        kind = "NaN" if (np.isnan(actual) | np.isnan(expected)).any() else "Inf"
    denom = np.abs(expected)
    rel = np.divide(diff, denom, out=np.where(diff > 0, np.inf, 0.0), where=denom > 0)
    norm_ref = float(np.linalg.norm(np.where(nonfinite, 0.0, expected)))
    norm_diff = float(np.linalg.norm(np.where(np.isinf(diff), 0.0, diff))) if diff.size else 0.0
    rel_norm = norm_diff / norm_ref if norm_ref > 0 else (0.0 if norm_diff == 0 else np.inf)
    if np.isinf(diff).any():
        rel_norm = np.inf
    atol = None
    if tol.rtol is not None:
        # The table's atol is relative to the tensor's RMS (parity.tolerances): near-zero elements
        # of a large tensor keep rounding of its large values, and a tiny tensor is judged at its
        # own scale instead of passing under an absolute bound bigger than itself.
        atol = tol.atol * (norm_ref / np.sqrt(diff.size) if tol.scaled_atol and diff.size else 1.0)
        bad = diff > atol + tol.rtol * denom
    else:
        bad = np.zeros(diff.shape, dtype=bool)
    mismatches = int(bad.sum())
    # Below the noise floor the difference is rounding of the magnitudes that made the tensor
    # (parity.tolerances.NOISE_FLOORS), which no relative or elementwise bound can judge.
    tiny = bool(tol.abs_norm) and norm_diff <= tol.abs_norm and not np.isinf(diff).any()
    relative_ok = mismatches == 0 and (tol.rel_norm is None or rel_norm <= tol.rel_norm)
    ok = tiny or relative_ok
    score = 0.0
    if tol.rtol is not None and diff.size:
        allowed = atol + tol.rtol * denom  # 0 where torch's tensor is all zeros: any error is infinite
        with np.errstate(invalid="ignore", divide="ignore"):
            score = float(np.max(np.divide(diff, allowed, out=np.where(diff > 0, np.inf, 0.0), where=allowed > 0)))
    if tol.rel_norm is not None:
        score = max(score, rel_norm / tol.rel_norm if tol.rel_norm > 0 else np.inf)
    if tiny:
        score = min(score, norm_diff / tol.abs_norm)
    if diff.size:
        # Worst element: the most out-of-tolerance one when the elementwise check is on.
        excess = diff - (atol + tol.rtol * denom) if tol.rtol is not None else diff
        flat = int(np.argmax(excess))
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
        ok=bool(ok) and not kind,
        score=float(score),
        ref_norm=norm_ref,
        floor=float(tol.abs_norm or 0.0),
        nonfinite=kind,
        floored=bool(tiny and not relative_ok),
        note=f"{kind} in {'torch' if not np.isfinite(expected).all() else 'flax'}" if kind else "",
    )


def compare_to_reference(
    name: str, flax_value, torch_value, reference, tol: Tolerance, *, layout: str = AS_IS,
    floor: float = 0.0,
) -> Comparison:
    """fp64-reference verdict: Flax's error against a float64 reference, measured in units of
    torch's own error against it.

    flax_value is in Flax layout; torch_value and reference (the float64 torch run) in torch
    layout. The returned Comparison carries flax-vs-torch statistics for reading, but ``ok`` and
    ``score`` come from ``||flax - ref|| <= max(tol.k * max(||torch - ref||, tol.floor * ||ref||),
    floor)``: ``floor`` is the absolute noise floor of this tensor (parity.tolerances.noise_floor),
    for a reference that is itself rounding noise (a gradient zero in exact arithmetic).
    """
    if tol.k is None:
        raise ValueError(f"{name}: compare_to_reference needs an fp64-reference Tolerance (k, floor)")
    loose = Tolerance(rel_norm=float("inf"), reason="statistics only")
    stats = compare(name, flax_value, torch_value, loose, layout=layout)
    ref = _as_float64(reference)
    flax = _as_float64(to_torch_layout(to_numpy(flax_value), layout))
    with np.errstate(invalid="ignore"):
        flax_err = float(np.linalg.norm(flax - ref))
        torch_err = float(np.linalg.norm(_as_float64(torch_value) - ref))
    ref_norm = float(np.linalg.norm(ref))
    # The absolute floor stands for rounding noise; here the noise is measured: it applies only
    # where torch's own run is mostly noise against float64 (a tensor zero in exact arithmetic),
    # not where the tensor is merely small (an output scaled by 1e-6 is judged relatively).
    ignored = bool(floor) and torch_err < REFERENCE_NOISE_SHARE * ref_norm
    allowed = max(tol.k * max(torch_err, tol.floor * ref_norm), 0.0 if ignored else floor)
    ok = bool(np.isfinite(flax_err) and flax_err <= allowed) and not stats.nonfinite
    if ref_norm <= floor and not ignored:  # the reference is rounding noise: relative errors are noise ratios
        note = f"vs fp64: below the noise floor ({floor:.2e}): ||flax - ref|| {flax_err:.2e}, torch {torch_err:.2e}"
    else:
        note = f"vs fp64: flax {flax_err / ref_norm:.2e}, torch {torch_err / ref_norm:.2e}"
    return replace(
        stats,
        ok=ok,
        score=float(flax_err / allowed) if allowed > 0 else float("inf"),
        tolerance=tol.describe() + (f", or ||d||<={floor:.3g}" if floor and not ignored else ""),
        note=stats.note or note,
        floor=floor,
        floor_ignored=ignored,
    )
