"""The per-layer analysis streams: layers run alone in chunks, each judged and freed before the next.

Chunking must not change a single row: the same verdicts, numbers and notes as one chunk, also for
a module called twice whose parameter gradient is the sum over calls in different chunks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import parity
import parity._layer_runs as runs
from parity.registry import PAIRS
from test_hf_layer_rows import FlaxShared, TorchShared


def _rows(report) -> list[tuple]:
    def c(comp):
        return None if comp is None else (comp.ok, comp.max_abs, comp.max_rel)

    return [(r.name, c(r.accumulated), c(r.isolated), c(r.grad_accumulated), c(r.grad_isolated), tuple(r.notes))
            for r in report.layers]


def _check(name: str):
    if name == "shared":
        torch.manual_seed(0)
        return parity.check(TorchShared(), FlaxShared(), np.random.default_rng(0).standard_normal((2, 4)),
                            dtype="float64", lint=False)
    pair = PAIRS[name]
    tm, fm = pair.build()
    return parity.check(tm, fm, pair.example_input(), dtype="float64", input_layout=pair.input_layout,
                        output_layout=pair.out_layout(), name=name, lint=False)


@pytest.mark.parametrize("name", ["shared", "unet-same-bn"])
def test_chunked_rows_equal_one_chunk(name, monkeypatch):
    whole = _check(name)
    chunks: list[int] = []
    real = runs.run_jobs

    def spy(jobs, shared=None):
        chunks.append(len(jobs))
        return real(jobs, shared)

    monkeypatch.setattr(runs, "run_jobs", spy)
    monkeypatch.setattr(runs, "CHUNK_BYTES", 0)  # chunks no bigger than the largest layer
    streamed = _check(name)
    assert len(chunks) > 1, chunks  # it did stream
    assert streamed.verdict == whole.verdict == "PASS"
    assert _rows(streamed) == _rows(whole)
    if name == "shared":  # the twice-called layer's weight gradient was still judged, as the sum
        first = next(r for r in streamed.layers if r.torch_path == "layer")
        assert first.grad_isolated is not None and first.grad_isolated.ok


def test_each_chunk_holds_at_most_the_largest_layer_or_the_budget(monkeypatch):
    held: list[tuple[int, int]] = []
    real_chunks = runs.chunks

    def spy(jobs):
        largest = max(runs.job_bytes(j) for j in jobs)
        for chunk in real_chunks(jobs):
            size = sum(runs.job_bytes(j) for j in chunk)
            held.append((size, max(largest, runs.CHUNK_BYTES) if len(chunk) > 1 else size))
            yield chunk

    monkeypatch.setattr(runs, "chunks", spy)
    monkeypatch.setattr(runs, "CHUNK_BYTES", 0)
    assert _check("unet-same-bn").ok
    assert len(held) > 1 and all(size <= bound for size, bound in held), held
