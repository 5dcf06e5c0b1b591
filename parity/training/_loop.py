"""The one training-parity loop: a TorchStepper's steps against the Flax twin's optax step, compared
per step, one report.

Per step: loss, learning rate, global gradient norm, the parameter update (p_k - p_{k-1}) of every
torch-named parameter, and BatchNorm running statistics, under the training tolerance table and
the noise floors (parity.training.noise). Where torch steps is the stepper's business (this
process: parity.training._stepper.LocalStepper; DDP workers: parity.training.ddp_train).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from parity.data_parallel.mesh import replicate, shard_batch
from parity.judge import judge
from parity.numerics import jax_precision, numerics_env
from parity.pair import CheckOptions, PreparedPair, prepare
from parity.runtime import (FlaxTwin, as_args, flax_inputs, output_layouts, output_shapes, torch_inputs,
                            value_and_grad_fn)
from parity.tolerances import TRAIN_DIAGNOSIS, TRAIN_LOSS, TRAIN_STATS, TRAIN_UPDATE, train_tolerance
from parity.training._losses import first_leaf, flax_loss
from parity.training._report import StepResult, TrainReport
from parity.training._settings import TrainSettings
from parity.training._stepper import Batch, StepSide, TorchStepper, hold_dropout, named_params
from parity.training.noise import UpdateNoise, loss_gradient_floor, stats_floors
from parity.training.optim import (OptimizerSpec, _RefState, conventions, optax_optimizer, optax_schedule,
                                   reference_update, suspect_variants)
from weight_port import PortPlan
from weight_port.layout import to_flax_layout

MAX_REPLAY = 100  # steps of the Flax trajectory kept for naming an optimizer convention mistake


def train_pair(torch_module: torch.nn.Module, flax_module, data, settings: TrainSettings,
               stepper_for: Callable[[PreparedPair], TorchStepper]) -> TrainReport:
    """Prepare the pair (numerics pinned), build its torch stepper, run the loop; the stepper is
    closed however the loop ends."""
    with settings.numerics():
        # check_attributes="ignore": BatchNorm momentum/eps mismatches are named by the audit
        # (with the drift they cause) instead of stopping the run. Dropout off on both sides.
        pair = prepare(torch_module, flax_module, batch_at(data, 0)[0],
                       CheckOptions(dtype=settings.dtype, train=True, train_kwarg=settings.train_kwarg,
                                    input_layout=settings.input_layout, rename=settings.rename),
                       check_attributes="ignore", dropout=False)
        stepper = stepper_for(pair)
        try:
            return train_steps(pair, stepper, data, settings, settings.name or type(torch_module).__name__)
        finally:
            stepper.close()


def batch_at(data: Sequence[Batch] | Callable[[int], Batch], i: int) -> Batch:
    """Batch i (0-based) of a sequence (cycled) or a callable."""
    return data(i) if callable(data) else data[i % len(data)]


def train_steps(pair: PreparedPair, stepper: TorchStepper, data, settings: TrainSettings, name: str) -> TrainReport:
    """The loop: per step, torch's step from ``stepper``, the Flax twin's optax step on the same
    batch, both compared (compare_step); then the report. Numerics are the caller's."""
    spec, dtype, steps = settings.optimizer, settings.dtype, settings.steps
    flax = _FlaxSide(pair, settings, stepper.mesh)
    prec = jax_precision()
    noise = UpdateNoise(spec)
    t_prev, f_prev = named_params(pair.torch_module), flax.named(flax.params, "params")
    replay: list[tuple[float, dict, dict, dict]] = []  # (lr, p_prev, grads, update), Flax side
    results: list[StepResult] = []
    for i in range(steps):
        k = i + 1
        x, y = batch_at(data, i)
        y = np.asarray(y)
        t = stepper.step(k, (x, y))
        f, grads = flax.step(i, x, y)
        t_upd, f_upd = _moved(t.params, t_prev), _moved(f.params, f_prev)
        # Keep the Flax trajectory up to (and including) the first failing step, to name the cause.
        if len(replay) < MAX_REPLAY and all(r.ok for r in results):
            replay.append((f.lr, f_prev, flax.named(grads, "params"), f_upd))
        # torch's gradients of this step (before its optimizer step) and their noise floor
        noise.observe(t.lr, loss_gradient_floor(dtype, t.out_cotangent_norm, t.input_norm), t.grads, t_prev, f_prev)
        results.append(compare_step(k, dtype, prec, noise, t, t_upd, f, f_upd))
        t_prev, f_prev = t.params, f.params

    report = TrainReport(model=name, dtype=dtype, optimizer=spec, loss=settings.loss, steps=results,
                         conventions=conventions(spec), env=numerics_env(), flax_variables=flax.variables)
    stepper.annotate(report)
    report.notes += noise_notes(spec, results)
    if not report.ok:
        report.findings += name_optimizer_mistake(spec, steps, replay, dtype, prec)
    return report


