"""``parity bench``: time torch eager / channels_last / torch.compile against jax.jit, write a report;
``parity bench --torch M:F --flax M:F (--input-shape S | --example-input M:FN)``: the same grid on
your own pair (an HF transformers model and its Flax module, say);
``parity bench --layers MODEL``: the per-layer speed profile of one model instead;
``parity bench --data-parallel N``: data-parallel scaling at 1..N devices instead;
``parity bench --check-cost`` / ``--golden-cost``: what a check, a record and a verify cost in memory."""
from __future__ import annotations

import argparse
from pathlib import Path

from parity.errors import UsageError


from parity.benchmark.names import DEFAULT_MODELS, QUICK_MODELS


def run(args: argparse.Namespace) -> int:
    from parity.benchmark import BenchConfig, run_benchmarks, select_device, set_cpu_threads
    from parity.benchmark.runner import environment
    from parity.benchmark.sizes import parse_model_batches
    from parity.benchmark.workloads import VARIANTS
    from parity.registry import select

    if args.data_parallel is not None:  # before anything initialises JAX in this process
        return _data_parallel(args)
    if args.check_cost is not None:
        return _check_cost(args)
    if args.golden_cost is not None:
        return _golden_cost(args)
    if args.threads is not None:
        set_cpu_threads(args.threads)  # before select_device: XLA reads its flags at backend start
    device = select_device(args.device)  # DeviceError (a ValueError): one line, exit 2
    if args.layers:
        return _profile(args, device)
    if args.torch or args.flax:
        return _own_grid(args, device)
    on_cpu = device.kind == "cpu"
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    select(models)  # unknown names fail here (KeyError, exit 2), before anything runs
    variants = args.variants or [v for v in VARIANTS if not (args.quick and v == "torch-compile")]
    size = args.size or ("tiny" if args.quick else "cpu" if on_cpu else "full")
    cfg = BenchConfig(
        models=tuple(models),
        # () with --size gpu: each family's GPU batch (parity.benchmark.sizes.GPU_BATCHES).
        batches=tuple(args.batch or ((2,) if args.quick else () if size == "gpu" else (2, 8) if on_cpu else (8, 32))),
        model_batches=parse_model_batches(args.model_batch),
        size=size,
        dtype="bfloat16" if args.bf16 else "float32",
        phases=tuple(args.phase),
        variants=tuple(variants),
        peak_tflops=args.peak_tflops,
        **_timing_settings(args),
    )
    env = environment(device, cfg)
    _print_devices(env, cfg)
    results, gates = run_benchmarks(cfg, device, log=lambda s: print(s, flush=True))
    status = _write(results, gates, env, args)
    if args.port:
        status = max(status, _port_benchmark(args))
    return status


def _timing_settings(args: argparse.Namespace) -> dict:
    return (dict(warmup=1, min_rounds=1, max_rounds=1, min_time_s=0.0) if args.quick else
            dict(min_time_s=args.min_time) if args.min_time is not None else {})


def _print_devices(env: dict, cfg) -> None:
    d = env["device"]
    print(f"devices: torch {d['torch_device'] or 'MISSING (' + str(d['torch_missing']) + ')'}"
          f"{' (' + d['torch_device_name'] + ')' if d.get('torch_device_name') else ''}; "
          f"jax {d['jax_device']} ({d['jax_device_kind']}); dtype {cfg.dtype}; size {cfg.size}; "
          f"torch threads {env['threads']['torch_intra_op']}; timed with JAX matmul precision "
          "'highest' and torch TF32 off (equal precision on both sides)", flush=True)


def _write(results, gates, env: dict, args: argparse.Namespace, prefix: str = "") -> int:
    """Write the report; 1 when a parity gate failed, else 0."""
    from parity.benchmark.report import write_report

    paths = write_report(results, gates, env, args.out, quick=args.quick, prefix=prefix)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if not all(g.ok for g in gates):
        print("parity gate FAILED for: " + ", ".join(f"{g.model} b{g.batch}" for g in gates if not g.ok))
        return 1
    return 0


