"""parity.verify: judge a Flax twin against a golden bundle, without torch.

The weights are ported by the state-dict path of weight_port (layer kinds read off the Flax twin,
the torch side's call order and flatten order from the bundle), the twin runs forward and VJP
with the recorded cotangents on the one Flax engine (parity.runtime), and every tensor is judged
by parity.judge exactly as parity.check judges it (parity.judge.ModelJudge for outputs and
gradients, with the twin's own noise run only for the tensors that need it; parity.layers for the
per-layer rows), into the same Report. The bundle's judged tensors are read when the judge asks
and every tensor is freed once judged (docs/golden.md, "Memory"). Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np

from parity._logits import judge_logits, logit_paths
from parity.golden._bundle import Bundle, BundleError, Recorded, decode_tree, read_bundle
from parity.options import Options
from parity.judge import ModelJudge, Table, measured, worst_of
from parity.layers import RowJudge, analyze_layers, first_divergence
from parity.report import Report
from parity.runtime import (FlaxTwin, flax_inputs, forward_backward, match_outputs, output_shapes,
                            param_grads_for)
from parity.runtime.layouts import LayoutSpec, declared, output_layouts
from parity.sharding import Placement, ShardingError, ShardOptions
from parity.tolerances import FORWARD, GRAD, REFERENCE, tolerance_for
from weight_port import Inputs, PortError, bind_keywords
from weight_port.layout import AS_IS, to_flax_layout, to_torch_layout
from weight_port import PortPlan, build_plan


@dataclass
class RecordedCall:
    """One torch module call as the bundle holds it: what parity.layers reads of a TorchCall
    (its values, names and order), without the torch module and its autograd graph."""

    path: str
    call: int
    start: int
    torch_type: str
    inputs: dict[str, None]
    input_values: dict[str, np.ndarray] = field(default_factory=dict)
    output_values: dict[str, np.ndarray] = field(default_factory=dict)
    input_grads: dict[str, np.ndarray] = field(default_factory=dict)
    output_grads: dict[str, np.ndarray] = field(default_factory=dict)
    lower_precision: str = ""
    # No autograd graph in a bundle: parity.layers' "boundary differs" test, which follows it,
    # finds nothing to follow and judges every layer by its own isolated error.
    outputs: dict = field(default_factory=dict)
    arrived: dict = field(default_factory=dict)


class RecordedLayouts:
    """The activation layouts the torch side resolved (parity.runtime.ActivationLayouts), read back."""

    def __init__(self, meta: list[dict]):
        self.inputs = {(m["path"], m["call"]): dict(m.get("in_layouts", {})) for m in meta}
        self.outputs = {(m["path"], m["call"]): dict(m.get("out_layouts", {})) for m in meta}
        self.declared = {(m["path"], m["call"], p) for m in meta for p in m.get("declared", ())}

    def is_declared(self, path: str, call: int, leaf: str) -> bool:
        return (path, call, leaf) in self.declared


def _calls(bundle: Bundle, group: str) -> list[RecordedCall]:
    meta = bundle.manifest["calls"].get(group, [])
    values = bundle.group("layers.safetensors", group)
    calls = [RecordedCall(m["path"], m["call"], m["start"], m["type"], dict.fromkeys(m["inputs"]),
                          lower_precision=m.get("lower_precision", "")) for m in meta]
    kinds = {"in": "input_values", "out": "output_values", "gin": "input_grads", "gout": "output_grads"}
    for k, v in values.items():
        i, kind, leaf = k.split("|", 2)
        getattr(calls[int(i)], kinds[kind])[leaf] = v
    return calls


@dataclass
class _Side:
    """One group of recorded model-level tensors (outputs, input and parameter gradients), read
    from the bundle when asked (Recorded: never kept, so what has been judged is not held)."""

    outputs: Recorded
    input_grads: Recorded
    param_grads: Recorded
    tensors: Recorded  # all three by the ModelJudge keys (``out...``, ``input[...]``, ``param:<name>``)


def _judge_key(rest: str) -> str | None:
    kind, path = rest.split("|", 1)
    return {"out": path, "igrad": path, "pgrad": "param:" + path}.get(kind)


def _side(bundle: Bundle, group: str) -> _Side | None:
    if not any(k.startswith(group + "|") for k in bundle.keys("run.safetensors")):
        return None
    return _Side(*(bundle.recorded("run.safetensors", group, kind) for kind in ("out", "igrad", "pgrad")),
                 bundle.recorded("run.safetensors", group, rename=_judge_key))


@dataclass
class _FlaxSide:
    """The twin run once: its model-level tensors named and laid out as torch's (ModelJudge keys)."""

    outputs: dict[str, np.ndarray]  # Flax layout, by torch path
    tensors: dict[str, np.ndarray]  # torch layout, by ModelJudge key
    input_grads: dict[str, np.ndarray]  # Flax layout
    param_grads: dict[str, np.ndarray]  # torch names and layout

    def drop(self, key: str) -> None:
        """Free a judged gradient (its outputs stay: the logit metrics read them after)."""
        if key in self.outputs:
            return
        self.tensors.pop(key, None)
        self.input_grads.pop(key, None)
        self.param_grads.pop(key.removeprefix("param:"), None)


