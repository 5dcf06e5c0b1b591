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
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity.compare import compare, compare_to_reference, failed_comparison, worst_of
from parity.layers import analyze_layers, first_divergence
from parity.lint import lint_traced
from parity.numerics import (REDUCED_FLOAT32_NOTE, jax_precision, numerics_env, pinned, precision_warnings,
                             reduced_float32)
from parity.report import Report
from parity.runtime import (ActivationLayouts, FlaxRun, FlaxTwin, TorchRun, as_args, flax_inputs,
                            forward_backward, input_layouts, input_paths, output_layouts, output_shapes, run_torch,
                            structure, torch_inputs, train_mode_matters)
from parity.runtime.layouts import LayoutSpec, model_input_ids, split_output_spec
from parity.runtime.torch_runner import keystr
from parity.tolerances import FORWARD, GRAD, REFERENCE, forward_noise_floor, noise_floor, tolerance_for
from weight_port.keywords import bind_keywords
from weight_port.layout import AS_IS, to_flax_layout
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
    return plan, notes


def _run(torch_module, flax_module, example_input, variables, dname, *, train, train_kwarg, input_layout,
         output_layout, rename, seed, grads, tdev, say, layers) -> CapturedRun:
    tdtype = _DTYPES[dname]
    tm = copy.deepcopy(torch_module).to(device=tdev, dtype=tdtype)
    tm.train(train)
    # Keyword inputs (parity.Inputs) are bound into the private torch copy and a rebuilt Flax
    # module: everything below calls both top modules positionally.
    tm, flax_module, example_input = bind_keywords(tm, flax_module, example_input)
    args = torch_inputs(as_args(example_input), tdtype, tdev, grads)
    in_layouts = input_layouts(tm, args, input_layout)
    twin = FlaxTwin(flax_module, train=train, train_kwarg=train_kwarg, train_mode_matters=train_mode_matters(tm))
    say("porting weights")
    plan, notes = _port(tm, flax_module, args, in_layouts, rename)
    if variables is None:
        variables = plan.to_flax(tm.state_dict())
    f_args = flax_inputs(args, in_layouts)
    say("torch forward/backward")
    t = run_torch(tm, args, train=train, grads=grads, cotangent_seed=seed + 1, capture=layers)
    f_shapes = {p: s.shape for p, s in output_shapes(twin, variables, f_args).items()}
    to_t = _align(list(f_shapes), list(t.outputs))
    if to_t is None:
        err = (f"output structures differ: torch {structure(t.raw_outputs)} vs Flax "
               f"{'{' + ', '.join(f_shapes) + '}'}")
        return CapturedRun(plan, twin, variables, args, f_args, t, None, {}, in_layouts, {}, None, tm, notes, err)
    # output_layout entries naming a layer (by torch module path) are for its per-layer rows
    output_layout, layer_layouts = split_output_spec(output_layout, list(t.outputs),
                                                     [p for p, _ in tm.named_modules()])
    acts = None
    if t.calls is not None:
        acts = ActivationLayouts(t.calls, model_input_ids(args, in_layouts), t.aliases, layer_layouts)

    def producer(path: str):
        nonlocal acts
        if acts is None:  # only asked when the shapes fit both layouts: one more forward, hooked
            probe = run_torch(copy.deepcopy(tm), torch_inputs(args, tdtype, tdev, False), train=train,
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
    return CapturedRun(plan, twin, variables, args, f_args, t, f, f_named, in_layouts, out_layouts,
                       acts, tm, notes)


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


def _first_nonfinite(run: CapturedRun) -> str | None:
    """Where a NaN or Inf first appears, in the order the values are made: inputs, then each
    layer's output (torch, in execution order), the model outputs, Flax's layer outputs, then the
    gradients. None when everything is finite."""
    def layer(path: str) -> str:
        return f"layer {path or '<root>'}"

    found = [(p, v) for p, v in zip(input_paths(run.torch_args), jax.tree_util.tree_leaves(run.torch_args))]
    for tc in run.torch.calls or []:  # completion order: a module after its children
        found += [(f"torch output {p} of {layer(tc.path)}", v) for p, v in tc.output_values.items()]
    found += [(f"torch {p}", v) for p, v in run.torch.outputs.items()]
    if run.flax is not None:
        for key, outs in run.flax.call_outputs.items():
            found += [(f"Flax output {p} of {key}", v) for p, v in outs.items()]
        found += [(f"Flax {p}", v) for p, v in run.flax.outputs.items()]
    for tc in reversed(run.torch.calls or []):  # roughly backward order
        found += [(f"torch gradient at output {p} of {layer(tc.path)}", v) for p, v in tc.output_grads.items()]
    found += [(f"torch grad {p}", v) for p, v in {**run.torch.input_grads, **run.torch.param_grads}.items()]
    if run.flax is not None:
        found += [(f"Flax grad {p}", v) for p, v in {**run.flax.input_grads, **run.f_p_grads}.items()]
    for where, value in found:
        kind = _bad(value)
        if kind:
            return f"{kind} in {where}"
    return None


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
    rtol/atol: override the table. precision: JAX matmul precision; tf32 (default: matching
    ``precision``) is torch's TF32 flag, and the report warns when the two disagree.
    reference="float64": also run both sides in float64 and judge the ``dtype`` run by Flax's
    error against the torch float64 result relative to torch's own (the per-layer analysis then
    runs in float64, where verdicts are sharp). A float32 check whose arithmetic is reduced
    precision (TF32 on a GPU, bf16 passes on a TPU; parity.numerics.reduced_float32) takes this
    mode by itself unless rtol/atol are given, and says so in a warning. device: "cpu" (default)
    or "cuda". The torch
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
    if reference and (rtol is not None or atol is not None):
        raise ValueError("rtol/atol override the table; they do not combine with reference='float64'")
    tdev, jdev = _device(device)
    opts = dict(train=train, train_kwarg=train_kwarg, input_layout=input_layout, output_layout=output_layout,
                rename=rename, seed=seed, grads=grads, tdev=tdev, say=say)
    x64 = jax.enable_x64(True) if dname == "float64" else contextlib.nullcontext()
    with jax.default_device(jdev), pinned(precision=precision, tf32=tf32):
        with x64:  # record x64 as it is for the run itself (on only inside float64 checks)
            env = numerics_env(tdev)
        notes = precision_warnings(env)
        if reference is None and rtol is None and atol is None and reduced_float32(dname, env, jdev.platform):
            reference = "float64"
            notes.append(REDUCED_FLOAT32_NOTE)
        with x64:
            run = _run(torch_module, flax_module, example_input, variables, dname,
                       layers=layers and not reference, **opts)
        notes += run.notes + _dtype_warnings(run, dname, variables is not None)
        report = Report(model=name or type(torch_module).__name__, dtype=dname,
                        mode="train" if train else "eval", outputs=[], reference=reference, env=env,
                        warnings=notes)
        prec = jax_precision()
        fwd = tolerance_for(dname, FORWARD, prec).override(rtol, atol)
        report.invalid = _first_nonfinite(run)
        if lint or strict:
            say("trap lint")
            with x64:  # the twin is traced on the run's own (possibly float64) variables
                found = lint_traced(run.torch_module, run.twin, run.variables, run.flax_args, run.plan,
                                    train=train, torch_args=run.torch_args)
            report.warnings += [f"trap: {f}" for f in found]
            if strict:  # a "note" (a module fx could not trace) says what was not read: no trap
                report.strict_findings = [str(f) for f in found if f.kind != "note"]
        if run.structure_error:
            report.outputs = [failed_comparison("output structure", run.structure_error, fwd)]
            return report
        report.warnings += (_constant_input_warnings(run.torch_args) + _batch_of_one_warnings(run.torch_args)
                            + _zero_warnings(run))

        def reference_run(capture_layers: bool) -> CapturedRun:
            say("float64 reference run")
            with jax.enable_x64(True):
                ref_vars = None
                if variables is not None:
                    ref_vars = jax.tree_util.tree_map(
                        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        variables)
                # Weights rounded to the checked dtype first: the reference then differs from the
                # low-precision runs by their arithmetic only, and user-given low-precision
                # variables upcast to exactly the reference's weights.
                rounded = copy.deepcopy(torch_module).to(_DTYPES[dname])
                return _run(rounded, flax_module, example_input, ref_vars, "float64", layers=capture_layers, **opts)

        ref = reference_run(layers) if reference else None
        _judge_model(report, run, ref, dname, prec, rtol, atol, grads)
        floored = [c.name for c in report.outputs + report.grads if c.floored]
        escalated = bool(floored) and ref is None and dname != "float64" and rtol is None and atol is None
        if escalated:
            # Passing under the a-priori floor is not evidence (a small tensor is not a cancelled
            # one); the float64 run measures the noise, and the verdict is taken from it.
            # (its per-layer capture is not needed: the run's own analysis is kept, below)
            where = f"{', '.join(floored)}: under the {dname} noise floor and outside the relative tolerance"
            try:
                ref = reference_run(False)
            except Exception as exc:  # noqa: BLE001 -- e.g. a torch model that cannot run in float64
                escalated = False
                report.warnings.append(
                    f"{where}; the float64 run that would measure their noise failed "
                    f"({type(exc).__name__}: {str(exc)[:160]}), so they are judged by the floor alone")
            else:
                report.reference = "float64"
                report.warnings.append(f"{where}, so judged against a float64 run instead (the fp64-reference rule)")
                _judge_model(report, run, ref, dname, prec, rtol, atol, grads)
        if ref is not None and report.invalid is None:
            bad = _first_nonfinite(ref)
            report.invalid = f"{bad} (float64 reference run)" if bad else None
        if data_parallel:  # sharded Flax vs torch and vs 1 device, BatchNorm semantics named
            from parity.data_parallel import attach
            with (jax.enable_x64(True) if dname == "float64" else contextlib.nullcontext()):
                attach(report, run, data_parallel, dname, prec, rtol=rtol, atol=atol, grads=grads)
        if layers:
            # Per-layer verdicts need sharp tolerances: in reference mode they run in float64.
            # A model-level escalation (a tensor under its floor) keeps the run's own per-layer
            # analysis, whose floors are local: a twin that computes in float32 by design (an HF
            # module's dtype) would fail a float64 layer table for rounding alone.
            lr = run if escalated else ref or run
            ldt = "float64" if lr is ref else dname
            over = (rtol, atol) if lr is not ref else (None, None)
            with (jax.enable_x64(True) if ldt == "float64" else contextlib.nullcontext()):
                report.layers = analyze_layers(
                    lr.torch.calls, lr.flax, lr.twin, lr.variables, lr.plan, lr.act_layouts,
                    grads=grads, train=train,
                    forward_tol=tolerance_for(ldt, FORWARD, prec).override(*over),
                    grad_tol=tolerance_for(ldt, GRAD, prec).override(*over),
                    param_grads=lr.torch.param_grads, progress=say, dtype=ldt,
                    root=None if lr is ref else (worst_of(report.outputs), worst_of(report.grads)),
                )
            report.first_divergence, report.divergence_kind = first_divergence(report.layers)
        say("done")
        return report


