"""Data-parallel scaling (``parity bench --data-parallel N``): train-step throughput at 1, 2, 4, ...,
N devices for jax (the Flax step under jit, batch sharded over a k-device Mesh) and torch
(DistributedDataParallel over gloo, k local processes), with the efficiency per step.

The work runs in a child process (``run_in_child``): on CPU the k JAX devices are simulated, and
XLA_FLAGS=--xla_force_host_platform_device_count=N only takes effect before JAX initialises, so
the command cannot count on its own process. The child checks parity once (one DDP step against
the sharded Flax step at N devices, training tolerance table; that DDP step runs before the timed
DDP runs, in the same start of the N worker processes), then times each side: jax compiles and
warms up outside the timed region and blocks before the clock is read; torch's first steps are
warm-up and its per-step time is rank 0's, DDP's gradient all-reduce included. Each count
reports samples/s (median step) and efficiency = rate_k / (k * rate_1). On CPU the simulated
devices and the k torch processes share this machine's cores: a functional run, not a scaling
number, and the report says so. torch DDP always runs on CPU here (gloo).
"""
from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from parity._xla_flags import with_cpu_devices

_RESULT = "PARITY_DP_SCALING_RESULT "  # prefix of the child's last stdout line (JSON)
_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding parity/, for the child's imports


@dataclass(frozen=True)
class ScalingConfig:
    """What to time. devices: N (counts 1, 2, 4, ... below N, then N). batch: the global batch,
    the same at every count (a multiple of each count; None: twice their least common multiple).
    size: a benchmark size (parity.benchmark.names.SIZES). steps: timed steps per count and
    side, after ``warmup`` untimed ones (jax: plus the compiling first call)."""

    model: str = "mlp"
    devices: int = 2
    size: str = "tiny"
    batch: int | None = None
    steps: int = 10
    warmup: int = 2
    device: str = "cpu"
    quick: bool = False
    lr: float = 0.01

    def counts(self) -> list[int]:
        if self.devices < 1:
            raise ValueError(f"--data-parallel must be >= 1, got {self.devices}")
        return sorted({2 ** i for i in range(self.devices.bit_length()) if 2 ** i < self.devices} | {self.devices})

    def global_batch(self) -> int:
        lcm = math.lcm(*self.counts())
        if self.batch is None:
            return 2 * lcm
        if self.batch < 1 or self.batch % lcm:
            raise ValueError(f"--batch {self.batch}: the global batch must be a multiple of every device count "
                             f"{self.counts()} (of {lcm})")
        return self.batch


