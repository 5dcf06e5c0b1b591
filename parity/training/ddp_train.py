"""Data-parallel training parity: torch DDP (gloo, N local processes) against the Flax train step
under jit on the batch sharded over an N-device mesh, compared per step.

Per step, as in single-device training parity (parity.training.loop.compare_step, shared):
loss, learning rate, global gradient norm, every parameter's update and BatchNorm running
statistics, under the training tolerance table and the same noise floors (parity.training.noise,
fed with torch's DDP-averaged gradients and the global batch's gradient floor). Named findings:
BatchNorm per-replica (torch DDP with plain BatchNorm) vs global-batch (Flax under jit on a
sharded batch) statistics, a torch loss summed over replicas instead of averaged (loss and
gradients N times Flax's), and, as on one device, an optimizer convention mistake.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from parity.judge import judge
from parity.training.ddp import ddp_job, replica_rows, run_ddp
from parity.data_parallel.mesh import data_mesh, replicate, shard_batch
from parity.numerics import jax_precision, numerics_env, pinned
from parity.pair import CheckOptions, prepare
from parity.runtime import (as_args, flax_inputs, output_layouts, output_shapes,
                            torch_inputs)
from parity.tolerances import TRAIN_STATS, train_tolerance
from parity.training.loop import (MAX_REPLAY, LOSSES, StepSide, TrainReport, first_leaf, name_optimizer_mistake,
                                  compare_step, flax_train_step, named_like_torch, noise_notes,
                                  tdtype_to_jnp)
from parity.training.noise import UpdateNoise, loss_gradient_floor, stats_floors
from parity.training.optim import OptimizerSpec, conventions, optax_optimizer, optax_schedule
from weight_port.layout import to_flax_layout

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def train_check_data_parallel(
    torch_module: torch.nn.Module,
    flax_module,
    data: Sequence[tuple[np.ndarray, np.ndarray]] | Callable[[int], tuple[np.ndarray, np.ndarray]],
    *,
    data_parallel: int,
    steps: int = 3,
    optimizer: OptimizerSpec | str = "sgd-momentum",
    loss: str = "cross_entropy",
    dtype: str = "float64",
    input_layout=None,
    output_layout=None,
    train_kwarg: str | None = None,
    rename=None,
    flax_optimizer: optax.GradientTransformation | None = None,
    precision: str = "highest",
    name: str | None = None,
    torch_loss_reduction: str = "mean",
) -> TrainReport:
    """The implementation of ``parity.train_check(..., data_parallel=N)``: train with torch DDP on
    ``data_parallel`` gloo processes and the Flax twin on an equally sharded mesh from the same
    initial weights; compare per step (a TrainReport).

    data: global batches (x [N, ...] torch layout, y [N, ...]), N a multiple of ``data_parallel``;
    rank/device r trains on rows [r*N/n, (r+1)*N/n). loss: "cross_entropy", "nll" (y: class
    labels) or "mse" (y: targets shaped like the torch output, torch layout; ``output_layout``
    as in train_check). torch_loss_reduction="sum" plants the across-replica summed loss (for
    tests). The torch module's class must be importable (the DDP workers unpickle it).
    """
    kwargs = {k: v for k, v in locals().items()}
    return train_checks_data_parallel([kwargs])[0]


_DEFAULTS = {"steps": 3, "optimizer": "sgd-momentum", "loss": "cross_entropy", "dtype": "float64",
             "input_layout": None, "output_layout": None, "train_kwarg": None, "rename": None,
             "flax_optimizer": None, "precision": "highest", "name": None, "torch_loss_reduction": "mean"}


def train_checks_data_parallel(cases: list[dict]) -> list[TrainReport]:
    """Several train_check_data_parallel(**case) runs (same data_parallel) sharing one start of
    the N torch worker processes (importing torch dominates a tiny run)."""
    checks = plan_checks(cases)
    return checks.reports(run_ddp(checks.jobs, world=checks.world))


@dataclass
class PlannedChecks:
    """Data-parallel training checks split in two, so a caller can run their DDP jobs together
    with its own (a benchmark's timed jobs) in one start of the worker processes: ``jobs`` go to
    run_ddp (first, in this order), ``reports(records)`` runs the Flax side and compares."""

    world: int
    mesh: Any
    jobs: list[dict]
    prepared: list[tuple]

    def reports(self, records: list[list[dict]]) -> list[TrainReport]:
        """One TrainReport per case, from run_ddp's records of ``jobs`` (in order)."""
        out = []
        for (c, spec, tdtype, batches, tm), recs in zip(self.prepared, records):
            x64 = jax.enable_x64(True) if c["dtype"] == "float64" else contextlib.nullcontext()
            with x64, pinned(precision=c["precision"], tf32=False):
                out.append(_flax_and_compare(tm, c, spec, tdtype, batches, recs, self.mesh))
        return out


def plan_checks(cases: list[dict]) -> PlannedChecks:
    """Validate ``cases`` (train_check_data_parallel keywords, one data_parallel) and build their
    DDP jobs; DataParallelError before anything starts when JAX lacks the devices."""
    worlds = {c["data_parallel"] for c in cases}
    if len(worlds) != 1:
        raise ValueError(f"cases must share data_parallel, got {sorted(worlds)}")
    n = worlds.pop()
    mesh = data_mesh(n)  # fail before starting processes when devices are missing
    prepared, jobs = [], []
    for c in cases:
        c = {**_DEFAULTS, **c}
        if c["loss"] not in LOSSES:
            raise ValueError(f"unknown loss {c['loss']!r}; choose from {', '.join(LOSSES)}")
        if c["dtype"] not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_TORCH_DTYPES)}, got {c['dtype']!r}")
        spec = OptimizerSpec(c["optimizer"]) if isinstance(c["optimizer"], str) else c["optimizer"]
        tdtype = _TORCH_DTYPES[c["dtype"]]
        data, steps = c["data"], c["steps"]
        batches = [data(i) if callable(data) else data[i % len(data)] for i in range(steps)]
        batches = [(x, np.asarray(y)) for x, y in batches]
        tm = copy.deepcopy(c["torch_module"]).to(tdtype)
        jobs.append(ddp_job(copy.deepcopy(tm), batches, world=n, spec=spec, steps=steps, loss=c["loss"],
                            dtype=tdtype, loss_reduction=c["torch_loss_reduction"]))
        prepared.append((c, spec, tdtype, batches, tm))
    return PlannedChecks(n, mesh, jobs, prepared)