def _run_twin(twin, variables, f_args, cots, to_t, out_layouts, in_layouts, plan: PortPlan, dtype=None,
              keys=None) -> _FlaxSide:
    """The twin's forward and VJP on ``variables`` and inputs cast to ``dtype`` (as they are when
    None), its tensors in torch names and layout; ``keys``: keep only those (the own-noise run of
    the tensors that need it)."""
    def cast(a):
        return jnp.asarray(a, dtype) if dtype is not None and hasattr(a, "dtype") and jnp.issubdtype(
            a.dtype, jnp.floating) else a

    to_f = {tp: fp for fp, tp in to_t.items()}
    f_cots = {to_f[p]: cast(to_flax_layout(c, out_layouts[p], p)) for p, c in cots.items()}
    wanted = None
    if keys is not None:  # only the layers of the wanted gradients: XLA computes no other
        plan, wanted = param_grads_for(plan, keys)
    f = forward_backward(twin, jax.tree_util.tree_map(cast, variables), jax.tree_util.tree_map(cast, f_args), f_cots,
                         param_grads=wanted)
    # the variables as cast (a float64 run's: twice the model's bytes) are not needed past the run
    f.new_variables = None
    outs = {to_t[p]: v for p, v in f.outputs.items()}
    named = plan.to_torch({"params": f.param_grads}, collections=("params",))
    f.param_grads = None
    tensors = {p: to_torch_layout(np.asarray(v), out_layouts[p]) for p, v in outs.items()}
    tensors.update({p: to_torch_layout(np.asarray(g), in_layouts[p]) for p, g in f.input_grads.items()
                    if p in in_layouts})
    tensors.update({f"param:{n}": np.asarray(g) for n, g in named.items()})
    if keys is not None:
        keep = set(keys)
        tensors = {k: v for k, v in tensors.items() if k in keep}
        named = {n: g for n, g in named.items() if f"param:{n}" in keep}
    return _FlaxSide(outs, tensors, dict(f.input_grads), named)


