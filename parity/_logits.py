"""Logit metrics: how far apart two sides' logits are as distributions, not as numbers. Torch-free.

For an output leaf declared as logits (``logits=`` / ``--logits PATH``, or any output leaf whose
path ends in ``logits``), class axis last in torch layout ([N, T, V] language-model logits,
[N, C] classifier logits), every other axis a position:

    top-1 agreement   fraction of positions where argmax(flax) == argmax(torch)
    top-k overlap     mean over positions of |topk(flax) & topk(torch)| / k
    KL                KL(p_torch || p_flax) per position, p = softmax over the class axis; max and mean

all in float64 from the two sides' values (a bfloat16 check's logits are compared as the two
sides computed them, upcast without rounding). A class that is -inf on torch's side has
probability 0 and adds nothing; one that is -inf on the Flax side only, where torch gives it
mass, makes that position's KL inf. A NaN anywhere makes every metric NaN (they then decide
nothing: parity.judge.logit_rule).

What the metrics may decide is the judge's business (parity.judge.logit_rule, thresholds in
parity.tolerances); this module only measures.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from parity.errors import UsageError
from parity.judge import Comparison, logit_rule
from parity.runtime.tree import canonical_path
from parity.tolerances import LOGIT_RULE

_BLOCK = 1 << 18  # elements per block of logit_metrics' temporaries (2 MiB in float64)
TOP_K = 5  # the default k of the top-k overlap (HF / MaxText logit checkers report top-5)


@dataclass(frozen=True)
class LogitMetrics:
    """The logit metrics of one output leaf. ``decided``: the logit rule turned the leaf's
    elementwise FAIL into a pass (parity.judge.logit_rule; the report says so)."""

    name: str  # the output's report name ("output.logits")
    path: str  # its output path ("out.logits")
    shape: tuple[int, ...]
    positions: int
    top1: float
    topk: float
    k: int
    kl_max: float
    kl_mean: float
    worst_position: tuple[int, ...]  # where KL is largest (index without the class axis)
    decided: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"top-1 {self.top1:.4f}, top-{self.k} {self.topk:.4f}, KL(torch||flax) max {self.kl_max:.3e} "
                f"(at {list(self.worst_position)}) mean {self.kl_mean:.3e} over {self.positions} positions")


def logit_paths(paths: list[str], declared=None) -> list[str]:
    """The output paths (parity's: ``out``, ``out.logits``, ``out[0]``) that are logits.

    declared: None (infer: every path whose last name ends in ``logits``, any case), one path or
    a list of them, given as parity names them (``out.logits``, ``out['logits']``) or without the
    root (``logits``, ``[0]``); ``()`` for none. A declared path that names no output is a
    UsageError listing the outputs (check and verify ask before their runs)."""
    if declared is None:
        return [p for p in paths if canonical_path(p).lower().endswith("logits")]
    wanted = [declared] if isinstance(declared, str) else list(declared)
    canon = {canonical_path(p): p for p in paths}
    out = []
    for w in wanted:
        c = canonical_path(w)
        hit = canon.get(c) or canon.get(f"out.{c}") or canon.get(f"out{c}")
        if hit is None:
            raise UsageError(f"logits={w!r} names no output; the outputs are {', '.join(paths)}")
        if hit not in out:
            out.append(hit)
    return out


def _as_float(x) -> np.ndarray:
    """float32 and float64 as they are, anything else (bfloat16, float16, ints) in float64."""
    a = np.asarray(x)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # a row of -inf stays -inf (and its KL then 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return x - top - np.log(np.sum(np.exp(x - top), axis=-1, keepdims=True))


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """[positions, k]: the classes a stable descending sort of each row of ``x`` [positions,
    classes] puts first (ties go to the lower class index on both sides alike), in class order.
    A partition, not a sort (a stable sort of GPT-2's 50257 classes at 128 positions took 0.5 s
    per side): where the k largest values are one set whatever the ties, it is that set; a row
    with more ties at its k-th value than places left is sorted, as before."""
    n = x.shape[-1]
    if k >= n:
        return np.sort(np.argsort(-x, axis=-1, kind="stable")[..., :k], axis=-1)
    top = np.argpartition(x, n - k, axis=-1)[..., n - k:]  # the k largest, ties broken anyhow
    kth = np.min(np.take_along_axis(x, top, axis=-1), axis=-1, keepdims=True)
    room = k - np.count_nonzero(x > kth, axis=-1)
    open_ties = np.count_nonzero(x == kth, axis=-1) > room  # which of the tied classes is a choice
    out = np.sort(top, axis=-1)
    if open_ties.any():
        out[open_ties] = np.sort(np.argsort(-x[open_ties], axis=-1, kind="stable")[..., :k], axis=-1)
    return out


def logit_metrics(name: str, path: str, flax_logits, torch_logits, k: int = TOP_K) -> LogitMetrics:
    """The metrics of one logits leaf; both arrays in torch layout, class axis last, same shape
    (a ValueError otherwise)."""
    f, t = _as_float(flax_logits), _as_float(torch_logits)  # read in float64 a block at a time below
    if f.shape != t.shape:
        raise ValueError(f"{name}: logits shapes differ, flax {f.shape} (torch layout) vs torch {t.shape}")
    if t.ndim < 1 or t.shape[-1] < 2:
        raise ValueError(f"{name}: logits need a class axis (last) of 2 or more classes, got shape {t.shape}")
    shape, v = tuple(t.shape), t.shape[-1]
    positions = int(np.prod(shape[:-1], dtype=np.int64))
    k = max(1, min(k, v))
    if positions == 0:
        nan = math.nan
        return LogitMetrics(name, path, shape, 0, nan, nan, k, nan, nan, ())
    f2, t2 = f.reshape(positions, v), t.reshape(positions, v)
    if np.isnan(f2).any() or np.isnan(t2).any():
        nan = math.nan
        return LogitMetrics(name, path, shape, positions, nan, nan, k, nan, nan, ())
    hits, overlap, kl = np.empty(positions, bool), np.empty(positions), np.empty(positions)
    # A block of positions at a time: each temporary is a block's (reused), not the logits' size
    # (GPT-2's 128 positions x 50257 classes are 51 MB per float64 temporary, and this VM pays
    # for each fresh page what the arithmetic on it costs).
    step = max(1, _BLOCK // v)
    for i in range(0, positions, step):
        fb, tb = np.asarray(f2[i:i + step], np.float64), np.asarray(t2[i:i + step], np.float64)
        hits[i:i + step] = np.argmax(fb, axis=-1) == np.argmax(tb, axis=-1)
        kf, kt = _top_k(fb, k), _top_k(tb, k)
        overlap[i:i + step] = (kf[:, :, None] == kt[:, None, :]).any(axis=-1).sum(axis=-1) / k
        lt, lf = _log_softmax(tb), _log_softmax(fb)
        pt = np.exp(lt)
        with np.errstate(invalid="ignore"):
            terms = np.where(pt > 0, pt * (lt - lf), 0.0)
        kl[i:i + step] = np.sum(terms, axis=-1)
    top1 = float(np.mean(hits))
    kl = np.maximum(kl, 0.0)  # rounding of a sum of ~0 terms can dip below zero
    worst = int(np.argmax(kl))
    where = tuple(int(i) for i in np.unravel_index(worst, shape[:-1])) if shape[:-1] else ()
    return LogitMetrics(name, path, shape, positions, top1, float(overlap.mean()), k, float(kl.max()),
                        float(kl.mean()), where)


def judge_logits(outputs: list[Comparison], paths: list[str], flax: Mapping[str, np.ndarray],
                 torch: Mapping[str, np.ndarray], dtype: str, declared=None, *, rule: bool = True,
                 k: int = TOP_K) -> tuple[list[Comparison], list[LogitMetrics], list[str]]:
    """The logit metrics of a check's outputs, and the logit rule applied to them: what
    parity.check and parity.verify both call once their outputs are judged.

    outputs: the output comparisons, one per path of ``paths`` (in that order); flax / torch:
    each side's output values by path, torch layout. declared: as for ``logit_paths``. rule:
    False where the caller's own rtol/atol decide (the rule then only reports). Returns (the
    outputs, a decided leaf's comparison replaced; the metrics; warnings)."""
    found = logit_paths(paths, declared)
    outs, metrics, notes = list(outputs), [], []
    for p in found:
        i = paths.index(p)
        try:
            m = logit_metrics(outs[i].name, p, flax[p], torch[p], k)
        except ValueError as exc:
            if declared is not None:  # a leaf the user named: say why it has no metrics
                notes.append(f"no logit metrics: {exc}")
            continue
        if rule:
            outs[i], m = logit_rule(outs[i], m, dtype)
        if m.decided:
            notes.append(f"{m.name}: the logit rule decided (elementwise FAIL, distributions agree: {m.describe()})")
        elif outs[i].ok and math.isfinite(m.top1) and m.top1 < LOGIT_RULE.top1_min:
            notes.append(f"{m.name} passes elementwise but its argmax differs at {1 - m.top1:.2%} of positions "
                         "(near-ties within the rounding?)")
        metrics.append(m)
    return outs, metrics, notes


__all__ = ["LogitMetrics", "TOP_K", "judge_logits", "logit_metrics", "logit_paths"]