def _norm(values) -> float:
    """Euclidean norm of all float leaves together (torch tensors or arrays)."""
    total = 0.0
    for v in values:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().double().numpy() if v.is_floating_point() else None
        # jnp.issubdtype: numpy's own does not count bfloat16 (ml_dtypes) as floating, which
        # made every bfloat16 run's noise floor 0.
        if v is not None and jnp.issubdtype(np.asarray(v).dtype, jnp.floating):
            total += float(np.sum(np.square(np.asarray(v, dtype=np.float64))))
    return float(np.sqrt(total))


def model_grad_floor(run: CapturedRun, dname: str) -> float:
    """Noise floor of the whole-model gradients: from the output cotangent and the inputs."""
    inputs = jax.tree_util.tree_leaves(run.torch_args)
    return noise_floor(dname, GRAD, _norm(run.torch.cotangents.values()), _norm(inputs))


def param_grad_floors(calls, dname: str) -> dict[str, float]:
    """Noise floor of each torch parameter's gradient from its own module's calls: the floor of
    parity.tolerances.noise_floor at that module's output cotangent and input norms, summed over
    the module's calls (each call adds its own sum of products). Empty without captured calls.

    A parameter gradient is a sum over that layer's products only, so its rounding noise scales
    with that layer's norms; the model's input and output-cotangent norms overstate it by orders of
    magnitude in a deep model (in bfloat16 the model-wide floor exceeded every UNet gradient, so
    none was compared).
    """
    floors: dict[str, float] = {}
    for tc in calls or ():
        if not tc.output_grads:
            continue
        f = noise_floor(dname, GRAD, _norm(tc.output_grads.values()), _norm(tc.inputs.values()))
        for pname, _ in tc.module.named_parameters(recurse=False):
            full = f"{tc.path}.{pname}" if tc.path else pname
            floors[full] = floors.get(full, 0.0) + f
    return floors


