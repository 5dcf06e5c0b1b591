"""parity.record: the torch side of a golden check, written to a bundle (parity.golden._bundle).

It runs exactly the torch runs that parity.check runs (parity.runtime.run_torch, the checker's
one-ulp-nudged probe), so that parity.verify can judge a Flax twin from the bundle alone, with
the same judge, on a machine without torch.
"""
from __future__ import annotations

import copy
import gc
import platform
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import torch

from parity.golden._bundle import BundleError, BundleTooLarge, BundleWriter, encode_tree, key
from parity.runtime import (ActivationLayouts, TorchRun, as_args, input_layouts, input_paths, run_torch,
                            torch_inputs, train_mode_matters)
from parity.runtime.layouts import model_input_ids, split_output_spec
from weight_port import Inputs, bind_keywords
from weight_port.layout import AS_IS
from weight_port import tied_aliases
from weight_port import rule_for
from weight_port import to_numpy

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Per-layer activations stop here unless the caller says otherwise: a bundle of a large model's
# every layer input, output and cotangent is several times the model's size.
DEFAULT_MAX_BYTES = 2 << 30


def _numpy_tree(tree):
    return jax.tree_util.tree_map(lambda x: to_numpy(x.detach()) if isinstance(x, torch.Tensor) else x, tree)


def _run_tensors(group: str, t: TorchRun, *, cotangents: bool) -> dict[str, np.ndarray]:
    out = {key(group, "out", p): v for p, v in t.outputs.items()}
    if cotangents:
        out.update({key(group, "cot", p): np.asarray(c) for p, c in t.cotangents.items()})
    out.update({key(group, "igrad", p): g for p, g in t.input_grads.items()})
    out.update({key(group, "pgrad", n): g for n, g in t.param_grads.items()})
    return out


class _Budget:
    """Counts the per-layer bytes and raises BundleTooLarge, naming the cap, once past it."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0

    def add(self, a: np.ndarray) -> np.ndarray:
        self.used += a.nbytes
        if self.used > self.max_bytes:
            raise BundleTooLarge(f"the per-layer activations exceed max_bytes={self.max_bytes} (--max-bytes): "
                                 "record without --layers, on a smaller input, or raise the cap")
        return a


def _calls(group: str, calls, acts: ActivationLayouts | None, budget: _Budget) -> tuple[list[dict], dict]:
    """(the manifest entry of every recorded module call, its tensors for layers.safetensors)."""
    meta, tensors = [], {}
    for i, c in enumerate(calls):
        entry = {"path": c.path, "call": c.call, "start": c.start, "type": c.torch_type,
                 "inputs": list(c.inputs), "lower_precision": c.lower_precision}
        if acts is not None:
            entry["in_layouts"] = acts.inputs.get((c.path, c.call), {})
            entry["out_layouts"] = acts.outputs.get((c.path, c.call), {})
            entry["declared"] = sorted(p for p in c.outputs if acts.is_declared(c.path, c.call, p))
        meta.append(entry)
        for kind, values in (("in", c.input_values), ("out", c.output_values), ("gin", c.input_grads),
                             ("gout", c.output_grads)):
            for leaf, v in values.items():
                tensors[key(group, i, kind, leaf)] = budget.add(np.asarray(v))
    return meta, tensors


def _state(module: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state_dict as numpy with every storage once, {alias: canonical} for the tied names: an LM
    head tied to its embedding is one tensor in the bundle, as in a safetensors checkpoint).
    Parameters are views of the module's own storage, not copies (a second copy of the model is
    what the memory budget of record cannot afford): write them before anything changes the
    module. Buffers are copied (a train-mode run updates BatchNorm statistics in place)."""
    state = module.state_dict(keep_vars=True)
    tied = tied_aliases(state.items())
    params = {id(p) for p in module.parameters()}
    return {n: to_numpy(t.detach()) if id(t) in params else to_numpy(t.detach()).copy()
            for n, t in state.items() if n not in tied}, tied