def _target_layout(twin, variables, xf, tm, example, output_layout) -> str:
    """The torch-side layout of the output an mse target is shaped like (declared, or read off
    both sides' output shapes as parity.check does)."""
    if isinstance(output_layout, dict):
        return next(iter(output_layout.values()))
    with torch.no_grad():
        t_out = first_leaf(copy.deepcopy(tm).eval()(*example))
    f_shape = next(iter(output_shapes(twin, variables, xf).values())).shape
    return output_layouts(output_layout, {"out": tuple(t_out.shape)}, {"out": f_shape})["out"]


def _flax_and_compare(tm, c: dict, spec, tdtype, batches, records, mesh) -> TrainReport:
    n = mesh.devices.size
    steps, loss, dtype = c["steps"], c["loss"], c["dtype"]
    # The pair prepared as single-device training prepares it (parity.training.loop.train_local).
    pair = prepare(tm, c["flax_module"], batches[0][0],
                   CheckOptions(dtype=dtype, train=True, train_kwarg=c["train_kwarg"], input_layout=c["input_layout"],
                                rename=c["rename"]), check_attributes="ignore", dropout=False)
    twin, plan, in_layouts, example = pair.twin, pair.plan, pair.in_layouts, pair.inputs(False)
    variables = replicate(jax.tree_util.tree_map(lambda a: np.array(a, copy=True), pair.variables), mesh)
    params = variables["params"]
    bstats = {k: v for k, v in variables.items() if k != "params"}
    tx = c["flax_optimizer"] if c["flax_optimizer"] is not None else optax_optimizer(spec, steps)
    schedule = optax_schedule(spec, steps)
    opt_state = replicate(jax.jit(tx.init)(params), mesh)
    step = flax_train_step(twin, tx, loss)  # the same jitted step as single-device training
    target_layout = (_target_layout(twin, variables, flax_inputs(example, in_layouts), tm, example,
                                    c["output_layout"]) if loss == "mse" else None)

    def named(tree, collection):
        return named_like_torch(plan, tree, collection)

    prec = jax_precision()
    noise = UpdateNoise(spec)  # the noise floors of single-device training parity (parity.training.noise)
    t_prev = {k: v.astype(np.float64) for k, v in
              ((k, p.detach().double().numpy()) for k, p in tm.named_parameters())}
    f_prev = named(params, "params")
    replay: list[tuple[float, dict, dict, dict]] = []  # (lr, p_prev, grads, update), Flax side
    results = []
    for i, ((x, y), rec) in enumerate(zip(batches, records)):
        k = i + 1
        xf = flax_inputs(torch_inputs(as_args(x), tdtype, grads=False), in_layouts)
        batch = int(np.shape(y)[0])
        # mse targets are shaped like the output: converted to its Flax layout, in the run's dtype
        yf = (jnp.asarray(to_flax_layout(y, target_layout, "mse target"), dtype=tdtype_to_jnp(dtype))
              if loss == "mse" else jnp.asarray(y))
        xf, yf = shard_batch(xf, mesh, batch), shard_batch(yf, mesh, batch, where="labels")
        params, bstats, opt_state, f_loss, f_gnorm, grads = step(params, bstats, opt_state, xf, yf)
        f_now = named(params, "params")
        f_upd = {p: f_now[p] - f_prev[p] for p in f_now}
        # Keep the Flax trajectory up to (and including) the first failing step, to name the cause.
        if len(replay) < MAX_REPLAY and all(r.ok for r in results):
            replay.append((float(schedule(i)), f_prev, named(grads, "params"), f_upd))
        # torch's averaged gradients of this step, and its global-batch gradient floor (run_ddp)
        noise.observe(rec["lr"], loss_gradient_floor(dtype, rec["out_cotangent_norm"], rec["input_norm"]),
                      rec["grads"], t_prev, f_prev)
        f_stats = named(bstats["batch_stats"], "batch_stats") if rec["buffers"] and "batch_stats" in bstats else {}
        t_side = StepSide(rec["loss"], rec["lr"], rec["grad_norm"],
                          {p: rec["params"][p] - t_prev[p] for p in rec["params"]}, rec["buffers"])
        f_side = StepSide(float(f_loss), float(schedule(i)), float(f_gnorm), f_upd, f_stats)
        results.append(compare_step(k, dtype, prec, noise, t_side, f_side))
        t_prev, f_prev = rec["params"], f_now
    name = c["name"] or type(c["torch_module"]).__name__
    report = TrainReport(model=name, dtype=dtype, optimizer=spec, loss=loss, steps=results,
                         conventions=conventions(spec), env=numerics_env(),
                         notes=[f"data_parallel={n}: torch DDP on {n} gloo processes vs the Flax step under "
                                f"jit with the batch sharded over {n} {mesh.devices.flat[0].platform} devices"])
    report.notes += noise_notes(spec, results)
    report.findings += _findings(report, plan, n, _replica0_stats_match(twin, plan, variables, *batches[0],
                                                                        records[0], in_layouts, tdtype, n, dtype, prec))
    if not report.ok:  # an optimizer convention mistake, named as on one device
        report.findings += name_optimizer_mistake(spec, steps, replay, dtype, prec)
    return report