def _own_grid(args: argparse.Namespace, device) -> int:
    """--torch/--flax without --layers: the registry grid (gate, phases x variants) on your own
    pair, at the batch of its example input (parity.benchmark.runner.run_own_benchmark)."""
    from parity.benchmark.runner import BenchConfig, environment, run_own_benchmark
    from parity.benchmark.workloads import VARIANTS, example_batch, prepare_own
    from parity.commands.check import own_pair

    other = [f for f, v in (("--models", args.models), ("--batch", args.batch), ("--model-batch", args.model_batch),
                            ("--size", args.size), ("--port", args.port)) if v]
    if other:
        raise UsageError(f"your own pair is timed at its example input's batch and size; it does not take "
                         f"{', '.join(other)} (change --input-shape or --example-input instead)")
    own = own_pair(argparse.Namespace(**vars(args), seed=0))  # SetupError: a UsageError, one line, exit 2
    torch_model, flax_model, x, name = own.torch_model, own.flax_model, own.example_input, own.name
    variants = args.variants or [v for v in VARIANTS if not (args.quick and v == "torch-compile")]
    cfg = BenchConfig(models=(name,), batches=(example_batch(x),), size="full",
                      dtype="bfloat16" if args.bf16 else "float32", phases=tuple(args.phase),
                      variants=tuple(variants), peak_tflops=args.peak_tflops, **_timing_settings(args))
    env = environment(device, cfg)
    env["own_pair"] = {"torch": args.torch, "flax": args.flax, "input": args.example_input or args.input_shape,
                       "layout": args.layout, "output_layout": args.output_layout, "rename": args.rename,
                       "train_kwarg": args.train_kwarg}
    _print_devices(env, cfg)
    print(f"your pair: {name} ({args.torch} / {args.flax}), batch {cfg.batches[0]}", flush=True)
    results, gates = run_own_benchmark(
        lambda: prepare_own(torch_model, flax_model, x, device, name=name, dtype=cfg.dtype, seed=cfg.seed,
                            **own.facts()),
        cfg, device, log=lambda s: print(s, flush=True))
    # Files named <pair>_<device>_<dtype>_..., beside (never over) the registry grid's.
    return _write(results, gates, env, args, prefix="".join(c if c.isalnum() or c in "._-" else "-" for c in name) + "_")


def _data_parallel(args: argparse.Namespace) -> int:
    """--data-parallel N: parity.benchmark.dp_scaling in a child process (its JAX needs N devices,
    simulated on CPU by a flag read at JAX start-up); exit 1 when its parity gate fails."""
    from parity.benchmark.dp_scaling import ScalingConfig, run_in_child

    other = [f for f, v in (("--layers", args.layers), ("--torch", args.torch), ("--flax", args.flax),
                            ("--bf16", args.bf16), ("--port", args.port), ("--threads", args.threads is not None),
                            ("--model-batch", args.model_batch), ("--min-time", args.min_time is not None)) if v]
    if other:
        raise UsageError(f"--data-parallel times one registry pair in float32; it does not take {', '.join(other)}")
    models = args.models or ["mlp"]
    if len(models) != 1 or (args.batch and len(args.batch) != 1):
        raise UsageError("--data-parallel times one pair at one global batch: give one --models and one --batch")
    cfg = ScalingConfig(model=models[0], devices=args.data_parallel, size=args.size or "tiny",
                        batch=args.batch[0] if args.batch else None, device=args.device, quick=args.quick,
                        **(dict(steps=2, warmup=1) if args.quick else {}))
    print(f"data-parallel scaling: {cfg.model} ({cfg.size}) at {cfg.counts()} devices, global batch "
          f"{cfg.global_batch()}, jax on {cfg.device}, torch DDP over gloo", flush=True)
    result = run_in_child(cfg, args.out, log=lambda s: print(s, flush=True))
    for kind, path in result["paths"].items():
        print(f"wrote {kind}: {path}")
    if not result["gate_ok"]:
        print(f"parity gate FAILED for {cfg.model} at data_parallel={cfg.devices}")
        return 1
    return 0


