"""Training parity: same initial weights, same batches, N optimizer steps in torch and Flax.

Public API: train_check, TrainReport, StepResult, OptimizerSpec, OPTIMIZERS, SCHEDULES, LOSSES,
audit_batch_norms/BNFinding. Data makers live in parity.training.data, the digits demo and the
loss-curve plot in parity.training.digits.
"""
from parity.training.bn_audit import BNFinding, audit_batch_norms
from parity.training.check import train_check
from parity.training.loop import LOSSES, StepResult, TrainReport
from parity.training.optim import OPTIMIZERS, SCHEDULES, OptimizerSpec

__all__ = ["BNFinding", "LOSSES", "OPTIMIZERS", "OptimizerSpec", "SCHEDULES", "StepResult",
           "TrainReport", "audit_batch_norms", "train_check"]