def _recast(held: list, dtype) -> Mapping:
    """The variables tree in ``held`` (taken out of it) with every float leaf cast to ``dtype``,
    each old leaf released as soon as its cast exists: at most one leaf held in both dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(held.pop())
    for i in range(len(leaves)):
        a = leaves[i]
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
            leaves[i] = jnp.asarray(a, dtype)
        del a
    return jax.tree_util.tree_unflatten(treedef, leaves)


@dataclass(frozen=True)
class VerifyOptions(Options):
    """What ``parity.verify`` runs and how (the fields are verify()'s keywords; see its
    docstring). Frozen: the CLI builds one, a caller may pass one and override fields by keyword
    (``VerifyOptions.of``, parity.options). Torch-free, unlike parity.pair.CheckOptions beside
    which it would otherwise sit: verify runs where torch is not installed."""

    what = "verify option"

    input_layout: LayoutSpec = None
    layers: bool = True
    train_kwarg: str | None = None
    # Output leaves that are logits, as CheckOptions.logits (None infers, () declares none).
    logits: str | tuple[str, ...] | None = None
    mesh: object = None  # "data=2,model=4" or a jax.sharding.Mesh: a sharded verify
    shard: ShardOptions | None = None  # the sharding style and the user's rules (with mesh only)

    def __post_init__(self):
        if self.logits is not None and not isinstance(self.logits, str):
            object.__setattr__(self, "logits", tuple(self.logits))
        if self.shard is not None and self.mesh is None:
            raise ShardingError("shard= (a sharding style or rules) needs mesh=")


def verify(path, flax_module, options: VerifyOptions | None = None, *, variables: Mapping | None = None,
           progress: Callable[[str], None] | None = None, **option_fields) -> Report:
    """Judge ``flax_module`` (Linen or NNX) against the golden bundle at ``path`` (parity.record).

    options: a VerifyOptions; its fields may also be given as keywords, which win
    (``verify(path, twin, layers=False)``). The fields:

    input_layout: the twin's input layouts where they differ from the torch side's inference
    (as parity.check's). layers: the per-layer rows with the first divergence, when the bundle
    has them. train_kwarg: the twin's train-mode keyword (as parity.check's). logits: the output
    leaves that are logits, as parity.check's (default: inferred from a path ending in
    ``logits``): metrics in ``report.logits``, and the logit rule in a half-precision bundle,
    exactly as parity.check applies them. mesh ("data=2,model=4" or a jax.sharding.Mesh): the
    twin's variables are ported straight into their shardings (parity.sharding; ``shard``, a
    ShardOptions, picks the style and adds regex rules), the inputs split over "data", and the
    same judging runs on the sharded run; ShardingError (exit 2) for a mesh or a rule that cannot
    be used, or ``shard`` without ``mesh``.

    The bundle's torch weights are ported into the twin (or ``variables`` are used as given), the
    twin runs forward and VJP with the recorded cotangents on the recorded inputs, and outputs,
    input and parameter gradients and the per-layer rows are judged as parity.check judges them.
    A bundle that is damaged or does not fit the twin raises BundleError (never a verdict).
    progress: called with short status lines.
    """
    o = VerifyOptions.of(options, **option_fields)
    say = progress or (lambda msg: None)
    placement = None if o.mesh is None else Placement(o.mesh, o.shard)
    bundle = read_bundle(path)
    x64 = jax.enable_x64(True) if bundle.manifest["dtype"] == "float64" else contextlib.nullcontext()
    with jax.default_matmul_precision("highest"), x64:
        return _verify(bundle, flax_module, variables, o, say, placement)


def _port(bundle: Bundle, flax_module, args: tuple, in_layouts: dict, variables, placement=None):
    plan_in = bundle.manifest["plan"]
    positional = [in_layouts.get(f"input[{i}]", AS_IS) for i in range(len(args))]
    weights = bundle.tensors("weights.safetensors", keep=False)
    flatten = {p: tuple(s) if s else None for p, s in plan_in.get("flatten", {}).items()}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            plan = build_plan(None, flax_module, args, state=weights, input_layout=positional, flatten=flatten,
                              call_order=plan_in.get("call_order"), check_attributes="warn")
            if placement is not None:  # straight into their shardings, a layer at a time
                variables = placement.port(plan, weights) if variables is None else placement.place(plan, variables)
            elif variables is None:
                variables = plan.to_flax(weights)
        except ShardingError:  # a sharding rule that cannot be used (parity.sharding), by name
            raise
        except PortError as exc:
            raise BundleError(f"the bundle's weights do not fit this twin (another model?): {exc}".replace("\n", " ")
                              ) from None
        except Exception as exc:  # noqa: BLE001 -- the twin's abstract init refused the recorded inputs
            raise BundleError(f"the twin does not run on the bundle's inputs (another model?): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    notes = [f"weight port: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    # A tied tensor is stored once (an LM head tied to its embedding), so the plan from the weights
    # alone cannot see the tie: the recorded one makes the per-layer rows judge its gradient
    # whole-model (each layer sees one use of it), as parity.check's plan does.
    plan.tied = {**plan_in.get("tied", {}), **plan.tied}
    # The torch side's layer kinds against the rules the twin's classes chose: a Linear ported by
    # another kind's rule is a wrong port, whatever the shapes say.
    kinds = {e["path"]: e["kind"] for e in plan_in.get("modules", [])}
    for layer in plan.layers:
        want = kinds.get(layer.info.torch_path)
        if want and layer.rule.name and want != layer.rule.name:
            notes.append(f"torch {layer.info.torch_path} is a {want} but the twin's module is ported as "
                         f"{layer.rule.name}")
    return plan, variables, notes


def _bind_keywords(flax_module, args: tuple, keywords: dict | None, flax_only: Mapping[str, np.ndarray]):
    """(the twin, its positional inputs) with a recorded parity.Inputs call bound as parity.check
    binds it (weight_port.bind_keywords): the keyword inputs and the Flax-only constants (the
    run's ``main|flax_only`` group)."""
    if not keywords:
        return flax_module, args
    n = keywords["positional"]
    call = Inputs(*args[:n], **dict(zip(keywords["keys"], args[n:])),
                  flax_only=decode_tree(keywords["flax_only"], flax_only))
    _, flax_module, args = bind_keywords(None, flax_module, call)
    return flax_module, args


def _verify(bundle: Bundle, flax_module, variables, o: VerifyOptions, say, placement: Placement | None) -> Report:
    m = bundle.manifest
    dname, train = m["dtype"], m["train"]
    # the small groups of the run, kept; the judged tensors are read when the judge asks (_side)
    inputs = bundle.group("run.safetensors", "main", "input")
    cots = bundle.group("run.safetensors", "main", "cot")
    args = decode_tree(m["inputs"]["tree"], inputs)
    flax_module, args = _bind_keywords(flax_module, args, m["inputs"].get("keywords"),
                                       bundle.group("run.safetensors", "main", "flax_only"))
    in_layouts = dict(m["inputs"]["layouts"])
    if o.input_layout is not None:
        in_layouts.update(declared(o.input_layout, list(in_layouts), root="input", flag="--layout"))
    say("porting the bundle's weights")
    ours = variables is None
    plan, variables, notes = _port(bundle, flax_module, args, in_layouts, variables, placement)
    twin = FlaxTwin(flax_module, train=train, train_kwarg=o.train_kwarg,
                    train_mode_matters=m.get("train_mode_matters", True))
    f_args = flax_inputs(args, in_layouts)
    if placement is not None:
        f_args = placement.inputs(f_args)
    main = _side(bundle, "main")
    try:
        f_shapes = {p: s.shape for p, s in output_shapes(twin, variables, f_args).items()}
    except Exception as exc:  # noqa: BLE001 -- a twin that cannot take the recorded inputs
        raise BundleError(f"the twin does not run on the bundle's inputs (another model?): "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
    to_t = match_outputs(list(f_shapes), m["outputs"]["paths"])
    if to_t is None:
        raise BundleError(f"the twin's outputs {{{', '.join(f_shapes)}}} are not the bundle's "
                          f"{{{', '.join(m['outputs']['paths'])}}} (another model?)")
    logit_paths(m["outputs"]["paths"], o.logits)  # a declared path that names no output: stop before the runs
    producers = m["outputs"].get("producer_layouts", {})
    out_layouts = output_layouts(m["outputs"].get("output_layout"), {p: main.outputs.shape(p) for p in main.outputs},
                                 {to_t[p]: s for p, s in f_shapes.items()}, producers.get)
    say("flax forward/vjp")
    flax_main = _run_twin(twin, variables, f_args, cots, to_t, out_layouts, in_layouts, plan)
    prec, platform = "highest", jax.default_backend()
    report = Report(model=m["model"], dtype=dname, mode="train" if train else "eval", outputs=[],
                    env={"bundle": str(bundle.path), "recorded": m.get("env", {}), "jax": jax.__version__,
                         "jax_platform": platform, "jax_default_matmul_precision": prec}, warnings=notes)
    if placement is not None:
        report.env["sharding"] = placement.record()
        report.warnings += placement.summary()
    tf, tg = Table(tolerance_for(dname, FORWARD, prec, platform)), Table(tolerance_for(dname, GRAD, prec, platform))
    ref64 = tolerance_for("float64", REFERENCE)
    lower = m.get("lower_precision", {})
    dropped = any(getattr(layer.rule, "dropped", ()) for layer in plan.layers)
    with_layers = o.layers and m.get("layers") and "layers.safetensors" in m["files"]
    # The twin's variables after its main run: ours (ported here, not the caller's), unsharded and
    # with no rows to follow, the own-noise run is their last use, so it takes them over and casts
    # them a leaf at a time (the model held once, not once per dtype: 1.35 GiB of GPT-2-medium).
    held = [variables]
    consume = ours and not with_layers and placement is None
    del variables

    def run_twin(twin_, dtype, keys):
        vs = _recast(held, dtype) if consume else held[0]
        return _run_twin(twin_, vs, f_args, cots, to_t, out_layouts, in_layouts, plan, dtype, keys).tensors
    if dname == "float64":
        probe = _side(bundle, "probe")
        rule = measured(ref64, "float64", probe_dtype="float32", effective=lower.get("main") or None)
        if lower.get("main"):
            rule = replace(rule, own_everywhere=True)
        refs, probes = main.tensors, probe.tensors

        def own_noise(keys):  # the twin's float32 run against its float64 one (this run)
            say(f"flax float32 run (its own rounding noise) for {len(keys)} tensor(s)")
            own32 = run_twin(twin.computing_in("float32", dname), jnp.float32, keys)
            say("judging them again with the twin's own noise")
            return own32, {k: flax_main.tensors[k] for k in own32 if k in flax_main.tensors}
    else:
        ref = _side(bundle, "ref")
        rule = measured(tolerance_for(dname, REFERENCE, prec, platform), dname)
        if lower.get("ref") or dropped:  # as parity.check: float32 parts or tables the twin computes
            rule = replace(rule, own_everywhere=True)
        refs, probes = ref.tensors, None  # the probe is torch's own run: the recorded value judged
        report.reference = "float64"

        def own_noise(keys):  # this run against the twin's float64 run
            say(f"flax float64 run (its own rounding noise) for {len(keys)} tensor(s)")
            with jax.enable_x64(True):
                # truly float64, as parity.check's: a Linen dtype=float32 field cloned (FlaxTwin.computing_in)
                own64 = run_twin(twin.computing_in("float64", dname), jnp.float64, keys)
            say("judging them again with the twin's own noise")
            return {k: flax_main.tensors[k] for k in own64 if k in flax_main.tensors}, own64
    # the one mechanism of parity.check: the twin's own noise run only for the tensors that do not
    # pass on torch's alone, and every tensor freed once judged (the bundle's are read when asked)
    say("judging outputs and gradients on torch's noise")
    ModelJudge(rule, tf, tg, refs, probes, own_noise).fill(
        report, main, flax_main, out_layouts, in_layouts, frozen=set(m["plan"].get("frozen", ())),
        tied=m["plan"].get("tied", {}), release=flax_main.drop)
    # before the rows: the root row takes the whole-model verdicts
    report.outputs, report.logits, logit_notes = judge_logits(
        report.outputs, list(main.outputs), flax_main.tensors, main.outputs, dname, o.logits)
    report.warnings += logit_notes
    flax_main = None  # the rows run the twin again; nothing of this run is needed past here
    if with_layers:
        say("per-layer rows from the bundle")
        report.layers = _rows(bundle, twin, held[0], plan, f_args, cots, to_t, out_layouts, train, report, say,
                              main if dname == "float64" else ref)
        report.first_divergence, report.divergence_kind = first_divergence(report.layers)
    say("done")
    return report


def _rows(bundle: Bundle, twin, variables, plan: PortPlan, f_args, cots, to_t, out_layouts, train: bool,
          report: Report, say, truth: _Side):
    """The per-layer rows from the bundle, in float64 (a float32 bundle's rows were recorded in
    float64, with a float32 probe run measuring their noise), as parity.check's."""
    m = bundle.manifest
    if m["dtype"] == "float64":  # the run itself is the rows' run: its tables, its probe's gradients
        where = ("highest", jax.default_backend())
        probe_pgrads = _side(bundle, "probe").param_grads
    else:
        where = ()
        # read as each row asks and dropped after (Recorded): the probe's parameter gradients are
        # a float32 copy of the model's (GPT-2-medium: 1.4 GB), judged a layer at a time
        probe_pgrads = bundle.recorded("layers.safetensors", "probe_params")
    t64f, t64g = (Table(tolerance_for("float64", kind, *where)) for kind in (FORWARD, GRAD))
    probe_calls = {(c.path, c.call): c for c in _calls(bundle, "probe")}
    row_judge = RowJudge(t64f, t64g, tolerance_for("float64", REFERENCE), "float32", probe_calls, probe_pgrads)
    with jax.enable_x64(True):
        f64 = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
        rows_vars = jax.tree_util.tree_map(f64, variables)
        r_args = jax.tree_util.tree_map(f64, f_args)
        to_f = {tp: fp for fp, tp in to_t.items()}
        r_cots = {to_f[p]: jnp.asarray(to_flax_layout(c, out_layouts[p], p), jnp.float64) for p, c in cots.items()}
        # the rows run the twin as declared, as parity.check's rows do: own noise is measured
        # by the twin truly in float64 (computing_in) above, the rows judge what the port computes.
        # No whole-model parameter gradients: the rows take each layer's from its run alone (in
        # float64 they were twice the model's bytes, computed and never read).
        rows_flax = forward_backward(twin, rows_vars, r_args, r_cots, capture=True, param_grads=lambda path: False)
        return analyze_layers(_calls(bundle, "rows"), rows_flax, twin, rows_vars, plan,
                              RecordedLayouts(m["calls"]["rows"]), grads=True, train=train, rows=row_judge,
                              param_grads=truth.param_grads, progress=say,
                              root=(worst_of(report.outputs), worst_of(report.grads)))


__all__ = ["VerifyOptions", "verify"]