class _FlaxSide:
    """The Flax twin trained by the one optax step (flax_train_step) from the pair's variables, on
    one device, or with a mesh replicated and fed the batch split row-wise over it (as torch's
    replicas split it)."""

    def __init__(self, pair: PreparedPair, settings: TrainSettings, mesh):
        def place(tree):
            return jax.device_put(tree, jax.devices()[0]) if mesh is None else replicate(tree, mesh)

        self.mesh = mesh
        self.pair = pair
        # Copy: on CPU, plan.to_flax can hand back jax arrays that alias the torch tensors' memory
        # (zero-copy jnp.asarray), so torch's in-place optimizer.step() would move the Flax weights
        # too. (A numpy copy, then placed: committed arrays from the start, so the jitted step is
        # compiled once instead of again when its own committed outputs come back as inputs.)
        variables = place(jax.tree_util.tree_map(lambda a: np.array(a, copy=True), pair.variables))
        self.params = variables["params"]
        # Non-param collections (BatchNorm statistics) travel through the step and come back updated.
        self.rest = {k: v for k, v in variables.items() if k != "params"}
        spec, steps = settings.optimizer, settings.steps
        tx = settings.flax_optimizer if settings.flax_optimizer is not None else optax_optimizer(spec, steps)
        self.schedule = optax_schedule(spec, steps)
        self.opt_state = place(jax.jit(tx.init)(self.params))  # one compile, not one per leaf shape
        self._step = flax_train_step(pair.twin, tx, settings.loss)
        self._target = _target_maker(pair, settings)

    def _placed(self, x, y, rows: int):
        if self.mesh is None:
            return x, y
        return shard_batch(x, self.mesh, rows), shard_batch(y, self.mesh, rows, where="labels")

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.rest}

    def named(self, tree, collection: str) -> dict[str, np.ndarray]:
        return named_like_torch(self.pair.plan, tree, collection)

    def step(self, i: int, x, y: np.ndarray) -> tuple[StepSide, Any]:
        """Step i (0-based) on (x torch layout, y): (its StepSide, its gradients as a params tree)."""
        xf = flax_inputs(torch_inputs(as_args(x), self.pair.torch_dtype, grads=False), self.pair.in_layouts)
        xf, yf = self._placed(xf, self._target(y), int(np.shape(y)[0]))
        try:
            self.params, self.rest, self.opt_state, loss, gnorm, grads = self._step(
                self.params, self.rest, self.opt_state, xf, yf)
        except nn.errors.InvalidRngError as exc:
            raise ValueError("the Flax twin asks for an RNG in train mode (dropout?); train parity runs "
                             f"deterministic and passes none: {exc}") from exc
        stats = self.named(self.rest["batch_stats"], "batch_stats") if "batch_stats" in self.rest else {}
        return StepSide(float(loss), float(self.schedule(i)), float(gnorm), self.named(self.params, "params"),
                        stats), grads


def _moved(now: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: now[n] - before[n] for n in now}


def _target_maker(pair: PreparedPair, settings: TrainSettings) -> Callable[[np.ndarray], jax.Array]:
    """y -> the Flax step's target: labels as they are; mse targets (shaped like the torch output)
    in the output's Flax layout and the run's dtype. That layout is declared, or read off both
    sides' output shapes as parity.check does (torch's from a forward of a copy, as trained)."""
    if settings.loss != "mse":
        return jnp.asarray
    declared = settings.output_layout
    if isinstance(declared, Mapping):
        layout = next(iter(declared.values()))
    else:
        probe = copy.deepcopy(pair.torch_module)
        hold_dropout(probe)
        with torch.no_grad():
            t_shape = tuple(first_leaf(probe(*pair.inputs(False))).shape)
        f_shape = next(iter(output_shapes(pair.twin, pair.variables, pair.flax_args).values())).shape
        layout = output_layouts(declared, {"out": t_shape}, {"out": f_shape})["out"]
    return lambda y: jnp.asarray(to_flax_layout(y, layout, "mse target"), dtype=settings.dtype)


