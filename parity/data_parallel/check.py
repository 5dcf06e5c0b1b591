"""Data-parallel parity: the Flax twin under jit on a batch sharded over N devices, against the
single-device Flax run and torch; BatchNorm per-replica vs global-batch semantics named.

The sharded run goes through the engine's forward_backward (parity.runtime) with the inputs and
cotangents placed batch-sharded and the variables replicated (NamedSharding on a 1-D "data"
mesh): jit follows the placement, so XLA partitions the same program over the devices and
inserts the cross-device reductions (BatchNorm moments, parameter gradients) itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import jax
import numpy as np
from flax import traverse_util

from parity.judge import Comparison, Table, failed_comparison, judge
from parity.data_parallel.mesh import (batch_sharded, batch_size, data_mesh, per_device_batch, replicate,
                                       shard_batch)
from parity.runtime import forward_backward
from parity.tolerances import FORWARD, GRAD
from weight_port.layout import AS_IS, to_flax_layout, to_torch_layout


@dataclass
class BatchNormSemantics:
    """One BatchNorm whose batch statistics on one replica's shard differ from the global batch's.

    rel_diff: ||d(replica 0) - d(global)|| / ||d(global)||, d = the update of the running mean and
    variance by this step (replica 0's is what torch DDP keeps: buffers broadcast from rank 0);
    independent of the momentum."""

    torch_path: str
    flax_path: str
    rel_diff: float

    def describe(self) -> str:
        return (f"BatchNorm {self.torch_path} (flax {self.flax_path}): per-replica vs global-batch "
                f"statistics differ (running-stats update rel diff {self.rel_diff:.2e})")


def semantics_note(n: int) -> str:
    """Which BatchNorm semantics each side used, and how to get the other."""
    return (f"BatchNorm semantics with data_parallel={n}: torch here ran the whole batch in one process "
            "= global-batch statistics, what torch.nn.SyncBatchNorm gives under DDP "
            "(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)); torch DDP with plain BatchNorm uses "
            "per-replica statistics (batch/N each; running stats broadcast from rank 0). The Flax twin "
            "under jit on the sharded batch uses global statistics (XLA all-reduces the moments); for "
            "DDP's per-replica default run the step per replica (shard_map/pmap) with BatchNorm "
            "axis_name=None, for global statistics there axis_name='data'.")


@dataclass
class DataParallelResult:
    """What the sharded run was and how it agreed. vs_torch / vs_single: sharded Flax against
    torch and against the single-device Flax run (also appended to the report's lists)."""

    n: int
    platform: str
    devices: int  # devices in the mesh
    per_device_batch: int  # rows of the input batch each device held (batch / N when sharded)
    processes: int = 1  # processes of the jax.distributed job the mesh spans (parity check --processes)
    devices_per_process: int = 0  # the mesh's devices in this process
    vs_torch: list[Comparison] = field(default_factory=list)
    vs_single: list[Comparison] = field(default_factory=list)
    batchnorm: list[BatchNormSemantics] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.vs_torch + self.vs_single)

    def to_dict(self) -> dict:
        return {"n": self.n, "platform": self.platform, "devices": self.devices,
                "per_device_batch": self.per_device_batch, "processes": self.processes,
                "devices_per_process": self.devices_per_process, "ok": self.ok,
                "vs_torch": [c.to_dict() for c in self.vs_torch],
                "vs_single": [c.to_dict() for c in self.vs_single],
                "batchnorm": [asdict(b) for b in self.batchnorm]}


def _bn_layers(plan) -> dict[tuple[str, ...], str]:
    """{flax module path: torch path} of the BatchNorm layers of the port plan."""
    return {tuple(layer.info.flax_path): layer.info.torch_path or "<root>" for layer in plan.layers
            if layer.rule.name == "batch_norm"}


def _stats_by_layer(variables) -> dict[tuple[str, ...], np.ndarray]:
    flat = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    out: dict[tuple[str, ...], list[np.ndarray]] = {}
    for path, v in sorted(flat.items()):
        out.setdefault(tuple(path[:-1]), []).append(np.ravel(np.asarray(v, np.float64)))
    return {k: np.concatenate(v) for k, v in out.items()}


def _per_replica_batchnorm(run, n: int, batch: int, tol) -> list[BatchNormSemantics]:
    """BatchNorm layers whose statistics on replica 0's shard differ from the global batch's."""
    layers = _bn_layers(run.plan)
    if not layers or not run.twin.train or "batch_stats" not in run.variables:
        return []
    local = batch // n
    shard0 = jax.tree_util.tree_map(
        lambda x: x[:local] if hasattr(x, "shape") and np.ndim(x) >= 1 and np.shape(x)[0] == batch else x,
        run.flax_args)
    old = _stats_by_layer(run.variables)
    per_replica = _stats_by_layer(forward_backward(run.twin, run.variables, shard0, None).new_variables)
    global_ = _stats_by_layer(run.flax.new_variables)
    found = []
    for path, torch_path in layers.items():
        if path not in global_:
            continue
        g, r = global_[path] - old[path], per_replica[path] - old[path]
        rel = float(np.linalg.norm(r - g) / max(np.linalg.norm(g), np.finfo(np.float64).tiny))
        if not judge(f"batch_stats {'/'.join(path)} replica 0 vs global", r, g, tol).ok:
            found.append(BatchNormSemantics(torch_path, "/".join(path), rel))
    return found


def check_data_parallel(run, n: int, mj) -> DataParallelResult:
    """Run the checker's pair (``run``: parity.checker.CapturedRun) with the batch sharded over ``n``
    devices and compare: outputs, input and parameter gradients, and (train mode) the updated
    BatchNorm statistics, against torch and against the single-device Flax run. ``mj`` is the
    check's parity.judge.ModelJudge: a sharded tensor is judged exactly as the report's own
    tensor of the same name (against torch), and against the single-device run by the same
    measured noise with the single-device Flax run as the probe."""
    mesh = data_mesh(n)
    batch = batch_size(run.flax_args)
    to_t = run.output_map
    args = shard_batch(run.flax_args, mesh, batch)
    grads = bool(run.torch.input_grads or run.torch.param_grads)
    cots = None
    if grads:
        cots = {fp: to_flax_layout(run.torch.cotangents[tp], run.out_layouts[tp], tp)
                for fp, tp in to_t.items() if tp in run.torch.cotangents}
        cots = shard_batch(cots, mesh, batch, where="cotangents")
    sharded = forward_backward(run.twin, replicate(dict(run.variables), mesh), args, cots)
    result = DataParallelResult(n, mesh.devices.flat[0].platform, mesh.devices.size, per_device_batch(args),
                                jax.process_count(), len(mesh.local_devices))
    tag = f"dp{n}"

    def both(kind: str, key: str, name: str, value, torch_value, single_value, layout: str, axis="auto") -> None:
        result.vs_torch.append(mj.judge(kind, key, f"{tag} {name}", value, torch_value, layout, axis=axis))
        if single_value is not None:  # torch layout
            result.vs_single.append(mj.judge(kind, key, f"{tag} {name} vs 1 device", value, single_value, layout,
                                             axis=axis, probe=single_value))

    for fp, tp in to_t.items():
        layout = run.out_layouts[tp]
        both(FORWARD, tp, f"output{tp[3:]}", sharded.outputs[fp], run.torch.outputs[tp],
             to_torch_layout(run.flax.outputs[tp], layout), layout)
    if grads:
        for p, g in run.torch.input_grads.items():
            layout = run.in_layouts[p]
            both(GRAD, p, f"grad {p}", sharded.input_grads[p], g, to_torch_layout(run.flax.input_grads[p], layout),
                 layout)
        named = run.plan.to_torch({"params": sharded.param_grads}, collections=("params",))
        for n_, g in run.torch.param_grads.items():
            if n_ in named:
                both(GRAD, f"param:{n_}", f"grad {n_}", named[n_], g, run.f_p_grads.get(n_), AS_IS, axis=0)
    if run.twin.train and "batch_stats" in (sharded.new_variables or {}):
        stats = Table(mj.table_forward.tol)
        single = traverse_util.flatten_dict(dict(run.flax.new_variables["batch_stats"]))
        for path, v in traverse_util.flatten_dict(dict(sharded.new_variables["batch_stats"])).items():
            name = f"{tag} batch_stats {'/'.join(path)} vs 1 device"
            try:
                result.vs_single.append(judge(name, v, np.asarray(single[path]), stats))
            except ValueError as exc:
                result.vs_single.append(failed_comparison(name, str(exc), stats))
        result.batchnorm = _per_replica_batchnorm(run, n, batch, stats)
    return result


def attach(report, run, n: int, mj) -> None:
    """Add a data-parallel run's comparisons to ``report`` (so its verdict includes them), its
    BatchNorm semantics as warnings, and the DataParallelResult as ``report.data_parallel``."""
    result = check_data_parallel(run, n, mj)
    for comp in result.vs_torch + result.vs_single:
        kind = ("outputs" if " output" in comp.name or " batch_stats" in comp.name
                else "input_grads" if " grad input" in comp.name else "param_grads")
        getattr(report, kind).append(comp)
    procs = (f" in {result.processes} processes, {result.devices_per_process} each" if result.processes > 1
             else "")
    report.warnings.append(
        f"data_parallel={n}: Flax twin under jit with the batch sharded over {result.devices} "
        f"{result.platform} devices{procs}, {result.per_device_batch} rows each (parameters replicated), "
        f"rows 'dp{n} ...'")
    if result.batchnorm:
        report.warnings += [bn.describe() for bn in result.batchnorm] + [semantics_note(n)]
    report.data_parallel = result


__all__ = ["BatchNormSemantics", "semantics_note", "DataParallelResult", "attach", "batch_sharded", "check_data_parallel"]