def run_in_child(cfg: ScalingConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Run the scaling benchmark in a fresh interpreter (on CPU with N simulated devices), its
    progress lines passed to ``log``; returns its result: {"gate_ok", "paths", "functional_run"}."""
    cfg.global_batch()  # a bad batch fails here, before a process starts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(_ROOT), *(p for p in sys.path if p)]))}
    if cfg.device == "cpu":
        env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), cfg.devices)
        env["JAX_PLATFORMS"] = "cpu"
    # stderr merged into stdout: one pipe read to its end cannot fill up and stall the child
    # cwd=_ROOT (and so an absolute out_dir): `python -m` puts the working directory first on
    # sys.path, ahead of PYTHONPATH; from another checkout the child would import that one.
    proc = subprocess.Popen([sys.executable, "-m", "parity.benchmark.dp_scaling", json.dumps(asdict(cfg)),
                             str(Path(out_dir).resolve())], env=env, cwd=str(_ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    result, tail = None, collections.deque(maxlen=40)
    for line in proc.stdout:
        if line.startswith(_RESULT):
            result = json.loads(line[len(_RESULT):])
        else:
            tail.append(line)
            log(line.rstrip("\n"))
    if proc.wait() or result is None:
        raise RuntimeError(f"the data-parallel benchmark process exited with {proc.returncode}:\n{''.join(tail)}")
    return result


def measure_scaling(cfg: ScalingConfig, log: Callable[[str], None] = print) -> dict:
    """The benchmark itself, in a process whose JAX has >= N devices: parity gate, then jax and
    torch timed at every count. Returns the report payload (JSON-ready)."""
    import jax
    import torch

    from parity.benchmark.devices import select_device
    from parity.benchmark.runner import BenchConfig, environment
    from parity.benchmark.sizes import sized_config
    from parity.training.ddp import ddp_job, run_ddp
    from parity.training.ddp_train import plan_checks
    from parity.numerics import pinned
    from parity.registry import select
    from parity.training import OptimizerSpec
    from parity.training.data import default_loss, synthetic_batches

    pairs = select(cfg.model)
    if len(pairs) != 1:
        raise ValueError(f"--data-parallel times one pair; {cfg.model!r} selects {', '.join(p.name for p in pairs)}")
    pair, batch, counts = pairs[0], cfg.global_batch(), cfg.counts()
    device = select_device(cfg.device)
    config = sized_config(pair, cfg.size)
    torch_model, flax_model = pair.build(config, seed=0)
    loss = default_loss(pair)
    batches = synthetic_batches(pair, config, torch_model, batch=batch, n_batches=1, seed=0)
    spec = OptimizerSpec("sgd", lr=cfg.lr)
    platform = jax.devices()[0].platform

    # One start of N torch processes runs the parity gate's DDP step first, then the timed DDP
    # runs at every count (a job of k processes; the others sit it out, blocked).
    checks = plan_checks([dict(torch_module=torch_model, flax_module=flax_model, data=batches, data_parallel=cfg.devices,
                               steps=1, optimizer=spec, loss=loss, dtype="float32", input_layout=pair.input_layout,
                               output_layout=pair.out_layout(), train_kwarg=pair.train_kwarg, name=pair.name)])
    timed_jobs = [ddp_job(torch_model, batches, world=k, spec=spec, steps=cfg.warmup + cfg.steps, loss=loss,
                          dtype=torch.float32, record=False) for k in counts]
    records = run_ddp(checks.jobs + timed_jobs, world=cfg.devices)
    gate = checks.reports(records[:1])[0]
    worst = max(c.rel_norm for c in gate.steps[0].comparisons)
    log(f"parity gate ({pair.name}: 1 DDP step on {cfg.devices} gloo processes vs the Flax step sharded over "
        f"{cfg.devices} {platform} devices, float32): {'PASS' if gate.ok else 'FAIL'} (worst rel_norm {worst:.2e})"
        + ("" if gate.ok else f" -- {'; '.join(gate.findings) or 'see parity train --data-parallel'}"))

    step_for = _jax_steps(pair, torch_model, flax_model, batches[0], spec, cfg.warmup + cfg.steps, loss)
    rows = []
    with pinned(precision="highest", tf32=False):  # equal precision on both sides, as every timed benchmark here
        for k in counts:
            rows.append(_row("jax", k, batch, _time_jax(step_for(k), cfg)))
            log(_line(rows[-1]))
    for k, recs in zip(counts, records[1:]):
        rows.append(_row("torch", k, batch, [r["seconds"] for r in recs[cfg.warmup:]]))
        log(_line(rows[-1]))
    for side in ("jax", "torch"):
        base = next(r for r in rows if r["framework"] == side and r["devices"] == 1)["samples_per_s"]
        for r in rows:
            if r["framework"] == side:
                r["efficiency"] = r["samples_per_s"] / (r["devices"] * base)

    env = environment(device, BenchConfig(models=(pair.name,), batches=(batch,), size=cfg.size,
                                          phases=("train",), variants=("jax-jit",)))
    cores = os.cpu_count()
    functional = {"jax": platform == "cpu", "torch": (cores or 1) < cfg.devices}
    label = (f"FUNCTIONAL RUN, not a scaling number: the {cfg.devices} JAX devices are simulated on this "
             f"machine's {cores} CPU cores (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}) and the torch DDP "
             f"processes share the same cores" if functional["jax"] else
             f"jax: {cfg.devices} real {platform} devices (a scaling number); torch DDP runs on CPU over gloo, "
             f"{cores} cores{' (shared by the processes: functional)' if functional['torch'] else ''}")
    return {
        "kind": "data_parallel_scaling", "functional_run": functional["jax"], "functional": functional,
        "note": label, "model": pair.name, "size": cfg.size, "global_batch": batch, "counts": counts,
        "loss": loss, "optimizer": f"sgd lr={cfg.lr}", "dtype": "float32", "steps": cfg.steps, "warmup": cfg.warmup,
        "jax_platform": platform, "torch_backend": "gloo (CPU), 1 thread per process",
        "parity_gate": {"ok": gate.ok, "worst_rel_norm": worst, "findings": gate.findings,
                        "data_parallel": cfg.devices, "report": str(gate)},
        "results": rows, "environment": env,
    }


def _jax_steps(pair, torch_model, flax_model, batch, spec, steps: int, loss: str):
    """k -> a zero-argument train step on a k-device mesh that blocks until done (fresh state per k)."""
    import jax

    from parity.data_parallel.mesh import data_mesh, replicate, shard_batch
    from parity.pair import CheckOptions, prepare
    from parity.runtime import flax_inputs
    from parity.training import flax_train_step
    from parity.training.optim import optax_optimizer

    x_np, y_np = batch
    # Prepared as training parity prepares its pair (one port, the twin in train mode, dropout off).
    prepared = prepare(torch_model, flax_model, x_np, CheckOptions(train=True, train_kwarg=pair.train_kwarg,
                                                                   input_layout=pair.input_layout),
                       dropout=False)
    x0, layouts, variables, twin = prepared.inputs(False), prepared.in_layouts, prepared.variables, prepared.twin
    tx = optax_optimizer(spec, steps)
    # training parity's Flax step, without its gradient norm and gradients (as the timed torch
    # DDP jobs skip theirs)
    train_step = flax_train_step(twin, tx, loss, measure=False)
    rest = {k: v for k, v in variables.items() if k != "params"}

    def step_for(k: int):
        mesh = data_mesh(k)
        n = int(y_np.shape[0])
        carry = [replicate(variables["params"], mesh), replicate(rest, mesh),
                 replicate(tx.init(variables["params"]), mesh)]
        x, y = shard_batch(flax_inputs(x0, layouts), mesh, n), shard_batch(y_np, mesh, n, where="labels")

        def step() -> None:
            carry[0], carry[1], carry[2], value = train_step(*carry, x, y)
            jax.block_until_ready(value)

        return step

    return step_for


def _time_jax(step, cfg: ScalingConfig) -> list[float]:
    from parity.benchmark.timing import measure

    t = measure(step, warmup=cfg.warmup, min_rounds=cfg.steps, max_rounds=cfg.steps, min_time_s=0.0)
    return list(t.samples_s)


def _row(framework: str, k: int, batch: int, seconds: list[float]) -> dict:
    from parity.benchmark.timing import summarize

    med, q1, q3 = summarize(seconds)
    return {"framework": framework, "devices": k, "per_device_batch": batch // k, "median_s": med,
            "iqr_s": q3 - q1, "samples_per_s": batch / med, "efficiency": None, "samples_s": seconds}


def _line(r: dict) -> str:
    return (f"  {r['framework']:<6} {r['devices']:>3} device(s)  {r['median_s'] * 1e3:9.3f} ms/step  "
            f"IQR {r['iqr_s'] * 1e3:7.3f}  {r['samples_per_s']:10.1f} samples/s")


def markdown(payload: dict) -> str:
    """The report: the functional-run label, the gate, then devices x framework."""
    p = payload
    g = p["parity_gate"]
    lines = [f"# Data-parallel scaling: {p['model']} ({p['size']}), global batch {p['global_batch']}", "",
             f"**{p['note']}.**", "",
             f"Parity gate (1 DDP step vs the Flax step sharded over {g['data_parallel']} devices, float32): "
             f"{'PASS' if g['ok'] else 'FAIL'}, worst rel_norm {g['worst_rel_norm']:.2e}.", "",
             f"Train step = forward + {p['loss']} + backward + {p['optimizer']}, {p['dtype']}; jax: the step under "
             f"jit on {p['jax_platform']}, batch sharded over a k-device Mesh; torch: DDP, {p['torch_backend']}. "
             f"Median of {p['steps']} steps after {p['warmup']} warm-up steps (jax also after compiling); "
             "efficiency = samples/s at k / (k x samples/s at 1).", "",
             "| framework | devices | rows/device | median ms/step (IQR) | samples/s | efficiency |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in p["results"]:
        lines.append(f"| {r['framework']} | {r['devices']} | {r['per_device_batch']} | {r['median_s'] * 1e3:.3g} "
                     f"({r['iqr_s'] * 1e3:.2g}) | {r['samples_per_s']:.4g} | {r['efficiency']:.2f} |")
    v = p["environment"]["versions"]
    lines += ["", "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(payload: dict, out_dir: Path) -> dict[str, Path]:
    """<stem>_dp<N>.json and .md under out_dir (the stem names device and library versions)."""
    from parity.benchmark.report import file_stem

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(payload["environment"], payload["dtype"], False) + f"_dp{max(payload['counts'])}"
    stem += "_quick" if payload.get("quick") else ""
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(payload))
    return paths


def _child(config_json: str, out_dir: str) -> None:
    cfg = ScalingConfig(**json.loads(config_json))
    payload = measure_scaling(cfg, log=lambda s: print(s, flush=True))
    payload["quick"] = cfg.quick
    paths = write_report(payload, Path(out_dir))
    print(f"note: {payload['note']}", flush=True)
    print(_RESULT + json.dumps({"gate_ok": payload["parity_gate"]["ok"], "functional_run": payload["functional_run"],
                                "paths": {k: str(v) for k, v in paths.items()}}), flush=True)


__all__ = ["ScalingConfig", "markdown", "measure_scaling", "run_in_child", "write_report"]

if __name__ == "__main__":  # the child: python -m parity.benchmark.dp_scaling CONFIG_JSON OUT_DIR
    _child(sys.argv[1], sys.argv[2])
