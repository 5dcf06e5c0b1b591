"""Data-parallel training parity: torch DDP (gloo, N local processes) against the Flax train step
under jit on the batch sharded over an N-device mesh, compared per step.

The DDP workers (parity.training.ddp) train first and rank 0 records every step; DDPStepper then
serves those steps to the one training loop (parity.training._loop), which steps the Flax twin on
the sharded batch and compares as on one device: loss, learning rate, global gradient norm,
every parameter's update and BatchNorm running statistics, under the training tolerance table and
the same noise floors (fed with torch's DDP-averaged gradients and the global batch's gradient
floor). Named findings: BatchNorm per-replica (torch DDP with plain BatchNorm) vs global-batch
(Flax under jit on a sharded batch) statistics, a torch loss summed over replicas instead of
averaged (loss and gradients N times Flax's), and, as on one device, an optimizer convention
mistake.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import optax
import torch

from parity.data_parallel.mesh import data_mesh
from parity.judge import judge
from parity.numerics import jax_precision
from parity.pair import PreparedPair
from parity.runtime import as_args, flax_inputs, forward_backward, torch_inputs
from parity.tolerances import TRAIN_STATS, train_tolerance
from parity.training._loop import batch_at, named_like_torch, train_pair
from parity.training._report import TrainReport
from parity.training._settings import TrainSettings
from parity.training._stepper import Batch, StepSide
from parity.training.ddp import ddp_job, replica_rows, run_ddp
from parity.training.noise import stats_floors
from parity.training.optim import OptimizerSpec


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


_SETTINGS = tuple(f.name for f in fields(TrainSettings))


def train_checks_data_parallel(cases: list[dict]) -> list[TrainReport]:
    """Several train_check_data_parallel(**case) runs (same data_parallel) sharing one start of
    the N torch worker processes (importing torch dominates a tiny run)."""
    checks = plan_checks(cases)
    return checks.reports(run_ddp(checks.jobs, world=checks.world))


@dataclass
class _Case:
    """One planned check: what the Flax side and the comparison need once DDP has run."""

    torch_module: torch.nn.Module  # a copy of the caller's, untouched (each report prepares its own)
    flax_module: Any
    batches: list[Batch]  # one global batch per step
    settings: TrainSettings


@dataclass
class PlannedChecks:
    """Data-parallel training checks split in two, so a caller can run their DDP jobs together
    with its own (a benchmark's timed jobs) in one start of the worker processes: ``jobs`` go to
    run_ddp (first, in this order), ``reports(records)`` runs the Flax side and compares."""

    world: int
    mesh: Any
    jobs: list[dict]
    prepared: list[_Case]

    def reports(self, records: list[list[dict]]) -> list[TrainReport]:
        """One TrainReport per case, from run_ddp's records of ``jobs`` (in order). Records and
        cases are only read: they can be judged again."""
        return [train_pair(c.torch_module, c.flax_module, c.batches, c.settings,
                           lambda pair, c=c, recs=recs: DDPStepper(pair, recs, self.mesh, c.batches[0]))
                for c, recs in zip(self.prepared, records)]


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
        settings = TrainSettings(**{"steps": 3, **{k: c[k] for k in _SETTINGS if k in c}})
        batches = [batch_at(c["data"], i) for i in range(settings.steps)]
        batches = [(x, np.asarray(y)) for x, y in batches]
        tm = copy.deepcopy(c["torch_module"])  # as it is now, whatever the caller does with theirs
        jobs.append(ddp_job(copy.deepcopy(tm), batches, world=n, spec=settings.optimizer,
                            steps=settings.steps, loss=settings.loss, dtype=settings.torch_dtype,
                            loss_reduction=c.get("torch_loss_reduction", "mean")))
        prepared.append(_Case(tm, c["flax_module"], batches, settings))
    return PlannedChecks(n, mesh, jobs, prepared)


class DDPStepper:
    """The torch steps the DDP workers ran, served in order from rank 0's records (run_ddp); the
    Flax twin steps on the batch sharded over ``mesh``, as torch's replicas split it."""

    def __init__(self, pair: PreparedPair, records: list[dict], mesh, first_batch: Batch):
        self.pair, self.records, self.mesh, self.first_batch = pair, records, mesh, first_batch

    def step(self, k: int, batch: Batch) -> StepSide:
        return self.records[k - 1]["step"]

    def annotate(self, report: TrainReport) -> None:
        n = self.mesh.devices.size
        report.notes.append(f"data_parallel={n}: torch DDP on {n} gloo processes vs the Flax step under jit "
                            f"with the batch sharded over {n} {self.mesh.devices.flat[0].platform} devices")
        report.findings += _findings(report, n, lambda: self._replica0_stats_match(report.dtype))

    def close(self) -> None:
        pass  # the records belong to the caller (PlannedChecks.reports can judge them again)

    def _replica0_stats_match(self, dtype: str) -> bool:
        """Whether torch's BatchNorm running statistics after step 1 are what the Flax twin computes
        from replica 0's slice alone (per-replica semantics, confirmed rather than assumed)."""
        pair, n, t_stats = self.pair, self.mesh.devices.size, self.records[0]["step"].stats
        if not t_stats or "batch_stats" not in pair.variables:
            return False
        x, y = self.first_batch
        local = replica_rows(x, 0, n, len(y))
        xf = flax_inputs(torch_inputs(as_args(local), pair.torch_dtype, grads=False), pair.in_layouts)
        stats = forward_backward(pair.twin, pair.variables, xf, None).new_variables["batch_stats"]
        f_stats = named_like_torch(pair.plan, stats, "batch_stats")
        tol, floors = train_tolerance(dtype, TRAIN_STATS, 1, jax_precision()), stats_floors(dtype, t_stats)
        return all(judge(b, f_stats[b], v, tol.with_floor(floors.get(b, 0.0))).ok
                   for b, v in t_stats.items() if b in f_stats)


def _findings(report: TrainReport, n: int, per_replica_stats: Callable[[], bool]) -> list[str]:
    """Name the data-parallel mistakes the first failing step shows (per_replica_stats: whether
    torch's statistics are replica 0's, asked only when statistics failed)."""
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
    if bad_stats and per_replica_stats():
        out.append(
            f"step {first.step}: BatchNorm {', '.join(bad_stats)}: torch DDP normalised each replica's "
            f"batch/{n} rows with its own statistics (plain BatchNorm; its running stats after step 1 "
            "equal the Flax twin's on replica 0's rows alone), the Flax twin under jit on the sharded "
            "batch used global-batch statistics. For global statistics in torch use "
            "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) (GPU backends only; on CPU, all-reduce "
            "the batch mean and centred second moment over the process group); for per-replica "
            "statistics in Flax run the step per replica (shard_map/pmap) with BatchNorm axis_name=None")
    return out


__all__ = ["DDPStepper", "PlannedChecks", "plan_checks", "train_check_data_parallel", "train_checks_data_parallel"]