def _replica0_stats_match(twin, plan, variables, x, y, record, in_layouts, tdtype, n, dtype, prec) -> bool:
    """Whether torch's BatchNorm running statistics after step 1 are what the Flax twin computes
    from replica 0's slice alone (per-replica semantics, confirmed rather than assumed)."""
    if not record["buffers"] or "batch_stats" not in variables:
        return False
    from parity.runtime import forward_backward

    local = replica_rows(x, 0, n, len(y))
    xf = flax_inputs(torch_inputs(as_args(local), tdtype, grads=False), in_layouts)
    single = jax.device_get(variables)
    stats = forward_backward(twin, single, xf, None).new_variables["batch_stats"]
    f_stats = {k: np.asarray(v, np.float64) for k, v in
               plan.to_torch({"batch_stats": stats}, collections=("batch_stats",)).items()}
    tol, floors = train_tolerance(dtype, TRAIN_STATS, 1, prec), stats_floors(dtype, record["buffers"])
    return all(judge(b, f_stats[b], v, tol.with_floor(floors.get(b, 0.0))).ok
               for b, v in record["buffers"].items() if b in f_stats)


def _findings(report: TrainReport, plan, n: int, per_replica_confirmed: bool) -> list[str]:
    """Name the data-parallel mistakes the first failing step shows."""
    first = report.first_failure
    if first is None:
        return []
    out = []
    ratio_l = first.torch_loss / first.flax_loss if first.flax_loss else float("nan")
    g = first.scalar("grad_norm")
    ratio_g = g.expected_at_worst / g.actual_at_worst if g.actual_at_worst else float("nan")
    if n > 1 and abs(ratio_l - n) < 1e-3 * n and abs(ratio_g - n) < 1e-3 * n:
        out.append(f"step {first.step}: torch's loss and gradient norm are {n}x the Flax ones (loss ratio "
                   f"{ratio_l:.4f}, grad-norm ratio {ratio_g:.4f}): the torch loss is summed over the {n} "
                   "replicas instead of averaged (DDP already averages gradients; do not multiply the "
                   "per-replica mean loss by the world size or all-reduce-sum it into the backward)")
    bad_stats = sorted({c.name.rsplit(".", 1)[0] for c in first.stats if not c.ok})
    if bad_stats and per_replica_confirmed:
        out.append(
            f"step {first.step}: BatchNorm {', '.join(bad_stats)}: torch DDP normalised each replica's "
            f"batch/{n} rows with its own statistics (plain BatchNorm; its running stats after step 1 "
            "equal the Flax twin's on replica 0's rows alone), the Flax twin under jit on the sharded "
            "batch used global-batch statistics. For global statistics in torch use "
            "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) (GPU backends only; on CPU, all-reduce "
            "the batch mean and centred second moment over the process group); for per-replica "
            "statistics in Flax run the step per replica (shard_map/pmap) with BatchNorm axis_name=None")
    return out


__all__ = ["PlannedChecks", "plan_checks", "train_check_data_parallel", "train_checks_data_parallel"]
