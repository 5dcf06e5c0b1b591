"""The torch side of training parity: one optimizer step (torch_step), and the stepper protocol
the training loop drives (TorchStepper) with its in-process implementation (LocalStepper).

torch_step is the one torch training step: LocalStepper runs it on the pair's torch copy here, the
DDP workers (parity.training.ddp) run it on theirs and parity.training.ddp_train serves what
rank 0 recorded.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import jax
import numpy as np
import torch

from parity.runtime import as_args, torch_inputs
from parity.training._losses import first_leaf, torch_loss
from parity.training.bn_audit import BNFinding, audit_batch_norms
from parity.training.optim import torch_optimizer
from weight_port import to_numpy

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from parity.pair import PreparedPair
    from parity.training._settings import TrainSettings
    from parity.training._report import StepResult, TrainReport

Batch = tuple[np.ndarray, np.ndarray]


@dataclass
class StepSide:
    """What one framework's optimizer step k produced, by torch name in torch layout (float64).

    The loop takes each side's update p_k - p_{k-1} from ``params`` and the previous step's."""

    loss: float
    lr: float  # the learning rate the step used
    grad_norm: float  # global norm of the gradients the optimizer stepped with
    params: dict[str, np.ndarray]  # every parameter after the step
    stats: dict[str, np.ndarray]  # BatchNorm "<path>.running_mean" / "...running_var" after the step
    grads: dict[str, np.ndarray] | None = None  # the gradients stepped with (torch's: the noise floors)
    # ||dL/d output|| and ||float leaves of the batch||: the scale of this step's gradient noise
    # floor (parity.training.noise.loss_gradient_floor; torch's side).
    out_cotangent_norm: float = 0.0
    input_norm: float = 0.0


class TorchStepper(Protocol):
    """The torch side of one training-parity run, from the pair's initial weights.

    step(k, batch): torch's optimizer step k (1-based) on ``batch`` (x in torch layout, y), in
    order, as a StepSide with grads and the noise-floor norms. annotate(report): this path's own
    notes and findings (before the loop adds its noise notes and optimizer diagnosis).
    close(): release what the stepper holds. ``mesh``: where the Flax twin steps (None: one
    device; a mesh: the batch sharded over it, as torch's replicas split it)."""

    mesh: Mesh | None

    def step(self, k: int, batch: Batch) -> StepSide: ...

    def annotate(self, report: TrainReport) -> None: ...

    def close(self) -> None: ...


# --- the torch step ---------------------------------------------------------------------------
def torch_step(module: torch.nn.Module, optimizer, scheduler, inputs: tuple, target: torch.Tensor, loss: str, *,
               forward: Callable | None = None, loss_scale: float = 1, measure: bool = True,
               across: Callable | None = None) -> StepSide | None:
    """One torch optimizer step of ``module`` on ``inputs`` (torch tensors) and ``target``.

    forward: what runs the batch (the module, or DistributedDataParallel wrapping it); loss_scale
    multiplies the loss (a planted mistake: replicas' losses summed). measure=False: the step only
    (benchmarks), None returned. across(loss tensor, cotangent norm, input norm) -> (loss,
    cotangent norm, input norm): those of the global step, combined over DDP's replicas (None:
    this process's). Gradients are read after the backward (after DDP's averaging), before the
    optimizer steps; parameters and running statistics after it."""
    optimizer.zero_grad(set_to_none=False)
    out = first_leaf((forward or module)(*inputs))
    if measure and out.requires_grad:
        out.retain_grad()  # dL/d output: one factor of the gradients' noise floor
    value = torch_loss(loss, out, target)
    if loss_scale != 1:
        value = value * loss_scale
    value.backward()
    value = value.detach()
    lr = float(optimizer.param_groups[0]["lr"])
    if measure:
        cot, inp = floor_norms(out, inputs)
        value, cot, inp = (float(value), cot, inp) if across is None else across(value, cot, inp)
        gnorm = float(np.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in module.parameters()
                                  if p.grad is not None)))
        grads = torch_grads(module)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if not measure:
        return None
    return StepSide(value, lr, gnorm, named_params(module), running_stats(module), grads, cot, inp)


def named_params(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter by torch name, a float64 copy."""
    return {n: to_numpy(p.detach()).astype(np.float64) for n, p in module.named_parameters()}


def torch_grads(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Each parameter's .grad by torch name, float64 (zeros where it has none)."""
    return {n: to_numpy(p.grad.detach()).astype(np.float64) if p.grad is not None else np.zeros(tuple(p.shape))
            for n, p in module.named_parameters()}


def running_stats(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The running statistics of every BatchNorm (by layer type) that tracks them, float64 copies."""
    out = {}
    for path, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out[f"{path}.running_mean"] = to_numpy(m.running_mean).astype(np.float64)
            out[f"{path}.running_var"] = to_numpy(m.running_var).astype(np.float64)
    return out


def _norm(tensors) -> float:
    return float(np.sqrt(sum(float((t.detach().double() ** 2).sum()) for t in tensors)))


def floor_norms(out: torch.Tensor, inputs) -> tuple[float, float]:
    """(||dL/d out||, ||float leaves of inputs||): what a step's gradient noise floor scales with
    (loss_gradient_floor). ``out`` had retain_grad() before the backward; no grad reads as 0."""
    floats = [t for t in jax.tree_util.tree_leaves(inputs)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    cot = out.grad if out.grad is not None else torch.zeros(())
    return _norm([cot]), _norm(floats)


def hold_dropout(module: torch.nn.Module) -> int:
    """Train mode with dropout held deterministic: torch Dropout modules in train mode would draw
    their own masks, which no Flax RNG can reproduce, so they run in eval mode (identity) while
    BatchNorm stays in train mode. Returns how many were held."""
    module.train(True)
    drop = [m for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in drop:
        m.eval()
    return len(drop)


# --- torch in this process ---------------------------------------------------------------------
class LocalStepper:
    """torch stepped in this process: the pair's private torch copy, trained in place (the report
    keeps it as ``torch_module``)."""

    mesh = None

    def __init__(self, pair: PreparedPair, settings: TrainSettings):
        self.module = pair.torch_module
        held = hold_dropout(self.module)
        self.notes = [f"dropout deterministic: {held} torch Dropout module(s) held in eval mode; the Flax "
                      "twin gets no 'dropout' RNG"]
        bn_paths, self.bn_findings = audit_batch_norms(pair.plan)
        if bn_paths:
            self.notes.append(f"BatchNorm train mode in {len(bn_paths)} layer(s): batch statistics normalise; "
                              "running statistics compared after every step")
        self.optimizer, self.scheduler = torch_optimizer(settings.optimizer, self.module.parameters(), settings.steps)
        self.loss, self.dtype = settings.loss, pair.torch_dtype

    def step(self, k: int, batch: Batch) -> StepSide:
        x, y = batch
        xs = torch_inputs(as_args(x), self.dtype, grads=False)
        ys = torch.as_tensor(y, dtype=self.dtype) if self.loss == "mse" else torch.as_tensor(y)
        return torch_step(self.module, self.optimizer, self.scheduler, xs, ys, self.loss)

    def annotate(self, report: TrainReport) -> None:
        report.notes += self.notes
        report.findings += _bn_drift(self.bn_findings, report.steps)
        report.torch_module = self.module

    def close(self) -> None:
        pass  # the trained module stays with the report


def _bn_drift(findings: list[BNFinding], results: list[StepResult]) -> list[str]:
    """Each BatchNorm finding of the audit, with how far that layer's running statistics drifted."""
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
