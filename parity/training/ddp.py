"""The torch side of data-parallel training parity: DistributedDataParallel on N local processes
(gloo), started here; rank 0 records what the comparison needs, per step.

Each rank trains on its contiguous slice of the global batch (rank r gets rows [r*b, (r+1)*b)),
the same split the JAX mesh gives device r. DDP averages gradients over ranks, so with equal
slices and a per-replica mean loss the step is the global-batch mean step -- except BatchNorm,
which plain torch BatchNorm computes per replica (running statistics broadcast from rank 0 at
the next forward, DDP's broadcast_buffers=True).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding parity/, for the workers' imports


def _worker(rank: int, workdir: str) -> None:
    """Rank ``rank`` of every job in ``workdir``/jobs.pt (one process group per job, of the job's
    own world size: ranks beyond it sit the job out. So several checks, and a benchmark's device
    counts, share one interpreter start: importing torch dominates a tiny job)."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share the machine's cores
    jobs = torch.load(Path(workdir) / "jobs.pt", weights_only=False)  # our own file, from run_ddp
    for j, job in enumerate(jobs):
        world = job["world"]
        if rank >= world:
            continue
        dist.init_process_group("gloo", init_method=f"file://{workdir}/init{j}", rank=rank, world_size=world)
        try:
            records = _train(rank, world, job)
            if rank == 0:  # sent before the group goes down: a crash in the shutdown cannot lose it
                _save_whole(records, Path(workdir) / f"out{j}.pt")
            # Every rank past its last collective before any rank tears the group down: a rank
            # that destroys its group (or exits) while a peer may still talk to it is the likely
            # source of the "terminate called without an active exception" seen at exit.
            dist.barrier()
        finally:
            dist.destroy_process_group()
    (Path(workdir) / f"done{rank}").touch()  # this rank's jobs are done: only its exit is left (run_ddp's _join)


