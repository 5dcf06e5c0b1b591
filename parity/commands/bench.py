"""``parity bench``: time torch eager / channels_last / torch.compile against jax.jit, write a report."""
from __future__ import annotations

import argparse
from pathlib import Path


DEFAULT_MODELS = ["mlp", "cnn", "unet-same", "unet-same-bn"]
QUICK_MODELS = ["mlp", "cnn", "unet-same-bn"]


def run(args: argparse.Namespace) -> int:
    from parity.benchmark import BenchConfig, run_benchmarks, select_device, set_cpu_threads
    from parity.benchmark.report import write_report
    from parity.benchmark.runner import environment
    from parity.benchmark.workloads import VARIANTS
    from parity.registry import select

    if args.threads is not None:
        set_cpu_threads(args.threads)  # before select_device: XLA reads its flags at backend start
    device = select_device(args.device)  # DeviceError (a ValueError): one line, exit 2
    on_cpu = device.kind == "cpu"
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    select(models)  # unknown names fail here (KeyError, exit 2), before anything runs
    variants = args.variants or [v for v in VARIANTS if not (args.quick and v == "torch-compile")]
    cfg = BenchConfig(
        models=tuple(models),
        batches=tuple(args.batch or ((2,) if args.quick else (2, 8) if on_cpu else (8, 32))),
        size=args.size or ("tiny" if args.quick else "cpu" if on_cpu else "full"),
        dtype="bfloat16" if args.bf16 else "float32",
        phases=tuple(args.phase),
        variants=tuple(variants),
        **(dict(warmup=1, min_rounds=1, max_rounds=1, min_time_s=0.0) if args.quick else {}),
    )
    env = environment(device, cfg)
    d = env["device"]
    print(f"devices: torch {d['torch_device'] or 'MISSING (' + str(d['torch_missing']) + ')'}"
          f"{' (' + d['torch_device_name'] + ')' if d.get('torch_device_name') else ''}; "
          f"jax {d['jax_device']} ({d['jax_device_kind']}); dtype {cfg.dtype}; size {cfg.size}; "
          f"torch threads {env['threads']['torch_intra_op']}; timed with JAX matmul precision "
          "'highest' and torch TF32 off (equal precision on both sides)", flush=True)
    results, gates = run_benchmarks(cfg, device, log=lambda s: print(s, flush=True))
    paths = write_report(results, gates, env, args.out, quick=args.quick)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    status = 0
    if args.port:
        status = _port_benchmark(args)
    if not all(g.ok for g in gates):
        print("parity gate FAILED for: " + ", ".join(f"{g.model} b{g.batch}" for g in gates if not g.ok))
        return 1
    return status


def _port_benchmark(args: argparse.Namespace) -> int:
    """bench/port_throughput.py lives in the source tree (not the installed package): load it by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "port_throughput.py"
    if not path.exists():
        print(f"port-throughput benchmark: not available ({path} does not exist)")
        return 0
    spec = importlib.util.spec_from_file_location("bench_port_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(["--quick"] if args.quick else []))