def model_forward_floor(run: CapturedRun, dname: str) -> float:
    """Noise floor of the model's outputs: from the norm of the model's inputs."""
    return forward_noise_floor(dname, _norm(jax.tree_util.tree_leaves(run.torch_args)))


def _judge_model(report: Report, run: CapturedRun, ref: CapturedRun | None, dname: str, prec: str, rtol, atol,
                 grads: bool) -> None:
    """Fill the report's output, input-gradient and parameter-gradient comparisons."""
    floor = model_grad_floor(run, dname) if grads else 0.0
    # Per-parameter floors where the per-layer capture ran (the reference run's, in reference
    # mode: the same magnitudes); the model-wide floor is the fallback (layers=False, tied names).
    p_floors = param_grad_floors((ref or run).torch.calls, dname) if grads else {}
    out_floor = model_forward_floor(run, dname)
    if ref is None:
        fwd = tolerance_for(dname, FORWARD, prec).override(rtol, atol)
        if rtol is None and atol is None:  # a per-call override is the whole criterion (its atol
            fwd = fwd.with_floor(out_floor)  # is the absolute part the caller chose)
        grd = tolerance_for(dname, GRAD, prec).override(rtol, atol)

        def judge(kind, nm, f, t, layout, ref_value, fl):
            return compare(nm, f, t, fwd if kind == FORWARD else grd.with_floor(fl), layout=layout)
    else:
        ref_tol = tolerance_for(dname, REFERENCE, prec)

        def judge(kind, nm, f, t, layout, ref_value, fl):
            return compare_to_reference(nm, f, t, ref_value, ref_tol, layout=layout,
                                        floor=fl if kind == GRAD else out_floor)

    def safe(kind, nm, f, t, layout, ref_value, fl=floor):
        try:
            return judge(kind, nm, f, t, layout, ref_value, fl)
        except ValueError as exc:  # shape mismatch: a wrong twin, reported, not raised
            return failed_comparison(nm, str(exc), tolerance_for(dname, kind, prec))

    t, f = run.torch, run.flax
    single = len(t.outputs) == 1
    report.input_grads, report.param_grads = [], []  # a re-judgement (fp64 escalation) starts afresh
    report.outputs = [safe(FORWARD, _label("output", p, "out", single), f.outputs[p], v, run.out_layouts[p],
                           ref.torch.outputs[p] if ref else None) for p, v in t.outputs.items()]
    if not grads:
        return
    single = len(t.input_grads) == 1
    report.input_grads = [safe(GRAD, _label("grad input", p, "input", single), f.input_grads[p], g,
                               run.in_layouts[p], ref.torch.input_grads[p] if ref else None)
                          for p, g in t.input_grads.items()]
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
                + (f" (tied to {tied[n]})" if n in tied else ""), tolerance_for(dname, GRAD, prec)))
            continue
        report.param_grads.append(safe(GRAD, f"grad {n}", run.f_p_grads[n], g, AS_IS,
                                       ref.torch.param_grads[n] if ref else None, p_floors.get(n, floor)))


def assert_parity(*args, **kwargs) -> Report:
    """check(...) that raises AssertionError carrying the report table when parity fails."""
    report = check(*args, **kwargs)
    if not report.ok:
        raise AssertionError("\n" + str(report))
    return report