def _plan_inputs(tm: torch.nn.Module, args: tuple, in_layouts: dict[str, str]) -> dict:
    """What the port needs from the torch side when it runs without torch: every module's path,
    class and rule kind, the forward's call order, the flatten order of Linears after a flatten
    of channels-first maps, and the layout of every positional input. ``tm`` is record's private
    copy: both traces run it in eval mode and remove their hooks, so no copy of it is made."""
    from weight_port import torch_call_order

    modules = []
    for path, m in tm.named_modules():
        rule = rule_for(type(m))
        modules.append({"path": path, "type": type(m).__name__, "kind": rule.name if rule is not None else None})
    try:
        order = torch_call_order(tm, tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                                          for a in args))
    except Exception:  # noqa: BLE001 -- names pair most models; the order is the fallback
        order = None
    flatten = {}
    try:
        from weight_port import find_flattened_linears

        plain = tuple(a.detach() for a in args if isinstance(a, torch.Tensor))
        flatten = {p: list(s) if s else None for p, s in (find_flattened_linears(tm, plain) or {}).items()}
    except Exception:  # noqa: BLE001 -- the Flax side's own trace decides then
        flatten = {}
    positional = [in_layouts.get(f"input[{i}]", AS_IS) for i in range(len(args))]
    frozen = [n for n, p in tm.named_parameters() if not p.requires_grad]
    return {"modules": modules, "call_order": order, "flatten": flatten, "input_layouts": in_layouts,
            "positional_layouts": positional, "frozen": frozen}


def _keywords(example_input) -> tuple[dict | None, dict[str, np.ndarray]]:
    """(the manifest entry of an Inputs call, its Flax-only array constants by leaf name): how
    many positional arguments, the keywords in order (their values are the inputs input[n]...),
    and the Flax-only keywords (None when the call is positional). torch_only keywords are bound
    into the recorded torch module and need nothing on the Flax side."""
    if not isinstance(example_input, Inputs):
        return None, {}
    only = _numpy_tree(dict(example_input.flax_only))
    leaves = {p: np.asarray(v) for p, v in zip(
        input_paths((only,)), jax.tree_util.tree_leaves(only)) if hasattr(v, "shape")}
    tree = encode_tree(only, root="flax_only")
    leaves = {p.replace("input[0]", "flax_only", 1): v for p, v in leaves.items()}
    return {"positional": len(example_input.args), "keys": list(example_input.kwargs), "flax_only": tree,
            "torch_only": sorted(example_input.torch_only)}, leaves


