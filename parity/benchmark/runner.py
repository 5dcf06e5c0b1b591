"""Run the benchmark grid: parity gate per model and batch, then every phase x variant, timed.

A variant that cannot run here is recorded as ``n/a`` with the reason; one that raises (e.g.
torch.compile without a working C++ compiler) as ``failed`` with the reason; neither stops the
run. A torch variant whose first result disagrees with jax.jit's is ``failed`` too, so a fast
wrong model cannot win.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import jax
import torch

from parity.benchmark.devices import Device
from parity.benchmark.timing import Timing, measure
from parity.benchmark.names import DEFAULT_MODELS, DTYPES, PHASES, SIZES, VARIANTS
from parity.benchmark.peaks import mfu, peak_tflops
from parity.benchmark.sizes import cpu_config, default_batches, sized_config  # noqa: F401 - re-exported
from parity.benchmark.workloads import Prepared, VariantUnavailable, make_step, prepare
from parity.numerics import numerics_env, pinned
from parity.registry import select
from parity.tolerances import FORWARD, TOLERANCES, tolerance_for

# Equal precision on both sides while timing: full-fp32 matmuls/convs (no TF32, no bf16 passes).
TIMED_PRECISION = {"jax_default_matmul_precision": "highest", "torch_allow_tf32": False}


@dataclass(frozen=True)
class BenchConfig:
    """What to run. size: 'tiny' (registry tiny, for smoke runs), 'cpu' (CPU-sized, see
    sizes.cpu_config), 'full' (registry full / paper sizes) or 'gpu' (sizes.gpu_config).

    batches: for every model; model_batches: per pair name or family, overriding batches
    (batches=() with size 'gpu' means each family's GPU batch). peak_tflops: the --peak-tflops
    override for MFU (None: looked up by device name in parity.benchmark.peaks).
    """

    models: tuple[str, ...] = DEFAULT_MODELS
    batches: tuple[int, ...] = (2, 8)
    size: str = "cpu"
    dtype: str = "float32"
    phases: tuple[str, ...] = PHASES
    variants: tuple[str, ...] = VARIANTS
    warmup: int = 3
    min_rounds: int = 10
    max_rounds: int = 200
    min_time_s: float = 2.0
    seed: int = 0
    model_batches: dict = field(default_factory=dict)
    peak_tflops: float | None = None

    def batches_for(self, pair, on_cpu: bool = True) -> tuple[int, ...]:
        """This pair's batch sizes: --model-batch by name, then by family, then batches, then
        the size's default."""
        for key in (pair.name, pair.family):
            if key in self.model_batches:
                return tuple(self.model_batches[key])
        return tuple(self.batches) or default_batches(pair, self.size, on_cpu, quick=False)

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.batches and self.size != "gpu" and not self.model_batches:
            raise ValueError("no batch sizes: give batches (or size 'gpu', which has one per family)")
        for b in [*self.batches, *(b for bs in self.model_batches.values() for b in bs)]:
            if b < 1:
                raise ValueError(f"batch sizes must be positive integers, got {b}")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")


@dataclass
class BenchResult:
    model: str
    phase: str
    batch: int
    variant: str
    dtype: str
    status: str  # "ok", "failed" or "n/a"
    reason: str = ""
    note: str = ""
    timing: Timing | None = None
    flops: int | None = None
    flops_source: str = ""
    peak_bytes: int | None = None
    peak_source: str = ""
    check: str = ""  # this variant's first result vs jax.jit's
    model_flops: int | None = None  # the row's FLOPs for MFU (the same for every variant)
    mfu: float | None = None  # model_flops / median / peak; None with peak n/a

    @property
    def median_s(self) -> float | None:
        return self.timing.median_s if self.timing else None

    @property
    def samples_per_s(self) -> float | None:
        return self.batch / self.timing.median_s if self.timing else None

    @property
    def tflops_per_s(self) -> float | None:
        return self.flops / self.timing.median_s / 1e12 if self.timing and self.flops else None

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "timing"}
        d["timing"] = self.timing.to_dict() if self.timing else None
        d.update(median_s=self.median_s, samples_per_s=self.samples_per_s, tflops_per_s=self.tflops_per_s)
        return d