# --- the Flax step ------------------------------------------------------------------------------
def flax_train_step(twin: FlaxTwin, tx: optax.GradientTransformation, loss: str | Callable, *,
                    measure: bool = True) -> Callable:
    """The Flax side of one training step, jitted (training parity on one device and sharded, the
    data-parallel benchmark, the benchmark workloads' train phase): (params, other collections,
    optimizer state, inputs, target) -> (params, updated collections, optimizer state, loss,
    global gradient norm, gradients); measure=False: the first four only (timing). Inputs and
    target in Flax layout; loss: a name (parity.training's losses, on the first output leaf) or
    ``loss(outputs, target) -> scalar``; the gradient comes from the engine's value_and_grad_fn."""
    loss_fn = loss if callable(loss) else (lambda out, y: flax_loss(loss, first_leaf(out), y))
    grad_fn = value_and_grad_fn(twin, loss_fn)

    @jax.jit
    def step(p, rest, state, x, y):
        value, grads, new_rest = grad_fn({"params": p, **rest}, x, y)
        updates, state = tx.update(grads, state, p)
        new_p = optax.apply_updates(p, updates)
        if not measure:
            return new_p, new_rest, state, value
        return new_p, new_rest, state, value, optax.tree.norm(grads), grads

    return step


def named_like_torch(plan: PortPlan, tree, collection: str) -> dict[str, np.ndarray]:
    """A Flax collection (params, gradients, updates, batch_stats) as float64 numpy arrays
    named and laid out as the torch module's tensors, through the port's plan."""
    return {k: np.asarray(v, np.float64) for k, v in
            plan.to_torch({collection: tree}, collections=(collection,)).items()}


# --- one step's comparison ----------------------------------------------------------------------
def compare_step(k: int, dtype: str, prec: str, noise: UpdateNoise, t: StepSide, t_upd: Mapping[str, np.ndarray],
                 f: StepSide, f_upd: Mapping[str, np.ndarray]) -> StepResult:
    """Step k's comparisons under the training tolerance table and the noise floors: ``noise``
    has observed this step (UpdateNoise.observe with torch's gradients); running statistics get
    their own floors (stats_floors). Statistics only one side has are not compared."""
    tol_s, tol_u, tol_b = (train_tolerance(dtype, kind, k, prec) for kind in (TRAIN_LOSS, TRAIN_UPDATE, TRAIN_STATS))
    scalars = [judge("loss", np.asarray(f.loss), np.asarray(t.loss), tol_s),
               judge("lr", np.asarray(f.lr), np.asarray(t.lr), tol_s),
               judge("grad_norm", np.asarray(f.grad_norm), np.asarray(t.grad_norm), tol_s)]
    updates = [noise.compare(f"update {n}", n, f_upd[n], t_upd[n], tol_u) for n in t_upd]
    floors = stats_floors(dtype, t.stats)
    stats = [judge(n, f.stats[n], v, tol_b.with_floor(floors.get(n, 0.0)))
             for n, v in t.stats.items() if n in f.stats]
    return StepResult(k, t.loss, f.loss, scalars, updates, stats)


# --- the report's diagnosis ---------------------------------------------------------------------
def noise_notes(spec: OptimizerSpec, results: list[StepResult]) -> list[str]:
    """The report's note on updates judged partly as gradient noise (UpdateNoise), if any."""
    noisy = sorted({c.name.removeprefix("update ") for r in results for c in r.updates if "steps noise" in c.note})
    if not noisy:
        return []
    return [f"gradient noise: entries of {', '.join(noisy)[:200]} have gradients under the noise "
            f"floor (zero in exact arithmetic, e.g. a softmax key bias); {spec.name} turns that "
            "noise into steps each framework draws differently, judged by the largest such step "
            "(parity.tolerances.TRAIN_NOISE_FLOORS)"]


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
