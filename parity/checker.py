"""parity.check: run a torch module and its Flax twin on the same input, compare outputs and grads.

Gradients are of <output, cotangent> with one seeded random cotangent shared by both sides (a
plain sum would hide sign and permutation errors that cancel).
"""
from __future__ import annotations

import contextlib
from collections import ChainMap
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import Future
from dataclasses import dataclass, replace
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity._logits import judge_logits, logit_paths
from parity._heap import give_back
from parity._spill import Renamed, Spill, spill_wanted
from parity._threads import beside, settle
from parity.judge import ModelJudge, Table, failed_comparison, measured, reduce_probe, worst_of
from parity.layers import RowJudge, analyze_layers, first_divergence
from parity.lint import lint_traced, watch_forward
from parity.numerics import (REDUCED_FLOAT32_NOTE, jax_precision, numerics_env, pinned, precision_warnings,
                             reduced_float32)
from parity.pair import CheckOptions, PreparedPair, devices, prepare
from parity.report import Report
from parity.runtime import (ActivationLayouts, FlaxRun, TorchRun, forward_backward, input_paths, match_outputs,
                            output_layouts, output_shapes, param_grads_for, structure)
from parity.runtime.layouts import model_input_ids, split_output_spec
from parity.runtime.torch_runner import keystr
from parity.tolerances import FORWARD, GRAD, REFERENCE, tolerance_for
from weight_port import to_flax_layout, to_torch_layout

@dataclass
class CapturedRun:
    """Raw results of one forward + backward on both sides of a prepared pair (numpy; torch values
    in torch layout, Flax values in Flax layout): what ``capture`` returns and ``check`` judges.

    torch.calls / flax.calls (when captured with layers=True): every module call on each side,
    the input of parity.layers.isolated_layers with ``act_layouts`` (None without layers).
    """

    pair: PreparedPair
    torch: TorchRun
    flax: FlaxRun | None  # None when the output structures differ (nothing to compare leaf by leaf)
    f_p_grads: dict[str, np.ndarray]  # Flax param grads named and laid out as torch's
    act_layouts: ActivationLayouts | None
    structure_error: str | None = None

    # The pair's pieces, read through the run (every consumer of a run also needs them).
    plan = property(lambda self: self.pair.plan)
    twin = property(lambda self: self.pair.twin)
    variables = property(lambda self: self.pair.variables)
    torch_args = property(lambda self: self.pair.torch_args)
    flax_args = property(lambda self: self.pair.flax_args)
    in_layouts = property(lambda self: self.pair.in_layouts)
    out_layouts = property(lambda self: self.pair.out_layouts or {})
    output_map = property(lambda self: self.pair.output_map)
    torch_module = property(lambda self: self.pair.torch_module)
    notes = property(lambda self: self.pair.notes)


def run_pair(pair: PreparedPair, o: CheckOptions, *, layers: bool, say, watch: bool = False,
         cotangents: Mapping[str, np.ndarray] | None = None, flax_side: bool = True,
         ops: bool = False, free_weights: bool = False,
         param_grad_sink: Callable[[str, np.ndarray], None] | None = None) -> CapturedRun:
    """One forward + backward of both sides of ``pair`` (cotangents: torch's, by output path;
    default: seeded random); the first run also settles the output map and layouts the pair's
    casts share. flax_side=False: torch's side alone (``flax`` None until ``run_flax_side``), for a caller
    that needs the twin's side later (the rows' float64 run: after the model is judged). ops:
    torch's run records the torch functions its forward calls (``run.torch.ops``, for the lint).
    free_weights, param_grad_sink: PreparedPair.run_torch's."""
    say("torch forward/backward")
    t, args = pair.run_torch(grads=o.grads, capture=layers, cotangents=cotangents or None,
                             cotangent_seed=o.seed + 1, watch=watch, ops=ops, free_weights=free_weights,
                             param_grad_sink=param_grad_sink)
    module_paths = [p for p, _ in pair.torch_module.named_modules()]
    # output_layout entries naming a layer (by torch module path) are for its per-layer rows
    output_layout, layer_layouts = split_output_spec(o.output_layout, list(t.outputs), module_paths)
    acts = None
    if t.calls is not None:
        acts = ActivationLayouts(t.calls, model_input_ids(args, pair.in_layouts), t.aliases, layer_layouts)
    if pair.output_map is None:
        f_shapes = {p: s.shape for p, s in output_shapes(pair.twin, pair.variables, pair.flax_args).items()}
        to_t = match_outputs(list(f_shapes), list(t.outputs))
        if to_t is None:
            err = (f"output structures differ: torch {structure(t.raw_outputs)} vs Flax "
                   f"{'{' + ', '.join(f_shapes) + '}'}")
            return CapturedRun(pair, t, None, {}, None, err)

        def producer(path: str):
            if acts is None:  # only asked when the shapes fit both layouts: one more forward, hooked
                probe, probe_args = pair.run_torch(grads=False, capture=True)
                probe_acts = ActivationLayouts(probe.calls, model_input_ids(probe_args, pair.in_layouts),
                                               probe.aliases, layer_layouts)
                return probe_acts.of_tensor(probe.raw_outputs[path])
            return acts.of_tensor(t.raw_outputs[path])

        f_shapes = {to_t[p]: shape for p, shape in f_shapes.items()}
        pair.out_layouts = output_layouts(output_layout, {p: o_.shape for p, o_ in t.outputs.items()}, f_shapes,
                                          producer)
        pair.output_map = to_t
    run = CapturedRun(pair, t, None, {}, acts)
    if flax_side:
        run_flax_side(run, o.grads, layers=layers, say=say)
    return run


def run_flax_side(run: CapturedRun, grads: bool, *, layers: bool, say,
                  flax_param_grads: bool | list[str] = True) -> None:
    """The twin's forward and, with ``grads``, its VJP of ``run`` (made by run_pair with
    flax_side=False), with torch's cotangents: sets ``run.flax`` and ``run.f_p_grads``. The
    twin, variables and inputs are ``run.pair``'s. flax_param_grads=False: the VJP leaves
    the parameter gradients out (both empty): a run only its per-layer rows read; a list of
    ModelJudge keys: the gradients of those parameters alone (parity.runtime.param_grads_for)."""
    pair, t = run.pair, run.torch
    to_t = pair.output_map
    to_f = {tp: fp for fp, tp in to_t.items()}
    f_cots = ({to_f[p]: to_flax_layout(c, pair.out_layouts[p], p) for p, c in t.cotangents.items()}
              if grads else None)
    say("flax forward/vjp" + (" with every layer recorded" if layers else ""))
    plan, wanted = pair.plan, None if flax_param_grads else (lambda path: False)
    if isinstance(flax_param_grads, list) and f_cots is not None:
        plan, wanted = param_grads_for(pair.plan, flax_param_grads)
    f = forward_backward(pair.twin, pair.variables, pair.flax_args, f_cots, capture=layers, param_grads=wanted)
    f.outputs = {to_t[p]: v for p, v in f.outputs.items()}
    run.flax = f
    run.f_p_grads = (plan.to_torch({"params": f.param_grads}, collections=("params",))
                     if grads and flax_param_grads else {})


