"""What a golden bundle costs in memory: ``parity.record`` (torch side) and ``parity.verify``
(Flax side), each in a fresh process, against the targets of the golden-bundle design.

    record: peak RSS growth <= 1.3 x the model's bytes + the bundle's bytes on disk
    verify: peak RSS growth <= 1.3 x the model's bytes + the recorded tensors it judges
            (run.safetensors, layers.safetensors) + the compile

The compile's share is measured, not guessed: a ``compile`` run lowers and compiles the twin's
jitted forward/VJP in float32 and float64 (what verify compiles) on abstract inputs, nothing
else, and its growth is the compile term of verify's budget.
The verify and compile processes run as on a machine without torch: torch is not found there
(``parity.golden.hide_torch``, as tests/no_torch does for the torch-free tests), and the table says so. Wall time and peak RSS growth are measured
after the imports and the model build (parity.benchmark.rss). Workloads: Hugging Face
GPT2LMHeadModel (tied LM head) built from a config, random init, never from the hub:
``gpt2-tiny`` (2 layers of 32, batch 2 x 16, also with per-layer rows), ``gpt2-medium``
(355M parameters: 24 layers of 1024, 16 heads; batch 1 x 128, no per-layer rows) and
``gpt2-8x1024`` (its first 8 layers: 153M parameters, the same batch).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from parity.benchmark.rss import in_fresh_process, measured, peak_mib, rss_mib

SLACK = 1.3  # the design's allowance over the model's bytes
GPT2 = {  # (GPT2Config arguments, batch, tokens, per-layer rows measured too)
    "gpt2-tiny": (dict(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16), 2, 16, True),
    "gpt2-medium": (dict(n_embd=1024, n_layer=24, n_head=16), 1, 128, False),  # vocab 50257, 1024 positions
    # gpt2-medium's width and vocabulary at a third of its depth (153M parameters): its record and
    # verify fit beside other work on a shared 24 GiB machine, and its attention weight gradients
    # need the twin's own noise as gpt2-medium's do (docs/golden.md, "Memory")
    "gpt2-8x1024": (dict(n_embd=1024, n_layer=8, n_head=16), 1, 128, False),
}
KINDS = ("record", "verify", "compile")


@dataclass
class GoldenCost:
    workload: str
    kind: str  # record, verify, compile; "+layers" with per-layer rows
    wall_s: float
    peak_rss_growth_mib: float
    model_mib: float  # parameter bytes (the tied LM head once)
    recorded_mib: float  # record: the bundle on disk; verify: the tensors it judges
    verdict: str = ""
    torch_imported: bool = False
    # (step, RSS growth MiB when it starts, peak growth MiB until then): where the peak is reached
    steps: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # verify: the comparisons that failed, as the report prints them


class _Steps:
    """parity.record / parity.verify's progress callback: the RSS and peak growth at each step."""

    def __init__(self):  # made just before the measured region starts
        self.base, self.steps = rss_mib(), []

    def __call__(self, msg: str) -> None:
        self.steps.append((msg, round(rss_mib() - self.base), round(peak_mib() - self.base)))


def _config(workload: str):
    import transformers

    return transformers.GPT2Config(**GPT2[workload][0])


def _inputs(workload: str):
    import torch

    from parity import Inputs

    cfg, (_, n, t, _) = _config(workload), GPT2[workload]
    ids = torch.randint(0, cfg.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[-1, t - 2:] = 0  # padding: the mask matters
    return Inputs(ids, attention_mask=mask, position_ids=torch.arange(t)[None].repeat(n, 1))


def _twin(workload: str):
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2LMHeadModule

    return FlaxGPT2LMHeadModule(_config(workload))


def _mib(path: Path, names=None) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if names is None or f.name in names) / 2 ** 20


def _record(workload: str, bundle: Path, layers: bool) -> GoldenCost:
    import jax
    import torch
    import transformers

    import parity
    import parity.golden._record  # noqa: F401 -- every import done before the clock starts

    jax.block_until_ready(jax.jit(lambda a: a + 1)(jax.numpy.zeros(2)))
    torch.manual_seed(0)
    tm = transformers.GPT2LMHeadModel(_config(workload)).eval()
    x = _inputs(workload)
    model_mib = sum(p.numel() * p.element_size() for p in tm.parameters()) / 2 ** 20  # unique: tied once
    steps = _Steps()
    _, wall, growth = measured(lambda: parity.record(tm, x, bundle, layers=layers, name=workload, progress=steps))
    return GoldenCost(workload, "record", wall, growth, model_mib, _mib(bundle), torch_imported=True,
                      steps=steps.steps)


def _verify(workload: str, bundle: Path, layers: bool) -> GoldenCost:
    import jax

    import parity
    import parity.golden._verify  # noqa: F401

    jax.block_until_ready(jax.jit(lambda a: a + 1)(jax.numpy.zeros(2)))
    fm = _twin(workload)
    model_mib = _mib(bundle, {"weights.safetensors"})
    steps = _Steps()
    report, wall, growth = measured(lambda: parity.verify(bundle, fm, layers=layers, progress=steps))
    return GoldenCost(workload, "verify", wall, growth, model_mib, _mib(bundle, {"run.safetensors", "layers.safetensors"}),
                      report.verdict, "torch" in sys.modules, steps.steps,
                      [str(c) for c in report.outputs + report.grads if not c.ok][:10])


