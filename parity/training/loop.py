"""train_check: port torch's initial weights, train both twins on identical batches, compare per step.

Per step: loss, learning rate, global gradient norm, the parameter update (p_t - p_{t-1}) of every
torch-named parameter, and BatchNorm running statistics. Dropout runs deterministic.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from parity.judge import Comparison, judge
from parity.numerics import jax_precision, numerics_env
from parity.pair import CheckOptions, prepare
from parity.tolerances import TRAIN_DIAGNOSIS, TRAIN_LOSS, TRAIN_STATS, TRAIN_UPDATE, train_tolerance
from parity.training.bn_audit import BNFinding, audit_batch_norms
from parity.training.noise import UpdateNoise, loss_gradient_floor, stats_floors
from parity.training.optim import (OptimizerSpec, _RefState, conventions, optax_optimizer,
                                   optax_schedule, reference_update, suspect_variants, torch_optimizer)
from parity.runtime import (FlaxTwin, as_args, flatten, flax_inputs, output_layouts,
                            output_shapes, torch_inputs, value_and_grad_fn)
from weight_port.layout import to_flax_layout
from weight_port import PortPlan
from weight_port import to_numpy

LOSSES = ("cross_entropy", "nll", "mse")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_REPLAY = 100  # steps of the Flax trajectory kept for naming an optimizer convention mistake

Batch = tuple[np.ndarray, np.ndarray]


# --- losses: the same formula on both sides; class axis 1 in torch, last in Flax -------------
def torch_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss on torch's output: class axis 1 ([N, C] or [N, C, *S])."""
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)  # logits [N, C, *S], labels [N, *S]
    if kind == "nll":
        return F.nll_loss(out, y)  # log-probabilities [N, C, *S]
    return F.mse_loss(out, y)


def flax_loss(kind: str, out: jax.Array, y: jax.Array) -> jax.Array:
    """out: [N, *S, C] (Flax layout); y: labels [N, *S] (same in both layouts) or targets like out."""
    if kind == "mse":
        return jnp.mean(jnp.square(out - y))
    logp = jax.nn.log_softmax(out, axis=-1) if kind == "cross_entropy" else out
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


# --- result -------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """Comparisons of one optimizer step (1-based). Tensors are named and laid out as in torch."""

    step: int
    torch_loss: float
    flax_loss: float
    scalars: list[Comparison]  # loss, lr, grad_norm
    updates: list[Comparison]  # "update <param>": p_t - p_{t-1}
    stats: list[Comparison]  # BatchNorm running_mean / running_var after the step

    @property
    def comparisons(self) -> list[Comparison]:
        return self.scalars + self.updates + self.stats

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    def worst(self, comps: list[Comparison]) -> Comparison | None:
        """Failures first, then the largest real relative error: a tensor below its noise floor
        (zero in exact arithmetic) comes last, its rel_norm being a ratio of two noises."""
        return max(comps, key=lambda c: (not c.ok, not c.below_floor, c.rel_norm), default=None)

    def scalar(self, name: str) -> Comparison:
        return next(c for c in self.scalars if c.name == name)

    def to_dict(self) -> dict:
        w_u, w_s = self.worst(self.updates), self.worst(self.stats)
        return {
            "step": self.step, "ok": self.ok, "torch_loss": self.torch_loss, "flax_loss": self.flax_loss,
            "scalars": [c.to_dict() for c in self.scalars],
            "worst_update": w_u.to_dict() if w_u else None,
            "worst_stat": w_s.to_dict() if w_s else None,
            "failures": [c.to_dict() for c in self.comparisons if not c.ok],
        }


