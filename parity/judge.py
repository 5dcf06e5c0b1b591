"""The one judge: every "is this close enough" in parity is one call into this module.

Two ways of judging, and each Comparison says which one decided it (``Comparison.judge``):

reference (measured noise)
    Flax's error against a reference run must be within k times the noise that the same
    computation is measured to have, per slice (per channel / feature / output unit, so a small
    column is judged on its own scale, never on the whole tensor's)::

        ||flax_s - ref_s|| <= k * max(noise_scale * ||probe_s - ref_s||, rho * eps * ||ref_s||)

    * a low-precision check (float32, bfloat16, float16): ref = torch run in float64 (weights
      rounded to the checked dtype), probe = torch's own run in the checked dtype, noise_scale 1;
    * a float64 check, and the per-layer rows that run in float64: ref = torch's float64 run,
      probe = a torch run in a lower dtype (float32, or the checked dtype), noise_scale =
      eps(float64) / eps(probe dtype): the lower run's rounding, measured, scaled down to float64.
      A layer that computes in float32 even inside a float64 run (an RMS norm's upcast) is
      judged with noise_scale eps(float32) / eps(probe dtype) instead (``Measured.scaled``).
    ``rho * eps * ||ref_s||`` is the rounding of the slice's own values in the checked dtype: the
    only floor, and it comes from what the computation produces, never from its inputs (a mask
    filled with finfo.min, integer ids and constants carry no rounding).

table (torch.testing semantics)
    ``|a - b| <= atol + rtol * |b|`` elementwise (and ``||a - b|| <= rel_norm * ||b||`` where the
    entry sets one): float64 checks whose lower-precision probe could not run, low-precision
    checks whose float64 reference could not run, and a caller's rtol/atol (which replace the
    table and nothing else). Without measured noise a pass that only atol explains (norm-wise
    relative error above rtol) is INCONCLUSIVE, not PASS; a caller's own atol is their decision.

logits (parity.tolerances.LOGIT_RULE, ``logit_rule``)
    only for an output declared as logits, only in a bfloat16 / float16 check, and only to turn
    that leaf's FAIL into a pass: top-1 agreement and the largest per-position KL(p_torch ||
    p_flax) (parity._logits) within the rule's bounds. Never for a NaN or Inf, never the other way.

Non-finite values: the same +-inf at the same position on both sides agrees (a banned logit, a
-inf padded max-pool); NaN on both sides makes the comparison ``nonfinite="NaN"`` (INVALID: no
verdict); a NaN or inf on one side only is a FAIL that names the side.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, replace

import numpy as np

from parity import _blockwise
from parity._threads import in_order
from parity.tolerances import (EPS, FEW_ELEMENTS, FORWARD, GRAD, LOGIT_RULE, NOISE_SLICE_SHARE, OWN_NOISE_EVERYWHERE,
                                TOLERANCES, Tolerance)
from weight_port.layout import AS_IS, to_torch_layout
from weight_port import to_numpy

REFERENCE, TABLE, LOGITS = "reference", "table", "logits"


class NoEvidence(ValueError):
    """The measured-noise rule cannot judge this tensor (no reference or probe value for it, or
    one that is not finite where both sides are): the caller falls back to the table."""


@dataclass(frozen=True)
class Comparison:
    """Error of one tensor. Indices are in torch layout (e.g. [N, C, H, W]).

    max_abs / max_rel / rel_norm / mismatches / worst_*: Flax against torch, for reading (the
    reference rule decides on the measured-noise criterion, reported in ``note`` and ``score``).
    judge: "reference", "table" or "logits" (see the module docstring). score: error over allowance of
    the worst criterion (<= 1 passes). inconclusive: passed the table only through atol, with no
    measured noise to say whether that is rounding (the verdict is then INCONCLUSIVE).
    nonfinite: "NaN" when both sides hold NaN at some element (the comparison proves nothing).
    """

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
    score: float = 0.0
    note: str = ""
    ref_norm: float = 0.0  # ||torch value|| (finite elements)
    nonfinite: str = ""
    judge: str = TABLE
    inconclusive: bool = False
    # Training parity only: the optimizer-noise bound of Tolerance.abs_norm (0: none).
    floor: float = 0.0

    @property
    def below_floor(self) -> bool:
        """Training parity: torch's update is itself within the optimizer's noise bound."""
        return self.floor > 0 and self.ref_norm <= self.floor

    @property
    def verdict(self) -> str:
        """"ok", "FAIL", "INCONCLUSIVE" or "NaN" (both sides NaN: no verdict)."""
        if self.nonfinite:
            return self.nonfinite
        if not self.ok:
            return "FAIL"
        return "INCONCLUSIVE" if self.inconclusive else "ok"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


# --- the rules ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """The table rule. atol_decides: the caller chose atol (a per-call override), so a pass that
    only atol explains is a PASS; otherwise it is INCONCLUSIVE (no measured noise behind it)."""

    tol: Tolerance
    atol_decides: bool = False


@dataclass(frozen=True)
class Measured:
    """The measured-noise rule: k and rho from the table's REFERENCE entry, eps of the checked
    dtype, noise_scale = eps(reference arithmetic) / eps(probe dtype) (1 when the probe is the
    checked run itself)."""

    k: float
    rho: float
    eps: float
    noise_scale: float = 1.0
    reason: str = ""
    own_everywhere: bool = False  # the twin's own noise counts on every slice (half precision)

    def describe(self) -> str:
        noise = "torch's own error vs ref" if self.noise_scale == 1.0 else (
            f"{self.noise_scale:.2g} x the probe's error vs ref")
        return f"per slice: ||flax - ref|| <= {self.k:g} x max({noise}, {self.rho:g} eps ||ref||)"



def measured(tol: Tolerance, dtype: str, *, probe_dtype: str | None = None,
             effective: str | None = None) -> Measured:
    """The measured rule of table entry ``tol`` (k, floor) for values computed in ``dtype``.

    probe_dtype: None when the probe is the judged run's own torch side (its error against the
    reference *is* the noise); else the dtype of a separate lower-precision torch run whose
    error is scaled by eps(effective) / eps(probe_dtype). effective: the precision the judged
    torch run really computed in (default ``dtype``; "float32" where a float64 run computes part
    of itself in float32).
    """
    if tol.k is None:
        raise ValueError("the measured-noise rule needs a REFERENCE table entry (k, floor)")
    scale = 1.0 if probe_dtype is None else min(EPS[effective or dtype] / EPS[probe_dtype], 1.0)
    # The floor is the rounding of the slice's own values in the precision they were computed in:
    # a float32 part of a float64 run holds float32-rounded values (diffusers' Timesteps computes
    # its sinusoids in float32 from integer steps: the probe measures no noise there at all).
    eps = max(EPS[dtype], EPS[effective]) if effective else EPS[dtype]
    # ... and its k is that precision's: float64's wide k rests on float64's headroom, which a
    # float32 part does not have (k 32 let a planted 1e-5 error after an RMS norm's upcast pass)
    k = TOLERANCES[(effective, "highest", "fp64_reference")].k if effective and effective != dtype else tol.k
    return Measured(k=k, rho=tol.floor / EPS[dtype], eps=eps, noise_scale=scale, reason=tol.reason,
                    # the precision the values were really computed in decides (a float32 part of a
                    # float64 run rounds as float32 does, XLA and ATen differently)
                    own_everywhere=(effective or dtype) in OWN_NOISE_EVERYWHERE)


Rule = Table | Measured


@dataclass(frozen=True)
class ProbeSums:
    """A probe reduced to what the measured judge reads of it, for one tensor judged along
    ``axis``: per slice, the sums of squares of ``probe - ref`` (``noise``) and of ``probe``
    (``norm``), in float64 (parity._blockwise.slice_sums: the same tiles, the same sums, as the
    judge takes from the whole arrays). A run whose gradients come one at a time (a torch probe's
    ``param_grad_sink``) keeps these instead of a model-sized copy of itself; the per-layer rows
    then judge against the same ``ref`` by them."""

    shape: tuple[int, ...]
    axis: int | None
    noise: np.ndarray
    norm: np.ndarray


def reduce_probe(probe, ref, axis: int | None):
    """``probe`` (torch layout) as a ProbeSums against ``ref`` along ``axis``; ``probe`` itself, as
    a numpy array, when a sum is not finite (the judge's masked path needs its values) or the
    shapes differ (the judge names the mismatch)."""
    p, r = _as_float(probe), _as_float(ref)
    if p.shape != r.shape or not p.ndim or not p.size:
        return p
    noise, norm = _blockwise.slice_sums(p, axis, r), _blockwise.slice_sums(p, axis)
    if not (np.all(np.isfinite(noise)) and np.all(np.isfinite(norm))):
        return p
    return ProbeSums(p.shape, _normal_axis(axis, p.ndim), noise, norm)


def _normal_axis(axis: int | None, ndim: int) -> int | None:
    """``axis`` as _blockwise sums it: None for a vector (one slice), else non-negative."""
    return None if axis is None or ndim < 2 else axis % ndim


# --- the judge -----------------------------------------------------------------------------------
def _as_float(x) -> np.ndarray:
    """``x`` as a float32 or float64 numpy array: float32 stays as it is (each judging step reads it
    in float64 a block at a time, or casts inside the ufunc: the same numbers without a whole
    float64 copy of it; BERT-base's float32 gradients are 0.9 GB in float64), anything else in
    float64."""
    a = np.asarray(to_numpy(x))
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def slice_axis(layout: str, ndim: int) -> int | None:
    """The axis whose entries are judged each on their own scale: channels ([N, C, ...] torch
    layout) for a channels-first tensor, else the last (features of [N, D] / [N, T, D]); None for a
    vector or scalar (judged whole). Parameter gradients pass axis=0 (one slice per output unit)."""
    if ndim < 2:
        return None
    return 1 if layout != AS_IS else ndim - 1


def _n_slices(x: np.ndarray, axis: int | None) -> tuple[int, int]:
    """(number of slices, elements per slice) of ``x`` judged along ``axis``."""
    n = 1 if axis is None or x.ndim < 2 else x.shape[axis]
    return n, (x.size // n if n else 0)


def _slice_norms(a: np.ndarray, axis: int | None, b: np.ndarray | None = None) -> np.ndarray:
    """The 2-norm of each slice of ``a - b`` (of ``a`` without ``b``) along ``axis`` (one for the
    whole array when ``axis`` is None or it has fewer than 2 dimensions), in float64, shape
    [slices]; a cache-sized tile at a time (parity._blockwise): no temporary of the tensor's size."""
    return np.sqrt(_blockwise.slice_sums(a, axis, b))


def failed_comparison(name: str, reason: str, rule: Rule | Tolerance | None = None) -> Comparison:
    """A comparison that could not be made (shape or arity mismatch): always out of tolerance."""
    inf = float("inf")
    return Comparison(name=name, shape=(), max_abs=inf, max_rel=inf, rel_norm=inf, mismatches=-1,
                      worst_index=(), expected_at_worst=float("nan"), actual_at_worst=float("nan"),
                      tolerance=_describe(rule), ok=False, score=inf, note=reason)


def worst_of(comps: list[Comparison]) -> Comparison | None:
    """The comparison that decides a verdict: any failure first, then inconclusive, then the
    highest score."""
    return max(comps, key=lambda c: (not c.ok, c.inconclusive, c.score, c.rel_norm), default=None)


def _describe(rule) -> str:
    if rule is None:
        return ""
    if isinstance(rule, Measured):
        return rule.describe()
    tol = rule.tol if isinstance(rule, Table) else rule
    return tol.describe()


def judge(name: str, flax_value, torch_value, rule: Rule | Tolerance, *, layout: str = AS_IS,
          reference=None, probe=None, flax_probe=None, flax_reference=None,
          axis: int | str | None = "auto") -> Comparison:
    """Judge a Flax result (Flax layout) against torch (torch layout) by ``rule``.

    A Measured rule needs ``reference`` (torch layout; the truth) and ``probe`` (torch layout; the
    run whose distance to the reference is the measured noise; or that run reduced against this
    reference by ``reduce_probe``, a ProbeSums: the same verdict and score); without a usable reference
    (missing, or non-finite where both sides are finite) it raises ValueError. A bare Tolerance
    is a Table rule whose atol decides (a caller's torch.testing-style check). The Flax value is
    converted to torch layout here and nowhere else, so every index means the same thing to a
    PyTorch user. Arithmetic is in float64.

    flax_probe / flax_reference (torch layout, optional): the twin's own run in the probe's and
    the reference's precision. Where a slice is rounding noise on torch's side (its probe error is
    at least NOISE_SLICE_SHARE of its value: zero in exact arithmetic), the twin's own measured
    noise counts too: two frameworks cancel to zero with different rounding patterns (one may
    even cancel exactly), and a real error on such a slice is orders above either noise.
    """
    if isinstance(rule, Tolerance):
        rule = Table(rule, atol_decides=True)
    actual = _as_float(to_torch_layout(to_numpy(flax_value), layout))
    expected = _as_float(torch_value)
    if actual.shape != expected.shape:
        raise ValueError(f"{name}: shape mismatch, flax {actual.shape} (torch layout) vs torch {expected.shape}")
    if isinstance(rule, Measured):
        if reference is None or probe is None:
            raise NoEvidence(f"{name}: the measured-noise rule needs a reference and a probe")
        if isinstance(probe, ProbeSums):
            return _judge_sums(name, actual, expected, _as_float(reference), probe, rule, axis, flax_probe,
                               flax_reference, layout)
        # a low-precision run's probe is torch's own value: the same array (its tiles read once)
        ref, prb = _as_float(reference), expected if probe is torch_value else _as_float(probe)
        if ref.shape != expected.shape or prb.shape != expected.shape:
            raise NoEvidence(f"{name}: reference {ref.shape} / probe {prb.shape} do not match torch {expected.shape}")
        ax = slice_axis(layout, expected.ndim) if axis == "auto" else axis
        # The usual case, every value finite: all the numbers in one pass over the four arrays
        m = _blockwise.measure(actual, expected, ref, prb, ax) if expected.ndim and expected.size else None
        stats = _statistics(actual, expected) if m is None else _finite_stats(
            actual, expected, m["max_abs"], math.sqrt(m["diff"]), math.sqrt(m["expected"]), m["max_rel"])
        return _measured(name, actual, expected, ref, prb, rule, stats, ax,
                         _own(flax_probe, flax_reference, expected.shape), m)
    return _table(name, actual, expected, rule, _statistics(actual, expected))


def _judge_sums(name, actual, expected, ref, sums: ProbeSums, rule: Measured, axis, flax_probe, flax_reference,
                layout) -> Comparison:
    """judge() by a probe kept as its sums (ProbeSums): the same numbers as from the whole probe
    when every value is finite; else NoEvidence (the masked path needs the probe's values)."""
    ax = slice_axis(layout, expected.ndim) if axis == "auto" else axis
    if ref.shape != expected.shape or sums.shape != expected.shape or sums.axis != _normal_axis(ax, expected.ndim):
        raise NoEvidence(f"{name}: the probe's sums (shape {sums.shape}, axis {sums.axis}) do not match torch "
                         f"{expected.shape} judged along axis {ax}")
    m = _blockwise.measure(actual, expected, ref, None, ax) if expected.ndim and expected.size else None
    if m is None:
        raise NoEvidence(f"{name}: a value is not finite, and the probe was kept as its sums alone")
    m["noise"] = sums.noise
    stats = _finite_stats(actual, expected, m["max_abs"], math.sqrt(m["diff"]), math.sqrt(m["expected"]),
                          m["max_rel"])
    return _measured(name, actual, expected, ref, sums, rule, stats, ax, _own(flax_probe, flax_reference, expected.shape),
                     m)


def _own(flax_probe, flax_reference, shape: tuple[int, ...]) -> tuple | None:
    """The twin's own two runs of a tensor (torch layout), as they are (_slice_norms reads them in
    float64 a block at a time); None without both, or when their shape is not ``shape``."""
    if flax_probe is None or flax_reference is None:
        return None
    own = (to_numpy(flax_probe), to_numpy(flax_reference))
    return own if own[0].shape == shape and own[1].shape == shape else None


def judge_or_table(name: str, flax_value, torch_value, rule: Rule | None, table: Table, *, layout: str = AS_IS,
                   reference=None, probe=None, flax_probe=None, flax_reference=None,
                   axis: int | str | None = "auto") -> Comparison:
    """One model-level tensor: by the measured ``rule`` where there is evidence (a reference and a
    probe), else by ``table`` with a note saying why; a shape mismatch is a failed comparison,
    never an exception. What parity.check's ModelJudge and parity.verify both call."""
    if rule is not None and reference is not None and probe is not None:
        try:
            return judge(name, flax_value, torch_value, rule, layout=layout, reference=reference, probe=probe,
                         flax_probe=flax_probe, flax_reference=flax_reference, axis=axis)
        except NoEvidence as exc:
            fallback = f"{exc}: judged by the table"
        except ValueError as exc:
            return failed_comparison(name, str(exc), table)
    else:
        fallback = ""
    try:
        c = judge(name, flax_value, torch_value, table, layout=layout)
    except ValueError as exc:
        return failed_comparison(name, str(exc), table)
    return replace(c, note="; ".join(n for n in (c.note, fallback) if n))


def logit_rule(c: Comparison, m, dtype: str):
    """The logit rule (parity.tolerances.LOGIT_RULE): a logits leaf that FAILs elementwise in a
    bfloat16 / float16 check passes when its distributions agree (top-1 agreement and the largest
    per-position KL within the rule's bounds); then the comparison's judge is "logits" and its
    note says what decided, over what the elementwise judge found. Anything else comes back
    unchanged: a pass is never turned into a failure, float32 / float64 keep their verdict, and a
    NaN or Inf (on one side or both) or a comparison that could not be made is never a pass.
    m: the leaf's parity._logits.LogitMetrics; returns (comparison, metrics with ``decided``)."""
    r = LOGIT_RULE
    eligible = (dtype in r.dtypes and not c.ok and not c.nonfinite and c.mismatches >= 0
                and "one side only" not in c.note and math.isfinite(m.top1) and math.isfinite(m.kl_max))
    if not eligible or m.top1 < r.top1_min or m.kl_max > r.kl_max:
        return c, m
    note = (f"decided by the logit rule ({dtype}): top-1 {m.top1:.4f} >= {r.top1_min:g}, max KL "
            f"{m.kl_max:.2e} <= {r.kl_max:g}; elementwise it fails" + (f": {c.note}" if c.note else ""))
    return replace(c, ok=True, judge=LOGITS, note=note, inconclusive=False), replace(m, decided=True)


# --- a model's tensors -------------------------------------------------------------------------------
def _label(prefix: str, path: str, root: str, single: bool) -> str:
    """Report name of a leaf: "output" / "output.logits" / "grad input[1]"."""
    return prefix if single else prefix + path[len(root):]


class ModelJudge:
    """Judges the model-level tensors of one check or verify (outputs, input gradients, parameter
    gradients; keys ``out...``, ``input[...]``, ``param:<torch name>``), each by
    ``judge_or_table``: parity.check's and parity.verify's one mechanism.

    rule: the measured rule (None: the tables decide). refs / probes: the reference run's and the
    probe run's values by key, torch layout (any Mapping: verify's read the bundle when asked);
    probes None: the probe is the judged torch value itself (a low-precision run against its
    float64 reference: torch's own error is the noise).
    own_noise(keys): the twin's own run in the other precision, (flax_probe, flax_reference) by
    key, torch layout, for at least ``keys`` (None: every key), or None when it cannot run. It is
    run at most once, and only when a tensor does not pass on torch's noise alone: the twin's own
    noise only ever widens the bound (a pass without it is a pass with it), and that run is a
    whole-model run in another precision (in float64: twice the model's bytes in variables and
    as much again in gradients).
    """

    def __init__(self, rule: Rule | None, table_forward: Table, table_grad: Table, refs=None, probes=None,
                 own_noise=None):
        self.rule, self.table_forward, self.table_grad = rule, table_forward, table_grad
        self.refs, self.probes = (refs, probes) if rule is not None else (None, None)
        self.own_probe: dict = {}
        self.own_ref: dict = {}
        self._own_noise = own_noise if rule is not None else None
        self.notes: list[str] = []  # what the report's warnings should say (fill adds them)

    def _measurable(self, key: str) -> bool:
        return self.refs is not None and key in self.refs and (self.probes is None or key in self.probes)

    def _run_own_noise(self, keys) -> None:
        run, self._own_noise = self._own_noise, None
        try:
            got = run(keys)
        except Exception as exc:  # noqa: BLE001 -- a twin that cannot run in the other precision
            self.notes.append(f"the twin's own-noise run (the other precision) failed ({type(exc).__name__}: "
                              f"{str(exc)[:120]}): noise slices are judged by torch's noise alone")
            return
        if got is not None:
            self.own_probe, self.own_ref = got

    def _judge(self, kind, key, name, flax_value, torch_value, layout, axis, probe) -> Comparison:
        table = self.table_forward if kind == FORWARD else self.table_grad
        if not self._measurable(key):
            return judge_or_table(name, flax_value, torch_value, None, table, layout=layout)
        return judge_or_table(name, flax_value, torch_value, self.rule, table, layout=layout, reference=self.refs[key],
                              probe=probe if probe is not None else (
                                  torch_value if self.probes is None else self.probes[key]),
                              flax_probe=self.own_probe.get(key), flax_reference=self.own_ref.get(key), axis=axis)

    def _own_noise_may_pass(self, c: Comparison) -> bool:
        return not c.ok and c.judge == REFERENCE and self._own_noise is not None

    def judge(self, kind: str, key: str, name: str, flax_value, torch_value, layout: str,
              axis: int | str | None = "auto", probe=None) -> Comparison:
        """One tensor now (``kind`` FORWARD or GRAD; Flax value in Flax layout, torch value in
        torch layout); the twin's own noise is run for every key if this one needs it. probe:
        another run of the same tensor whose error against the reference measures the noise
        (torch layout; default: the probe's): the data-parallel rows' single-device run."""
        c = self._judge(kind, key, name, flax_value, torch_value, layout, axis, probe)
        if self._own_noise_may_pass(c):
            self._run_own_noise(None)
            c = self._judge(kind, key, name, flax_value, torch_value, layout, axis, probe)
        return c

    def fill(self, report, torch_side, flax_side, out_layouts: Mapping[str, str], in_layouts: Mapping[str, str], *,
             frozen=frozenset(), tied: Mapping[str, str] | None = None, release=None) -> None:
        """The report's outputs, input gradients and parameter gradients. torch_side / flax_side:
        ``.outputs``, ``.input_grads`` by path and ``.param_grads`` by torch name (Flax's laid out
        as torch's; Mappings). A frozen torch parameter (requires_grad=False: RoFormer's
        sinusoidal table) has no gradient to compare; its Flax twin often computes it in code.

        Two passes: every tensor on torch's noise first; then, when some failed there, the twin's
        own noise is run once for those keys alone and they are judged again. release(key), when
        given, is called as soon as a tensor's comparison is final and passed (its reference,
        probe and own values are dropped here; the caller drops its own; a failure's stay, where
        the caller looks for the first NaN): parity.check and parity.verify free what they have
        judged before the twin's own-noise run needs the memory."""
        tied = tied or {}
        again = []  # (list, index, key, how to judge it) of tensors the twin's own noise may pass

        # Judged a few at a time in worker threads (parity._threads.in_order), taken in order:
        # each tensor's comparison depends on its own values alone (BERT-base's 224: 1.35 -> 0.9 s).
        jobs: list = []  # (the report's list, the key, how to judge it or the comparison made)

        def one(out: list, kind, key, name, flax_of, torch_of, layout, axis) -> None:
            jobs.append((out, key, (kind, key, name, flax_of, torch_of, layout, axis)))

        report.outputs, report.input_grads, report.param_grads = [], [], []
        single = len(torch_side.outputs) == 1
        for p in list(torch_side.outputs):
            one(report.outputs, FORWARD, p, _label("output", p, "out", single), lambda p=p: flax_side.outputs[p],
                lambda p=p: torch_side.outputs[p], out_layouts[p], "auto")
        single = len(torch_side.input_grads) == 1
        for p in list(torch_side.input_grads):
            one(report.input_grads, GRAD, p, _label("grad input", p, "input", single),
                lambda p=p: flax_side.input_grads[p], lambda p=p: torch_side.input_grads[p], in_layouts[p], "auto")
        for n in list(torch_side.param_grads):
            if n in frozen:
                continue
            if n not in flax_side.param_grads:
                jobs.append((report.param_grads, f"param:{n}", failed_comparison(
                    f"grad {n}", "the port gives no Flax gradient for this torch parameter"
                    + (f" (tied to {tied[n]})" if n in tied else ""), self.table_grad)))
                continue
            one(report.param_grads, GRAD, f"param:{n}", f"grad {n}", lambda n=n: flax_side.param_grads[n],
                lambda n=n: torch_side.param_grads[n], AS_IS, 0)

        def judged(how) -> Comparison:  # on what the judge holds now (the twin's own noise once run)
            if isinstance(how, Comparison):
                return how
            kind, key, name, flax_of, torch_of, layout, axis = how
            return self._judge(kind, key, name, flax_of(), torch_of(), layout, axis, None)

        for (out, key, how), c in zip(jobs, in_order(judged, [how for _, _, how in jobs])):
            out.append(c)
            if not isinstance(how, Comparison) and self._own_noise_may_pass(c):
                again.append((out, len(out) - 1, key, how))
            else:
                self._done(key, release, c.ok)
        if again and self._own_noise is not None:
            self._run_own_noise([key for _, _, key, _ in again])
        for (out, i, key, _), c in zip(again, in_order(judged, [how for *_, how in again])):
            out[i] = c
            self._done(key, release, c.ok)
        own = [c.name for c in report.outputs + report.input_grads + report.param_grads
               if "twin's own rounding noise only" in c.note]
        if own:
            self.notes.append(
                f"{', '.join(own[:4])}{' ...' if len(own) > 4 else ''}: some slices are within the twin's own "
                "rounding noise only, larger there than torch's (a slice that is zero in exact arithmetic, or "
                "reductions XLA accumulates in the low dtype): the same computation, rounded differently")
        report.warnings += self.notes

    def _done(self, key: str, release, ok: bool) -> None:
        if release is None:  # kept: the data-parallel rows judge the same keys again
            return
        for d in (self.refs, self.probes, self.own_probe, self.own_ref):
            if isinstance(d, MutableMapping):  # (a ChainMap over a Spill's view drops its dict part only)
                d.pop(key, None)
        if ok:  # a failure's values stay: the check looks in them for where a NaN or Inf began
            release(key)


@dataclass
class _Stats:
    agree_inf: np.ndarray
    nan_both: np.ndarray
    one_sided: np.ndarray
    ref_norm: float
    rel_norm: float
    max_rel: float
    max_abs: float = 0.0
    note: str = ""
    nonfinite: str = ""
    finite: bool = False  # both sides proven finite (_finite_statistics): no need to look again
    # |a - b|, 0 where both agree on an infinity, inf where one side only is non-finite; made
    # when first read (only the elementwise table reads every element), from ``values``
    made_diff: np.ndarray | None = None
    values: tuple | None = None

    @property
    def diff(self) -> np.ndarray:
        if self.made_diff is None:
            self.made_diff = _blockwise.abs_diff(*self.values)
        return self.made_diff

    def any_one_sided(self) -> bool:
        return not self.finite and bool(self.one_sided.any())

    def worst_in_slice(self, axis, row: int) -> tuple[int, ...]:
        """Index of the largest |a - b| of slice ``row`` along ``axis`` (the whole array when
        ``axis`` is None or it has fewer than 2 dimensions): the first one in C order, as an argmax
        over the whole array masked to that slice finds it, without the mask's copy (nor, for
        finite values, the whole difference's)."""
        if self.made_diff is not None or not self.finite:
            return _worst_in_slice(self.diff, axis, row)
        a, b = self.values
        if axis is None or a.ndim < 2:
            return _blockwise.argmax_abs_diff(a, b)
        at = (slice(None),) * (axis % a.ndim) + (row,)  # the slice as a view: no copy
        idx = list(_blockwise.argmax_abs_diff(a[at], b[at]))
        idx.insert(axis % a.ndim, row)
        return tuple(idx)


def _all_finite(x: np.ndarray) -> bool:
    """Every element finite. A NaN or infinity makes the sum non-finite, so a finite sum proves it
    in one pass without a mask; a sum that overflows (finite values near float64's limit) is
    answered by the mask."""
    return bool(np.isfinite(np.add.reduce(x, axis=None))) or bool(np.isfinite(x).all())


def _statistics(actual: np.ndarray, expected: np.ndarray) -> _Stats:
    if _all_finite(actual) and _all_finite(expected):
        return _finite_statistics(actual, expected)
    return _masked_statistics(actual, expected)


def _masked_statistics(actual: np.ndarray, expected: np.ndarray) -> _Stats:
    """_statistics where some element is not finite (infinities that agree, NaN, one side only)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    fa, fe = np.isfinite(actual), np.isfinite(expected)
    agree_inf = np.isinf(actual) & np.isinf(expected) & (actual == expected)
    nan_both = np.isnan(actual) & np.isnan(expected)
    one_sided = ~(fa & fe) & ~agree_inf & ~nan_both
    with np.errstate(invalid="ignore"):
        diff = np.where(fa & fe, np.abs(actual - expected), 0.0)
    diff = np.where(one_sided | nan_both, np.inf, diff)
    finite = fa & fe
    ref_norm = float(np.linalg.norm(np.where(finite, expected, 0.0)))
    norm_diff = float(np.linalg.norm(np.where(finite, diff, 0.0))) if diff.size else 0.0
    rel_norm = norm_diff / ref_norm if ref_norm > 0 else (0.0 if norm_diff == 0 else math.inf)
    if (one_sided | nan_both).any():
        rel_norm = math.inf
    denom = np.abs(np.where(finite, expected, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.divide(diff, denom, out=np.where(diff > 0, np.inf, 0.0), where=denom > 0)
    s = _Stats(agree_inf, nan_both, one_sided, ref_norm, rel_norm, float(rel.max()) if rel.size else 0.0,
               float(diff.max()) if diff.size else 0.0, finite=bool(finite.all()), made_diff=diff)
    if nan_both.any():
        s.nonfinite, s.note = "NaN", "NaN on both sides"
    elif one_sided.any():
        bad_flax = ~fa & one_sided & fe
        bad_torch = ~fe & one_sided & fa
        side = "flax" if bad_flax.any() and not bad_torch.any() else (
            "torch" if bad_torch.any() and not bad_flax.any() else "both, at different places")
        kind = "NaN" if (np.isnan(actual) | np.isnan(expected))[one_sided].any() else "Inf"
        s.note = f"{kind} on one side only ({side}): {int(one_sided.sum())} element(s)"
    return s


def _finite_stats(actual, expected, max_abs: float, norm_diff: float, ref_norm: float, max_rel: float,
                  diff: np.ndarray | None = None) -> _Stats:
    """_Stats of two arrays proven finite (no masks; |a - b| made when first read, unless given)."""
    none = np.zeros((), dtype=bool)  # no infinity, no NaN (any_one_sided: finite)
    rel_norm = norm_diff / ref_norm if ref_norm > 0 else (0.0 if norm_diff == 0 else math.inf)
    return _Stats(none, none, none, ref_norm, rel_norm, max_rel, max_abs, finite=True, made_diff=diff,
                  values=(actual, expected))


def _finite_statistics(actual: np.ndarray, expected: np.ndarray) -> _Stats:
    """_statistics of two finite arrays (the usual case), a tile at a time (parity._blockwise):
    the same numbers as the masked path's without its masks, and without |a - b| itself until
    something reads every element of it (the elementwise table). Judging BERT-base's gradients
    made 0.9 GB of float64 temporaries, and on a VM touching fresh pages costs what the
    arithmetic on them does."""
    if actual.ndim == 0 or not actual.size:
        diff = np.asarray(np.subtract(actual, expected, dtype=np.float64))
        np.abs(diff, out=diff)
        ref_norm = float(np.linalg.norm(np.asarray(expected, np.float64))) if expected.size else 0.0
        norm_diff = float(np.linalg.norm(diff)) if diff.size else 0.0
        max_rel = 0.0
        if diff.ndim == 0:
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = float(abs(diff / expected)) if expected != 0 else (math.inf if diff > 0 else 0.0)
            max_rel = 0.0 if math.isnan(rel) else rel
        return _finite_stats(actual, expected, float(diff.max()) if diff.size else 0.0, norm_diff, ref_norm,
                             max_rel, diff)
    max_abs, sq_diff, sq_ref, max_rel = _blockwise.pair_statistics(actual, expected)
    return _finite_stats(actual, expected, max_abs, math.sqrt(sq_diff), math.sqrt(sq_ref), max_rel)


def _worst_in_slice(diff: np.ndarray, axis, row: int) -> tuple[int, ...]:
    """Index (in ``diff``'s shape) of the largest element of slice ``row`` along ``axis`` (the
    whole array when ``axis`` is None or it has fewer than 2 dimensions): the first one in C order,
    as an argmax over the whole array masked to that slice finds it, without the mask's copy."""
    if not diff.size:
        return ()
    if axis is None or diff.ndim < 2:
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    part = np.take(diff, row, axis=axis)
    idx = [int(i) for i in np.unravel_index(int(np.argmax(part)), part.shape)]
    idx.insert(axis % diff.ndim, row)
    return tuple(idx)


def _worst(diff: np.ndarray, excess: np.ndarray, actual, expected) -> tuple[tuple[int, ...], float, float]:
    if not diff.size:
        return (), 0.0, 0.0
    flat = int(np.argmax(np.where(np.isnan(excess), -np.inf, excess)))
    idx = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
    return idx, float(expected[idx]), float(actual[idx])


def _result(name, actual, expected, s: _Stats, *, ok, score, mismatches, excess, tolerance, judge_name,
            note="", inconclusive=False, floor=0.0, worst_index: tuple[int, ...] | None = None) -> Comparison:
    if worst_index is None:
        worst, exp_w, act_w = _worst(s.diff, excess, actual, expected)
    else:  # found by the caller
        worst = worst_index
        exp_w, act_w = (float(expected[worst]), float(actual[worst])) if expected.size else (0.0, 0.0)
    notes = "; ".join(n for n in (s.note, note) if n)
    return Comparison(
        name=name, shape=tuple(expected.shape), max_abs=s.max_abs,
        max_rel=s.max_rel, rel_norm=float(s.rel_norm), mismatches=int(mismatches), worst_index=worst,
        expected_at_worst=exp_w, actual_at_worst=act_w, tolerance=tolerance,
        ok=bool(ok) and not s.nonfinite and not s.any_one_sided(), score=float(score), note=notes,
        ref_norm=s.ref_norm, nonfinite=s.nonfinite, judge=judge_name,
        inconclusive=bool(inconclusive) and bool(ok) and not s.nonfinite and not s.any_one_sided(),
        floor=float(floor or 0.0))


def _table(name, actual, expected, rule: Table, s: _Stats) -> Comparison:
    tol = rule.tol
    expected = np.asarray(expected, np.float64)  # the bounds atol + rtol |expected| in float64
    diff = s.diff
    denom = np.abs(np.where(np.isfinite(expected), expected, 0.0))
    if tol.rtol is not None:
        allowed = tol.atol + tol.rtol * denom
        bad = diff > allowed
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.divide(diff, allowed, out=np.where(diff > 0, np.inf, 0.0), where=allowed > 0)
        score = float(ratio.max()) if ratio.size else 0.0
        excess = diff - allowed
    else:
        bad = np.zeros(diff.shape, dtype=bool)
        score, excess = 0.0, diff
    mismatches = int(bad.sum())
    ok = mismatches == 0
    if tol.rel_norm is not None:
        ok = ok and s.rel_norm <= tol.rel_norm
        score = max(score, s.rel_norm / tol.rel_norm if tol.rel_norm > 0 else math.inf)
    # Training's per-tensor noise bounds (parity.training.noise): the one place an absolute norm
    # floor is still applied, from the optimizer's own update formula.
    tiny = bool(tol.abs_norm) and not np.isinf(diff).any() and float(np.linalg.norm(diff)) <= tol.abs_norm
    if tiny and not ok:
        ok, score = True, float(np.linalg.norm(diff)) / tol.abs_norm
    inconclusive, note = False, ""
    if ok and not rule.atol_decides and tol.rtol is not None and s.rel_norm > tol.rtol and not tiny:
        # Elementwise within atol but the tensor as a whole is off by more than rtol relative:
        # atol alone passed it, and nothing measured says that this is rounding (a 1e-6-sized
        # output 50% off passes any absolute bound above 1e-6).
        inconclusive = True
        note = (f"passes only under atol={tol.atol:g} (rel_norm {s.rel_norm:.2e} > rtol {tol.rtol:g}); "
                "a float64 reference run would measure its noise")
    return _result(name, actual, expected, s, ok=ok, score=score, mismatches=mismatches, excess=excess,
                   tolerance=tol.describe(), judge_name=TABLE, note=note, inconclusive=inconclusive,
                   floor=tol.abs_norm or 0.0)


def _masked_noise(name, actual, expected, ref, probe, s: _Stats, axis):
    """(ref, probe as judged, and the per-slice flax error, probe error and reference norm)
    where some value is not finite. Elements where flax, torch and the reference all hold the same
    infinity agree; elsewhere a non-finite reference cannot measure anything."""
    proven = {id(actual), id(expected)} if s.finite else set()
    if all(_all_finite(x) for x in {id(x): x for x in (actual, expected, ref, probe)}.values() if id(x) not in proven):
        z = lambda x: x  # noqa: E731 -- no mask, no masked copies (each the tensor's size)
    else:
        fine = np.isfinite(actual)
        for x in (expected, ref, probe):
            fine &= np.isfinite(x)
        usable = fine | s.agree_inf
        if not usable[~s.one_sided & ~s.nan_both].all():
            raise NoEvidence(f"{name}: the reference or probe run is not finite where both sides are")
        z = lambda x: np.where(fine, x, 0.0)  # noqa: E731
    fl, rf, pr = z(actual), z(ref), z(probe)
    return (rf, pr, *(np.sqrt(x) for x in _blockwise.noise_sums(fl, rf, pr, axis)))


def _measured(name, actual, expected, ref, probe, rule: Measured, s: _Stats, axis, own=None,
              m: dict | None = None) -> Comparison:
    """m: _blockwise.measure's sums when every value is finite (then no mask, nothing read again)."""
    if m is not None:
        rf, pr = ref, probe
        flax_err, probe_err, ref_n = np.sqrt(m["err"]), np.sqrt(m["noise"]), np.sqrt(m["norm"])
    else:
        rf, pr, flax_err, probe_err, ref_n = _masked_noise(name, actual, expected, ref, probe, s, axis)
    n_slices, per_slice = _n_slices(rf, axis)
    noise = rule.noise_scale * probe_err
    if own is not None and _all_finite(own[0]) and _all_finite(own[1]):
        scale = np.maximum(np.sqrt(pr.norm) if isinstance(pr, ProbeSums) else _slice_norms(pr, axis), ref_n)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(scale > 0, probe_err / np.where(scale > 0, scale, 1.0), 1.0)
        own_noise = rule.noise_scale * _slice_norms(own[0], axis, own[1])
        counts = (share >= NOISE_SLICE_SHARE) | rule.own_everywhere
        own_decided = counts & (own_noise > noise) & (flax_err > rule.k * noise)
        noise = np.where(counts, np.maximum(noise, own_noise), noise)
    else:
        own_decided = np.zeros(flax_err.shape, dtype=bool)
    # The smallest normal number of the checked dtype per element: a slice that is exactly zero
    # on torch's runs may still differ by denormal dust, which is no error.
    tiny = np.finfo(np.float32).tiny if rule.eps > EPS["float64"] else np.finfo(np.float64).tiny
    # k widened where the slice is too small for its noise norm to be a good estimate (FEW_ELEMENTS)
    k = rule.k * (1.0 + FEW_ELEMENTS / math.sqrt(max(per_slice, 1)))
    allowed = k * np.maximum(noise, rule.rho * rule.eps * ref_n) + tiny * math.sqrt(per_slice or 1)
    ratio = flax_err / allowed
    worst = int(np.argmax(ratio)) if ratio.size else 0
    bad_slices = int((ratio > 1).sum())
    ok = bad_slices == 0
    excess_slices = ratio
    # Worst element for reading: the largest |flax - torch| inside the worst slice.
    worst_index = s.worst_in_slice(axis if n_slices > 1 else None, worst)
    rn = ref_n[worst] if ref_n.size else 0.0
    where = f" (slice {worst} of axis {axis})" if axis is not None and n_slices > 1 else ""
    note = (f"vs fp64{where}: flax {flax_err[worst] / rn if rn else flax_err[worst]:.2e}, "
            f"torch noise {noise[worst] / rn if rn else noise[worst]:.2e}"
            + ("" if rn else " (absolute: the reference is zero)")
            + (f"; {bad_slices} of {n_slices} slices out" if bad_slices else "")
            + (f"; {int(own_decided.sum())} slice(s) within the twin's own rounding noise only (its own "
               "low-precision run against its float64 run), above torch's" if own_decided.any() and ok else ""))
    return _result(name, actual, expected, s, ok=ok, score=float(excess_slices.max()) if ratio.size else 0.0,
                   mismatches=bad_slices, excess=None, tolerance=rule.describe(), judge_name=REFERENCE,
                   note=note, worst_index=worst_index)


__all__ = ["Comparison", "LOGITS", "Measured", "ModelJudge", "NoEvidence", "ProbeSums", "REFERENCE", "Rule", "TABLE", "Table", "failed_comparison",
           "judge", "logit_rule", "measured", "reduce_probe", "slice_axis", "worst_of"]