def _save_whole(obj, path: Path) -> None:
    """torch.save to ``path`` all at once (written beside it, then renamed): the parent reads
    only complete results, whatever happens to this process afterwards."""
    partial = path.with_suffix(".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def _train(rank: int, world: int, p: dict) -> list[dict]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from parity.runtime import as_args, torch_inputs
    from parity.training._stepper import hold_dropout, torch_step
    from parity.training.optim import torch_optimizer

    model = p["module"]
    hold_dropout(model)  # dropout held deterministic, as in single-device training parity
    ddp = DDP(model)
    opt, sched = torch_optimizer(p["spec"], ddp.parameters(), p["steps"])

    def across(loss: torch.Tensor, cot: float, inp: float) -> tuple[float, float, float]:
        # The global step: the mean of the replicas' losses, and the gradient noise floor's norms
        # (parity.training.noise.loss_gradient_floor): DDP's averaged gradient is that of the
        # global mean loss, whose output cotangent is each rank's own over world (stacked), and
        # whose input is the global batch.
        total = loss.clone()
        dist.all_reduce(total)
        squares = torch.tensor([cot * cot, inp * inp], dtype=torch.float64)
        dist.all_reduce(squares)
        return float(total) / world, float(np.sqrt(squares[0])) / world, float(np.sqrt(squares[1]))

    records = []
    for x, y in p["batches"]:
        start = time.perf_counter()
        xs = torch_inputs(as_args(replica_rows(x, rank, world, len(y))), p["dtype"], grads=False)
        ys = torch.as_tensor(replica_rows(y, rank, world, len(y)))
        if p["loss"] == "mse":  # targets shaped like the output, in the run's dtype
            ys = ys.to(p["dtype"])
        # DDP all-reduces (averages) the gradients in the backward; a summed loss is planted as
        # the per-replica mean times world. record=False (benchmarks): the step alone, no extra
        # all-reduce, norm or copies.
        side = torch_step(model, opt, sched, xs, ys, p["loss"], forward=ddp, measure=p["record"], across=across,
                          loss_scale=world if p["loss_reduction"] == "sum" else 1)
        # the step on this rank, incl. DDP's all-reduce (benchmarks)
        records.append({"seconds": time.perf_counter() - start, "step": side})
    return records


def replica_rows(tree, rank: int, world: int, batch: int):
    """Rank ``rank``'s contiguous rows [r*b, (r+1)*b), b = batch/world, of every array leaf of
    ``tree`` whose leading axis is the batch (the rows the JAX mesh gives device r); other leaves
    (scalars, per-model constants) whole, as shard_batch replicates them."""
    b = batch // world

    def rows(x):
        batched = hasattr(x, "shape") and len(x.shape) >= 1 and x.shape[0] == batch
        return x[rank * b:(rank + 1) * b] if batched else x

    return jax.tree_util.tree_map(rows, tree)


def ddp_job(torch_module: torch.nn.Module, batches: list[tuple[Any, np.ndarray]], *, world: int,
            spec, steps: int, loss: str, dtype: torch.dtype, loss_reduction: str = "mean",
            record: bool = True) -> dict:
    """One DDP training job for run_ddp: a copy of ``torch_module`` trained ``steps`` steps on the
    global ``batches`` (x: the input pytree in torch layout, y: labels or mse targets; cycled),
    each rank on its contiguous slice. record=False: only each step's seconds (benchmarks)."""
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    for _, y in batches:
        if len(y) % world:
            raise ValueError(f"global batch {len(y)} is not a multiple of data_parallel={world}")
    return {"module": torch_module.to(dtype), "world": world, "spec": spec, "steps": steps, "loss": loss,
            "dtype": dtype, "loss_reduction": loss_reduction, "record": record,
            "batches": [batches[i % len(batches)] for i in range(steps)]}


def run_ddp(jobs: list[dict], *, world: int, timeout: float = 300) -> list[list[dict]]:
    """Run ``jobs`` (ddp_job) with DDP on ``world`` local gloo processes started here, each job on
    the first ``job["world"]`` (<= world) of them, one job after another; per job, rank 0's
    record per step: {"seconds": the step on rank 0, "step": the StepSide of torch_step (None
    for record=False jobs): global mean loss, lr, global gradient norm and the gradients
    themselves (after DDP's averaging, before the optimizer step), the global output cotangent and
    input norms (the step's gradient noise floor), parameters and BatchNorm running statistics
    after the step (float64 numpy)}. The modules are pickled to the workers: their classes must
    import from the caller's sys.path (not be defined in ``__main__``)."""
    too_big = [j["world"] for j in jobs if j["world"] > world]
    if too_big:
        raise ValueError(f"a job needs {max(too_big)} processes, run_ddp starts {world}")
    with tempfile.TemporaryDirectory(prefix="parity_ddp_") as d:
        torch.save(jobs, Path(d) / "jobs.pt")
        # Fresh interpreters (not fork: the parent runs JAX threads and torch's OpenMP pool; not
        # multiprocessing's spawn: it re-imports the caller's __main__), one thread each.
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               # the caller's import path: the model's class must import in the worker to unpickle
               "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(_ROOT), *(p for p in sys.path if p)]))}
        # cwd=_ROOT: `python -m` puts the working directory first on sys.path, ahead of
        # PYTHONPATH, so a caller standing in another checkout would run that checkout's workers.
        logs = [Path(d) / f"rank{rank}.log" for rank in range(world)]
        procs = []
        try:
            for rank in range(world):
                with open(logs[rank], "w") as log:  # a file, not a pipe: a chatty rank cannot block on it
                    procs.append(subprocess.Popen([sys.executable, "-m", "parity.training.ddp", str(rank), d],
                                                  env=env, cwd=str(_ROOT), stdout=log, stderr=subprocess.STDOUT))
            timed_out = _join(procs, timeout, Path(d))
        finally:
            for proc in procs:  # never leave a rank behind (a failure, a timeout, an interrupt)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        codes = [proc.returncode for proc in procs]
        outs = [Path(d) / f"out{j}.pt" for j in range(len(jobs))]
        sent = [o.exists() for o in outs]
        failed = [r for r, code in enumerate(codes) if code]
        if all(sent):
            # Rank 0 wrote every job's records, whole, before any shutdown: they are the result,
            # even when a rank then died in the process group's teardown or the interpreter's exit.
            for r in failed:
                warnings.warn(f"torch DDP rank {r} exited with {codes[r]} after every result was sent; the "
                              f"results are kept. Its output:\n{_tail(logs[r])}", DDPExitWarning, stacklevel=2)
            return [torch.load(o, weights_only=False) for o in outs]
        done = f"results of {sum(sent)} of {len(jobs)} jobs were sent"
        if timed_out:
            raise RuntimeError(f"torch DDP timed out after {timeout:g} s ({done}); stopped every rank. "
                               f"Rank 0's output:\n{_tail(logs[0])}")
        r = failed[0] if failed else 0
        raise RuntimeError(f"torch DDP rank {r} exited with {codes[r]} ({done}):\n{_tail(logs[r])}")


class DDPExitWarning(RuntimeWarning):
    """A DDP worker exited with an error after every result had been sent (the results are kept)."""


_GRACE = 10.0  # seconds the other ranks get to finish once one has failed (then they are stopped)


def _join(procs: list[subprocess.Popen], timeout: float, workdir: Path) -> bool:
    """Wait for every process; True when ``timeout`` ran out first. Once one exits with an error
    before finishing its jobs, the others get _GRACE seconds: a rank waiting in a collective on a
    dead peer may never return. (One that failed after its last job, in the interpreter's exit,
    holds nobody up: the others, rank 0 with jobs of its own left, keep the whole timeout.)"""
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        now = time.monotonic()
        if now >= deadline:
            return True
        if any(proc.returncode and not (workdir / f"done{r}").exists() for r, proc in enumerate(procs)):
            deadline = min(deadline, now + _GRACE)
        time.sleep(0.05)
    return False


def _tail(log: Path, n: int = 2000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no output)"


__all__ = ["DDPExitWarning", "ddp_job", "replica_rows", "run_ddp"]

if __name__ == "__main__":  # one rank: python -m parity.training.ddp RANK WORKDIR
    _worker(int(sys.argv[1]), sys.argv[2])