@dataclass
class GateResult:
    model: str
    batch: int
    dtype: str
    ok: bool
    verdicts: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the checks' warnings, printed under the gate


def gate_dtype(dtype: str) -> str:
    """The dtype the parity gate runs at: the benchmark's, when the tolerance table covers it."""
    return dtype if any(k[0] == dtype for k in TOLERANCES) else "float32"


def gate(prep: Prepared) -> GateResult:
    """One parity.check of the eager torch module against the Flax twin on this input (eval, and
    train too for BatchNorm models: Prepared.modes), forward and gradients, at the benchmark's
    dtype, with the pair's declared layouts (a registry pair's, or what the user passed).

    A check that misses the table's elementwise tolerance is re-judged against a float64 run
    (check(reference="float64")): Flax passes if its error vs float64 is within a small factor of
    torch's own. That is the sharper verdict where float32 rounding is amplified, e.g. BatchNorm's
    train-mode backward (batch-statistics gradients cancel), and it still fails a wrong model.
    """
    from parity.checker import check

    dtype = gate_dtype(prep.dtype)
    # check() works on a copy cast to ``dtype`` and ports that copy's weights itself. It runs on
    # the benchmark's device where it can (CPU and CUDA); a TPU run is gated on the host CPU.
    kwargs = dict(dtype=dtype, name=prep.name, layers=False, **prep.check_kwargs,
                  **({"device": "cuda"} if prep.device.kind == "cuda" else {}))
    ok, verdicts, reports, warnings = True, [], [], []
    for train in prep.modes:
        mode = "train" if train else "eval"
        r = check(prep.torch_module, prep.flax_module, prep.args, train=train, **kwargs)
        verdict = f"{mode}: PASS (tolerance table)"
        if not r.ok and dtype != "float64":
            worst = r.worst(r.outputs + r.grads)
            r = check(prep.torch_module, prep.flax_module, prep.args, train=train, reference="float64", **kwargs)
            verdict = (f"{mode}: {'PASS' if r.ok else 'FAIL'} (fp64 reference; the table's elementwise "
                       f"check missed on {worst.name}, rel_norm {worst.rel_norm:.1e})")
        elif not r.ok:
            verdict = f"{mode}: FAIL (tolerance table)"
        ok &= r.ok
        verdicts.append(verdict)
        reports.append(str(r))
        warnings += [w for w in r.warnings if w not in warnings]
    return GateResult(prep.name, prep.batch, dtype, ok, verdicts, reports, warnings)