def capture(torch_module: torch.nn.Module, flax_module, example_input, options: CheckOptions | None = None, *,
            variables: Mapping | None = None, progress: Callable[[str], None] | None = None,
            **option_fields) -> CapturedRun:
    """One forward + backward of both sides, exactly as ``check`` runs them, without judging.

    Arguments as for ``check`` (example_input in torch layout, [N, C, H, W] for images; options
    as a CheckOptions and/or its fields as keywords). The torch module is copied and cast to
    ``dtype``; ``variables`` default to the port of that copy. layers=True records every module
    call on both sides (``CapturedRun.torch.calls``, ``.flax.calls``) for parity.layers.
    ``.flax`` is None when the output structures differ (``.structure_error`` says how). Numerics
    are the caller's: ``check`` runs the same capture under parity.numerics.pinned and
    jax.default_device(device), with x64 enabled for float64.
    """
    o = CheckOptions.of(options, **option_fields)
    say = progress or (lambda msg: None)
    pair = prepare(torch_module, flax_module, example_input, o, variables=variables, progress=say)
    return run_pair(pair, o, layers=o.layers, say=say)


def _dtype_warnings(run: CapturedRun, dname: str, user_variables: bool) -> list[str]:
    out = []
    for path, f in (run.flax.outputs.items() if run.flax else ()):
        if jnp.issubdtype(f.dtype, jnp.floating) and f.dtype.name != dname:
            out.append(f"Flax {path} is {f.dtype.name} but the check runs in {dname}: the Flax "
                       "module computes at a different precision (its dtype/param_dtype?)")
    if user_variables:
        leaves = jax.tree_util.tree_leaves(run.variables.get("params", {}))
        kinds = sorted({np.dtype(x.dtype).name for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)})
        if kinds and kinds != [dname]:
            out.append(f"the given Flax variables are {', '.join(kinds)} but the check runs in {dname}")
    return out


