"""One sharded run over several processes (jax.distributed): join a job, or launch one on localhost.

``join`` is what every process of a multi-process job calls before JAX initialises its backends
(on a multi-host TPU or GPU slice each host runs the same command with its own process id; on
Cloud TPU the coordinator is found by itself: ``join("auto")``). ``launch`` starts N processes of
one ``parity`` command on this machine, each with its share of simulated CPU devices, joined on a
free localhost port: what tests and a laptop use to run the multi-process path. The global mesh
then spans every process's devices; each process holds only its devices' shards.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

from parity._xla_flags import with_cpu_devices
from parity.sharding._mesh import ShardingError



def join(coordinator: str, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join the jax.distributed job at ``coordinator`` (HOST:PORT, or "auto": let JAX find it, as
    on Cloud TPU and SLURM). Cross-process collectives on CPU are gloo's."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ShardingError("--coordinator HOST:PORT needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _without_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip or a == "--processes" or a.startswith("--processes="):
            skip = a == "--processes"
            continue
        out.append(a)
    return out


def launch(argv: list[str], processes: int, devices: int, *, timeout: float | None = None) -> int:
    """``python -m parity.cli *argv`` (the command line as given; its ``--processes N`` left out) as
    ``processes`` processes of one jax.distributed job on this machine, each with
    ``devices // processes`` simulated CPU devices. Process 0's output is passed through (it alone
    prints the report); a process that fails stops the others (they would wait in a collective
    forever) and its error is printed. Returns process 0's exit code. Used by parity verify --mesh
    and parity check --data-parallel."""
    if processes < 1 or devices % processes:
        raise ShardingError(f"--processes {processes}: the mesh's {devices} devices do not split evenly "
                            f"over {processes} processes")
    argv = _without_processes(argv)
    coordinator = f"localhost:{_free_port()}"
    # each process its share of the devices; the user's other XLA flags travel with it
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": with_cpu_devices(os.environ.get("XLA_FLAGS", ""), devices // processes)}
    logs, procs = [], []
    for i in range(processes):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        logs.append((out, err))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "parity.cli", *argv, "--coordinator", coordinator,
             "--num-processes", str(processes), "--process-id", str(i)], stdout=out, stderr=err, env=env))
    start, failed = time.monotonic(), None
    while any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.returncode not in (None, 0, 1, 3, 4)), None)
        late = timeout is not None and time.monotonic() - start > timeout
        if failed is not None or late:
            time.sleep(2)  # let the others finish the line they are writing
            for p in procs:
                if p.poll() is None:
                    p.kill()
            if late and failed is None:
                raise ShardingError(f"--processes {processes}: no result after {timeout:.0f}s; stopped")
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    lead = failed if failed is not None else 0
    out, err = logs[lead]
    out.seek(0)
    err.seek(0)
    sys.stdout.write(out.read())
    sys.stderr.write("".join(ln for ln in err if not ln.startswith("[Gloo]")))
    codes = [p.returncode for p in procs]
    if failed is None and len(set(codes)) > 1:
        raise ShardingError(f"--processes {processes}: the processes disagree (exit codes {codes})")
    return procs[lead].returncode


__all__ = ["join", "launch"]