def environment(device: Device, cfg: BenchConfig) -> dict:
    env = numerics_env()
    env.update(
        device=device.describe(),
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        threads={
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
            "note": "XLA:CPU sizes its own thread pool to the visible cores",
        },
        torch_compile_mode="default",
        torchinductor_env={k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_")},
        python_executable=sys.executable,
        git_commit=_git_commit(),
        config=asdict(cfg),
        timed_precision=dict(TIMED_PRECISION),
        peak=device_peak(device, cfg),
    )
    env["versions"]["optax"] = _version("optax")
    return env


def device_peak(device: Device, cfg: BenchConfig) -> dict:
    """The peak dense TFLOP/s MFU is measured against, and where it came from (or why n/a)."""
    d = device.describe()
    name = d.get("torch_device_name") if device.kind != "cpu" else None
    name = name or (d.get("jax_device_kind") if device.kind != "cpu" else None)
    # float32 is timed with TF32 off (TIMED_PRECISION), so its peak is the plain FP32 rate.
    precision = cfg.dtype
    if device.kind == "cpu" and cfg.peak_tflops is None:
        tflops, source = None, "no peak table for CPUs; give --peak-tflops"
    else:
        tflops, source = peak_tflops(name, precision, cfg.peak_tflops)
    return {"device_name": name, "precision": precision, "tflops": tflops, "source": source}


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(__file__))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check_first_value(ref, value, dtype: str) -> tuple[bool, str]:
    """Compare a variant's first result with jax.jit's, forward tolerance: one array, or
    {path: array} (Step.first_value; torch layout), leaf by leaf. The text names the worst leaf."""
    from collections.abc import Mapping

    from parity.judge import judge

    if not any(k[0] == dtype for k in TOLERANCES):
        return True, f"not checked: no {dtype} entry in parity/tolerances.py"
    ref, value = ({"first result": v} if not isinstance(v, Mapping) else v for v in (ref, value))
    if set(ref) != set(value):
        return False, f"different output leaves: {sorted(value)} vs jax-jit's {sorted(ref)}"
    tol = tolerance_for(dtype, FORWARD)
    cs = [(p, judge(f"first result {p}", ref[p], value[p], tol)) for p in ref]
    bad = [(p, c) for p, c in cs if not c.ok]
    p, c = max(bad or cs, key=lambda pc: pc[1].rel_norm)
    where = f"{p}: " if len(cs) > 1 else ""
    text = f"{where}max_abs {c.max_abs:.2e}, rel_norm {c.rel_norm:.2e} vs jax-jit ({c.tolerance})"
    if len(cs) > 1:
        text += f"; {len(cs) - len(bad)}/{len(cs)} leaves agree"
    return not bad, text


def run_benchmarks(cfg: BenchConfig, device: Device, log: Callable[[str], None] = print
                   ) -> tuple[list[BenchResult], list[GateResult]]:
    """Every model x batch x phase x variant of ``cfg`` on ``device``; JAX matmul precision
    'highest' and torch TF32 off (equal precision on both sides) for the whole run."""
    results: list[BenchResult] = []
    gates: list[GateResult] = []
    with _timed_precision(device):
        for pair in select(list(cfg.models)):
            model_start = time.perf_counter()
            config = sized_config(pair, cfg.size)
            batches = sorted(cfg.batches_for(pair, on_cpu=device.kind == "cpu"))
            preps = (prepare(pair, config, b, device, dtype=cfg.dtype, seed=cfg.seed) for b in batches)
            _bench_pair(preps, cfg, device, log, results, gates)
            log(f"[wall] {pair.name}: {time.perf_counter() - model_start:.1f} s (model set-up, gate, "
                "compilations, warm-up and timing)")
    return results, gates


def run_own_benchmark(prep_fn: Callable[[], Prepared], cfg: BenchConfig, device: Device,
                      log: Callable[[str], None] = print) -> tuple[list[BenchResult], list[GateResult]]:
    """Your own pair (workloads.prepare_own, called as ``prep_fn()`` under the timed precision):
    the same gate and phase x variant grid as a registry pair, at the example input's batch."""
    results: list[BenchResult] = []
    gates: list[GateResult] = []
    with _timed_precision(device):
        model_start = time.perf_counter()
        prep = prep_fn()
        _bench_pair(iter([prep]), cfg, device, log, results, gates)
        log(f"[wall] {prep.name}: {time.perf_counter() - model_start:.1f} s (model set-up, gate, "
            "compilations, warm-up and timing)")
    return results, gates


def _timed_precision(device: Device):
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(pinned(precision=TIMED_PRECISION["jax_default_matmul_precision"],
                               tf32=TIMED_PRECISION["torch_allow_tf32"]))
    stack.enter_context(jax.default_device(device.jax_device))
    return stack