def _compile(workload: str, bundle: Path) -> GoldenCost:
    """Lower and compile what verify compiles (forward/VJP in float32 and float64) on abstract
    variables and inputs: verify's compile term, with no weights and no recorded tensors."""
    import jax
    import jax.numpy as jnp


    jax.block_until_ready(jax.jit(lambda a: a + 1)(jax.numpy.zeros(2)))
    fm = _twin(workload)
    _, n, t, _ = GPT2[workload]
    ids = jax.ShapeDtypeStruct((n, t), jnp.int32)
    abstract = jax.eval_shape(lambda: fm.init(jax.random.PRNGKey(0), jnp.zeros((n, t), jnp.int32),
                                              jnp.ones((n, t), jnp.int32), jnp.zeros((n, t), jnp.int32)))

    def compile_all():
        for dt in (jnp.float32, jnp.float64):
            with jax.enable_x64(dt == jnp.float64):
                v = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dt), abstract)

                def loss(v, ids, mask, pos):
                    out = fm.apply(v, ids, mask, pos)
                    return jnp.sum(out[0].astype(dt))

                jax.jit(jax.value_and_grad(loss)).lower(v, ids, ids, ids).compile()

    _, wall, growth = measured(compile_all)
    return GoldenCost(workload, "compile", wall, growth, _mib(bundle, {"weights.safetensors"}), 0.0,
                      torch_imported="torch" in sys.modules)


def child(workload: str, kind: str, bundle: str) -> GoldenCost:
    """One measurement in this process (called in a fresh one)."""
    layers = kind.endswith("+layers")
    base = kind.split("+")[0]
    if base != "record":
        from parity.golden import hide_torch

        hide_torch()  # as on a JAX-only host
    if base == "record":
        cost = _record(workload, Path(bundle), layers)
    elif base == "verify":
        cost = _verify(workload, Path(bundle), layers)
    else:
        cost = _compile(workload, Path(bundle))
    cost.kind = kind
    return cost


def measure(workloads: list[str], work: str | None = None) -> list[GoldenCost]:
    """Per workload: record, then verify of that bundle, then the compile alone, each in a fresh
    process, one after another (with "+layers" twice more where the workload says so). The bundles
    go to a temporary directory under ``work`` and are removed."""
    unknown = [w for w in workloads if w not in GPT2]
    if unknown:
        raise KeyError(f"unknown golden-cost workload(s) {unknown}; choose from {', '.join(GPT2)}")
    out = []
    for w in workloads:
        runs = [(k, False) for k in KINDS] + ([("record", True), ("verify", True)] if GPT2[w][3] else [])
        tmp = Path(tempfile.mkdtemp(prefix="golden-cost.", dir=work))
        try:
            for kind, layers in runs:
                bundle = tmp / ("layers" if layers else "plain")
                name = kind + ("+layers" if layers else "")
                out.append(GoldenCost(**in_fresh_process("parity.benchmark.golden_cost", [w, name, str(bundle)])))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def budget_mib(c: GoldenCost, compile_mib: float = 0.0) -> float:
    """The design's target for a run's peak RSS growth (MiB)."""
    return SLACK * c.model_mib + c.recorded_mib + (compile_mib if c.kind.startswith("verify") else 0.0)


def table(costs: list[GoldenCost]) -> str:
    """Markdown: each run's wall and peak RSS growth against its target."""
    compiles = {c.workload: c.peak_rss_growth_mib for c in costs if c.kind == "compile"}
    lines = ["| workload | run | wall s | peak RSS growth MiB | model MiB | recorded MiB | target MiB | "
             "x target | x model | verdict | torch imported |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        if c.kind == "compile":
            target, ratio = "", ""
        else:
            b = budget_mib(c, compiles.get(c.workload, 0.0))
            target, ratio = f"{b:.0f}", f"{c.peak_rss_growth_mib / b:.2f}"
        lines.append(f"| {c.workload} | {c.kind} | {c.wall_s:.1f} | {c.peak_rss_growth_mib:.0f} | {c.model_mib:.1f} | "
                     f"{c.recorded_mib:.1f} | {target} | {ratio} | {c.peak_rss_growth_mib / c.model_mib:.2f} | "
                     f"{c.verdict} | {'yes' if c.torch_imported else 'no'} |")
    return "\n".join(lines)


def write(costs: list[GoldenCost], out: Path) -> str:
    """The table, also written to ``out``/golden_cost.md and .json (with the budgets)."""
    text = table(costs)
    out.mkdir(parents=True, exist_ok=True)
    compiles = {c.workload: c.peak_rss_growth_mib for c in costs if c.kind == "compile"}
    rows = [{**asdict(c), "target_mib": None if c.kind == "compile" else budget_mib(c, compiles.get(c.workload, 0.0))}
            for c in costs]
    (out / "golden_cost.md").write_text(text + "\n")
    (out / "golden_cost.json").write_text(json.dumps(rows, indent=1) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.benchmark.golden_cost", description=__doc__)
    ap.add_argument("--child", nargs=3, metavar=("WORKLOAD", "KIND", "BUNDLE"), help=argparse.SUPPRESS)
    ap.add_argument("workloads", nargs="*", default=["gpt2-tiny"])
    ap.add_argument("--out", type=Path, help="write golden_cost.json/.md here")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(asdict(child(*args.child))))
        return 0
    costs = measure(args.workloads, work=os.environ.get("TMPDIR"))
    print(write(costs, args.out) if args.out else table(costs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