def _bad(value) -> str:
    """"NaN" / "Inf" when a float array holds one, else ""."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy() if value.is_floating_point() else None
    a = np.asarray(value) if value is not None else None
    if a is None or not jnp.issubdtype(a.dtype, jnp.floating):
        return ""
    a = np.asarray(a, dtype=np.float64)
    if np.isnan(a).any():
        return "NaN"
    return "" if np.isfinite(a).all() else "Inf"


def _first_nonfinite(run: CapturedRun, *, nan_only: bool = False, side: str | None = None) -> str | None:
    """Where a NaN (or, unless ``nan_only``, an Inf) first appears, in the order the values are
    made: inputs, each layer's output (torch, in execution order), the model outputs, Flax's layer
    outputs, then the gradients; ``side`` "torch" / "flax" looks at that side only (inputs are
    torch's). None when nothing is found."""
    def layer(path: str) -> str:
        return f"layer {path or '<root>'}"

    torch_side, flax_side = side in (None, "torch"), side in (None, "flax") and run.flax is not None
    found = ([(p, v) for p, v in zip(input_paths(run.torch_args), jax.tree_util.tree_leaves(run.torch_args))]
             if side is None else [])
    if torch_side:
        for tc in run.torch.calls or []:  # completion order: a module after its children
            found += [(f"torch output {p} of {layer(tc.path)}", v) for p, v in tc.output_values.items()]
        found += [(f"torch {p}", v) for p, v in run.torch.outputs.items()]
    if flax_side:
        for key, outs in run.flax.call_outputs.items():
            found += [(f"Flax output {p} of {key}", v) for p, v in outs.items()]
        found += [(f"Flax {p}", v) for p, v in run.flax.outputs.items()]
    if torch_side:
        for tc in reversed(run.torch.calls or []):  # roughly backward order
            found += [(f"torch gradient at output {p} of {layer(tc.path)}", v) for p, v in tc.output_grads.items()]
        found += [(f"torch grad {p}", v) for p, v in {**run.torch.input_grads, **run.torch.param_grads}.items()]
    if flax_side:
        found += [(f"Flax grad {p}", v) for p, v in {**run.flax.input_grads, **run.f_p_grads}.items()]
    for where, value in found:
        kind = _bad(value)
        if kind and (kind == "NaN" or not nan_only):
            return f"{kind} in {where}"
    return None


def _empty_input_warnings(torch_args: tuple) -> list[str]:
    """An input with no elements (an empty batch): every comparison of nothing passes."""
    return [f"{keystr(path)} is empty (shape {tuple(leaf.shape)}): a check of nothing passes whatever the twin does"
            for path, leaf in jax.tree_util.tree_flatten_with_path(tuple(torch_args))[0]
            if isinstance(leaf, torch.Tensor) and leaf.numel() == 0]


def _initial_buffer_warnings(module: torch.nn.Module, train: bool) -> list[str]:
    """BatchNorm running statistics still at their initial values (mean 0, var 1) in an eval-mode
    check: normalisation then divides by sqrt(1 + eps) ~ 1, so a twin that gets the variance
    formula wrong (var + eps for sqrt(var + eps), a missing mean) agrees to ~eps."""
    if train:
        return []
    stale = [name for name, m in module.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
             and m.running_mean is not None and not bool(torch.any(m.running_mean != 0))
             and not bool(torch.any(m.running_var != 1))]
    if not stale:
        return []
    return [f"BatchNorm running statistics are at their initial values (mean 0, var 1) in {len(stale)} "
            f"layer(s), first {stale[0] or '<root>'}: in eval mode they normalise by ~1, so a twin that "
            "mishandles the mean or the variance (var + eps for sqrt(var + eps)) agrees here; run a few "
            "train-mode steps first, or load trained statistics"]


def _zero_warnings(run: CapturedRun) -> list[str]:
    """All-zero outputs and gradients: legal, but usually a dead branch or a detached input, and
    a comparison of zeros with zeros proves nothing about the branch that should have fed them."""
    out = [f"torch {p} is all zeros: a dead branch? (both sides agreeing on zeros proves little)"
           for p, v in run.torch.outputs.items() if _is_zero(v)]
    out += [f"grad {p} is all zeros in torch: input detached or unused?" for p, g in run.torch.input_grads.items()
            if _is_zero(g)]
    out += [f"grad {n} is all zeros in torch: parameter unused or behind a dead branch?"
            for n, g in run.torch.param_grads.items() if _is_zero(g)]
    return out


def _constant_input_warnings(torch_args: tuple) -> list[str]:
    """Inputs whose elements are all equal: an all-ones attention mask, all-zero token types, a
    blank image. Both sides agreeing on such an input cannot show that the twin uses it right
    (a twin that ignores the mask, or always reads embedding row 0, computes the same here)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tuple(torch_args))[0]:
        if not isinstance(leaf, torch.Tensor) or leaf.numel() < 2:
            continue
        flat = leaf.detach().reshape(-1)
        if bool(torch.all(flat == flat[0])):
            out.append(f"{keystr(path)} is constant (every element {flat[0].item()!r}): a twin that "
                       "ignores it or reads it wrong agrees on this input too; vary it (pad some "
                       "positions of a mask, mix token types, use a non-blank image) to test that part")
    return out


def _batch_of_one_warnings(torch_args: tuple) -> list[str]:
    """Every input with a leading axis of 1: a twin that mixes samples (a sum or mean over the
    whole array where torch reduces per sample, a reshape that folds the batch in) agrees on it."""
    leaves = [x for x in jax.tree_util.tree_leaves(tuple(torch_args)) if isinstance(x, torch.Tensor)]
    if leaves and all(x.dim() >= 2 and x.shape[0] == 1 for x in leaves):
        return ["every input has batch size 1: a twin that mixes samples (reduces over the batch "
                "axis, folds it into another) agrees on it; check with a batch of 2 or more"]
    return []


def _is_zero(value) -> bool:
    a = np.asarray(value)
    return a.size > 0 and jnp.issubdtype(a.dtype, jnp.floating) and not np.any(a)


def check(
    torch_module: torch.nn.Module,
    flax_module,
    example_input,
    options: CheckOptions | None = None,
    *,
    variables: Mapping | None = None,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    **option_fields,
) -> Report:
    """Compare ``torch_module`` and its Flax twin (Linen or NNX) on ``example_input``.

    options: a CheckOptions (parity.pair); its fields may also be given as keywords, which win
    (``check(tm, fm, x, dtype="bfloat16", layers=False)``). The fields:

    example_input: the torch module's positional arguments in torch layout: one tensor / array,
    or a tuple/list of them (pytrees allowed: dicts, tuples with None); integer leaves (token
    ids, masks) are fed as they are and get no gradient. ``parity.Inputs(*args, **kwargs)`` calls
    both sides with keywords too (HF models order their arguments differently per framework). Outputs may be any pytree (tensors,
    tuples, dicts, dataclasses, HF ModelOutput) and are compared leaf by leaf by path.
    input_layout / output_layout: "NC..." ([N, C, *S] in torch, channels-last in Flax) or "as_is",
    one string (inputs: every float leaf) or per leaf (dict by path such as ``input[1]`` /
    ``out.logits``, or by key); default: inferred (weight_port.layout, parity.runtime.layouts),
    a LayoutError naming the leaf when it cannot be. A dict ``output_layout`` may also name the
    outputs of a layer's per-layer rows by its torch module path: ``{"resnet": "as_is"}`` (every
    output leaf of ``resnet``) or ``{"resnet:pooler_output": "as_is"}`` (one leaf); a key that
    names a model output leaf stays a model output. Undeclared layer outputs take the one layout
    in which torch's and Flax's shapes agree, else the kind of layer that made them: declare
    those whose shapes fit both layouts ([N, C, H, W] with C == H == W) and whose Flax module
    returns them channels-first (HF's Flax ResNet, ViT, ... return [N, C, H, W] maps).
    variables: Flax variables to use (linen-style; default: ported from the torch module after
    casting it to ``dtype``). rename: passed to the port (weight_port.build_plan).
    train: BatchNorm uses batch statistics on both sides; the twin's train keyword is found from
    its ``__call__`` (train / training / deterministic / use_running_average) or ``train_kwarg``.
    layers: per-layer rows with isolated and accumulated error, and ``first_divergence``. A row
    compares only what is surely paired (a container: the Flax call that holds exactly its
    layers; otherwise a "not paired" note); a layer whose module boundary differs between the
    sides (work torch does inside it and Flax after it) says "boundary differs" and is judged at
    the next layer computed from its output (parity.layers).
    Judging (parity.judge, one judge for every tensor): by default each output, gradient and
    per-layer row is judged by measured noise. A float32 / bfloat16 / float16 check also runs torch
    in float64 (weights rounded to ``dtype``): the twin's error against it must be within k times
    torch's own, per slice (channel / feature / output unit). A float64 check runs torch in float32
    once (one ulp nudged) and scales its error to float64. Per-layer rows run in float64. Where the
    float64 (or float32) run cannot run, the table decides (elementwise rtol/atol, torch.testing
    semantics) and a pass that only atol explains is INCONCLUSIVE. rtol/atol: the caller's
    torch.testing-style criterion, replacing the table and the measured noise (and nothing
    else). reference: "float64" (the default behaviour; kept for compatibility) or None.
    precision: JAX matmul precision; tf32 (default: matching ``precision``) is torch's TF32 flag,
    and the report warns when the two disagree (on a CPU float32 is full precision whatever the
    flag: the float32 table applies). device: "cpu" (default) or "cuda". The torch
    module is copied, never mutated. Runs under pinned numerics and, for float64, with x64
    enabled for the duration of the call only. progress: called with short status lines.
    logits: the output leaves that are logits, class axis last ([N, T, V], [N, C]): a path such as
    ``out.logits`` or ``logits``, or several; default None infers every leaf whose path ends in
    ``logits`` (an HF ModelOutput's ``.logits``), () none. Each gets top-1 agreement, top-k overlap
    and KL(p_torch || p_flax) per position in ``report.logits``; in a bfloat16 / float16 check they
    may turn that leaf's FAIL into a pass (parity.judge.logit_rule; the report says so), never the
    reverse, never for a NaN, and never under the caller's own rtol/atol.
    data_parallel: also run the twin under jit on the batch sharded over N devices (parity.data_parallel).
    spill: a low-precision check's torch parameter gradients (the checked run's, and the float64
    reference's, which the judge, the rows' noise probe and the rows read again) kept in files in
    TMPDIR between those reads and deleted when judged or at the end (parity._spill): None
    (default) when the float64 ones hold 1 GiB or more (a 134M-parameter model), True always,
    False never. The same numbers either way.
    lint: read both graphs for known convention traps first (parity.lint: GELU exact vs tanh,
    'SAME' vs symmetric padding with stride > 1, conv geometry, dropout left on, ceil_mode); each
    finding is a report warning "trap: ...". strict (runs the lint even with lint=False): any
    finding but a "note" (a lint crash included: strict asks for a lint that ran) makes the
    verdict FAIL, never a setup error: the numbers are still computed and shown, so the report
    says both what the lint found and whether it mattered on this input.
    """
    o = CheckOptions.of(options, **option_fields)
    say = progress or (lambda msg: None)
    _, jdev = devices(o.device)
    x64 = jax.enable_x64(True) if o.dtype == "float64" else contextlib.nullcontext()
    with jax.default_device(jdev), pinned(precision=o.precision, tf32=o.tf32):
        with x64:  # record x64 as it is for the run itself (on only inside float64 checks)
            env = numerics_env(devices(o.device)[0])
            # A check changes no weight for good (its noise probe moves them back bit for bit):
            # its copy keeps the caller's weights, so the model is held once, not twice.
            pair = prepare(torch_module, flax_module, example_input, o, variables=variables, progress=say,
                           share_weights=True)
        return _check_pair(pair, o, env, jdev.platform, name or type(torch_module).__name__, say)


def _check_pair(pair: PreparedPair, o: CheckOptions, env: dict, platform: str, name: str, say) -> Report:
    """The check of a prepared pair, under the caller's numerics (check() sets them)."""
    dname = o.dtype
    x64 = (lambda: jax.enable_x64(True)) if dname == "float64" else contextlib.nullcontext
    notes = precision_warnings(env)
    if not o.override and dname != "float64" and reduced_float32(dname, env, platform):
        notes.append(REDUCED_FLOAT32_NOTE)
    # A low-precision check judges its per-layer rows on the float64 run, which records every
    # layer itself: this run records none (half the memory), unless the float64 run fails.
    rows_here = o.layers and (dname == "float64" or o.override)
    # A twin that computes in its Linen dtype field (HF's Flax modules) computes in that dtype on
    # the rows' float64 variables too: its rows' run would be this run again, but for an op that
    # mixes a float64 parameter in before casting back (LayerNorm's scale: one rounding where this
    # run has two). Its layers are recorded here instead, what the checked model itself computes
    # at each one, and the rows read this run (Evidence.finish_rows): one whole-model run fewer.
    twin_rows_here = o.layers and not rows_here and pair.twin_in("float64") is not pair.twin
    # The lint reads torch's side off this run (its ops, the norms' inputs): one forward fewer.
    # Not off a recorded run: one that records its ops copies every value it records.
    lint = o.lint or o.strict
    # A large model's torch gradients in the checked dtype wait through torch's float64 run for
    # the judge: in files too, as autograd makes them (GPT-2-medium: 1.4 GB off that run's peak).
    spill = Spill() if _spills(pair, o) else None
    with (watch_forward(pair.torch_module, pair.plan, o.train) if lint and not rows_here
          else contextlib.nullcontext()) as torch_side, x64():
        run = run_pair(pair, o, layers=rows_here, say=say, watch=dname == "float64",
                       ops=torch_side is not None, flax_side=False,
                       param_grad_sink=None if spill is None else spill.__setitem__)
    _take_spilled(run.torch, spill, pair.torch_module)
    if torch_side is not None:
        torch_side.ops = run.torch.ops
    reference = None
    # Without rows the float64 reference's torch run goes beside the twin's float32 trace,
    # compile and run: those keep one core busy while torch's kernels, which release the GIL, use
    # another (BERT-base on 2 cores: 15.3 -> 14.3 s). With rows it records every activation: two
    # threads first-touching fresh memory contend in the kernel, and side by side was no faster
    # (27.4 s vs 27.2 s; the rows' probe beside the twin's float64 run: 30.3 s).
    if run.structure_error is None and not o.override and dname != "float64" and not o.layers:
        say("float64 reference run (torch, beside the twin's run)")
        reference = beside(_float64_reference, run, o)
    if run.structure_error is None:
        try:
            with x64():
                run_flax_side(run, o.grads, layers=rows_here or twin_rows_here, say=say)
        except BaseException:
            settle(reference)
            raise
    notes += pair.notes + _dtype_warnings(run, dname, pair.user_variables)
    report = Report(model=name, dtype=dname, mode="train" if o.train else "eval", outputs=[], env=env,
                    warnings=notes)
    prec = jax_precision()
    if lint:
        say("trap lint")
        with x64():  # the twin is traced on the run's own (possibly float64) variables
            found = lint_traced(pair.torch_module, pair.twin, pair.variables, pair.flax_args, pair.plan,
                                train=o.train, torch_args=pair.inputs(False), torch_side=torch_side)
        report.warnings += [f"trap: {f}" for f in found]
        if o.strict:  # a "note" (a forward the lint could not run) says what was not read: no trap
            report.strict_findings = [str(f) for f in found if f.kind != "note"]
    if run.structure_error:
        fwd = tolerance_for(dname, FORWARD, prec, platform)
        report.outputs = [failed_comparison("output structure", run.structure_error, fwd)]
        return report
    logit_paths(list(run.torch.outputs), o.logits)  # a declared path that names no output: stop before the runs
    if (o.layers and not rows_here and not o.override and not o.data_parallel and _large(pair)
            and pair.release_variables()):
        # The twin runs again in float64 only (its own noise, its rows), on variables ported
        # again in float64 when it does (_float64_variables): a large model's checked-dtype ones
        # are not held through torch's float64 run and the own-noise run (GPT-2-medium: 1.35 GB
        # off each). A smaller model's are cast instead: BERT-base's port again cost 1.0 s, the
        # cast 0.4 s, and holding them 0.4 GB.
        run.flax.new_variables = None
        give_back()
    report.warnings += (_constant_input_warnings(pair.torch_args) + _batch_of_one_warnings(pair.torch_args)
                        + _empty_input_warnings(pair.torch_args) + _zero_warnings(run)
                        + _initial_buffer_warnings(pair.torch_module, o.train))
    try:
        ev = _evidence(run, o, prec, platform, report, say, reference)
    finally:
        settle(reference)  # a setup error above (an unknown logits path): its run ends before we return
    if o.layers and ev.rows_run is run and run.torch.calls is None:
        # No float64 run to take the rows from: this run again, every layer recorded.
        with x64():
            run = ev.rows_run = run_pair(pair, o, layers=True, say=say, watch=dname == "float64")
    report.reference = "float64" if ev.ref is not None else None
    mj = _model_judge(run, ev, every_key=bool(o.data_parallel))
    mj.fill(report, run.torch, SimpleNamespace(outputs=run.flax.outputs, input_grads=run.flax.input_grads,
                                               param_grads=run.f_p_grads), run.out_layouts, run.in_layouts,
            frozen={n for n, p in run.torch_module.named_parameters() if not p.requires_grad},
            tied=getattr(run.plan, "tied", None) or {}, release=_release(run, ev, o))
    _judge_logits(report, run, o)
    _locate_nonfinite(report, run, lambda: run_pair(_with_variables(pair), o, layers=True, say=say)
                      if run.torch.calls is None else run)
    if o.data_parallel:  # sharded Flax vs torch and vs 1 device, BatchNorm semantics named
        from parity.data_parallel import attach
        with x64():
            attach(report, run, o.data_parallel, mj)
    if o.layers:
        if ev.rows_run is not run:
            # Judged: the report holds numbers. The rows read the float64 run alone, so the
            # checked-dtype run's gradients (the model's size, twice) are freed before they start.
            for grads in (run.torch.param_grads, run.f_p_grads, run.flax.param_grads or {}):
                grads.clear()  # the ones still held: what failed, and all of them with data_parallel
            run.flax.new_variables = None  # it holds the variables, which the pair frees later
            give_back()
        if ev.finish_rows is not None:
            ev.finish_rows()
        lr = ev.rows_run
        ldt = lr.pair.dtype
        with (jax.enable_x64(True) if ldt == "float64" else contextlib.nullcontext()):
            report.layers = analyze_layers(
                lr.torch.calls, lr.flax, lr.twin, lr.variables, lr.plan, lr.act_layouts,
                grads=o.grads, train=o.train, rows=ev.rows, param_grads=lr.torch.param_grads, progress=say,
                root=(worst_of(report.outputs), worst_of(report.grads)),  # the whole-model verdicts
                release_param_grads=True,  # judged: the report holds numbers
            )
        report.first_divergence, report.divergence_kind = first_divergence(report.layers)
    report.warnings += _spill_notes(run, ev)
    say("done")
    return report


def _spills(pair: PreparedPair, o: CheckOptions) -> bool:
    """Whether a low-precision check keeps torch's parameter gradients (the checked run's and the
    float64 reference's) in files between the judge's reads (parity._spill; CheckOptions.spill:
    by default when the float64 ones hold 1 GiB or more)."""
    if not o.grads or o.override or o.dtype == "float64":
        return False
    return spill_wanted(o.spill, _float64_bytes(pair, trainable=True))


def _large(pair: PreparedPair) -> bool:
    """Whether the pair's torch parameters hold SPILL_BYTES (1 GiB) or more in float64, the size
    from which a check trades time for memory: GPT-2-medium's 2.8 GB do, BERT-base's 0.9 GB do
    not."""
    return spill_wanted(None, _float64_bytes(pair))


def _float64_bytes(pair: PreparedPair, *, trainable: bool = False) -> int:
    """The bytes of the pair's torch parameters in float64 (trainable: those with gradients alone)."""
    return 8 * sum(p.numel() for p in pair.torch_module.parameters() if p.requires_grad or not trainable)


def _take_spilled(t: TorchRun, spill: Spill | None, module: torch.nn.Module) -> None:
    """A run whose parameter gradients its sink put in ``spill`` (None: none did): they are its
    ``param_grads``, in ``module``'s parameter order as the report lists them (the sink saw
    autograd's)."""
    if spill is not None:
        t.param_grads = spill.reorder(n for n, _ in module.named_parameters())


def _spill_notes(run: CapturedRun, ev: Evidence) -> list[str]:
    """What the report says of torch's gradients kept in files (parity._spill): a write that
    failed (they stayed in memory), or files that are memory themselves."""
    ref = ev.ref.torch if isinstance(ev.ref, CapturedRun) else ev.ref
    spills = [s for s in (run.torch.param_grads, getattr(ref, "param_grads", None)) if isinstance(s, Spill)]
    failed = [s for s in spills if s.failed]
    if failed:
        return [f"torch's gradients could not all be kept in files under {failed[0].directory} "
                f"({failed[0].failed}): the rest were held in memory"]
    if spills and spills[0].in_memory:
        return [f"torch's gradients were kept in files under {spills[0].directory}, a memory filesystem: "
                "set TMPDIR to a directory on a disk to take them out of memory"]
    return []


def _release(run: CapturedRun, ev: Evidence, o: CheckOptions) -> Callable[[str], None] | None:
    """What ModelJudge.fill calls when a parameter gradient has passed: its values on both sides
    (and in the float64 reference, when no per-layer row reads it) are dropped, so the twin's
    own-noise run, a whole-model run in float64, does not come on top of the model's gradients
    three times over (BERT-base: 1.6 GB). None when the data-parallel rows judge every tensor again."""
    if o.data_parallel:
        return None
    run.flax.param_grads = None  # f_p_grads names the same arrays; nothing else reads these
    held = []
    if not (o.layers and ev.rows_run is run):  # rows read the gradients of the run they are made of
        held += [run.torch.param_grads, run.f_p_grads]
    if isinstance(ev.ref, TorchRun):  # a reference without rows (with rows it is their run)
        held.append(ev.ref.param_grads)

    def release(key: str) -> None:
        if key.startswith("param:"):
            name = key.removeprefix("param:")
            for grads in held:
                if name in grads:  # del, not pop: a Spill deletes its file unread
                    del grads[name]
    return release


def _judge_logits(report: Report, run: CapturedRun, o: CheckOptions) -> None:
    """The logit metrics of the outputs declared or inferred as logits, and the logit rule
    (parity._logits.judge_logits; the caller's own rtol/atol decide alone: metrics only)."""
    flax = {p: to_torch_layout(np.asarray(v), run.out_layouts[p]) for p, v in run.flax.outputs.items()}
    report.outputs, report.logits, notes = judge_logits(report.outputs, list(run.torch.outputs), flax,
                                                        run.torch.outputs, o.dtype, o.logits, rule=not o.override)
    report.warnings += notes


@dataclass
class Evidence:
    """What the judge measures the noise with, for one check.

    ref: the float64 run that low-precision values are judged against (a CapturedRun with
    per-layer rows, else the torch run alone; None in table mode and for float64 checks, whose
    reference is their own torch run). probe: for float64 checks, torch's float32 run whose
    error, scaled to float64, is the noise. model_rule: the measured rule of the model-level
    tensors, or the Table when there is no measured noise. rows_run / rows: the run whose
    per-layer rows are judged (float64 where possible) and how (parity.layers.RowJudge).
    """

    dname: str
    model_rule: object
    table_forward: Table
    table_grad: Table
    ref: object = None
    probe: TorchRun | None = None
    rows_run: CapturedRun | None = None
    rows: RowJudge | None = None
    # The twin's own run in the probe's precision (float64 checks: float32) or in float64 (a
    # low-precision check), by ModelJudge key, torch layout: its own noise on noise slices. A
    # thunk, run only when a tensor does not pass on torch's noise alone (the twin's own noise
    # only ever widens the bound: a pass without it is a pass with it).
    flax_other: Callable[[list[str] | None], dict[str, np.ndarray] | None] | None = None
    # What the rows still need, run after the model is judged (its runs' gradients freed first):
    # a low-precision check's float64 rows run of the twin and its float32 probe; sets ``rows``.
    finish_rows: Callable[[], None] | None = None


def _torch_only(pair: PreparedPair, o: CheckOptions, dname: str, *, capture: bool, cotangents,
                perturb: bool = False, last: bool = False,
                param_grad_sink: Callable[[str, np.ndarray], None] | None = None) -> TorchRun:
    """The pair's torch side again in ``dname``: the same (already rounded) weights and inputs,
    the same cotangents; forward ops below ``dname``'s precision noted. perturb: the noise probe
    of PreparedPair.run_torch (a random half of every weight, buffer and input one ulp nearer
    zero). In the pair's own dtype no copy is made; last: nothing runs the pair's torch side
    again (a nudged copy, or the pair itself, is left as the probe made it: a pass over every
    weight saved). param_grad_sink: PreparedPair.run_torch's (the run's param_grads are then
    empty)."""
    p = pair if dname == pair.dtype else pair.cast(dname, flax=False)
    t, _ = p.run_torch(grads=o.grads, capture=capture, cotangents=cotangents or None, watch=True,
                       perturb=o.seed + 7 if perturb else None, restore=p is pair and not last,
                       param_grad_sink=param_grad_sink)
    return t


def _float64_reference(run: CapturedRun, o: CheckOptions):
    """The torch side of a low-precision check's float64 reference: the same pair in float64
    (weights and inputs already rounded to the checked dtype, so the reference differs from the
    low-precision runs by their arithmetic only), the same plan and the same cotangents. With
    per-layer rows (which run in float64 on both sides, where verdicts are sharp): a CapturedRun
    whose twin's side runs later (Evidence.finish_rows), once the model is judged and its runs'
    gradients freed; else the TorchRun alone, in a worker thread (parity._threads.beside): it
    says nothing and writes no report."""
    cots = run.torch.cotangents
    # Its parameter gradients (the model's size in float64) are read long after the run: by the
    # model judge, the rows' probe and the rows. A large model's go to files as autograd makes
    # them and are read back a tensor at a time (parity._spill; GPT-2-medium with rows: 2.8 GB
    # off torch's float64 run, the twin's own-noise run, the probe and the rows).
    spill = Spill() if _spills(run.pair, o) else None

    def once(free: bool):
        # the twin's float64 variables are made when its side runs (PreparedPair.cast_variables)
        ref_pair = run.pair.cast("float64", flax=False)
        if spill is not None:
            spill.clear()  # a run made again starts afresh
        sink = None if spill is None else spill.__setitem__
        if o.layers:
            made = run_pair(ref_pair, o, layers=True, say=lambda m: None, watch=True, cotangents=cots,
                            flax_side=False, free_weights=free, param_grad_sink=sink)
            _take_spilled(made.torch, spill, ref_pair.torch_module)
            return made
        ref = ref_pair.run_torch(grads=o.grads, cotangents=cots or None, watch=True, free_weights=free,
                                 param_grad_sink=sink)[0]
        _take_spilled(ref, spill, ref_pair.torch_module)
        # Its outputs' autograd graph holds the float64 weights (the model's size, twice) for as
        # long as the run is alive; nothing reads them again.
        ref_pair.free_torch_weights()
        give_back()
        return ref
    with jax.enable_x64(True):
        # Nothing runs this copy again: its weights go as their gradients come (the float64
        # weights and gradients are not held whole together). What is read after the run stays:
        # the tables the twin computes (_float32_tables) are frozen parameters, the only ones the
        # port drops (weight_port drop_computed_tables), and get no gradient. A run that cannot be
        # made so (a backward that reads a freed weight, a recorded value that changed unseen) is
        # made again on a fresh copy, keeping its weights.
        try:
            return once(free=True)
        except Exception:  # noqa: BLE001 -- the same run again decides: one that fails fails there too
            give_back()
            return once(free=False)


def _evidence(run: CapturedRun, o: CheckOptions, prec: str, platform: str, report: Report, say,
              reference: Future | None = None) -> Evidence:
    """Run what the measured-noise judge needs (the float64 reference of a low-precision check,
    the float32 probe of a float64 check), or say in a warning why the table decides instead.
    reference: the float64 reference's torch side, started beside the twin's run
    (parity._threads.beside); None: it runs here."""
    dname, pair, cots = o.dtype, run.pair, run.torch.cotangents
    fwd_t = tolerance_for(dname, FORWARD, prec, platform)
    grd_t = tolerance_for(dname, GRAD, prec, platform)
    if o.override:  # the caller's rtol/atol replace the table, and nothing else (torch.testing)
        tf, tg = Table(fwd_t.override(o.rtol, o.atol), True), Table(grd_t.override(o.rtol, o.atol), True)
        return Evidence(dname, None, tf, tg, rows_run=run, rows=RowJudge(tf, tg))
    tf, tg = Table(fwd_t), Table(grd_t)
    ref64 = tolerance_for("float64", REFERENCE)
    if dname == "float64":
        say("float32 probe run (measures float64 noise)")
        try:
            with jax.enable_x64(True):
                probe = _torch_only(pair, o, "float32", capture=o.layers, cotangents=cots, perturb=True)
        except Exception as exc:  # noqa: BLE001 -- a model that cannot run in float32
            report.warnings.append(f"the float32 run that measures float64 noise failed ({type(exc).__name__}: "
                                   f"{str(exc)[:160]}): judged by the table; a pass only atol explains is "
                                   "INCONCLUSIVE")
            return Evidence(dname, None, tf, tg, rows_run=run, rows=RowJudge(tf, tg))
        effective = _lower_warning(run.torch, report, "float64 run") or _float32_tables(run, report)
        rule = measured(ref64, "float64", probe_dtype="float32", effective=effective)
        if effective:  # torch's float32 parts are the same in its probe: the twin's own noise counts
            rule = replace(rule, own_everywhere=True)
        rows = RowJudge(tf, tg, ref64, "float32", _calls_by_key(probe.calls), probe.param_grads,
                        all_float32=effective == "float32" and not run.torch.lower_precision)

        def other(keys):
            with jax.enable_x64(True):  # a twin declared float64 keeps its dtype (and says nothing)
                return _flax_values(run, "float32", keys)
        return Evidence(dname, rule, tf, tg, probe=probe, rows_run=run, rows=rows, flax_other=other)
    if reference is None:
        say("float64 reference run")
    try:
        ref = reference.result() if reference is not None else _float64_reference(run, o)
        ref_torch = ref.torch if o.layers else ref
    except Exception as exc:  # noqa: BLE001 -- e.g. a torch model that builds a float32 constant inside
        return _same_dtype_evidence(run, o, prec, platform, tf, tg, report, say,
                                    f"the float64 reference run failed ({type(exc).__name__}: {str(exc)[:160]})")
    rule = measured(tolerance_for(dname, REFERENCE, prec, platform), dname)
    if ref_torch.lower_precision or any(getattr(layer.rule, "dropped", ()) for layer in pair.plan.layers):
        # The reference computes part of itself in float32 (or holds a float32 table the twin
        # computes): that part is the same in torch's own run, so torch's measured noise misses
        # its rounding (diffusers' float32 sinusoids of timesteps up to 1000), while the twin
        # computes it its own way. The twin's own noise counts on every slice then.
        rule = replace(rule, own_everywhere=True)
    if not o.layers:
        def other(keys):
            give_back()  # the gradients that passed are freed (ModelJudge.fill's release)
            with jax.enable_x64(True):
                return _flax_values(run, "float64", keys)
        return Evidence(dname, rule, tf, tg, ref=ref_torch, flax_other=other)
    lower = _lower_warning(ref_torch, report, "float64 reference run") or _float32_tables(ref, report)
    # Nothing reads torch's float64 weights after its run (the rows read what it recorded): freed
    # before the probe and the judging (the model's size in float64).
    ref.pair.free_torch_weights()
    give_back()
    t64f, t64g = Table(tolerance_for("float64", FORWARD)), Table(tolerance_for("float64", GRAD))
    ev = Evidence(dname, rule, tf, tg, ref=ref, rows_run=ref)

    def finish_rows() -> None:
        """The twin's float64 run with every layer recorded (no whole-model parameter gradients:
        the rows take each layer's from the layer run alone), then torch's float32 probe; the
        checked-dtype pair freed as each of its sides has run its last."""
        # A twin that computes in its dtype field: its checked run recorded every layer and is the
        # rows' run (_check_pair: twin_rows_here); its whole-model gradients are freed. Its float64
        # variables, ported for its own-noise run, stay for the rows: freed before torch's probe
        # and ported again after it, they came off the probe's peak (GPT-2-medium: 2.7 GB), but
        # the check's peak stayed at 9.7 GiB (its own-noise run and the rows' first layers) and
        # the second port cost 1-3 s.
        if ref.flax is None and run.flax is not None and run.flax.calls:
            ref.flax = run.flax
        with jax.enable_x64(True):
            _float64_variables(ref, pair)
        # The checked-dtype variables are read no more (the float64 ones are their cast, exact):
        # freed before the twin's float64 rows run, not after it (where _check_pair has not freed
        # them already); remade from those if it fails.
        dtypes = (None if pair.variables is None
                  else jax.tree_util.tree_map(lambda a: jnp.asarray(a).dtype, pair.variables))
        pair.variables = {}
        give_back()
        try:
            if ref.flax is None:  # else the twin's own-noise run was this run (own_noise below)
                with jax.enable_x64(True):
                    run_flax_side(ref, o.grads, layers=True, say=say, flax_param_grads=False)
        except Exception as exc:  # noqa: BLE001 -- torch ran in float64 (the model is judged by it), the twin cannot
            pair.variables = (pair.port_variables() if dtypes is None else
                              jax.tree_util.tree_map(lambda a, d: jnp.asarray(a, d), ref.pair.variables, dtypes))
            # The rows in the checked dtype then, their noise measured there (a nudged torch run).
            rows_run = run_pair(pair, o, layers=True, say=say)
            fallback = _same_dtype_evidence(
                rows_run, o, prec, platform, tf, tg, report, say,
                f"the twin's float64 run of the per-layer rows failed ({type(exc).__name__}: {str(exc)[:160]}); "
                f"the rows are {dname}")
            ev.rows_run, ev.rows = rows_run, fallback.rows
            return
        # The checked-dtype pair has run its last but for torch's probe: the rows run on the
        # float64 one. Its torch weights go after the probe.
        say("float32 probe run (measures the float64 rows' noise)")
        # The rows judge each parameter gradient along axis 0 against torch's float64 one (held for
        # them): the probe's is kept as those sums alone as autograd finishes it (judge.ProbeSums),
        # not as a float32 copy of the model's gradients (GPT-2-medium: 1.4 GB through the rows).
        t64_grads, probe_grads = ref_torch.param_grads, {}

        def reduce(name: str, grad: np.ndarray) -> None:
            probe_grads[name] = reduce_probe(grad, t64_grads[name], 0) if name in t64_grads else np.array(grad)
        try:
            probe = _torch_only(pair, o, "float32", capture=True, cotangents=cots, perturb=True, last=True,
                                param_grad_sink=reduce if o.grads else None)
            ev.rows = RowJudge(t64f, t64g, ref64, "float32", _calls_by_key(probe.calls), probe_grads,
                               all_float32=lower == "float32" and not ref_torch.lower_precision)
        except Exception as exc:  # noqa: BLE001 -- rows then by the float64 table
            report.warnings.append(f"the float32 probe run of the per-layer rows failed ({type(exc).__name__}: "
                                   f"{str(exc)[:120]}): rows judged by the float64 table")
            ev.rows = RowJudge(t64f, t64g)
        pair.free_torch_weights()
        give_back()

    def other(keys):
        give_back()  # the gradients that passed are freed (ModelJudge.fill's release)
        with jax.enable_x64(True):
            _float64_variables(ref, pair)
            if pair.twin_in("float64") is not pair.twin:
                # the twin truly in float64 (a Linen dtype field cloned), not the rows' run of the
                # twin as declared; on the rows' float64 variables: the same cast, not a second copy
                return _flax_values(run, "float64", keys, variables=ref.variables)
            # The twin as declared computes in float64: its own-noise run is the rows' float64 run,
            # made now with the gradients the judge asks for (one whole-model float64 run, not two)
            run_flax_side(ref, o.grads, layers=True, say=say, flax_param_grads=True if keys is None else keys)
            values = _flax_tensors(ref)
            ref.flax.param_grads, ref.f_p_grads = None, {}  # the judge holds them; the rows never read them
            return values
    ev.flax_other, ev.finish_rows = other, finish_rows
    return ev


def _with_variables(pair: PreparedPair) -> PreparedPair:
    """``pair`` with its variables, ported again where _check_pair released them."""
    if pair.variables is None:
        pair.variables = pair.port_variables()
    return pair


def _float64_variables(ref: CapturedRun, pair: PreparedPair) -> None:
    """The float64 variables of the rows' pair ``ref.pair`` (a cast of ``pair`` made with
    flax=False): the checked-dtype ones cast, or, where _check_pair released those, the port again
    from ``pair``'s torch weights straight to float64 (the same values). Under jax.enable_x64."""
    if ref.pair.variables is None:
        ref.pair.variables = pair.port_variables("float64")
    ref.pair.cast_variables()


def _flax_values(run: CapturedRun, dname: str, keys: list[str] | None = None,
                 variables: Mapping | None = None) -> dict[str, np.ndarray]:
    """The twin run again in ``dname`` (variables and inputs of ``run`` cast, its cotangents): its
    model-level tensors by ModelJudge key, torch layout; with ``keys``, the parameter gradients
    of those keys alone (parity.runtime.param_grads_for). variables: ``run``'s already cast to
    ``dname`` (the rows' float64 pair holds them). The twin's own rounding noise is this run's
    distance to ``run``'s values (a bug, being in both, cancels)."""
    dt = jnp.dtype(dname)

    def cast(a):
        return jnp.asarray(a, dt) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a

    pair = replace(run.pair, twin=run.pair.twin_in(dname), dtype=dname,
                   flax_args=jax.tree_util.tree_map(cast, run.flax_args),
                   variables=run.variables if variables is None else variables)
    pair.cast_variables()  # (already cast when given: no copy)
    other = CapturedRun(pair, run.torch, None, {}, None)
    run_flax_side(other, bool(run.torch.cotangents), layers=False, say=lambda msg: None,
                  flax_param_grads=True if keys is None else keys)
    return _flax_tensors(other)


def _flax_tensors(run: CapturedRun) -> dict[str, np.ndarray]:
    """``run``'s Flax model-level tensors by ModelJudge key, torch layout."""
    f = run.flax
    out = {p: to_torch_layout(np.asarray(v), run.out_layouts[p]) for p, v in f.outputs.items()}
    out.update({p: to_torch_layout(np.asarray(g), run.in_layouts[p]) for p, g in f.input_grads.items()
                if p in run.in_layouts})
    out.update({f"param:{n}": np.asarray(g) for n, g in run.f_p_grads.items()})
    return out


def _same_dtype_evidence(run: CapturedRun, o: CheckOptions, prec: str, platform: str, tf: Table, tg: Table,
                         report: Report, say, why: str) -> Evidence:
    """No float64 run: the noise is measured by the torch run again in the checked dtype with a
    random half of every weight, buffer and input one ulp nearer zero, against the run itself
    (torch is then the reference: the twin's error against torch must be within k times what
    rounding-sized changes move torch by). Where even that cannot run, the table, with
    INCONCLUSIVE for a pass that only atol explains."""
    dname = o.dtype
    _with_variables(run.pair)  # its rows run the twin again in this dtype
    say(f"{dname} probe run (no float64 run: measures the noise in {dname})")
    try:
        probe = _torch_only(run.pair, o, dname, capture=o.layers, cotangents=run.torch.cotangents, perturb=True)
    except Exception as exc:  # noqa: BLE001
        report.warnings.append(f"{why}, and so did the {dname} probe run ({type(exc).__name__}): judged by the "
                               f"{dname} table; a pass only atol explains is INCONCLUSIVE")
        return Evidence(dname, None, tf, tg, rows_run=run, rows=RowJudge(tf, tg))
    report.warnings.append(f"{why}: the noise is measured by a {dname} torch run with every weight and input "
                           "nudged by one ulp, against torch's own run (the reference is torch, not float64)")
    ref_tol = tolerance_for(dname, REFERENCE, prec, platform)
    rule = measured(ref_tol, dname, probe_dtype=dname)
    rows = RowJudge(tf, tg, ref_tol, dname, _calls_by_key(probe.calls), probe.param_grads, dtype=dname)
    return Evidence(dname, rule, tf, tg, probe=probe, rows_run=run, rows=rows)


def _float32_tables(run: CapturedRun, report: Report) -> str | None:
    """"float32" (with a warning) when a frozen torch table that the twin computes (a sinusoid
    position table the port skipped) holds float32-rounded values in the float64 run: built in
    float32 and cast, it stays float32-accurate, while the twin computes it in float64."""
    found = []
    for layer in run.plan.layers:
        for name in getattr(layer.rule, "dropped", ()):
            key = f"{layer.info.torch_path}.{name}" if layer.info.torch_path else name
            try:
                t = run.torch_module.get_parameter(key)
            except AttributeError:
                continue
            if t.dtype == torch.float64 and bool(torch.equal(t, t.float().double())) and bool(
                    torch.any(t != t.round())):
                found.append(key)
    if not found:
        return None
    report.warnings.append(f"torch's {', '.join(found[:3])} (a table the twin computes) holds float32-rounded values "
                           "in the float64 run (built in float32, then cast): the model's outputs and gradients "
                           "and every row are judged by float32 noise")
    return "float32"


def _calls_by_key(calls) -> dict:
    return {(c.path, c.call): c for c in calls or ()}


def _lower_warning(t: TorchRun, report: Report, what: str) -> str | None:
    """"float32" (and a warning naming the first layer) when the torch ``what`` computed part of
    itself below float64; the judge then takes that precision's noise for what depends on it."""
    if not t.lower_precision:
        return None
    report.warnings.append(
        f"the torch {what} computes in {t.lower_precision} inside, first in layer {t.lower_first or '<root>'} "
        f"(an upcast/downcast on purpose, e.g. an RMS norm or a float32 softmax): that layer, the layers "
        f"around it and the model's outputs and gradients are judged by {t.lower_precision} noise")
    return t.lower_precision


def _model_judge(run: CapturedRun, ev: Evidence, every_key: bool = False) -> ModelJudge:
    """The check's ModelJudge (parity.judge; verify's is the same): a low-precision check judges
    against the float64 run with torch's own error as the noise; a float64 check against torch's
    own run with the float32 probe's error, scaled. The twin's own noise (ev.flax_other) is run
    by the judge when a tensor first needs it, for the tensors that need it; ``every_key``: for
    all of them (the data-parallel rows judge every tensor again and reuse it)."""
    refs = probes = None
    if ev.model_rule is not None and ev.ref is not None:  # the probe: torch's own value (probes None)
        refs = _tensors(ev.ref if isinstance(ev.ref, TorchRun) else ev.ref.torch)
    elif ev.model_rule is not None:
        refs, probes = _tensors(run.torch), _tensors(ev.probe)

    def own_noise(keys):
        other = ev.flax_other(None if every_key else keys)
        if other is None:
            return None
        # low precision: this run against the twin's float64 run; float64: its float32 run against this
        return (_flax_tensors(run), other) if ev.ref is not None else (other, _flax_tensors(run))

    return ModelJudge(ev.model_rule, ev.table_forward, ev.table_grad, refs, probes,
                      own_noise if ev.flax_other is not None else None)


def _tensors(t: TorchRun) -> MutableMapping[str, np.ndarray]:
    """A torch run's model-level tensors by ModelJudge key. Gradients kept in files (a Spill)
    stay there: a view reads each as the judge asks."""
    if isinstance(t.param_grads, Spill):
        return ChainMap({**t.outputs, **t.input_grads}, Renamed(t.param_grads, "param:"))
    return {**t.outputs, **t.input_grads, **{f"param:{n}": g for n, g in t.param_grads.items()}}


def _locate_nonfinite(report: Report, run: CapturedRun, recorded: Callable[[], CapturedRun]) -> None:
    """NaN on both sides in a compared tensor: INVALID, with where it first appeared. A NaN or inf
    on one side only is that tensor's FAIL; say where that side first made it. recorded(): the
    run with every layer recorded (run again only when something is not finite)."""
    bad = [c for c in report.outputs + report.grads if c.nonfinite or "one side only" in c.note]
    if not bad:
        return
    run = recorded()
    if any(c.nonfinite for c in report.outputs + report.grads):
        report.invalid = _first_nonfinite(run, nan_only=True) or next(
            f"NaN on both sides in {c.name}" for c in report.outputs + report.grads if c.nonfinite)
        return
    one_sided = [c for c in report.outputs + report.grads if "one side only" in c.note]
    if one_sided:
        side = "flax" if "(flax)" in one_sided[0].note else "torch"
        where = _first_nonfinite(run, side=side)
        if where:
            report.warnings.append(f"{one_sided[0].note.split(':')[0]} in {one_sided[0].name}; first: {where}")


def assert_parity(*args, **kwargs) -> Report:
    """check(...) that raises AssertionError carrying the report table when parity fails."""
    report = check(*args, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
