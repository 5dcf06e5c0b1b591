"""Logit metrics (parity._logits) and the logit rule (parity.judge.logit_rule): the numbers on
known cases, what they may decide and what they never do, in check, the report and its JSON."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import parity
from parity._logits import _top_k, judge_logits, logit_metrics, logit_paths
from parity.judge import LOGITS, Comparison, Table, judge, logit_rule
from parity.tolerances import FORWARD, LOGIT_RULE, tolerance_for
from logit_pairs import FlaxLM, lm_ids, torch_lm


def _logits(seed=0, shape=(2, 5, 11)):
    return np.random.default_rng(seed).standard_normal(shape) * 3


def test_identical_logits_agree_fully():
    x = _logits()
    m = logit_metrics("output", "out", x, x)
    assert (m.top1, m.topk, m.k, m.positions) == (1.0, 1.0, 5, 10)
    assert m.kl_max == 0.0 and m.kl_mean == 0.0


def test_metrics_match_a_direct_computation():
    t, f = _logits(0, (4, 7)), _logits(1, (4, 7))
    m = logit_metrics("output", "out", f, t, k=3)
    pt = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    pf = np.exp(f) / np.exp(f).sum(-1, keepdims=True)
    kl = (pt * np.log(pt / pf)).sum(-1)
    assert m.kl_max == pytest.approx(kl.max(), rel=1e-12) and m.kl_mean == pytest.approx(kl.mean(), rel=1e-12)
    assert m.top1 == np.mean(f.argmax(-1) == t.argmax(-1))
    top = lambda a: np.argsort(-a, -1)[:, :3]  # noqa: E731
    assert m.topk == np.mean([len(set(a) & set(b)) / 3 for a, b in zip(top(f), top(t))])
    assert m.worst_position == (int(kl.argmax()),)


def test_permuted_vocabulary_has_low_top1_and_large_kl():
    t = _logits()
    m = logit_metrics("output", "out", np.roll(t, 1, axis=-1), t)
    assert m.top1 < 0.2 and m.kl_max > 1.0


def test_banned_class_and_nan():
    t = _logits(shape=(3, 6))
    t[:, 0] = -np.inf  # banned on both sides: no mass, no KL
    assert logit_metrics("o", "out", t.copy(), t).kl_max == 0.0
    f = t.copy()
    f[1, 2] = -np.inf  # banned on the Flax side only where torch gives it mass
    assert logit_metrics("o", "out", f, t).kl_max == math.inf
    f[0, 1] = np.nan
    m = logit_metrics("o", "out", f, t)
    assert math.isnan(m.top1) and math.isnan(m.kl_max)


def test_logit_paths_inferred_and_declared():
    paths = ["out.logits", "out.hidden", "out['start_logits']"]
    assert logit_paths(paths) == ["out.logits", "out['start_logits']"]
    assert logit_paths(["out"]) == []
    assert logit_paths(paths, "logits") == ["out.logits"]
    assert logit_paths(paths, ["out['logits']", "hidden"]) == ["out.logits", "out.hidden"]
    assert logit_paths(["out"], "out") == ["out"]
    assert logit_paths(paths, ()) == []
    with pytest.raises(parity.UsageError, match="names no output; the outputs are out.logits"):
        logit_paths(paths, "scores")


def _failing(t, f, dtype="bfloat16") -> Comparison:
    c = judge("output", f, t, Table(tolerance_for(dtype, FORWARD)))
    assert not c.ok
    return c


def test_logit_rule_decides_only_a_half_precision_failure_with_agreeing_distributions():
    t = _logits()
    f = t + 0.5  # the same distribution, elementwise far off
    m = logit_metrics("output", "out", f, t)
    c, m2 = logit_rule(_failing(t, f), m, "bfloat16")
    assert c.ok and c.judge == LOGITS and m2.decided and "decided by the logit rule" in c.note
    for dtype in ("float32", "float64"):  # full precision keeps its verdict
        c, m2 = logit_rule(_failing(t, f, dtype), m, dtype)
        assert not c.ok and not m2.decided
    rolled = np.roll(t, 1, axis=-1)  # distributions that disagree stay a FAIL
    c, m2 = logit_rule(_failing(t, rolled), logit_metrics("output", "out", rolled, t), "bfloat16")
    assert not c.ok and not m2.decided


def test_logit_rule_never_fails_a_pass_nor_passes_a_nan():
    t = _logits()
    ok = judge("output", t, t, Table(tolerance_for("bfloat16", FORWARD)))
    bad = logit_metrics("output", "out", np.roll(t, 1, axis=-1), t)
    assert logit_rule(ok, bad, "bfloat16")[0] is ok
    f = t + 0.5
    f[0, 0, 0] = np.nan  # one NaN: the comparison fails on it, the metrics are NaN
    c = judge("output", f, t, Table(tolerance_for("bfloat16", FORWARD)))
    assert not logit_rule(c, logit_metrics("output", "out", f, t), "bfloat16")[0].ok
    # a comparison that says one side is not finite is never a pass, even with agreeing metrics
    fake = dataclasses.replace(_failing(t, t + 0.5), note="Inf on one side only (flax): 1 element(s)")
    assert not logit_rule(fake, logit_metrics("output", "out", t + 0.5, t), "bfloat16")[0].ok


def test_thresholds_are_in_the_table_with_a_reason():
    assert LOGIT_RULE.dtypes == {"bfloat16", "float16"} and len(LOGIT_RULE.reason) > 200
    # on the boundary: KL just above the bound is not decided
    t = _logits()
    f = t + 0.5
    m = dataclasses.replace(logit_metrics("output", "out", f, t), kl_max=LOGIT_RULE.kl_max * 1.01)
    assert not logit_rule(_failing(t, f), m, "bfloat16")[0].ok
    m = dataclasses.replace(m, kl_max=0.0, top1=LOGIT_RULE.top1_min - 0.01)
    assert not logit_rule(_failing(t, f), m, "bfloat16")[0].ok


def test_judge_logits_reports_only_logits_leaves():
    t = {"out.logits": _logits(), "out.hidden": _logits(1)}
    f = {"out.logits": t["out.logits"] + 0.5, "out.hidden": t["out.hidden"]}
    comps = [judge(n, f[p], t[p], Table(tolerance_for("bfloat16", FORWARD))) for n, p in
             (("output.logits", "out.logits"), ("output.hidden", "out.hidden"))]
    outs, metrics, notes = judge_logits(comps, list(t), f, t, "bfloat16")
    assert [m.path for m in metrics] == ["out.logits"] and metrics[0].decided and outs[0].judge == LOGITS
    assert outs[1] is comps[1] and "the logit rule decided" in notes[0]
    outs, metrics, _ = judge_logits(comps, list(t), f, t, "bfloat16", rule=False)  # the caller's rtol/atol
    assert not outs[0].ok and not metrics[0].decided


# --- through parity.check -----------------------------------------------------------------------
def test_check_correct_lm_reports_full_agreement_and_json():
    report = parity.check(torch_lm(), FlaxLM(), lm_ids(), layers=False)
    assert report.verdict == "PASS", str(report)
    (m,) = report.logits  # inferred from the dataclass field / dict key "logits"; "hidden" is not logits
    assert m.path == "out.logits" and m.shape == (2, 6, 16) and m.positions == 12
    assert m.top1 == 1.0 and m.topk == 1.0 and m.kl_max < 1e-10 and not m.decided
    assert "logits out.logits [2, 6, 16]: top-1 1.0000, top-5 1.0000" in str(report)
    j = json.loads(report.to_json())["logits"]
    assert j[0]["top1"] == 1.0 and j[0]["kl_max"] < 1e-10 and j[0]["path"] == "out.logits"


def test_check_permuted_vocabulary_fails_with_low_top1():
    report = parity.check(torch_lm(), FlaxLM(roll_vocab=True), lm_ids(), layers=False, grads=False)
    assert report.verdict == "FAIL"
    (m,) = report.logits
    assert m.top1 < 0.3 and m.kl_max > 1.0 and not m.decided


@pytest.mark.parametrize("dtype,verdict", [("bfloat16", "PASS"), ("float16", "PASS"), ("float32", "FAIL"),
                                           ("float64", "FAIL")])
def test_check_logit_rule_decides_in_half_precision_only(dtype, verdict):
    # a constant added to every logit: the same distributions, elementwise far off
    report = parity.check(torch_lm(), FlaxLM(shift=1.0), lm_ids(), layers=False, grads=False, dtype=dtype)
    assert report.verdict == verdict, str(report)
    (m,) = report.logits
    half = dtype in ("bfloat16", "float16")
    assert m.top1 == 1.0 and m.decided == half
    out = next(c for c in report.outputs if c.name == "output.logits")
    assert out.judge == (LOGITS if half else "reference")
    assert ("the logit rule decided" in str(report)) == half


def test_check_logit_rule_leaves_the_callers_own_tolerance_alone():
    report = parity.check(torch_lm(), FlaxLM(shift=1.0), lm_ids(), layers=False, grads=False, dtype="bfloat16",
                          rtol=1e-2, atol=1e-2)
    assert report.verdict == "FAIL" and report.logits[0].top1 == 1.0 and not report.logits[0].decided


def test_check_declared_logits():
    report = parity.check(torch_lm(), FlaxLM(), lm_ids(), layers=False, grads=False, logits=())
    assert report.logits == []
    report = parity.check(torch_lm(), FlaxLM(), lm_ids(), layers=False, grads=False, logits=["logits", "hidden"])
    assert [m.path for m in report.logits] == ["out.logits", "out.hidden"]
    with pytest.raises(parity.UsageError, match="names no output"):
        parity.check(torch_lm(), FlaxLM(), lm_ids(), layers=False, grads=False, logits="scores")


# --- through parity.verify (the same metrics and rule from a golden bundle) ----------------------
def test_verify_reports_the_metrics_check_reports(tmp_path):
    bundle = parity.record(torch_lm(), lm_ids(), tmp_path / "lm")
    report = parity.verify(bundle, FlaxLM(), layers=False)
    checked = parity.check(torch_lm(), FlaxLM(), lm_ids(), layers=False)
    assert report.verdict == "PASS" and [m.to_dict() for m in report.logits] == [m.to_dict() for m in checked.logits]
    assert json.loads(report.to_json())["logits"][0]["top1"] == 1.0
    assert parity.verify(bundle, FlaxLM(), layers=False, logits=()).logits == []
    with pytest.raises(parity.UsageError, match="names no output"):
        parity.verify(bundle, FlaxLM(), layers=False, logits="scores")


def test_verify_logit_rule_in_a_bfloat16_bundle(tmp_path):
    bundle = parity.record(torch_lm(), lm_ids(), tmp_path / "lm16", dtype="bfloat16")
    report = parity.verify(bundle, FlaxLM(shift=1.0), layers=False)
    assert report.verdict == "PASS" and report.logits[0].decided, str(report)
    report = parity.verify(bundle, FlaxLM(roll_vocab=True), layers=False)
    assert report.verdict == "FAIL" and report.logits[0].top1 < 0.3 and not report.logits[0].decided


def test_cli_verify_logits_flag(tmp_path):
    from pathlib import Path

    from child_process import cli_in_process

    bundle = parity.record(torch_lm(), lm_ids(), tmp_path / "lm")

    def cli(*args):
        return cli_in_process("verify", str(bundle), "--flax", "logit_pairs:FlaxLM", "--no-layers", "--quiet",
                              *args, cwd=Path(__file__).parent)

    proc = cli("--logits", "scores")
    assert proc.returncode == 2 and "logits='scores' names no output" in proc.stderr, proc.stderr
    proc = cli("--logits", "hidden", "--logits", "logits", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert [m["path"] for m in json.loads((tmp_path / "r.json").read_text())["logits"]] == ["out.hidden", "out.logits"]
    proc = cli("--logits", "none", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0 and json.loads((tmp_path / "r.json").read_text())["logits"] == []


@pytest.mark.parametrize("seed", range(4))
def test_the_top_k_is_a_stable_sorts_first_k_ties_and_all(seed):
    # the top-k overlap reads sets of classes: the partition must pick the same set as a stable
    # descending sort, ties at the k-th value going to the lower class index (integer logits are
    # all ties; an inf and a -inf column on top)
    rng = np.random.default_rng(seed)
    for ties in (True, False):
        x = rng.integers(-3, 3, size=(6, 30)).astype(float) if ties else rng.standard_normal((6, 30))
        x[0, 4], x[:, 7] = np.inf, -np.inf
        for k in (1, 2, 5, 29, 30, 31):
            want = np.sort(np.argsort(-x, axis=-1, kind="stable")[..., :min(k, 30)], axis=-1)
            np.testing.assert_array_equal(_top_k(x, min(k, 30)), want)


def test_the_metrics_a_block_of_positions_at_a_time_are_the_whole_ones(monkeypatch):
    from parity import _logits
    rng = np.random.default_rng(3)
    t = rng.standard_normal((2, 7, 50)).astype(np.float32)
    f = (t + 1e-2 * rng.standard_normal(t.shape)).astype(np.float32)
    whole = logit_metrics("out", "out", f, t)
    monkeypatch.setattr(_logits, "_BLOCK", 120)  # 2 positions per block, the last one short
    assert logit_metrics("out", "out", f, t) == whole
