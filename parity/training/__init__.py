"""Training parity: same initial weights, same batches, N optimizer steps in torch and Flax.

Public API: train_check, TrainReport, StepResult, OptimizerSpec, OPTIMIZERS, SCHEDULES, LOSSES,
audit_batch_norms/BNFinding, flax_train_step (the Flax twin's jitted optax step, as training
parity and the data-parallel benchmark run it). Data makers live in parity.training.data, the
digits demo and the loss-curve plot in parity.training.digits; torch DDP against the sharded
Flax step in parity.training.ddp_train.
"""
from parity.training._losses import LOSSES
from parity.training._loop import flax_train_step
from parity.training._report import StepResult, TrainReport
from parity.training.bn_audit import BNFinding, audit_batch_norms
from parity.training.check import train_check
from parity.training.optim import OPTIMIZERS, SCHEDULES, OptimizerSpec

__all__ = ["BNFinding", "LOSSES", "OPTIMIZERS", "OptimizerSpec", "SCHEDULES", "StepResult",
           "TrainReport", "audit_batch_norms", "flax_train_step", "train_check"]
