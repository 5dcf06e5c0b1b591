"""Torch eager / channels_last / torch.compile vs jax.jit, per registry model, phase and batch.

Each case: parity gate (cached per model and batch) -> first call timed apart (compilation) ->
first result checked against jax.jit's -> pytest-benchmark pedantic rounds, warm-up untimed.
Every timed call ends with block_until_ready / torch.cuda.synchronize (inside Step.__call__).
"""
from __future__ import annotations

import time

import jax
import pytest

from parity.benchmark import check_first_value, make_step
from parity.benchmark.workloads import VariantUnavailable


def test_step(benchmark, case, settings, device, prepared, reference):
    model, batch, phase, variant = case
    prep, gate = prepared(model, batch)
    assert gate.ok, "parity gate failed; not timing a model that computes something else:\n" + "\n".join(gate.reports)
    benchmark.group = f"{model} {phase} b{batch}"
    try:
        step = make_step(prep, variant, phase)
    except VariantUnavailable as exc:
        pytest.skip(f"n/a: {exc}")
    with jax.default_device(device.jax_device):
        step.reset_peak()
        start = time.perf_counter()
        step()  # first call: tracing + compilation + one step, reported apart from the rounds
        first_call_s = time.perf_counter() - start
        value = step.first_value()
        if variant == "jax-jit":
            reference(model, batch, phase, value)
        else:
            ok, text = check_first_value(reference(model, batch, phase), value, prep.dtype)
            assert ok, f"{variant} first result disagrees with jax-jit: {text}"
        benchmark.pedantic(step, rounds=settings.rounds, warmup_rounds=settings.warmup, iterations=1)
    flops, flops_source = step.flops()
    peak, peak_source = step.peak_bytes()
    benchmark.extra_info.update(
        model=model, phase=phase, batch=batch, variant=variant, dtype=prep.dtype, note=step.note,
        device=device.describe(), first_call_s=first_call_s, flops=flops, flops_source=flops_source,
        peak_bytes=peak, peak_source=peak_source, parity_gate_dtype=gate.dtype,
    )
