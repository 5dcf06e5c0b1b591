"""parity.check: run a torch module and its Flax twin on the same input, compare outputs and grads.

Gradients are of <output, cotangent> with one seeded random cotangent shared by both sides (a
plain sum would hide sign and permutation errors that cancel).
"""
from __future__ import annotations

import contextlib
import re
import copy
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity.judge import Comparison, NoEvidence, Table, failed_comparison, judge, judge_or_table, measured, worst_of
from parity.layers import RowJudge, analyze_layers, first_divergence
from parity.lint import lint_traced
from parity.numerics import (REDUCED_FLOAT32_NOTE, jax_precision, numerics_env, pinned, precision_warnings,
                             reduced_float32)
from parity.report import Report
from parity.runtime import (ActivationLayouts, FlaxRun, FlaxTwin, TorchRun, as_args, flax_inputs,
                            forward_backward, input_layouts, input_paths, output_layouts, output_shapes, run_torch,
                            structure, torch_inputs, train_mode_matters)
from parity.runtime.layouts import LayoutSpec, model_input_ids, split_output_spec
from parity.runtime.torch_runner import keystr
from parity.tolerances import FORWARD, GRAD, REFERENCE, tolerance_for
from weight_port.keywords import bind_keywords
from weight_port.layout import AS_IS, to_flax_layout, to_torch_layout
from weight_port.plan import PortPlan, build_plan

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return np.dtype(dtype).name if not isinstance(dtype, str) else dtype


@dataclass
class CapturedRun:
    """Raw results of one forward + backward on both sides (numpy; torch values in torch layout,
    Flax values in Flax layout): what ``capture`` returns and ``check`` judges.

    torch.calls / flax.calls (when captured with layers=True): every module call on each side,
    the input of parity.layers.isolated_layers with ``act_layouts`` (None without layers).
    """

    plan: PortPlan
    twin: FlaxTwin
    variables: Mapping
    torch_args: tuple
    flax_args: tuple
    torch: TorchRun
    flax: FlaxRun | None  # None when the output structures differ (nothing to compare leaf by leaf)
    f_p_grads: dict[str, np.ndarray]  # Flax param grads named and laid out as torch's
    in_layouts: dict[str, str]
    out_layouts: dict[str, str]
    act_layouts: ActivationLayouts | None
    torch_module: torch.nn.Module
    notes: list[str]
    structure_error: str | None = None
    output_map: dict[str, str] | None = None  # Flax output path -> torch output path


def _device(device: str | None) -> tuple[str, object]:
    """(torch device, JAX device) for "cpu" / "cuda" (alias "gpu"); None means CPU."""
    if device in (None, "cpu"):
        return "cpu", jax.devices("cpu")[0]
    if device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False")
        try:
            return "cuda", jax.devices("gpu")[0]
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} requested but JAX has no GPU backend ({exc})") from None
    raise ValueError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


def _plan_layouts(args: tuple, in_layouts: Mapping[str, str]) -> list[str]:
    # build_plan takes one layout per positional argument (its example input is flat).
    return [in_layouts.get(f"input[{i}]", AS_IS) for i in range(len(args))]