@dataclass
class TrainReport:
    """Per-step comparison of a torch and a Flax training run from the same initial weights."""

    model: str
    dtype: str
    optimizer: OptimizerSpec
    loss: str
    steps: list[StepResult]
    conventions: list[str] = field(default_factory=list)  # handled convention differences
    findings: list[str] = field(default_factory=list)  # named mistakes (BatchNorm audit, optimizer)
    notes: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    torch_module: Any = field(default=None, repr=False)  # trained copy
    flax_variables: Any = field(default=None, repr=False)  # trained variables

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    @property
    def first_failure(self) -> StepResult | None:
        return next((s for s in self.steps if not s.ok), None)

    @property
    def torch_losses(self) -> list[float]:
        return [s.torch_loss for s in self.steps]

    @property
    def flax_losses(self) -> list[float]:
        return [s.flax_loss for s in self.steps]

    def max_loss_diff(self, upto: int) -> float:
        """max |loss_flax - loss_torch| over steps 1..upto."""
        return max((s.scalar("loss").max_abs for s in self.steps[:upto]), default=0.0)

    def to_dict(self) -> dict:
        first = self.first_failure
        return {
            "model": self.model, "dtype": self.dtype, "ok": self.ok, "loss": self.loss,
            "optimizer": self.optimizer.__dict__ | {"weight_decay": self.optimizer.wd},
            "first_failure": first.step if first else None,
            "conventions": self.conventions, "findings": self.findings, "notes": self.notes,
            "steps": [s.to_dict() for s in self.steps], "env": self.env,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    def __str__(self) -> str:
        o = self.optimizer
        first = self.first_failure
        lines = [f"train parity {self.model} [{self.dtype}, {o.name} lr={o.lr:g} {o.schedule}, "
                 f"{len(self.steps)} steps, loss {self.loss}]: {'PASS' if self.ok else 'FAIL'}"]
        if first:
            bad = [c.name for c in first.comparisons if not c.ok]
            lines.append(f"  first failure at step {first.step}: {', '.join(bad)[:200]}")
        lines.append(f"  {'step':>5} {'torch loss':>12} {'flax loss':>12} {'|dloss|':>9} {'lr rel':>8} "
                     f"{'gnorm rel':>9} {'worst update rel_norm':>30} {'stats rel':>9}  ok")
        for s in self._rows_to_show():
            wu, ws = s.worst(s.updates), s.worst(s.stats)
            lines.append(
                f"  {s.step:5d} {s.torch_loss:12.6g} {s.flax_loss:12.6g} {s.scalar('loss').max_abs:9.2e} "
                f"{s.scalar('lr').rel_norm:8.1e} {s.scalar('grad_norm').rel_norm:9.2e} "
                f"{(_rel(wu) + ' ' + wu.name.removeprefix('update ')[:20]) if wu else '':>30} "
                f"{_rel(ws) if ws else '-':>9}  {'ok' if s.ok else 'FAIL'}")
        if first:
            for c in first.comparisons:
                if not c.ok:
                    lines.append(f"      step {first.step} {c.name}: worst at {list(c.worst_index)} torch "
                                 f"{c.expected_at_worst:.6g} flax {c.actual_at_worst:.6g}, rel_norm "
                                 f"{c.rel_norm:.2e} ({c.tolerance})")
        lines += [f"  finding: {f}" for f in self.findings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _rows_to_show(self) -> list[StepResult]:
        n = len(self.steps)
        keep = {1, 2, 3, 5, n} | {10**k for k in range(1, 6)} | {k * 50 for k in range(1, 200)}
        first = self.first_failure
        if first:
            keep.add(first.step)
        return [s for s in self.steps if s.step in keep]


# --- one step's comparison (single-device and data-parallel training share it) ---------------
@dataclass
class StepSide:
    """What one framework's optimizer step k produced, by torch name in torch layout (float64)."""

    loss: float
    lr: float
    grad_norm: float
    updates: dict[str, np.ndarray]  # p_k - p_{k-1} per parameter
    stats: dict[str, np.ndarray]  # BatchNorm "<path>.running_mean" / "...running_var" after the step


def compare_step(k: int, dtype: str, prec: str, noise: UpdateNoise, torch_side: StepSide,
                 flax_side: StepSide) -> StepResult:
    """Step k's comparisons under the training tolerance table and the noise floors: ``noise``
    has observed this step (UpdateNoise.observe with torch's gradients); running statistics get
    their own floors (stats_floors). Statistics only one side has are not compared."""
    tol_s, tol_u, tol_b = (train_tolerance(dtype, kind, k, prec) for kind in (TRAIN_LOSS, TRAIN_UPDATE, TRAIN_STATS))
    t, f = torch_side, flax_side
    scalars = [judge("loss", np.asarray(f.loss), np.asarray(t.loss), tol_s),
               judge("lr", np.asarray(f.lr), np.asarray(t.lr), tol_s),
               judge("grad_norm", np.asarray(f.grad_norm), np.asarray(t.grad_norm), tol_s)]
    updates = [noise.compare(f"update {n}", n, f.updates[n], t.updates[n], tol_u) for n in t.updates]
    floors = stats_floors(dtype, t.stats)
    stats = [judge(n, f.stats[n], v, tol_b.with_floor(floors.get(n, 0.0)))
             for n, v in t.stats.items() if n in f.stats]
    return StepResult(k, t.loss, f.loss, scalars, updates, stats)


def noise_notes(spec: OptimizerSpec, results: list[StepResult]) -> list[str]:
    """The report's note on updates judged partly as gradient noise (UpdateNoise), if any."""
    noisy = sorted({c.name.removeprefix("update ") for r in results for c in r.updates if "steps noise" in c.note})
    if not noisy:
        return []
    return [f"gradient noise: entries of {', '.join(noisy)[:200]} have gradients under the noise "
            f"floor (zero in exact arithmetic, e.g. a softmax key bias); {spec.name} turns that "
            "noise into steps each framework draws differently, judged by the largest such step "
            "(parity.tolerances.TRAIN_NOISE_FLOORS)"]


# --- the check ------------------------------------------------------------------------------
def _rel(c: Comparison) -> str:
    # An update that is all gradient noise (parity.training.noise) has no meaningful ratio.
    return f"{'<floor':>9}" if c.below_floor else f"{c.rel_norm:9.2e}"


def _batch(data, i: int) -> Batch:
    if callable(data):
        return data(i)
    return data[i % len(data)]


def _torch_named(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: to_numpy(p.detach()).astype(np.float64) for n, p in module.named_parameters()}


def torch_grads(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Each parameter's .grad by torch name, float64 (zeros where it has none)."""
    return {n: to_numpy(p.grad.detach()).astype(np.float64) if p.grad is not None else np.zeros(tuple(p.shape))
            for n, p in module.named_parameters()}


def _norm(tensors) -> float:
    return float(np.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in tensors)))


def floor_norms(out: torch.Tensor, inputs) -> tuple[float, float]:
    """(||dL/d out||, ||float leaves of inputs||): what a step's gradient noise floor scales with
    (loss_gradient_floor). ``out`` had retain_grad() before the backward; no grad reads as 0."""
    floats = [t for t in jax.tree_util.tree_leaves(inputs)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    cot = out.grad if out.grad is not None else torch.zeros(())
    return _norm([cot]), _norm(floats)


def _bn_stats_torch(module: torch.nn.Module, bn_paths: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for path in bn_paths:
        m = module.get_submodule(path)
        if m.track_running_stats:
            out[f"{path}.running_mean"] = to_numpy(m.running_mean).astype(np.float64)
            out[f"{path}.running_var"] = to_numpy(m.running_var).astype(np.float64)
    return out


def flax_train_step(twin: FlaxTwin, tx: optax.GradientTransformation, loss: str) -> Callable:
    """The Flax side of one training step, jitted, shared by single-device and data-parallel
    training parity: (params, other collections, optimizer state, inputs, target) -> (params,
    updated collections, optimizer state, loss, global gradient norm, gradients). Inputs and
    target in Flax layout; the gradient comes from the engine's value_and_grad_fn."""
    grad_fn = value_and_grad_fn(twin, lambda out, y: flax_loss(loss, first_leaf(out), y))

    @jax.jit
    def step(p, bs, state, x, y):
        value, grads, new_rest = grad_fn({"params": p, **bs}, x, y)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), new_rest, state, value, optax.tree.norm(grads), grads

    return step


def named_like_torch(plan: PortPlan, tree, collection: str) -> dict[str, np.ndarray]:
    """A Flax collection (params, gradients, updates, batch_stats) as float64 numpy arrays
    named and laid out as the torch module's tensors, through the port's plan."""
    return {k: np.asarray(v, np.float64) for k, v in
            plan.to_torch({collection: tree}, collections=(collection,)).items()}


def first_leaf(out):
    """The output the loss reads: the output itself, or the first leaf of a pytree output."""
    return next(iter(flatten(out).values()))


def train_local(torch_module, flax_module, data, steps, spec, loss, dtype, tdtype, input_layout, output_layout,
                train_kwarg, rename, flax_tx, name):
    """Training parity on one device: torch steps in this process (see parity.training.check)."""
    x0, _ = _batch(data, 0)
    # check_attributes="ignore": BatchNorm momentum/eps mismatches are named by the audit below
    # (with the drift they cause) instead of stopping the run. Dropout off on both sides (below).
    pair = prepare(torch_module, flax_module, x0, CheckOptions(dtype=dtype, train=True, train_kwarg=train_kwarg,
                                                                input_layout=input_layout, rename=rename),
                   check_attributes="ignore", dropout=False)
    tm, twin, plan, in_layouts = pair.torch_module, pair.twin, pair.plan, pair.in_layouts
    # Copy: on CPU, plan.to_flax can hand back jax arrays that alias the torch tensors' memory
    # (zero-copy jnp.asarray), so torch's in-place optimizer.step() would move the Flax weights too.
    # (A numpy copy, then device_put: committed arrays from the start, so the jitted step is
    # compiled once instead of again when its own committed outputs come back as inputs.)
    device = jax.devices()[0]
    variables = jax.device_put(jax.tree_util.tree_map(lambda a: np.array(a, copy=True), pair.variables), device)
    params = variables["params"]
    # Non-param collections (BatchNorm statistics) travel through the step and come back updated.
    bstats = {k: v for k, v in variables.items() if k != "params"}
    has_bs = "batch_stats" in variables

    notes = []
    # Dropout: torch modules in train mode would draw their own masks, which no Flax RNG can
    # reproduce; hold them in eval mode (identity) while BatchNorm stays in train mode.
    tm.train(True)
    drop = [m for m in tm.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in drop:
        m.eval()
    notes.append(f"dropout deterministic: {len(drop)} torch Dropout module(s) held in eval mode; the Flax "
                 "twin gets no 'dropout' RNG")
    bn_paths, bn_findings = audit_batch_norms(plan)
    if bn_paths:
        notes.append(f"BatchNorm train mode in {len(bn_paths)} layer(s): batch statistics normalise; "
                     "running statistics compared after every step")

    t_opt, t_sched = torch_optimizer(spec, tm.parameters(), steps)
    tx = flax_tx if flax_tx is not None else optax_optimizer(spec, steps)
    schedule = optax_schedule(spec, steps)
    opt_state = jax.device_put(jax.jit(tx.init)(params), device)  # one compile, not one per leaf shape
    flax_step = flax_train_step(twin, tx, loss)
    out_layout: list[str] = []  # the loss output's layout, found at the first step (mse targets)

    def named(tree, collection):
        return named_like_torch(plan, tree, collection)

    prec = jax_precision()
    noise = UpdateNoise(spec)
    t_prev = _torch_named(tm)
    f_prev = named(params, "params")
    replay: list[tuple[float, dict, dict, dict]] = []  # (lr, p_prev, grads, update), Flax side
    results: list[StepResult] = []
    for i in range(steps):
        k = i + 1
        x_np, y_np = _batch(data, i)
        y_np = np.asarray(y_np)
        # torch step
        xt = torch_inputs(as_args(x_np), tdtype, grads=False)
        yt = torch.as_tensor(y_np) if loss != "mse" else torch.as_tensor(y_np, dtype=tdtype)
        t_opt.zero_grad(set_to_none=False)
        t_out = first_leaf(tm(*xt))
        if t_out.requires_grad:
            t_out.retain_grad()  # dL/d output: one factor of the gradients' noise floor
        t_loss = torch_loss(loss, t_out, yt)
        t_loss.backward()
        t_loss = t_loss.detach()
        t_gnorm = float(np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in tm.parameters()
                                    if p.grad is not None)))
        t_lr = float(t_opt.param_groups[0]["lr"])
        noise.observe(t_lr, loss_gradient_floor(dtype, *floor_norms(t_out, xt)), torch_grads(tm), t_prev, f_prev)
        t_opt.step()
        if t_sched is not None:
            t_sched.step()
        # flax step
        xf = flax_inputs(xt, in_layouts)
        if loss == "mse":
            if not out_layout:
                shape = next(iter(output_shapes(twin, {"params": params, **bstats}, xf).values())).shape
                out_layout.append(output_layouts(output_layout, {"out": tuple(t_out.shape)}, {"out": shape})["out"]
                                  if isinstance(output_layout, (str, type(None))) else
                                  next(iter(output_layout.values())))
            yf = jnp.asarray(to_flax_layout(y_np, out_layout[0], "mse target"), dtype=tdtype_to_jnp(dtype))
        else:
            yf = jnp.asarray(y_np)
        try:
            params, bstats, opt_state, f_loss, f_gnorm, grads = flax_step(params, bstats, opt_state, xf, yf)
        except nn.errors.InvalidRngError as exc:
            raise ValueError("the Flax twin asks for an RNG in train mode (dropout?); train parity runs "
                             f"deterministic and passes none: {exc}") from exc
        f_lr = float(schedule(i))

        t_now, f_now = _torch_named(tm), named(params, "params")
        t_upd = {n: t_now[n] - t_prev[n] for n in t_now}
        f_upd = {n: f_now[n] - f_prev[n] for n in f_now}
        # Keep the Flax trajectory up to (and including) the first failing step, to name the cause.
        if len(replay) < MAX_REPLAY and all(r.ok for r in results):
            replay.append((f_lr, f_prev, named(grads, "params"), f_upd))
        t_prev, f_prev = t_now, f_now

        t_stats = _bn_stats_torch(tm, bn_paths)
        f_stats = named(bstats["batch_stats"], "batch_stats") if bn_paths and has_bs else {}
        results.append(compare_step(k, dtype, prec, noise, StepSide(float(t_loss), t_lr, t_gnorm, t_upd, t_stats),
                                    StepSide(float(f_loss), f_lr, float(f_gnorm), f_upd, f_stats)))

    report = TrainReport(model=name, dtype=dtype, optimizer=spec, loss=loss, steps=results,
                         conventions=conventions(spec), notes=notes, env=numerics_env(),
                         torch_module=tm, flax_variables={"params": params, **bstats})
    report.notes += noise_notes(spec, results)
    report.findings += _bn_drift(bn_findings, results)
    if not report.ok:
        report.findings += name_optimizer_mistake(spec, steps, replay, dtype, prec)
    return report


def tdtype_to_jnp(dtype: str):
    return jnp.float64 if dtype == "float64" else jnp.float32


def _bn_drift(findings: list[BNFinding], results: list[StepResult]) -> list[str]:
    """Each BatchNorm finding, with how far that layer's running statistics drifted."""
    out = []
    last = results[-1]
    for f in findings:
        drift = [c for c in last.stats if c.name.startswith(f.torch_path + ".")]
        first_bad = next((s.step for s in results for c in s.stats
                          if c.name.startswith(f.torch_path + ".") and not c.ok), None)
        text = "; ".join(f"{c.name.split('.')[-1]} max_rel {c.max_rel:.2e} (rel_norm {c.rel_norm:.2e})"
                         for c in drift)
        when = f"out of tolerance from step {first_bad}" if first_bad else "within tolerance so far"
        out.append(f"{f} -- after {last.step} steps {text}; {when}")
    return out


def name_optimizer_mistake(spec, steps, replay, dtype, prec) -> list[str]:
    """Replay the Flax run's own gradients through torch's formula and each known mistake.

    If torch's formula reproduces Flax's updates, the optimizer is not the cause (look upstream:
    forward, gradients, BatchNorm). Otherwise name the variant that does reproduce them.
    """
    if not replay:
        return []
    tol = train_tolerance(dtype, TRAIN_DIAGNOSIS, 1, prec).rel_norm

    def err(knobs: dict) -> float:
        knobs = dict(knobs)
        shift = knobs.pop("lr_shift", 0)
        state, worst = _RefState(), 0.0
        for t, (lr, p, g, upd) in enumerate(replay, start=1):
            lr_used = spec.lr_at(t - 1 + shift, steps)
            pred = reference_update(spec, state, t, lr_used if shift else lr, p, g, **knobs)
            num = np.sqrt(sum(float(np.sum((pred[n] - upd[n]) ** 2)) for n in upd))
            den = np.sqrt(sum(float(np.sum(upd[n] ** 2)) for n in upd))
            worst = max(worst, num / den if den else (0.0 if num == 0 else np.inf))
        return worst

    base = err({})
    if base <= tol:
        return [f"optimizer: Flax's updates follow torch's {spec.name} formula (rel err {base:.1e} over "
                f"{len(replay)} replayed steps): the divergence is upstream (forward, gradients, statistics, "
                "or float32 rounding amplified by the training dynamics)"]
    hits = [(err(knobs), label) for label, knobs in suspect_variants(spec)]
    named = [f"optimizer convention: {label} (reproduces Flax's updates to {e:.1e}; torch's formula "
             f"misses by {base:.1e})" for e, label in sorted(hits) if e <= tol]
    return named or [f"optimizer: Flax's updates differ from torch's {spec.name} formula by {base:.1e} "
                     "and match none of the known convention mistakes"]


__all__ = ["LOSSES", "StepResult", "StepSide", "TrainReport", "compare_step", "flax_loss", "floor_norms",
           "noise_notes", "torch_grads", "torch_loss", "train_local", "first_leaf", "flax_train_step",
           "named_like_torch", "name_optimizer_mistake", "MAX_REPLAY", "TORCH_DTYPES"]
