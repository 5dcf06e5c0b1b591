"""What a check costs against the floor: the runs its judge needs, each once.

floor: the port (one plan, the variables), torch forward/backward in the check's dtype and in
float64 (both kept alive), and the twin's jitted forward/VJP including its compile. Each run of
the benchmark is a fresh process (``python -m parity.benchmark.check_cost --child ...``): wall
time and peak RSS growth are measured after the models are built and the imports done (the
kernel's peak-RSS mark is reset there through /proc/self/clear_refs), so a figure is that run's
own. Workloads: a registry pair (its "full" config) and Hugging Face BertModel built from a
config (random init, never from the hub): ``tiny`` (2 layers of 32) or ``base`` (BERT-base, 110M
parameters), ids + mask at batch 2 x 128; and HF GPT-2 with its LM head as
parity.benchmark.golden_cost builds it (``gpt2-tiny``, ``gpt2-8x1024``, ``gpt2-medium``: 355M).

floor-own: the floor plus the twin's own float64 forward/VJP with its compile, which the judge
also runs when a tensor does not pass on torch's noise alone (the twin's own rounding noise:
BERT's attention value/output kernels have gradient rows that are rounding noise on both sides).
Whether a check needed it is in its report (``own_noise`` below: the check's warnings say so).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace

from parity.benchmark.rss import in_fresh_process, measured

KINDS = ("floor", "floor-own", "check", "check-layers")
BERT = {"tiny": dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256),
        "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
        "base": dict()}  # transformers' BertConfig defaults are BERT-base


@dataclass
class Cost:
    workload: str
    kind: str
    wall_s: float
    peak_rss_growth_mib: float
    model_mib: float
    verdict: str = ""
    own_noise: bool = False  # a check: the judge ran the twin's own float64 run
    runs: int = 1  # fresh processes measured: wall and peak RSS growth are the least of them


def _build(workload: str):
    """(torch module, Flax module, example input, check options as keywords)."""
    import torch

    if workload.startswith("bert-"):
        import transformers
        from transformers.models.bert.modeling_flax_bert import FlaxBertModule

        from parity import Inputs

        cfg = transformers.BertConfig(**BERT[workload.split("-", 1)[1]])
        torch.manual_seed(0)
        tm = transformers.BertModel(cfg).eval()
        ids = torch.randint(3, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 128, dtype=torch.long)
        mask[1, 100:] = 0
        x = Inputs(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                   position_ids=torch.arange(128)[None].repeat(2, 1), flax_only=dict(head_mask=None))
        return tm, FlaxBertModule(cfg), x, {}
    if workload.startswith("gpt2-"):  # GPT-2 with its LM head (tied), as parity.benchmark.golden_cost builds it
        import transformers

        from parity.benchmark import golden_cost

        torch.manual_seed(0)
        tm = transformers.GPT2LMHeadModel(golden_cost._config(workload)).eval()
        return tm, golden_cost._twin(workload), golden_cost._inputs(workload), {}
    from parity.registry import PAIRS

    pair = PAIRS[workload]
    cfg = pair.full()
    tm, fm = pair.build(cfg)
    return tm, fm, pair.example_input(cfg), dict(input_layout=pair.input_layout, output_layout=pair.out_layout())


def _floor(tm, fm, x, opts: dict, own: bool = False) -> str:
    """The runs the judge needs, each once, through the engine: port, torch in float32 and
    float64 (both alive), the twin's jitted forward/VJP with its compile; with ``own`` the
    twin's float64 forward/VJP too (its compile included), as the judge's own-noise run makes it."""
    import jax

    from parity.checker import _flax_values, run_pair
    from parity.numerics import pinned
    from parity.pair import CheckOptions, prepare

    o = CheckOptions(**opts)
    with pinned(precision="highest", tf32=False):
        pair = prepare(tm, fm, x, o, share_weights=True)  # as parity.check prepares its pair
        run = run_pair(pair, o, layers=False, say=lambda m: None)  # torch float32, the twin's jit + VJP
        jax.block_until_ready(run.flax.outputs)
        with jax.enable_x64(True):
            t64, _ = pair.cast("float64", flax=False).run_torch(grads=True, cotangents=run.torch.cotangents)
            if own:
                f64 = _flax_values(run, "float64")
                del f64
    del t64
    return "floor"


def child(workload: str, kind: str) -> Cost:
    """One measurement in this process (called in a fresh one)."""
    import jax

    import parity
    import parity.checker  # noqa: F401 -- every import done, and the backend up, before the clock starts

    jax.block_until_ready(jax.jit(lambda a: a + 1)(jax.numpy.zeros(2)))
    tm, fm, x, opts = _build(workload)
    model_mib = sum(p.numel() * p.element_size() for p in tm.parameters()) / 2 ** 20
    if kind.startswith("floor"):
        verdict, wall, growth = measured(lambda: _floor(tm, fm, x, opts, own=kind == "floor-own"))
        return Cost(workload, kind, wall, growth, model_mib, verdict)
    reports = []

    def run():
        reports.append(parity.check(tm, fm, x, layers=kind == "check-layers", **opts))
        return reports[-1].verdict
    verdict, wall, growth = measured(run)
    own = any("own rounding noise" in c.note for c in reports[0].outputs + reports[0].grads)
    return Cost(workload, kind, wall, growth, model_mib, verdict, own)


def measure(workloads: list[str], kinds: tuple[str, ...] = KINDS, repeat: int = 1) -> list[Cost]:
    """Each (workload, kind) in ``repeat`` fresh processes, one after another: the least wall time
    and the least peak RSS growth of them (on a shared or memory-compacting VM one run's wall
    varies by a third; the least is the cost without the interference). A run that fails (the OOM
    killer's SIGKILL included) is a row saying so, and the others still run."""
    out = []
    for w in workloads:
        for k in kinds:
            try:
                costs = [Cost(**in_fresh_process("parity.benchmark.check_cost", [w, k])) for _ in range(repeat)]
            except RuntimeError as exc:
                out.append(Cost(w, k, float("nan"), float("nan"), float("nan"), f"failed: {_why(str(exc))}"))
                continue
            out.append(replace(costs[0], wall_s=min(c.wall_s for c in costs), runs=len(costs),
                               peak_rss_growth_mib=min(c.peak_rss_growth_mib for c in costs)))
    return out


def _why(message: str) -> str:
    """One line for a child that failed: its exit status, or the last line of its stderr."""
    lines = [ln for ln in message.splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "unknown"


def table(costs: list[Cost]) -> str:
    """Markdown: each run's wall and peak RSS growth, and the check's ratios to the floor and (for
    a check whose judge ran the twin's own float64 run) to the floor with that run."""
    floors = {(c.workload, c.kind): c for c in costs if c.kind.startswith("floor")}
    lines = ["| workload | run | wall s | x floor | x floor-own | peak RSS growth MiB | x floor | x floor-own "
             "| x model | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(a: float, floor: Cost | None, attr: str) -> str:
        b = getattr(floor, attr) if floor else 0.0
        return f"{a / b:.2f}" if b > 0 and a == a else ""  # a == a: not a failed run's NaN

    def num(a: float, fmt: str) -> str:
        return format(a, fmt) if a == a else ""
    for c in costs:
        f, fo = floors.get((c.workload, "floor")), floors.get((c.workload, "floor-own"))
        fo = fo if c.own_noise or c.kind == "floor-own" else None
        lines.append(f"| {c.workload} | {c.kind}{' (own noise run)' if c.own_noise else ''} | {num(c.wall_s, '.1f')} | "
                     f"{ratio(c.wall_s, f, 'wall_s')} | {ratio(c.wall_s, fo, 'wall_s')} | "
                     f"{num(c.peak_rss_growth_mib, '.0f')} | {ratio(c.peak_rss_growth_mib, f, 'peak_rss_growth_mib')} | "
                     f"{ratio(c.peak_rss_growth_mib, fo, 'peak_rss_growth_mib')} | "
                     f"{num(c.peak_rss_growth_mib / c.model_mib, '.1f')} | {c.verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.benchmark.check_cost", description=__doc__)
    ap.add_argument("--child", nargs=2, metavar=("WORKLOAD", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("workloads", nargs="*", default=["vit", "bert-tiny"])
    ap.add_argument("--out", help="write the costs as JSON here")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                    help="the runs to measure (default: all; the ratios need the floors)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="fresh processes per run; the table shows the least wall and RSS of them")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(asdict(child(*args.child))))
        return 0
    costs = measure(args.workloads, tuple(args.kinds), max(1, args.repeat))
    print(table(costs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(c) for c in costs], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