def _port(tm, flax_module, args, in_layouts, rename) -> tuple[PortPlan, list[str]]:
    # A Flax hyperparameter that differs from torch's (LayerNorm eps) is something this check
    # should measure and locate, not refuse: ask the port to warn, and keep its words.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = tuple(x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in args)
        plan = build_plan(tm, flax_module, plain, input_layout=_plan_layouts(args, in_layouts),
                          check_attributes="warn", rename=rename)
    notes = [f"weight port: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    # Pairings the port made by structure rather than by name (PortPlan.pairing_notes, when the
    # port records them): a user should see them, since a wrong one shifts every verdict.
    notes += [f"weight port pairing: {n}" for n in getattr(plan, "pairing_notes", None) or []]
    # What a rule of the plan decided about single tensors (a frozen table the twin computes, a
    # look-alike Flax layer ported by its kind's rule)
    notes += _grouped_plan_notes(getattr(plan, "notes", None) or [])
    return plan, notes


def _grouped_plan_notes(plan_notes: list[str]) -> list[str]:
    """The port's notes, one line per look-alike Flax class (a UNet has ten BatchNorms of one
    class: one line, not ten) and one per other note."""
    looks: dict[str, list[str]] = {}
    out = []
    for n in plan_notes:
        m = re.match(r"flax (\S+) \((\w+)\) is of no registered class but has exactly (.*?): torch", n)
        if m:
            looks.setdefault(f"{m.group(2)}|{m.group(3)}", []).append(m.group(1))
        else:
            out.append(f"weight port: {n}")
    for key, paths in looks.items():
        cls, kind = key.split("|", 1)
        out.append(f"weight port: {len(paths)} Flax {cls} layer(s) of no registered class have exactly {kind} "
                   f"and are ported by that kind's rule (first: {paths[0]}); weight_port.register_rule names "
                   "the class for good")
    return out


def _run(torch_module, flax_module, example_input, variables, dname, *, train, train_kwarg, input_layout,
         output_layout, rename, seed, grads, tdev, say, layers, watch: bool = False) -> CapturedRun:
    tdtype = _DTYPES[dname]
    tm = copy.deepcopy(torch_module).to(device=tdev, dtype=tdtype)
    tm.train(train)
    # Keyword inputs (parity.Inputs) are bound into the private torch copy and a rebuilt Flax
    # module: everything below calls both top modules positionally.
    tm, flax_module, example_input = bind_keywords(tm, flax_module, example_input)
    args = torch_inputs(as_args(example_input), tdtype, tdev, grads)
    # The inputs as given, for every later run: a torch model may change its inputs in place
    # (XGLM adds its offset to position_ids with +=), and a rerun on those would compute another
    # thing (the noise probe of XGLM was 91% off its own run).
    given = torch_inputs(args, tdtype, tdev, grads)
    in_layouts = input_layouts(tm, args, input_layout)
    twin = FlaxTwin(flax_module, train=train, train_kwarg=train_kwarg, train_mode_matters=train_mode_matters(tm))
    say("porting weights")
    plan, notes = _port(tm, flax_module, args, in_layouts, rename)
    if variables is None:
        variables = plan.to_flax(tm.state_dict())
    f_args = flax_inputs(args, in_layouts)
    say("torch forward/backward")
    t = run_torch(tm, args, train=train, grads=grads, cotangent_seed=seed + 1, capture=layers,
                  watch_precision=tdtype if watch else None)
    f_shapes = {p: s.shape for p, s in output_shapes(twin, variables, f_args).items()}
    to_t = _align(list(f_shapes), list(t.outputs))
    if to_t is None:
        err = (f"output structures differ: torch {structure(t.raw_outputs)} vs Flax "
               f"{'{' + ', '.join(f_shapes) + '}'}")
        return CapturedRun(plan, twin, variables, given, f_args, t, None, {}, in_layouts, {}, None, tm, notes, err)
    # output_layout entries naming a layer (by torch module path) are for its per-layer rows
    output_layout, layer_layouts = split_output_spec(output_layout, list(t.outputs),
                                                     [p for p, _ in tm.named_modules()])
    acts = None
    if t.calls is not None:
        acts = ActivationLayouts(t.calls, model_input_ids(args, in_layouts), t.aliases, layer_layouts)

    def producer(path: str):
        nonlocal acts
        if acts is None:  # only asked when the shapes fit both layouts: one more forward, hooked
            probe = run_torch(copy.deepcopy(tm), torch_inputs(given, tdtype, tdev, False), train=train,
                              grads=False, capture=True)
            acts = ActivationLayouts(probe.calls, model_input_ids(args, in_layouts), probe.aliases, layer_layouts)
            return acts.of_tensor(probe.raw_outputs[path])
        return acts.of_tensor(t.raw_outputs[path])

    f_shapes = {to_t[p]: shape for p, shape in f_shapes.items()}
    out_layouts = output_layouts(output_layout, {p: o.shape for p, o in t.outputs.items()}, f_shapes, producer)
    to_f = {tp: fp for fp, tp in to_t.items()}
    f_cots = ({to_f[p]: to_flax_layout(c, out_layouts[p], p) for p, c in t.cotangents.items()}
              if grads else None)
    say("flax forward/vjp" + (" with every layer recorded" if layers else ""))
    f = forward_backward(twin, variables, f_args, f_cots, capture=layers)
    f.outputs = {to_t[p]: v for p, v in f.outputs.items()}
    f_named = plan.to_torch({"params": f.param_grads}, collections=("params",)) if grads else {}
    if t.calls is not None and acts is None:
        acts = ActivationLayouts(t.calls, model_input_ids(args, in_layouts), t.aliases, layer_layouts)
    return CapturedRun(plan, twin, variables, given, f_args, t, f, f_named, in_layouts, out_layouts,
                       acts, tm, notes, output_map=to_t)


def capture(torch_module: torch.nn.Module, flax_module, example_input, *, dtype="float32", device: str = "cpu",
            variables: Mapping | None = None, train: bool = False, train_kwarg: str | None = None,
            input_layout: LayoutSpec = None, output_layout: LayoutSpec = None, rename=None, seed: int = 0,
            grads: bool = True, layers: bool = True,
            progress: Callable[[str], None] | None = None) -> CapturedRun:
    """One forward + backward of both sides, exactly as ``check`` runs them, without judging.

    Arguments as for ``check`` (example_input in torch layout, [N, C, H, W] for images). The
    torch module is copied and cast to ``dtype``; ``variables`` default to the port of that copy.
    layers=True records every module call on both sides (``CapturedRun.torch.calls``,
    ``.flax.calls``) for parity.layers. ``.flax`` is None when the output structures differ
    (``.structure_error`` says how). Numerics are the caller's: ``check`` runs the same capture
    under parity.numerics.pinned and jax.default_device(device), with x64 enabled for float64.
    """
    dname = _dtype_name(dtype)
    if dname not in _DTYPES:
        raise ValueError(f"unknown dtype {dname!r}; choose from {', '.join(_DTYPES)}")
    tdev, _ = _device(device)
    return _run(torch_module, flax_module, example_input, variables, dname, train=train, train_kwarg=train_kwarg,
                input_layout=input_layout, output_layout=output_layout, rename=rename, seed=seed, grads=grads,
                tdev=tdev, say=progress or (lambda msg: None), layers=layers)


def _canonical(path: str) -> str:
    # A field of a ModelOutput/dataclass (``out.logits``) and a dict key (``out['logits']``) are
    # the same leaf to a user comparing a torch ModelOutput against a Flax dict.
    return re.sub(r"\['([^']*)'\]", r".\1", path)


def _align(flax_paths: list[str], torch_paths: list[str]) -> dict[str, str] | None:
    """{flax output path: torch output path}, or None when the two output structures differ."""
    by_canon = {_canonical(p): p for p in torch_paths}
    out = {p: by_canon.get(_canonical(p)) for p in flax_paths}
    if None in out.values() or len(set(out.values())) != len(torch_paths):
        return None
    return out


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


def _label(prefix: str, path: str, root: str, single: bool) -> str:
    """Report name of a leaf: "output" / "output.logits" / "grad input[1]"."""
    return prefix if single else prefix + path[len(root):]


def check(
    torch_module: torch.nn.Module,
    flax_module,
    example_input,
    *,
    variables: Mapping | None = None,
    grads: bool = True,
    layers: bool = True,
    dtype=None,
    rtol: float | None = None,
    atol: float | None = None,
    train: bool = False,
    train_kwarg: str | None = None,
    input_layout: LayoutSpec = None,
    output_layout: LayoutSpec = None,
    rename=None,
    precision: str = "highest",
    tf32: bool | None = None,
    reference: str | None = None,
    device: str | None = None,
    seed: int = 0,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
    data_parallel: int | None = None,
    lint: bool = True,
    strict: bool = False,
) -> Report:
    """Compare ``torch_module`` and its Flax twin (Linen or NNX) on ``example_input``.

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
    data_parallel: also run the twin under jit on the batch sharded over N devices (parity.data_parallel).
    lint: read both graphs for known convention traps first (parity.lint: GELU exact vs tanh,
    'SAME' vs symmetric padding with stride > 1, conv geometry, dropout left on, ceil_mode); each
    finding is a report warning "trap: ...". strict (runs the lint even with lint=False): any
    finding but a "note" (a lint crash included: strict asks for a lint that ran) makes the
    verdict FAIL, never a setup error: the numbers are still computed and shown, so the report
    says both what the lint found and whether it mattered on this input.
    """
    say = progress or (lambda msg: None)
    dname = _dtype_name(dtype)
    if dname not in _DTYPES:
        raise ValueError(f"unknown dtype {dname!r}; choose from {', '.join(_DTYPES)}")
    if reference not in (None, "float64"):
        raise ValueError(f"reference must be None or 'float64', got {reference!r}")
    override = rtol is not None or atol is not None
    if reference and override:
        raise ValueError("rtol/atol replace the measured-noise judge; they do not combine with reference='float64'")
    tdev, jdev = _device(device)
    opts = dict(train=train, train_kwarg=train_kwarg, input_layout=input_layout, output_layout=output_layout,
                rename=rename, seed=seed, grads=grads, tdev=tdev, say=say)
    x64 = jax.enable_x64(True) if dname == "float64" else contextlib.nullcontext()
    with jax.default_device(jdev), pinned(precision=precision, tf32=tf32):
        with x64:  # record x64 as it is for the run itself (on only inside float64 checks)
            env = numerics_env(tdev)
        notes = precision_warnings(env)
        if not override and dname != "float64" and reduced_float32(dname, env, jdev.platform):
            notes.append(REDUCED_FLOAT32_NOTE)
        with x64:
            run = _run(torch_module, flax_module, example_input, variables, dname, layers=layers,
                       watch=dname == "float64", **opts)
        notes += run.notes + _dtype_warnings(run, dname, variables is not None)
        report = Report(model=name or type(torch_module).__name__, dtype=dname,
                        mode="train" if train else "eval", outputs=[], env=env, warnings=notes)
        prec = jax_precision()
        if lint or strict:
            say("trap lint")
            with x64:  # the twin is traced on the run's own (possibly float64) variables
                # (a copy of the inputs: the lint runs torch once, and a model may change them in place)
                found = lint_traced(run.torch_module, run.twin, run.variables, run.flax_args, run.plan,
                                    train=train, torch_args=torch_inputs(run.torch_args, _DTYPES[dname], tdev, False))
            report.warnings += [f"trap: {f}" for f in found]
            if strict:  # a "note" (a forward the lint could not run) says what was not read: no trap
                report.strict_findings = [str(f) for f in found if f.kind != "note"]
        if run.structure_error:
            fwd = tolerance_for(dname, FORWARD, prec, jdev.platform)
            report.outputs = [failed_comparison("output structure", run.structure_error, fwd)]
            return report
        report.warnings += (_constant_input_warnings(run.torch_args) + _batch_of_one_warnings(run.torch_args)
                            + _empty_input_warnings(run.torch_args) + _zero_warnings(run)
                            + _initial_buffer_warnings(run.torch_module, train))
        ev = _evidence(run, torch_module, flax_module, example_input, variables, dname, prec, jdev.platform,
                       override=override, rtol=rtol, atol=atol, layers=layers, opts=opts, report=report)
        report.reference = "float64" if ev.ref is not None else None
        mj = ModelJudge(run, ev)
        mj.fill(report)
        own = [c.name for c in report.outputs + report.grads if "twin's own rounding noise only" in c.note]
        if own:
            report.warnings.append(
                f"{', '.join(own[:4])}{' ...' if len(own) > 4 else ''}: some slices are within the twin's own "
                f"{dname} rounding noise only, larger there than torch's (a slice that is zero in exact "
                "arithmetic, or reductions XLA accumulates in the low dtype): the same computation, rounded "
                "differently")
        _locate_nonfinite(report, run)
        if data_parallel:  # sharded Flax vs torch and vs 1 device, BatchNorm semantics named
            from parity.data_parallel import attach
            with (jax.enable_x64(True) if dname == "float64" else contextlib.nullcontext()):
                attach(report, run, data_parallel, mj)
        if layers:
            lr = ev.rows_run
            ldt = "float64" if lr is not run else dname
            with (jax.enable_x64(True) if ldt == "float64" else contextlib.nullcontext()):
                report.layers = analyze_layers(
                    lr.torch.calls, lr.flax, lr.twin, lr.variables, lr.plan, lr.act_layouts,
                    grads=grads, train=train, rows=ev.rows, param_grads=lr.torch.param_grads, progress=say,
                    root=(worst_of(report.outputs), worst_of(report.grads)),  # the whole-model verdicts
                )
            report.first_divergence, report.divergence_kind = first_divergence(report.layers)
        say("done")
        return report


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
    # low-precision check), by ModelJudge key, torch layout: its own noise on noise slices.
    flax_other: dict[str, np.ndarray] | None = None


def _torch_only(run: CapturedRun, dname: str, *, train: bool, grads: bool, capture: bool, tdev: str,
                perturb: bool = False, seed: int = 0) -> TorchRun:
    """The run's torch side again in ``dname``: the same (already rounded) weights and inputs,
    the same cotangents; forward ops below ``dname``'s precision noted.

    perturb: move a random half of every float weight, buffer and input one ulp toward zero first
    (a noise probe): rounding-sized changes of everything that carries rounding, so a structure
    that cancels exactly in one precision (equal features, equal rows) shows the noise it has in
    another. Integer values (0, 1, a count or an index kept in a float buffer, a mask's finfo.min)
    carry no rounding and are left alone: XGLM turns such a float into an index, and a nudged 3.0
    is index 2."""
    tm = copy.deepcopy(run.torch_module).to(_DTYPES[dname])
    args = torch_inputs(run.torch_args, _DTYPES[dname], tdev, grads)
    if perturb:
        gen = torch.Generator().manual_seed(seed + 7)

        def nudge(t: torch.Tensor) -> torch.Tensor:
            flip = (torch.rand(t.shape, generator=gen) < 0.5).to(t.device) & torch.isfinite(t) & (t != t.round())
            return torch.where(flip, torch.nextafter(t, torch.zeros_like(t)), t)

        with torch.no_grad():
            for tensor in list(tm.parameters()) + list(tm.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(nudge(tensor))
        args = jax.tree_util.tree_map(
            lambda a: nudge(a.detach()).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
            and a.is_floating_point() else a, args)
    return run_torch(tm, args, train=train, grads=grads, cotangents=run.torch.cotangents or None,
                     capture=capture, watch_precision=_DTYPES[dname])


def _evidence(run: CapturedRun, torch_module, flax_module, example_input, variables, dname: str, prec: str,
              platform: str, *, override: bool, rtol, atol, layers: bool, opts: dict, report: Report) -> Evidence:
    """Run what the measured-noise judge needs (the float64 reference of a low-precision check,
    the float32 probe of a float64 check), or say in a warning why the table decides instead."""
    say, tdev, grads, train = opts["say"], opts["tdev"], opts["grads"], opts["train"]
    fwd_t = tolerance_for(dname, FORWARD, prec, platform)
    grd_t = tolerance_for(dname, GRAD, prec, platform)
    if override:  # the caller's rtol/atol replace the table, and nothing else (torch.testing)
        tf, tg = Table(fwd_t.override(rtol, atol), True), Table(grd_t.override(rtol, atol), True)
        return Evidence(dname, None, tf, tg, rows_run=run, rows=RowJudge(tf, tg))
    tf, tg = Table(fwd_t), Table(grd_t)
    ref64 = tolerance_for("float64", REFERENCE)
    if dname == "float64":
        say("float32 probe run (measures float64 noise)")
        try:
            with jax.enable_x64(True):
                probe = _torch_only(run, "float32", train=train, grads=grads, capture=layers, tdev=tdev,
                                    perturb=True, seed=opts["seed"])
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
        with jax.enable_x64(True):  # a twin declared float64 keeps its dtype (and says nothing)
            other = _own_noise_run(run, "float32", report)
        return Evidence(dname, rule, tf, tg, probe=probe, rows_run=run, rows=rows, flax_other=other)
    say("float64 reference run")
    try:
        with jax.enable_x64(True):
            if layers:  # per-layer rows run in float64 on both sides, where verdicts are sharp
                ref_vars = None
                if variables is not None:
                    ref_vars = jax.tree_util.tree_map(
                        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        variables)
                # Weights rounded to the checked dtype first: the reference then differs from the
                # low-precision runs by their arithmetic only.
                rounded = copy.deepcopy(torch_module).to(_DTYPES[dname])
                ref = _run(rounded, flax_module, example_input, ref_vars, "float64", layers=True, watch=True, **opts)
                ref_torch = ref.torch
            else:
                ref = _torch_only(run, "float64", train=train, grads=grads, capture=False, tdev=tdev)
                ref_torch = ref
    except Exception as exc:  # noqa: BLE001 -- e.g. a torch model that builds a float32 constant inside
        return _same_dtype_evidence(run, dname, prec, platform, tf, tg, opts, report,
                                    f"the float64 reference run failed ({type(exc).__name__}: {str(exc)[:160]})")
    rule = measured(tolerance_for(dname, REFERENCE, prec, platform), dname)
    if ref_torch.lower_precision or any(getattr(layer.rule, "dropped", ()) for layer in run.plan.layers):
        # The reference computes part of itself in float32 (or holds a float32 table the twin
        # computes): that part is the same in torch's own run, so torch's measured noise misses
        # its rounding (diffusers' float32 sinusoids of timesteps up to 1000), while the twin
        # computes it its own way. The twin's own noise counts on every slice then.
        rule = replace(rule, own_everywhere=True)
    if not layers:
        with jax.enable_x64(True):
            other = _own_noise_run(run, "float64", report)
        return Evidence(dname, rule, tf, tg, ref=ref_torch, flax_other=other)
    lower = _lower_warning(ref_torch, report, "float64 reference run") or _float32_tables(ref, report)
    t64f, t64g = Table(tolerance_for("float64", FORWARD)), Table(tolerance_for("float64", GRAD))
    say("float32 probe run (measures the float64 rows' noise)")
    try:
        probe = _torch_only(run, "float32", train=train, grads=grads, capture=True, tdev=tdev, perturb=True,
                            seed=opts["seed"])
        rows = RowJudge(t64f, t64g, ref64, "float32", _calls_by_key(probe.calls), probe.param_grads,
                        all_float32=lower == "float32" and not ref_torch.lower_precision)
    except Exception as exc:  # noqa: BLE001 -- rows then by the float64 table
        report.warnings.append(f"the float32 probe run of the per-layer rows failed ({type(exc).__name__}: "
                               f"{str(exc)[:120]}): rows judged by the float64 table")
        rows = RowJudge(t64f, t64g)
    other = _flax_tensors(ref) if ref.flax is not None else None
    return Evidence(dname, rule, tf, tg, ref=ref, rows_run=ref, rows=rows, flax_other=other)


def _own_noise_run(run: CapturedRun, dname: str, report: Report) -> dict[str, np.ndarray] | None:
    try:
        return _flax_values(run, dname)
    except Exception as exc:  # noqa: BLE001 -- a twin that cannot run in dname: torch's noise alone
        report.warnings.append(f"the twin's {dname} run (its own rounding noise) failed ({type(exc).__name__}: "
                               f"{str(exc)[:120]}): noise slices are judged by torch's noise alone")
        return None


def _flax_values(run: CapturedRun, dname: str) -> dict[str, np.ndarray]:
    """The twin run again in ``dname`` (variables, inputs and cotangents of ``run`` cast): its
    model-level tensors by ModelJudge key, torch layout. The twin's own rounding noise is this
    run's distance to ``run``'s values (a bug, being in both, cancels)."""
    dt = jnp.dtype(dname)

    def cast(a):
        return jnp.asarray(a, dt) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a

    to_t = run.output_map or {}
    to_f = {tp: fp for fp, tp in to_t.items()}
    cots = {to_f[p]: cast(to_flax_layout(c, run.out_layouts[p], p)) for p, c in run.torch.cotangents.items()
            if p in to_f} or None
    f = forward_backward(run.twin, jax.tree_util.tree_map(cast, run.variables),
                         jax.tree_util.tree_map(cast, run.flax_args), cots)
    out = {to_t[p]: to_torch_layout(np.asarray(v), run.out_layouts[to_t[p]]) for p, v in f.outputs.items()
           if p in to_t}
    if cots is not None:
        out.update({p: to_torch_layout(np.asarray(g), run.in_layouts[p]) for p, g in f.input_grads.items()
                    if p in run.in_layouts})
        named = run.plan.to_torch({"params": f.param_grads}, collections=("params",))
        out.update({f"param:{n}": np.asarray(g) for n, g in named.items()})
    return out


def _flax_tensors(run: CapturedRun) -> dict[str, np.ndarray]:
    """``run``'s Flax model-level tensors by ModelJudge key, torch layout."""
    f = run.flax
    out = {p: to_torch_layout(np.asarray(v), run.out_layouts[p]) for p, v in f.outputs.items()}
    out.update({p: to_torch_layout(np.asarray(g), run.in_layouts[p]) for p, g in f.input_grads.items()
                if p in run.in_layouts})
    out.update({f"param:{n}": np.asarray(g) for n, g in run.f_p_grads.items()})
    return out


def _same_dtype_evidence(run: CapturedRun, dname: str, prec: str, platform: str, tf: Table, tg: Table,
                         opts: dict, report: Report, why: str) -> Evidence:
    """No float64 run: the noise is measured by the torch run again in ``dname`` with a random
    half of every weight, buffer and input one ulp nearer zero, against the run itself (torch is
    then the reference: the twin's error against torch must be within k times what rounding-sized
    changes move torch by). Where even that cannot run, the table, with INCONCLUSIVE for a pass
    that only atol explains."""
    say, tdev, grads, train, layers = opts["say"], opts["tdev"], opts["grads"], opts["train"], run.torch.calls is not None
    say(f"{dname} probe run (no float64 run: measures the noise in {dname})")
    try:
        probe = _torch_only(run, dname, train=train, grads=grads, capture=layers, tdev=tdev, perturb=True,
                            seed=opts["seed"])
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


class ModelJudge:
    """Judges the model-level tensors of one check (outputs, input and parameter gradients), and
    any other Flax value of the same tensor (the data-parallel run's), by the same rule."""

    def __init__(self, run: CapturedRun, ev: Evidence):
        self.run, self.ev = run, ev
        t = run.torch
        self.own_probe = self.own_ref = {}
        if ev.model_rule is None:
            self.refs = self.probes = None
        elif ev.ref is not None:  # low precision: truth = float64 run, noise = torch's own error
            self.refs = _tensors(ev.ref if isinstance(ev.ref, TorchRun) else ev.ref.torch)
            self.probes = _tensors(t)
            if ev.flax_other is not None:  # the twin's own noise: this run against its float64 run
                self.own_probe, self.own_ref = _flax_tensors(run), ev.flax_other
        else:  # float64: truth = torch's own run, noise = the float32 probe's error, scaled
            self.refs, self.probes = _tensors(t), _tensors(ev.probe)
            if ev.flax_other is not None:  # the twin's own noise: its float32 run against this one
                self.own_probe, self.own_ref = ev.flax_other, _flax_tensors(run)

    def judge(self, kind: str, key: str, name: str, flax_value, torch_value, layout: str,
              axis: int | str | None = "auto", probe=None) -> Comparison:
        """``kind`` FORWARD or GRAD; ``key`` the tensor's key in _tensors (``out...``,
        ``input[...]``, ``param:<name>``); Flax value in Flax layout. probe: another run of the
        same tensor whose error against the reference measures the noise (torch layout; default:
        the check's own probe)."""
        table = self.ev.table_forward if kind == FORWARD else self.ev.table_grad
        if self.refs is None or key not in self.refs or key not in self.probes:
            return judge_or_table(name, flax_value, torch_value, None, table, layout=layout)
        return judge_or_table(name, flax_value, torch_value, self.ev.model_rule, table, layout=layout,
                              reference=self.refs[key], probe=self.probes[key] if probe is None else probe,
                              flax_probe=self.own_probe.get(key), flax_reference=self.own_ref.get(key), axis=axis)

    def fill(self, report: Report) -> None:
        run, t, f = self.run, self.run.torch, self.run.flax
        single = len(t.outputs) == 1
        report.outputs = [self.judge(FORWARD, p, _label("output", p, "out", single), f.outputs[p], v,
                                     run.out_layouts[p]) for p, v in t.outputs.items()]
        report.input_grads, report.param_grads = [], []
        if not t.input_grads and not t.param_grads:  # grads=False
            return
        single = len(t.input_grads) == 1
        report.input_grads = [self.judge(GRAD, p, _label("grad input", p, "input", single), f.input_grads[p], g,
                                         run.in_layouts[p]) for p, g in t.input_grads.items()]
        tied = getattr(run.plan, "tied", None) or {}
        # A frozen torch parameter (requires_grad=False: RoFormer's sinusoidal table) has no gradient
        # to compare; its Flax twin often computes it in code and has no leaf for it at all.
        frozen = {n for n, p in run.torch_module.named_parameters() if not p.requires_grad}
        for n, g in t.param_grads.items():
            if n in frozen:
                continue
            if n not in run.f_p_grads:
                report.param_grads.append(failed_comparison(
                    f"grad {n}", "the port gives no Flax gradient for this torch parameter"
                    + (f" (tied to {tied[n]})" if n in tied else ""), self.ev.table_grad))
                continue
            report.param_grads.append(self.judge(GRAD, f"param:{n}", f"grad {n}", run.f_p_grads[n], g, AS_IS, axis=0))


def _tensors(t: TorchRun) -> dict[str, np.ndarray]:
    """A torch run's model-level tensors by ModelJudge key."""
    return {**t.outputs, **t.input_grads, **{f"param:{n}": g for n, g in t.param_grads.items()}}


def _locate_nonfinite(report: Report, run: CapturedRun) -> None:
    """NaN on both sides in a compared tensor: INVALID, with where it first appeared. A NaN or inf
    on one side only is that tensor's FAIL; say where that side first made it."""
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