def _profile(args: argparse.Namespace, device) -> int:
    """``--layers MODEL`` (a registry pair) or ``--torch/--flax`` with ``--input-shape`` or
    ``--example-input``: time every paired layer alone in both frameworks, write the report."""
    from parity.benchmark.layer_profile import ProfileSettings, profile_layers
    from parity.benchmark.layer_report import by_ratio, by_share, summary_lines, write_profile
    from parity.benchmark.report import file_stem
    from parity.benchmark.runner import BenchConfig, environment

    dtype = "bfloat16" if args.bf16 else "float32"
    torch_model, flax_model, x, facts, name, size, batch = _profile_pair(args, device)
    cfg = BenchConfig(models=(name,), batches=(batch,), size=size if size != "own" else "full", dtype=dtype)
    env = environment(device, cfg)
    print(f"per-layer profile: {name} ({size}, batch {batch}, {dtype}) on {device.kind} "
          f"({env['device'].get('torch_device_name') or env['device']['jax_device_kind']})", flush=True)
    profile = profile_layers(torch_model, flax_model, x, device=device, dtype=dtype, name=name,
                             settings=ProfileSettings.quick() if args.quick else None,
                             log=lambda s: print(s, flush=True), **facts)
    profile.env = {"versions": env["versions"], "device_name": env["device"].get("torch_device_name"),
                   "device": env["device"], "size": size, "batch": batch, "git_commit": env["git_commit"],
                   "timed_precision": env["timed_precision"]}
    print("\n".join(summary_lines(profile)))
    print("top layers by share of the JAX fwd+bwd total:")
    for t in by_share(profile)[:8]:
        share, ratio = t.share.get("jax fwd+bwd"), t.ratio("fwd+bwd")
        print(f"  {t.name:<28} {t.torch_type:<18} {share:7.1%}" if share is not None else f"  {t.name} n/a",
              f" JAX/torch {ratio:.3g}x" if ratio else "")
    bad = [t.name for t in profile.layers if t.parity.startswith("FAIL")]
    if bad:
        print(f"parity FAILED for {len(bad)} layer(s): {', '.join(bad)} (their times compare different work)")
    worst = by_ratio(profile)[:1]
    if worst and worst[0].ratio("fwd+bwd"):
        print(f"largest JAX/torch ratio (fwd+bwd): {worst[0].name} {worst[0].ratio('fwd+bwd'):.3g}x")
    for kind, path in write_profile(profile, args.out, file_stem(env, dtype, args.quick)).items():
        print(f"wrote {kind}: {path}")
    return 1 if bad else 0


def _profile_pair(args: argparse.Namespace, device):
    """(torch model, flax model, torch-layout input, layout facts for profile_layers, name, size,
    batch) for --layers."""
    from parity.benchmark.sizes import default_batches, parse_model_batches, sized_config
    from parity.registry import select

    if args.torch or args.flax:
        return _own_pair(args)
    pairs = select(args.layers)
    if len(pairs) != 1:
        raise ValueError(f"--layers needs one pair, {args.layers!r} selects {', '.join(p.name for p in pairs)}")
    pair = pairs[0]
    on_cpu = device.kind == "cpu"
    size = args.size or ("tiny" if args.quick else "cpu" if on_cpu else "full")
    by_model = parse_model_batches(args.model_batch)
    batches = (by_model.get(pair.name) or by_model.get(pair.family) or args.batch
               or default_batches(pair, size, on_cpu, args.quick))
    config = sized_config(pair, size)
    torch_model, flax_model = pair.build(config)
    x = pair.example_input(config, batch=batches[0])
    facts = dict(input_layout=pair.input_layout, output_layout=pair.out_layout(), train_kwarg=pair.train_kwarg)
    return torch_model, flax_model, x, facts, pair.name, size, batches[0]


def _own_pair(args: argparse.Namespace):
    """--torch/--flax with --input-shape or --example-input, as `parity check` takes them."""
    from parity.commands.check import own_pair

    own = own_pair(argparse.Namespace(**{**vars(args), "seed": 0, "name": args.layers}))
    x = own.example_input
    first = next(iter(x)) if isinstance(x, (tuple, list)) else x
    return own.torch_model, own.flax_model, x, own.facts(), own.name, "own", int(first.shape[0])


def _check_cost(args: argparse.Namespace) -> int:
    """parity bench --check-cost: each run in a fresh process; the table printed and written."""
    import json
    from dataclasses import asdict

    from parity.benchmark.check_cost import measure, table

    costs = measure(args.check_cost or ["vit", "bert-tiny"], repeat=max(1, args.cost_repeat))
    text = table(costs)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check_cost.md").write_text(text + "\n")
    (args.out / "check_cost.json").write_text(json.dumps([asdict(c) for c in costs], indent=1) + "\n")
    return 0


def _golden_cost(args: argparse.Namespace) -> int:
    """parity bench --golden-cost: record and verify, each in a fresh process; the table printed and written."""
    from parity.benchmark.golden_cost import measure, write

    print(write(measure(args.golden_cost or ["gpt2-tiny"]), args.out))
    return 0


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