def record(torch_module: torch.nn.Module, example_input, path, *, layers: bool = False, dtype: str = "float32",
           seed: int = 0, train: bool = False, input_layout=None, output_layout=None, name: str | None = None,
           max_bytes: int = DEFAULT_MAX_BYTES, progress: Callable[[str], None] | None = None) -> Path:
    """Run ``torch_module`` on ``example_input`` as parity.check runs it and write a golden bundle
    to the new directory ``path`` (parity.golden._bundle); returns that path.

    example_input: the positional arguments in torch layout ([N, C, H, W] for images; a pytree of
    tensors / arrays allowed), or parity.Inputs(*args, **kwargs) (the keyword inputs and the
    Flax-only constants are recorded; parity.verify calls the twin with them). dtype: the checked
    dtype ("float32" or "float64"; float16 and bfloat16 records are written but their measured
    noise comes from a float64 reference the same way). The bundle holds the weights, the inputs,
    the outputs, the seeded cotangents (``seed + 1``, as parity.check), every input and parameter
    gradient, the float64 reference run (a float64 record: the float32 run nudged by one ulp that
    measures float64 noise), and with ``layers`` every module call's inputs, outputs and
    cotangents in the run the per-layer rows are judged on (float64) and in the float32 probe, up to ``max_bytes`` (BundleTooLarge
    past it, and nothing is left at ``path``). input_layout / output_layout as for parity.check.
    """
    from parity.checker import _torch_only  # the checker's nudged probe, the same one
    from parity.pair import CheckOptions, PreparedPair
    from parity.numerics import numerics_env, pinned

    say = progress or (lambda msg: None)
    if dtype not in DTYPES:
        raise BundleError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if Path(path).exists():
        raise BundleError(f"{path} exists; record into a new directory (a bundle is never overwritten)")
    tdtype = DTYPES[dtype]
    budget = _Budget(max_bytes)
    # Peak memory (the design's budget: 1.3x the model's bytes plus what is recorded): one private
    # copy of the model, its weights written from that copy's own storage before the float64 run,
    # which then converts that copy in place (float32 storage freed), never a second copy beside it.
    with pinned(precision="highest"), BundleWriter(path) as writer:
        env = numerics_env("cpu")
        tm = copy.deepcopy(torch_module).to(dtype=tdtype)
        tm.train(train)
        # Keyword inputs are bound into the private copy as parity.check binds them (its leaves
        # named input[k] after the positional ones); verify binds the twin from the manifest.
        keywords, flax_only = _keywords(example_input)
        tm, _, example_input = bind_keywords(tm, None, example_input)
        args = torch_inputs(as_args(example_input), tdtype, "cpu", True)
        given = torch_inputs(args, tdtype, "cpu", True)
        in_layouts = input_layouts(tm, args, input_layout)
        # The port plan's inputs and the producers of the outputs, before any run leaves gradients
        # on the model (a deep copy would copy them).
        say("port plan inputs (call order, flatten order)")
        plan_in = _plan_inputs(tm, given, in_layouts)
        say("hooked forward (output producers)")
        # Which layer kind made each output: decides its layout where the shapes fit both (one more
        # hooked forward, like parity.check's).
        # A train-mode forward updates BatchNorm statistics: on a copy then, else on the model itself
        hooked = run_torch(copy.deepcopy(tm) if train else tm, torch_inputs(given, tdtype, "cpu", False), train=train, grads=False,
                           capture=True)
        _, layer_layouts = split_output_spec(output_layout, list(hooked.outputs), [p for p, _ in tm.named_modules()])
        spec = output_layout if not isinstance(output_layout, dict) else {
            k: v for k, v in output_layout.items() if not any(k == p or k.startswith(p + ":") for p in layer_layouts)}
        out_acts = ActivationLayouts(hooked.calls, {}, hooked.aliases, layer_layouts)
        producers = {p: out_acts.of_tensor(hooked.raw_outputs[p]) for p in hooked.outputs}
        del hooked, out_acts
        gc.collect()  # a train-mode copy sits in reference cycles (hooks close over their modules)
        say("writing the weights")
        # The weights as the runs below see them (train-mode statistics not yet updated)
        state, tied = _state(tm)
        writer.add("weights.safetensors", state)
        del state
        # run.safetensors a tensor at a time: each parameter gradient is written as autograd
        # finishes it (run_torch's param_grad_sink) and never held, in this run or the float64 one
        run_file = writer.stream("run.safetensors")

        def sink(group):
            return lambda n, g: run_file.put(key(group, "pgrad", n), g)

        say("torch forward/backward")
        t = run_torch(tm, args, train=train, grads=True, cotangent_seed=seed + 1, capture=layers and dtype == "float64",
                      watch_precision=tdtype if dtype == "float64" else None, param_grad_sink=sink("main"))
        # the outputs' autograd graph holds every parameter: dropped, so that the model's storage
        # is freed when the model is (below: before the bundle's tensors are written)
        t.raw_outputs = {}
        # The torch half of a prepared pair (no twin on this machine): the probe below is the
        # checker's own, run the same way.
        like = PreparedPair(tm, None, None, None, {}, given, (), in_layouts, dtype, "cpu", train)
        probe_opts = CheckOptions(dtype=dtype, seed=seed)
        run: dict[str, np.ndarray] = {}
        run.update({key("main", "input", p): to_numpy(x.detach()) for p, x in
                    zip(input_paths(given), jax.tree_util.tree_leaves(given)) if isinstance(x, torch.Tensor)})
        run.update(_run_tensors("main", t, cotangents=True))
        run.update({key("main", "flax_only", p): v for p, v in flax_only.items()})
        layer_files: dict[str, np.ndarray] = {}
        calls_meta: dict[str, list[dict]] = {}
        lower = {"main": t.lower_precision}
        mode_matters = train_mode_matters(tm)
        if dtype == "float64":
            say("float32 probe run (measures float64 noise)")
            probe = _torch_only(like, probe_opts, "float32", capture=layers, cotangents=t.cotangents, perturb=True)
            run.update(_run_tensors("probe", probe, cotangents=False))
            if layers:
                acts = ActivationLayouts(t.calls, model_input_ids(args, in_layouts), t.aliases, layer_layouts)
                calls_meta["rows"], tens = _calls("rows", t.calls, acts, budget)
                layer_files.update(tens)
                calls_meta["probe"], tens = _calls("probe", probe.calls, None, budget)
                layer_files.update(tens)
        else:
            probe_calls = None
            if layers:  # on the float32 copy, before it becomes the float64 one
                say("float32 probe run (measures the float64 rows' noise)")
                probe = _torch_only(like, probe_opts, "float32", capture=True, cotangents=t.cotangents,
                                    perturb=True)
                probe_calls, probe_params = probe.calls, probe.param_grads
                del probe
            say("float64 reference run")
            # In place: the gradients of the run above are held as numpy (recorded), the weights
            # are on disk, so the float32 storage is freed as each parameter is converted.
            tm.zero_grad(set_to_none=True)
            del like
            tm64 = tm.to(torch.float64)
            args64 = torch_inputs(given, torch.float64, "cpu", True)
            ref = run_torch(tm64, args64, train=train, grads=True, cotangents=t.cotangents, capture=layers,
                            watch_precision=torch.float64, param_grad_sink=sink("ref"))
            ref.raw_outputs = {}
            lower["ref"], lower["ref_first"] = ref.lower_precision, ref.lower_first
            run.update(_run_tensors("ref", ref, cotangents=False))
            del tm, tm64  # the float64 model, before the run's tensors are written
            gc.collect()  # its modules sit in reference cycles (the traces' hooks close over them)
            if layers:
                acts = ActivationLayouts(ref.calls, model_input_ids(args64, in_layouts), ref.aliases, layer_layouts)
                calls_meta["rows"], tens = _calls("rows", ref.calls, acts, budget)
                layer_files.update(tens)
                calls_meta["probe"], tens = _calls("probe", probe_calls, None, budget)
                layer_files.update(tens)
                layer_files.update({key("probe_params", n): g for n, g in probe_params.items()})
        say("writing the bundle")
        run_file.update(run)
        del run
        run_file.close()
        if layers:
            writer.add("layers.safetensors", layer_files)
        manifest = {
            "model": name or type(torch_module).__name__,
            "dtype": dtype,
            "train": train,
            "train_mode_matters": mode_matters,
            "seed": seed,
            "cotangent_seed": seed + 1,
            "layers": layers,
            "reference": "probe" if dtype == "float64" else "float64",
            "lower_precision": lower,
            "inputs": {"tree": encode_tree(_numpy_tree(given)), "layouts": in_layouts, "keywords": keywords},
            "outputs": {"paths": list(t.outputs), "shapes": {p: list(v.shape) for p, v in t.outputs.items()},
                        "producer_layouts": producers,
                        "output_layout": spec},
            "plan": {**plan_in, "tied": tied},
            "calls": calls_meta,
            "env": {**env, "python": platform.python_version()},
        }
        return writer.finish(manifest)


__all__ = ["DEFAULT_MAX_BYTES", "record"]