def _bench_pair(preps, cfg: BenchConfig, device: Device, log: Callable[[str], None],
                results: list[BenchResult], gates: list[GateResult]) -> None:
    """One pair: the parity gate on the first Prepared (the smallest batch), then every phase x
    variant at every batch ``preps`` yields (prepared lazily, one at a time)."""
    peak = device_peak(device, cfg)["tflops"]
    # jax-jit first: it is the reference each torch variant's first result is checked against.
    variants = sorted(cfg.variants, key=lambda v: v != "jax-jit")
    g = None
    for prep in preps:
        if g is None:
            # One parity gate per model (at the smallest batch); every timed variant at every
            # batch is then checked against jax.jit's first result (check_first_value).
            started = time.perf_counter()
            g = gate(prep)
            gates.append(g)
            # Setup and gate seconds on the console: where a run's wall time goes besides timing.
            log(f"[gate] {prep.name} b{g.batch} {g.dtype}: {'PASS' if g.ok else 'FAIL'}: " + "; ".join(g.verdicts)
                + f" ({time.perf_counter() - started:.1f} s)")
            if not g.ok:
                for r in g.reports:
                    log(r)
            else:  # a failing report prints its own warnings; a passing one would hide them
                for w in g.warnings:
                    log(f"  warning: {w}")
        for phase in cfg.phases:
            if not g.ok:
                results.extend(BenchResult(prep.name, phase, prep.batch, v, cfg.dtype, "failed",
                                           reason="parity gate failed") for v in variants)
                continue
            ref, row = None, []
            for variant in variants:
                r, value = _run_one(prep, variant, phase, cfg, ref)
                if variant == "jax-jit":
                    ref = value
                row.append(r)
            _add_mfu(prep, phase, row, peak)
            for r in row:
                log(_line(r))
            results.extend(row)


def _add_mfu(prep: Prepared, phase: str, row: list[BenchResult], peak: float | None) -> None:
    """One FLOP count per row, so every variant's MFU has the same numerator: torch's
    FlopCounterMode (matmul/conv family, the usual "model FLOPs"), else XLA's count."""
    ok = [r for r in row if r.status == "ok"]
    if not ok:
        return
    flops = None
    try:
        flops = prep.torch_flops(phase)
    except Exception:  # noqa: BLE001 - no torch count on this device: fall back to XLA's
        flops = None
    flops = flops or next((r.flops for r in ok if r.variant == "jax-jit" and r.flops), None)
    for r in ok:
        r.model_flops = flops
        r.mfu = mfu(flops, r.median_s, peak)


def _run_one(prep: Prepared, variant: str, phase: str, cfg: BenchConfig, ref):
    """(result, first value in torch layout or None)."""
    base = dict(model=prep.name, phase=phase, batch=prep.batch, variant=variant, dtype=cfg.dtype)
    try:
        step = make_step(prep, variant, phase)
        step.reset_peak()
        timing = measure(step, warmup=cfg.warmup, min_rounds=cfg.min_rounds,
                         max_rounds=cfg.max_rounds, min_time_s=cfg.min_time_s)
    except VariantUnavailable as exc:
        return BenchResult(**base, status="n/a", reason=str(exc)), None
    except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
        return BenchResult(**base, status="failed", reason=_one_line(exc)), None
    flops, flops_source = step.flops()
    peak, peak_source = step.peak_bytes()
    result = BenchResult(**base, status="ok", note=step.note, timing=timing, flops=flops,
                         flops_source=flops_source, peak_bytes=peak, peak_source=peak_source)
    value = step.first_value()
    if variant == "jax-jit":
        result.check = "reference"
    elif ref is None:
        result.check = "not checked: no jax-jit reference"
    else:
        ok, result.check = check_first_value(ref, value, prep.dtype)
        if not ok:
            result.status, result.reason = "failed", f"first result disagrees with jax-jit: {result.check}"
    return result, value


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _line(r: BenchResult) -> str:
    head = f"{r.model:<18} {r.phase:<7} b{r.batch:<4} {r.variant:<20}"
    if r.status != "ok":
        return f"{head} {r.status}: {r.reason}"
    t = r.timing
    util = f"  MFU {r.mfu:6.1%}" if r.mfu is not None else ""
    return (f"{head} {t.median_s * 1e3:9.3f} ms  IQR {t.iqr_s * 1e3:7.3f}  n={t.rounds:<3} "
            f"first call {t.first_call_s:6.2f} s  {r.samples_per_s:9.1f} samples/s{util}")
