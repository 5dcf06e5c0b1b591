"""Data-parallel parity: the Flax twin on a batch sharded over a jax.sharding.Mesh of N devices.

Public API: check_data_parallel / attach (used by ``parity.check(..., data_parallel=N)``),
DataParallelResult, BatchNormSemantics, data_mesh, shard_batch, request_cpu_devices,
DataParallelError. Training (``parity.train_check(..., data_parallel=N)``) lives in
parity.training.ddp_train (torch DDP in parity.training.ddp), imported on use: it needs torch.
"""
from parity.data_parallel.check import BatchNormSemantics, DataParallelResult, attach, check_data_parallel
from parity.data_parallel.mesh import (DataParallelError, batch_size, data_mesh, request_cpu_devices,
                                       shard_batch)

__all__ = ["BatchNormSemantics", "DataParallelError", "DataParallelResult", "attach", "batch_size",
           "check_data_parallel", "data_mesh", "request_cpu_devices", "shard_batch"]
