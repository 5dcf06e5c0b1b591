"""``parity check``: built-in pairs (``parity check [mlp|cnn|unet|all]``) or your own
(``parity check --torch MODULE:FACTORY --flax MODULE:FACTORY --input-shape 2,3,64,64``).

Exit codes: 0 pass, 1 parity mismatch (FAIL), 2 usage or setup error (one line on stderr), 3 no
verdict (INVALID: NaN on both sides of a compared tensor; only when no check FAILed), 4
INCONCLUSIVE (nothing failed, but a tensor passed the table only under its atol with no measured
noise behind it; only when no check FAILed or was INVALID). Every warning of the port and the checker is printed under its check's summary
line. Progress lines go to stderr, results to stdout, so ``--json -`` style piping stays clean.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from typing import TYPE_CHECKING

from parity.errors import UsageError
from parity.registry import select

if TYPE_CHECKING:
    from parity.pair import CheckOptions



class SetupError(UsageError):
    """A bad --torch/--flax spec, a factory that raises, a bad --input-shape: exit 2 (a UsageError,
    so every command that lets it through still answers with one line, never a traceback)."""


# The flags that describe your own pair, by argparse attribute.
OWN_PAIR_FLAGS = {"torch": "--torch", "flax": "--flax", "input_shape": "--input-shape",
                  "example_input": "--example-input"}


def own_pair_flags(args: argparse.Namespace) -> list[str]:
    """The own-pair flags given on the command line, in OWN_PAIR_FLAGS order."""
    return [flag for attr, flag in OWN_PAIR_FLAGS.items() if getattr(args, attr, None)]


def refuse_models_with_own_pair(args: argparse.Namespace, models, flag: str, what: str) -> None:
    """SetupError naming the own-pair flags given beside a built-in pair. models: the value of the
    built-in pair's argument (None or empty: none given); flag: its name ("MODEL", "--model");
    what: how the answer calls it ("MODEL names")."""
    given = own_pair_flags(args)
    if models and given:
        names = " ".join(models) if isinstance(models, (list, tuple)) else models
        raise SetupError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for your own pair, but "
                         f"{flag} {names!r} names a built-in pair: give either {what} or --torch/--flax, "
                         "not both")


def parse_layout(text: str | None, flag: str):
    """'NC...' -> 'NC...'; 'input[0]=NC...,input[1]=as_is' -> {path: layout}."""
    if text is None or "=" not in text:
        return text
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise SetupError(f"{flag} {text!r}: expected LAYOUT or PATH=LAYOUT[,PATH=LAYOUT]")
        out[key.strip()] = value.strip()
    return out


def parse_rename(items: list[str] | None):
    """['a\\.b=c', ...] -> [(regex, replacement)] for weight_port.build_plan(rename=)."""
    if not items:
        return None
    pairs = []
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old:
            raise SetupError(f"--rename {item!r}: expected OLD=NEW (OLD a regex over torch module paths)")
        pairs.append((old, new))
    return pairs


@dataclass(frozen=True)
class OwnPair:
    """Your own pair from the command line: the two models, the example input (torch layout) and
    the facts every command passes on (layouts parsed from --layout / --output-layout, --rename,
    --train-kwarg; None where the command has no such flag)."""

    torch_model: object
    flax_model: object
    example_input: object
    name: str
    input_layout: object = None
    output_layout: object = None
    rename: object = None
    train_kwarg: str | None = None

    def facts(self) -> dict:
        """The pair facts as CheckOptions / train_check / prepare_own keywords."""
        return dict(input_layout=self.input_layout, output_layout=self.output_layout, rename=self.rename,
                    train_kwarg=self.train_kwarg)


def own_pair(args: argparse.Namespace) -> OwnPair:
    """Your own pair from --torch/--flax and --example-input or --input-shape (and the layout,
    rename and train-kwarg flags, where the command has them); SetupError with one readable line
    for anything missing or broken."""
    import numpy as np

    given = [f for f, v in (("--torch", args.torch), ("--flax", args.flax)) if v]
    if len(given) != 2:
        others = own_pair_flags(args)
        raise SetupError(f"your own pair needs {'--flax' if args.torch else '--torch'} as well"
                         + (f" ({', '.join(others)} given)" if others else ""))
    if bool(args.input_shape) == bool(args.example_input):
        raise SetupError("your own pair needs exactly one of --input-shape and --example-input")
    import torch

    # A factory that initialises at random draws from torch's global generator: seeded (--seed),
    # so every run, and every process of a --processes job, builds the same weights (each process
    # places its own shards of them: unseeded, process 1's shards came from other weights).
    torch.manual_seed(getattr(args, "seed", 0))
    torch_model = call_factory(load_factory(args.torch, "--torch"), args.torch, "--torch")
    flax_model = call_factory(load_factory(args.flax, "--flax"), args.flax, "--flax")
    expect_models(torch_model, args.torch, flax_model, args.flax)
    if args.example_input:
        x = call_factory(load_factory(args.example_input, "--example-input"), args.example_input,
                          "--example-input")
        text = args.example_input
    else:
        x = np.random.default_rng(getattr(args, "seed", 0)).standard_normal(parse_shape(args.input_shape))
        text = args.input_shape
    _fits(torch_model, x, text)
    return OwnPair(torch_model, flax_model, x, getattr(args, "name", None) or type(torch_model).__name__,
                   input_layout=parse_layout(getattr(args, "layout", None), "--layout"),
                   output_layout=parse_layout(getattr(args, "output_layout", None), "--output-layout"),
                   rename=parse_rename(getattr(args, "rename", None)),
                   train_kwarg=getattr(args, "train_kwarg", None))


def load_factory(spec: str, flag: str) -> Callable[[], object]:
    """'pkg.module:factory' -> the callable; SetupError with one readable line otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SetupError(f"{flag} {spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:make_model")
    sys.path.insert(0, ".")  # like `python -m`: modules in the current directory are found
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself raising at import
        raise SetupError(f"{flag} {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    finally:
        sys.path.remove(".")
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SetupError(f"{flag} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SetupError(f"{flag} {spec!r}: {attr!r} is not callable")
    return obj


def call_factory(factory: Callable[[], object], spec: str, flag: str) -> object:
    try:
        return factory()
    except Exception as exc:
        raise SetupError(f"{flag} {spec!r}: the factory raised {type(exc).__name__}: {exc}") from None


def _kind(obj) -> str:
    """"torch" / "flax" for a model object, else a short description of what it is."""
    import flax.linen as nn
    import torch
    from flax import nnx

    if isinstance(obj, torch.nn.Module):
        return "torch"
    if isinstance(obj, (nn.Module, nnx.Module)):
        return "flax"
    if isinstance(obj, torch.Tensor) or hasattr(obj, "shape"):
        return f"a {type(obj).__module__.split('.')[0]} {type(obj).__name__} of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def expect_models(torch_model, torch_spec: str, flax_model, flax_spec: str) -> None:
    """SetupError naming the factory when --torch does not give a torch.nn.Module or --flax a
    Flax (Linen or NNX) module: otherwise the mistake surfaces later as a confusing input error."""
    got_t, got_f = _kind(torch_model), _kind(flax_model)
    if (got_t, got_f) == ("flax", "torch"):
        raise SetupError(f"--torch {torch_spec!r} returned a Flax module and --flax {flax_spec!r} a torch "
                         "module: the two are swapped")
    for flag, spec, got, want in (("--torch", torch_spec, got_t, "torch"), ("--flax", flax_spec, got_f, "flax")):
        if got != want:
            what = {"torch": "a torch.nn.Module", "flax": "a Flax module"}
            raise SetupError(f"{flag} {spec!r}: the factory returned {what.get(got, got)}, expected "
                             f"{what[want]}")


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise SetupError(f"--input-shape {text!r}: expected positive integers like 2,3,64,64")
    return shape


def _fits(torch_model, x, text: str) -> None:
    """Run the torch model once so a wrong input is one line, not a trace from deep inside."""
    import jax
    import numpy as np
    import torch

    dtype = next((p.dtype for p in torch_model.parameters() if p.is_floating_point()), torch.float32)

    def conv(a):
        if not isinstance(a, (np.ndarray, torch.Tensor)):
            return a
        t = torch.as_tensor(a)
        return t.to(dtype) if t.is_floating_point() else t

    args = x if isinstance(x, (tuple, list)) else (x,)
    try:
        with torch.no_grad():
            torch_model.eval()(*jax.tree_util.tree_map(conv, tuple(args)))
    except Exception as exc:
        raise SetupError(f"{text}: the torch model rejects this input "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _plot_path(base: str, report, many: bool) -> str:
    if not many:
        return base
    p = Path(base)
    return str(p.with_name(f"{p.stem}-{report.model}-{report.dtype}-{report.mode}{p.suffix or '.png'}"))


_MODEL_W = 24  # the longest registry name (unet-same-convtranspose) fits


def summary_line(r, seconds: float) -> str:
    """One row of the table, then one indented line per warning of the port and the checker."""
    where = f"  first divergence: {r.first_divergence} ({r.divergence_kind})" if r.first_divergence else ""
    bad = ", ".join(c.name for c in r.outputs + r.grads if not c.ok)
    verdict = r.verdict
    if verdict == "FAIL":
        verdict += f" ({bad[:50]})" if bad else ""
    elif verdict == "INVALID":
        verdict, where = f"INVALID ({r.invalid_reason})", ""
    elif verdict == "INCONCLUSIVE":
        verdict += f" ({', '.join(c.name for c in r.outputs + r.grads if c.inconclusive)[:50]})"
    # Maxima over every gradient (input and each parameter), each column on its own. The score
    # column is the worst error over its allowance (<= 1 passes), whichever judge decided: a
    # gradient that is zero in exact arithmetic has a rel_norm that is a ratio of two noises,
    # but its score says how it compares with the measured noise.
    gmax = (f"{max(c.max_abs for c in r.grads):12.2e} {max(c.score for c in r.grads):9.2e}"
            if r.grads else f"{'-':>12} {'-':>9}")
    omax = (f"{max(c.max_abs for c in r.outputs):11.2e} {max(c.score for c in r.outputs):9.2e}"
            if r.outputs else f"{'-':>11} {'-':>9}")
    judges = sorted({c.judge for c in r.outputs + r.grads})
    lines = [f"{r.model[:_MODEL_W]:<{_MODEL_W}} {r.dtype:<8} {r.mode:<5} {omax} "
             f"{gmax} {seconds:5.1f}s  {verdict}{where}" + (f"  [judge: {'+'.join(judges)}]" if judges else "")]
    lines += [f"    warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def logits_option(given: list[str] | None):
    """check()'s / verify()'s ``logits`` from ``--logits PATH`` (repeatable; ``--logits none``: no
    leaf is logits): None (infer) when not given."""
    if not given:
        return None
    return () if given == ["none"] else tuple(given)


def check_options(args: argparse.Namespace) -> CheckOptions:
    """What every check of this command runs with (dtype, train mode and the pair's facts are
    set per job)."""
    from parity.pair import CheckOptions  # torch and JAX load with the first check, not with the CLI

    return CheckOptions(grads=not args.no_grads, layers=not args.no_layers, rtol=args.rtol, atol=args.atol,
                        precision=args.precision, device=args.device, seed=args.seed,
                        reference="float64" if args.fp64_reference else None, data_parallel=args.data_parallel,
                        lint=not args.no_lint, strict=args.strict, logits=logits_option(args.logits),
                        spill=args.spill)


def _jobs(args: argparse.Namespace):
    """(label, thunk) per check to run; thunk(progress) -> Report."""
    from parity.checker import check

    base = check_options(args)
    batch = args.batch or 2 * (args.data_parallel or 1)
    if args.torch or args.flax or args.input_shape or args.example_input:
        refuse_models_with_own_pair(args, args.models, "MODEL", "MODEL names")
        own = own_pair(args)
        for dtype in args.dtype or ["float32"]:
            o = replace(base, dtype=dtype, train=args.train, **own.facts())
            yield f"{own.name} {dtype}", lambda say, o=o: check(own.torch_model, own.flax_model, own.example_input, o,
                                                               name=own.name, progress=say)
        return
    pairs = select(args.models or ["all"])
    for pair in pairs:
        config = pair.config(args.size)
        for dtype in args.dtype or ["float32", "float64"]:
            for train in pair.modes(config):
                def job(say, pair=pair, config=config, dtype=dtype, train=train):
                    torch_model, flax_model = pair.build(config, seed=args.seed)
                    x = pair.example_input(config, batch=batch, seed=args.seed)
                    o = replace(base, dtype=dtype, train=train, input_layout=pair.input_layout,
                                output_layout=pair.out_layout(), train_kwarg=pair.train_kwarg)
                    return check(torch_model, flax_model, x, o, name=pair.name, progress=say)
                yield f"{pair.name} {dtype} {'train' if train else 'eval'}", job


def writable(path: str, flag: str) -> None:
    """SetupError unless ``path`` can be written: checked before the checks run, so a typo in an
    output path costs one line at once rather than the whole run. Probed by creating (and
    removing) a file beside it, since permission bits do not tell root or read-only mounts."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise SetupError(f"{flag} {path!r} is a directory; give a file path")
    if not parent.exists():
        raise SetupError(f"{flag} {path!r}: directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise SetupError(f"{flag} {path!r}: {str(parent)!r} is not a directory")
    probe = parent / f".{p.name}.parity-probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SetupError(f"{flag} {path!r}: cannot write in {str(parent)!r} ({exc.strerror or exc})") from None


def write_atomic(path: str, text: str) -> None:
    # Written beside the target and renamed over it: an interrupted write leaves no half file.
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _processes(args: argparse.Namespace) -> int | None:
    """--processes N: this command again as N processes of one jax.distributed job on localhost
    (parity.sharding.launch), the data-parallel mesh spanning their devices; its exit code. With
    --coordinator (a process of such a job, or a host of a multi-host slice): join the job before
    JAX initialises, and None (run the checks here)."""
    if args.processes is not None and args.processes > 1:
        if not args.data_parallel:
            raise SetupError("--processes needs --data-parallel N (the mesh of N devices spans the processes)")
        from parity.sharding import launch

        return launch(args.argv, args.processes, args.data_parallel)
    if args.coordinator:
        from parity.sharding import join

        join(args.coordinator, args.num_processes, args.process_id)
    return None


def run(args: argparse.Namespace) -> int:
    if (args.rtol is None) != (args.atol is None):
        return fail("--rtol and --atol must be given together")
    try:
        code = _processes(args)
    except UsageError as exc:
        return fail(str(exc))
    if code is not None:
        return code
    if args.data_parallel and not args.coordinator:  # before JAX initialises: on CPU the N devices are simulated
        from parity.data_parallel import request_cpu_devices
        request_cpu_devices(args.data_parallel)
    lead = not args.process_id  # of a job's processes, 0 alone writes the files (all compute the same report)
    try:
        for flag, path in (("--json", args.json), ("--plot", args.plot)):
            if path and lead:
                writable(path, flag)
    except SetupError as exc:
        return fail(str(exc))
    try:
        jobs = list(_jobs(args))
    except (SetupError, KeyError) as exc:
        return fail(exc.args[0] if isinstance(exc, KeyError) else str(exc))
    header = (f"{'model':<{_MODEL_W}} {'dtype':<8} {'mode':<5} {'out max_abs':>11} {'out score':>9} "
              f"{'grad max_abs':>12} {'grad score':>9} {'time':>6}  result")
    print(header)
    print("-" * len(header), flush=True)
    reports = []
    for i, (label, job) in enumerate(jobs, 1):
        start = time.perf_counter()

        def say(msg: str, label=label, i=i) -> None:
            if not args.quiet:
                print(f"[{i}/{len(jobs)}] {label}: {msg} ({time.perf_counter() - start:.1f}s)",
                      file=sys.stderr, flush=True)

        try:
            report = job(say)
        except Exception as exc:  # a pair that cannot even be run (port refuses, shapes) is setup
            if os.environ.get("PARITY_DEBUG"):
                raise
            return fail(f"{label}: {type(exc).__name__}: {exc} (PARITY_DEBUG=1 for the traceback)")
        reports.append(report)
        print(summary_line(report, time.perf_counter() - start), flush=True)
    failed = [r for r in reports if r.verdict == "FAIL"]
    invalid = [r for r in reports if r.verdict == "INVALID"]
    inconclusive = [r for r in reports if r.verdict == "INCONCLUSIVE"]
    for r in reports if args.full else failed + invalid + inconclusive:
        print()
        print(r)
    if args.json and lead:
        from parity.report import dumps

        payload = [r.to_dict() for r in reports]
        write_atomic(args.json, dumps(payload[0] if len(payload) == 1 else payload))
    if args.plot and lead:
        from parity.plot import plot_layers

        for r in reports:
            if r.layers:
                plot_layers(r, _plot_path(args.plot, r, len(reports) > 1))
    result = ", ".join(f"{len(rs)} {word}" for rs, word in ((failed, "FAILED"), (invalid, "INVALID"),
                                                            (inconclusive, "INCONCLUSIVE")) if rs)
    print(f"\n{result or 'all pass'} (score = worst error over its allowance, <= 1 passes; judges: "
          "'reference' = measured noise against a float64 run, 'table' = elementwise rtol/atol; "
          f"JAX matmul precision {args.precision!r}, torch TF32 {'on' if args.precision != 'highest' else 'off'})")
    if invalid and not failed:
        print("INVALID: NaN on both sides of a compared tensor; the comparison proves nothing either way (exit 3)")
    if inconclusive and not failed and not invalid:
        print("INCONCLUSIVE: a tensor passed only under the table's atol with no measured noise behind it; "
              "see the warning of each check for what is missing (exit 4)")
    return 1 if failed else (3 if invalid else (4 if inconclusive else 0))


def fail(message: str) -> int:
    print(f"parity: error: {message}", file=sys.stderr)
    return 2
