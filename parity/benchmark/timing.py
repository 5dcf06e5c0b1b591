"""The timing loop: first call (compilation) timed apart, warm-up untimed, then per-step samples.

The step passed in must block until the device is done (workloads.Step does), so each sample is
the wall time of finished work. Median and IQR, not mean and stddev: a shared machine gives
heavy-tailed samples, and the median/IQR pair is what a reader can trust on it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Seconds. first_call_s includes tracing/compilation; warmup_s are the untimed warm-up calls."""

    first_call_s: float
    warmup_s: tuple[float, ...]
    samples_s: tuple[float, ...]
    median_s: float
    q1_s: float
    q3_s: float

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    @property
    def rounds(self) -> int:
        return len(self.samples_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "iqr_s": self.iqr_s, "rounds": self.rounds}


def summarize(samples: list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    """(median, q1, q3) of the samples (linear interpolation, numpy's default)."""
    if not samples:
        raise ValueError("no samples to summarize")
    q1, med, q3 = np.percentile(np.asarray(samples, dtype=np.float64), [25, 50, 75])
    return float(med), float(q1), float(q3)


def measure(
    step: Callable[[], None],
    *,
    warmup: int = 2,
    min_rounds: int = 5,
    max_rounds: int = 100,
    min_time_s: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time ``step``: one first call, ``warmup`` untimed calls, then at least ``min_rounds``
    samples and more until ``min_time_s`` of samples or ``max_rounds``."""
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds}, {max_rounds}")

    def timed() -> float:
        start = clock()
        step()
        return clock() - start

    first = timed()
    warm = tuple(timed() for _ in range(warmup))
    samples: list[float] = []
    while len(samples) < min_rounds or (sum(samples) < min_time_s and len(samples) < max_rounds):
        samples.append(timed())
    med, q1, q3 = summarize(samples)
    return Timing(first, warm, tuple(samples), med, q1, q3)
