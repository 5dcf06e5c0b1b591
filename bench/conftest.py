"""pytest-benchmark suite options and shared, cached setup (device, ported models, parity gates).

    python -m pytest bench/                       # CPU-sized models, batches 2 and 8
    python -m pytest bench/ --bench-quick         # CI smoke: tiny models, batch 2, one round
    python -m pytest bench/ --bench-device cuda --benchmark-json out.json
"""
from __future__ import annotations

import pytest

from parity.benchmark import PHASES, VARIANTS, gate, make_step, prepare, select_device, sized_config
from parity.numerics import numerics_env, pin_numerics
from parity.registry import select

DEFAULT_MODELS = "mlp,cnn,unet-same,unet-same-bn"


def pytest_addoption(parser):
    g = parser.getgroup("parity bench")
    g.addoption("--bench-quick", action="store_true",
                help="smoke mode: tiny models, batch 2, one warm-up and one timed round, no torch.compile")
    g.addoption("--bench-device", default="cpu", choices=("cpu", "cuda", "tpu"))
    g.addoption("--bench-models", default=None, help=f"comma-separated (default {DEFAULT_MODELS})")
    g.addoption("--bench-batch", default=None, help="comma-separated batch sizes (default 2,8; quick: 2)")
    g.addoption("--bench-size", default=None, choices=("tiny", "cpu", "full"),
                help="model configs (default: cpu on cpu, full elsewhere, tiny with --bench-quick)")
    g.addoption("--bench-variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")


class Settings:
    def __init__(self, config):
        quick = config.getoption("--bench-quick")
        self.quick = quick
        self.device_kind = config.getoption("--bench-device")
        self.models = (config.getoption("--bench-models") or ("mlp,cnn,unet-same-bn" if quick else DEFAULT_MODELS)).split(",")
        batch = config.getoption("--bench-batch") or ("2" if quick else "2,8")
        self.batches = [int(b) for b in batch.split(",")]
        self.size = config.getoption("--bench-size") or ("tiny" if quick else "cpu" if self.device_kind == "cpu" else "full")
        variants = config.getoption("--bench-variants")
        self.variants = variants.split(",") if variants else [v for v in VARIANTS if not (quick and v == "torch-compile")]
        # jax-jit first so its first result is the reference the torch variants are checked against.
        self.variants.sort(key=lambda v: v != "jax-jit")
        self.rounds, self.warmup = (1, 1) if quick else (20, 3)


def pytest_configure(config):
    config._bench_settings = Settings(config)
    pin_numerics(precision="highest", tf32=False)  # equal precision on both sides while timing


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    s: Settings = metafunc.config._bench_settings
    cases, ids = [], []
    for pair in select(s.models):
        for batch in s.batches:
            for phase in PHASES:
                for variant in s.variants:
                    cases.append((pair.name, batch, phase, variant))
                    ids.append(f"{pair.name}-{phase}-b{batch}-{variant}")
    metafunc.parametrize("case", cases, ids=ids)


def pytest_report_header(config):
    s: Settings = config._bench_settings
    env = numerics_env()
    return (f"parity bench: device={s.device_kind} size={s.size} models={s.models} batches={s.batches} "
            f"quick={s.quick}; torch threads={env['torch_threads']}; versions={env['versions']}")


@pytest.fixture(scope="session")
def settings(pytestconfig) -> Settings:
    return pytestconfig._bench_settings


@pytest.fixture(scope="session")
def device(settings):
    from parity.benchmark import DeviceError

    try:
        return select_device(settings.device_kind)
    except DeviceError as exc:
        pytest.exit(f"parity bench: {exc}", returncode=2)


@pytest.fixture(scope="session")
def prepared(settings, device):
    """(model, batch) -> (Prepared, GateResult): built and ported once per session; the parity
    gate runs once per model, at the smallest batch of the sweep."""
    preps: dict = {}
    gates: dict = {}

    def build(model: str, batch: int):
        if (model, batch) not in preps:
            pair = select(model)[0]
            preps[model, batch] = prepare(pair, sized_config(pair, settings.size), batch, device)
        return preps[model, batch]

    def get(model: str, batch: int):
        if model not in gates:
            gates[model] = gate(build(model, min(settings.batches)))
        return build(model, batch), gates[model]

    return get


@pytest.fixture(scope="session")
def reference(prepared):
    """(model, batch, phase) -> jax.jit's first result (torch layout), computed once."""
    cache: dict = {}

    def get(model: str, batch: int, phase: str, value=None):
        if value is not None:
            cache[model, batch, phase] = value
        if (model, batch, phase) not in cache:
            step = make_step(prepared(model, batch)[0], "jax-jit", phase)
            step()
            cache[model, batch, phase] = step.first_value()
        return cache[model, batch, phase]

    return get

