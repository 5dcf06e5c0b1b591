"""A check without per-layer rows runs torch's float64 reference in a worker thread beside the
twin's float32 trace, compile and run (parity._threads.beside): the same numbers as one after
the other, and a check that fails on the twin's side returns with no torch run still going."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import jax
import pytest

import parity
import parity.checker as checker
import weight_port
from parity.registry import PAIRS


def _cnn():
    pair = PAIRS["cnn"]
    cfg = pair.config("tiny")
    tm, fm = pair.build(cfg)
    return tm, fm, pair.example_input(cfg, batch=2), pair.layout


def _in_line(fn, *args) -> Future:
    """beside, but run at once on the caller's thread."""
    done: Future = Future()
    done.set_result(fn(*args))
    return done


def test_the_reference_runs_in_another_thread_and_changes_no_number(monkeypatch):
    tm, fm, x, layout = _cnn()
    threads, real = [], checker._float64_reference

    def spy(run, o):
        threads.append(threading.current_thread())
        return real(run, o)

    monkeypatch.setattr(checker, "_float64_reference", spy)
    beside = parity.check(tm, fm, x, input_layout=layout, layers=False)
    monkeypatch.setattr(checker, "beside", _in_line)
    in_line = parity.check(tm, fm, x, input_layout=layout, layers=False)
    assert [t is threading.main_thread() for t in threads] == [False, True]
    assert beside.verdict == in_line.verdict == "PASS", str(beside)
    assert beside.to_dict() == in_line.to_dict()


def test_a_twin_run_that_raises_waits_for_the_reference(monkeypatch):
    tm, fm, x, layout = _cnn()
    finished, real = [], checker._float64_reference

    def slow(run, o):
        time.sleep(0.5)  # still running when the twin's side raises
        ref = real(run, o)
        finished.append(True)
        return ref

    def broken(*a, **kw):
        raise RuntimeError("the twin's side broke")

    monkeypatch.setattr(checker, "_float64_reference", slow)
    monkeypatch.setattr(checker, "run_flax_side", broken)
    with pytest.raises(RuntimeError, match="the twin's side broke"):
        parity.check(tm, fm, x, input_layout=layout, layers=False)
    assert finished == [True]  # no torch run of this check goes on after it returned


def test_the_judge_takes_a_models_tensors_in_threads_and_in_order(monkeypatch):
    # ModelJudge.fill judges tensors side by side (parity._threads.in_order): the report is the one
    # a single thread writes, order and numbers, the twin's own-noise pass included.
    import parity._threads as threads_
    import parity.judge as judge
    from test_verdicts_own_noise import X, TorchTwoHeads, TwoHeads

    threads, real = set(), judge.ModelJudge._judge

    def spy(self, *a, **kw):
        threads.add(threading.current_thread())
        return real(self, *a, **kw)

    monkeypatch.setattr(judge.ModelJudge, "_judge", spy)
    tm, fm, x, layout = _cnn()
    # a wrong twin's numbers: every weight 1% off
    wrong = jax.tree_util.tree_map(lambda a: a * 1.01, weight_port.torch_to_flax(tm, fm, x, input_layout=layout))
    reports = {}
    for workers in (2, 1):
        monkeypatch.setattr(threads_, "WORKERS", workers)
        threads.clear()
        reports[workers] = [parity.check(tm, fm, x, input_layout=layout, layers=False),
                            parity.check(TorchTwoHeads(), TwoHeads(), X, input_layout="as_is", layers=False,
                                         lint=False),
                            parity.check(tm, fm, x, input_layout=layout, layers=False, variables=wrong)]
        assert (threading.main_thread() in threads) == (workers == 1), threads
    cnn, own, bad = reports[2]
    assert cnn.verdict == own.verdict == "PASS" and bad.verdict == "FAIL", (cnn.verdict, own.verdict, bad.verdict)
    assert "within the twin's own rounding noise only" in own.outputs[0].note
    assert [r.to_dict() for r in reports[2]] == [r.to_dict() for r in reports[1]]


def test_a_rows_parameter_gradients_are_judged_in_threads_and_in_order(monkeypatch):
    # A container's row holds every parameter beneath it: judged side by side, the rows are the
    # ones a single thread writes (to_dict: every number, note and verdict).
    import parity._threads as threads_
    from parity.layers import RowJudge

    threads, real = set(), RowJudge.judge

    def spy(self, name, *a, **kw):
        if name.startswith("grad "):
            threads.add(threading.current_thread())
        return real(self, name, *a, **kw)

    monkeypatch.setattr(RowJudge, "judge", spy)
    tm, fm, x, layout = _cnn()
    reports = {}
    for workers in (2, 1):
        monkeypatch.setattr(threads_, "WORKERS", workers)
        threads.clear()
        reports[workers] = parity.check(tm, fm, x, input_layout=layout)
        assert threads and (threading.main_thread() in threads) == (workers == 1), threads
    assert reports[2].verdict == "PASS" and reports[2].layers, str(reports[2])
    assert reports[2].to_dict() == reports[1].to_dict()


def test_the_judge_takes_as_many_threads_as_torchs_cpu_pool(monkeypatch):
    # The cores the caller gives torch (pytest-xdist workers: one each in this suite, where more
    # threads would only contend with the other worker), at most 4.
    import torch

    import parity._threads as threads_

    before = torch.get_num_threads()
    try:
        for n, expected in ((1, 1), (3, 3), (8, 4)):
            torch.set_num_threads(n)
            assert threads_.workers() == expected
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(threads_, "WORKERS", 2)
    assert threads_.workers() == 2


def test_a_run_beside_keeps_the_callers_float64_mode():
    # jax.enable_x64 is per thread: a float64 run started beside a float64 caller, in a thread
    # without it, would compute in float32
    import jax
    import jax.numpy as jnp

    from parity._threads import beside

    with jax.enable_x64(True):
        dtype = beside(lambda: jnp.zeros(1, jnp.float64).dtype).result()
    assert dtype == jnp.float64
    assert beside(lambda: bool(jax.config.jax_enable_x64)).result() is False
