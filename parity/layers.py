"""Per-layer parity: every module's output and cotangent on both sides, isolated and inherited error.

Both sides are recorded by the one engine (parity.runtime): torch hooks on every module record
its inputs, outputs and their gradients; the Flax runner records every submodule call (Linen
interceptors, or NNX recording subclasses) with its module path and when it began and ended,
with the cotangent at every output. Layers that own tensors are paired as the port paired them
(``down.0.conv1`` <-> ``down_0/conv1``); any other module only with the Flax call that holds
exactly the same of those layers (``_pair_calls``), else its row says "not paired". Each
activation's layout is the caller's (``output_layout=`` by layer path), else the one layout in
which its torch and Flax shapes agree, else the kind of layer that made it
(weight_port.layout.kind_layout), never its number of dimensions; else it is reported unknown.

Two errors per layer:
  accumulated  the Flax model's own intermediate vs torch's: includes everything inherited from
               upstream layers.
  isolated     the Flax layer run alone on *torch's* input for that layer (converted to Flax
               layout) with that layer's variables: non-zero only if this layer itself differs.
Backward likewise: "isolated" is the Flax layer's VJP at torch's input with torch's output
cotangent, compared against torch's input cotangent and the layer's parameter gradients, so a
bug that only exists in gradients (stop_gradient, a wrong custom_vjp) is pinned to its layer.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from parity import _layer_runs
from parity._heap import give_back
from parity._threads import in_order
from parity.judge import Comparison, NoEvidence, Table, failed_comparison, judge, measured, slice_axis, worst_of
from parity.runtime import (FlaxCall, FlaxRun, FlaxTwin, call_key, flatten, forward_backward, match_outputs,
                            param_grads_for, to_host, wanted_grads)
from parity.runtime.layouts import fitting_layouts, resolve
from parity.tolerances import Tolerance
from weight_port.layout import AS_IS, to_flax_layout, to_torch_layout
from weight_port import flax_path_str, torch_to_flax_path
from weight_port import PortPlan

if TYPE_CHECKING:  # (torch-free at run time: parity verify judges recorded torch calls)
    from parity.runtime import ActivationLayouts, TorchCall

ROOT = "<root>"  # how the report names the top-level module (its torch path is "")


@dataclass
class LayerRow:
    """One module call, in execution order (a module finishes after all of its children).

    isolated / accumulated: forward error of the output (see the module docstring).
    grad_isolated: worst of the input cotangents and the parameter gradients of this layer's
    subtree from the Flax layer's VJP at torch's input with torch's output cotangent (of the
    parameters no layer beneath it judges: _layer_runs.split_params).
    grad_accumulated: cotangent at this layer's output, full Flax backward vs full torch backward.
    """

    torch_path: str
    flax_path: str
    torch_type: str
    call: int = 0
    isolated: Comparison | None = None
    accumulated: Comparison | None = None
    grad_isolated: Comparison | None = None
    grad_accumulated: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    backward_order: int = 0  # position in the backward pass (children before their parent)
    # How the Flax side was found: "port" (the port paired this layer's tensors), "name" (the name
    # rule, and that Flax call holds exactly the port's layers this module holds), "layers" (the one
    # Flax call that holds exactly them); None: not paired (the notes say why).
    paired_by: str | None = None
    start: int = 0  # position in the forward pass by start (a parent before its children)
    # The Flax model's own inputs to this layer vs torch's (error handed to the layer, not made by it).
    input_accumulated: Comparison | None = None
    # Name of the later layer where this one's error is judged instead, when the two sides draw this
    # module's boundary differently (work torch does inside it, Flax after it: XGLM's embedding
    # scale): its isolated error is gone from the Flax model at that layer's input.
    boundary: str | None = None

    @property
    def name(self) -> str:
        base = self.torch_path or ROOT
        return f"{base}#{self.call}" if self.call else base

    @property
    def forward_ok(self) -> bool:
        return self.isolated is None or self.isolated.ok or self.boundary is not None

    @property
    def backward_ok(self) -> bool:
        # (a boundary that differs moves the scale's gradient across it as well)
        return self.grad_isolated is None or self.grad_isolated.ok or self.boundary is not None

    @property
    def ok(self) -> bool:
        """A layer is out of tolerance when its *isolated* error is: inherited error is judged
        where it ends up (the model outputs and gradients), never charged to an innocent layer."""
        return self.forward_ok and self.backward_ok

    def to_dict(self) -> dict:
        def d(c):
            return c.to_dict() if c is not None else None

        return {
            "name": self.name,
            "torch_path": self.torch_path,
            "flax_path": self.flax_path,
            "torch_type": self.torch_type,
            "call": self.call,
            "paired_by": self.paired_by,
            "ok": self.ok,
            "isolated": d(self.isolated),
            "accumulated": d(self.accumulated),
            "grad_isolated": d(self.grad_isolated),
            "grad_accumulated": d(self.grad_accumulated),
            "input_accumulated": d(self.input_accumulated),
            "boundary": self.boundary,
            "notes": list(self.notes),
        }


@dataclass
class RowJudge:
    """How the per-layer rows of one check are judged (parity.judge).

    With ``ref_tol`` (the float64 REFERENCE entry) the rows' run is float64 and each tensor is
    judged by measured noise: truth = torch's float64 value, noise = the same tensor of the
    ``probe`` run (torch in ``probe_dtype``, by (path, call); parameter gradients in
    ``probe_params``) scaled to float64, or to float32 where the layer computed in float32 inside
    (TorchCall.lower_precision). A tensor without a probe value, and every tensor when
    ``ref_tol`` is None, is judged by the table (``forward`` / ``grad``).
    """

    forward: Table
    grad: Table
    ref_tol: Tolerance | None = None
    probe_dtype: str = "float32"
    probe: Mapping[tuple[str, int], TorchCall] = field(default_factory=dict)
    probe_params: Mapping[str, np.ndarray] = field(default_factory=dict)
    # Every row is judged by float32 noise: the Flax twin computes below float64 in the float64
    # rows run (an HF Flax module built with dtype=float32 keeps it for float64 variables, and its
    # float32 values then mix into float64 ones; set by analyze_layers, with a row note), or a
    # torch table the twin computes holds float32-rounded values (set by the checker).
    all_float32: bool = False
    # The rows' own dtype and the probe's (float64 rows, a float32 probe; or, where no float64
    # run exists, the checked dtype for both).
    dtype: str = "float64"

    def probe_call(self, tc: TorchCall) -> TorchCall | None:
        return self.probe.get((tc.path, tc.call))

    def judge(self, name: str, flax_value, torch_value, *, grad: bool, tc: TorchCall | None, probe_value,
              layout: str = "as_is", axis: int | str | None = "auto", own: tuple | None = None) -> Comparison:
        """One tensor of a row (Flax value in Flax layout, torch's in torch layout); a shape
        mismatch raises ValueError (the caller reports it). own: (the twin's value as declared,
        the same layer truly in float64), Flax layout: its own rounding noise (parity.judge)."""
        table = self.grad if grad else self.forward
        if self.ref_tol is not None and probe_value is not None:
            effective = (tc.lower_precision or None) if tc is not None else None
            if self.all_float32 and self.dtype == "float64":
                effective = "float32"
            rule = measured(self.ref_tol, self.dtype, probe_dtype=self.probe_dtype, effective=effective)
            try:
                mine = {} if own is None else dict(flax_probe=to_torch_layout(np.asarray(own[0]), layout),
                                                    flax_reference=to_torch_layout(np.asarray(own[1]), layout))
                return judge(name, flax_value, torch_value, rule, layout=layout, reference=torch_value,
                             probe=probe_value, axis=axis, **mine)
            except NoEvidence:
                pass
        return judge(name, flax_value, torch_value, table, layout=layout)


def first_divergence(rows: Sequence[LayerRow]) -> tuple[str | None, str | None]:
    """(layer name, "forward" | "backward") of the first layer whose isolated error is out.

    Forward wins: a layer that computes the wrong value also back-propagates wrongly. Backward
    divergences are searched in backward-pass order (the first place the cotangent goes wrong).
    A layer whose boundary differs between the sides (``LayerRow.boundary``) is not blamed: its
    error is judged at the later layer named there, so a real bug further down is still found.
    """
    for row in rows:
        if not row.forward_ok:
            inner = _narrowed(rows, row)
            return (inner or row).name, "forward"
    for row in sorted(rows, key=lambda r: r.backward_order):
        if not row.backward_ok:
            return row.name, "backward"
    return None, None


def _is_below(path: str, ancestor: str) -> bool:
    return path != ancestor and (ancestor == "" or path.startswith(ancestor + "."))


def _dirty(c: Comparison | None) -> bool:
    """Known out of tolerance (a comparison that could not be made, mismatches -1, says nothing)."""
    return c is not None and not c.ok and c.mismatches >= 0


def _boundary_windows(rows: Sequence[LayerRow]) -> set[int]:
    """id() of the rows whose accumulated error a differing boundary explains: each boundary row
    and every layer that starts after it and before the layer where its error is judged."""
    by_name = {r.name: r for r in rows}
    spans = [(r.start, by_name[r.boundary].start) for r in rows if r.boundary in by_name]
    return {id(r) for r in rows if any(lo <= r.start < hi for lo, hi in spans)}


def _narrowed(rows: Sequence[LayerRow], found: LayerRow) -> LayerRow | None:
    """A layer inside ``found`` that holds the divergence, when the isolated search cannot see it.

    A layer the Flax side cannot run alone (HF attention: torch hands it an extended float mask,
    Flax the raw integer one) has no isolated row; a bug in its inline code then surfaces only in
    the first enclosing layer that can run alone, often the whole model (``<root>``). The
    accumulated rows narrow it: the first layer, in execution order, whose accumulated output is
    out of tolerance had every earlier layer's output in tolerance. If its own input (the Flax
    model's, against torch's) was clean and it cannot run alone, the error arises in its own code;
    if its input was already wrong, or it is clean alone, the error was made before it, by inline
    code of the innermost enclosing layer that cannot run alone and was itself handed a clean
    input (a parent that feeds its child the wrong tensor is blamed, not the child). None when no
    such layer lies strictly inside ``found``. Rows whose error a differing boundary explains are
    passed over.
    """
    order = list(rows)
    explained = _boundary_windows(order)
    first = next((i for i, r in enumerate(order) if _is_below(r.torch_path, found.torch_path)
                  and id(r) not in explained and _dirty(r.accumulated)), None)
    if first is None:
        return None
    row = order[first]
    if not _dirty(row.input_accumulated):
        if row.isolated is None:
            return row
        if not row.isolated.ok:
            return None  # judged alone and wrong: the isolated search already names it
    parts = row.torch_path.split(".")
    for depth in range(len(parts) - 1, 0, -1):  # innermost ancestor first
        anc = ".".join(parts[:depth])
        if not _is_below(anc, found.torch_path):
            break
        # the ancestor's call that encloses this row: the first one to complete after it
        enclosing = next((r for r in order[first + 1:] if r.torch_path == anc), None)
        if enclosing is None or _dirty(enclosing.input_accumulated):
            continue  # handed the error too: it was made further out
        if enclosing.isolated is None:
            return enclosing
    return None


# --- pairing and layouts ---------------------------------------------------------------------
def _subtree(variables: Mapping, path: tuple[str, ...]) -> dict:
    out = {}
    for col, tree in variables.items():
        node = tree
        for p in path:
            if not isinstance(node, Mapping) or p not in node:
                node = None
                break
            node = node[p]
        if node is not None:
            out[col] = node
    return out


def _flax_path_of(torch_path: str, plan: PortPlan, recorded: set[tuple[str, ...]]) -> tuple[str, ...]:
    """Flax module path of a torch module path.

    Layers that own tensors: exactly the port's pairing. Others: the port's own name rule when
    the Flax twin has a module there; else (containers of a model written outside this project,
    e.g. HF ``encoder.layer.0`` <-> ``encoder/layer/0``) the path their ported children share,
    less the part below the container that the children's torch paths share too.
    """
    for layer in plan.layers:
        if layer.info.torch_path == torch_path:
            return tuple(layer.info.flax_path)
    by_rule = tuple(torch_to_flax_path(torch_path))
    if by_rule in recorded or not torch_path:
        return by_rule
    prefix = torch_path + "."
    kids = [(layer.info.torch_path[len(prefix):].split("."), tuple(layer.info.flax_path))
            for layer in plan.layers if layer.info.torch_path.startswith(prefix)]
    if not kids:
        return by_rule
    common = list(kids[0][1])
    for _, f in kids[1:]:
        n = next((i for i, (a, b) in enumerate(zip(common, f)) if a != b), min(len(common), len(f)))
        common = common[:n]
    rel_common = 0  # leading torch components below the container that every child shares
    while all(len(r) > rel_common + 1 and r[rel_common] == kids[0][0][rel_common] for r, _ in kids):
        rel_common += 1
    if len(kids) == 1:
        rel_common = len(kids[0][0])
    guess = tuple(common[:len(common) - rel_common]) if rel_common else tuple(common)
    return guess if guess in recorded else by_rule


@dataclass(frozen=True)
class _InputLayout:
    """How torch's input to one layer becomes the Flax layer's input, and its cotangent back.

    Activations move by ``layout``. A Linear right after a flatten of [N, C, *S] is different:
    torch's features are ordered (C, *S) and the Flax twin's (*S, C) (the port permutes that
    Linear's kernel), so its [N, C*prod(S)] input is permuted instead (the plan says so).
    """

    layout: str
    flatten: tuple[int, ...] | None = None

    def to_flax(self, x: np.ndarray, where: str) -> np.ndarray:
        if self.flatten is not None:
            n = x.shape[0]
            return np.moveaxis(x.reshape(n, *self.flatten), 1, -1).reshape(n, -1)
        return to_flax_layout(x, self.layout, where)

    def to_torch(self, x: np.ndarray, where: str) -> np.ndarray:
        if self.flatten is not None:
            n, (c, *spatial) = x.shape[0], self.flatten
            return np.moveaxis(x.reshape(n, *spatial, c), -1, 1).reshape(n, -1)
        return to_torch_layout(x, self.layout, where)


def _flatten_of(torch_path: str, plan: PortPlan) -> tuple[int, ...] | None:
    for layer in plan.layers:
        if layer.info.torch_path == torch_path:
            flat = getattr(layer.info, "flatten", None)
            return tuple(flat) if flat else None
    return None


def _align_outputs(flax_paths: list[str], torch_paths: list[str]) -> dict[str, str]:
    """{flax output path: torch output path} of one layer: by name when both sides name the leaves
    alike (parity.runtime.match_outputs: a torch ModelOutput's ``out.z`` is a Flax dict's
    ``out['z']``, whatever the order of each side's leaves), else by order when the counts agree
    (an HF Flax layer returns ``(h,)`` where its torch twin returns ``h``); {} otherwise (the
    comparison then reports the structural difference)."""
    by_name = match_outputs(flax_paths, torch_paths)
    if by_name is not None:
        return by_name
    if len(flax_paths) == len(torch_paths):
        return dict(zip(flax_paths, torch_paths))
    return {}


def _compare_leaves(name: str, flax_vals: Mapping[str, np.ndarray], torch_vals: Mapping[str, np.ndarray],
                    layouts: Mapping[str, str], rows: RowJudge, *, grad: bool, tc: TorchCall,
                    probe_vals: Mapping[str, np.ndarray] | None,
                    own: tuple[Mapping, Mapping] | None = None) -> Comparison | None:
    """Worst comparison over torch's leaves (by path); a structural difference fails, except extra
    Flax leaves: torch layers return None for optional outputs that their Flax twins always return
    (HF attention's weights: torch ``(h, None)``, Flax ``(h, weights)``), and a None is no leaf."""
    table = rows.grad if grad else rows.forward
    if not set(torch_vals) <= set(flax_vals):
        return failed_comparison(name, f"flax returns {sorted(flax_vals)}, torch {sorted(torch_vals)}", table)
    comps = []
    for p in torch_vals:
        if p not in layouts:
            continue
        leaf_name = name if len(torch_vals) == 1 else f"{name} {p}"
        try:
            comps.append(rows.judge(leaf_name, flax_vals[p], torch_vals[p], grad=grad, tc=tc, layout=layouts[p],
                                    probe_value=(probe_vals or {}).get(p),
                                    own=None if own is None or p not in own[1] else (own[0][p], own[1][p])))
        except ValueError as exc:
            comps.append(failed_comparison(leaf_name, str(exc), table))
    return worst_of(comps)


# --- one layer alone on torch's input --------------------------------------------------------
@dataclass
class IsolatedLayer:
    """One Flax layer, cut out of the recorded run, ready to run alone on torch's input to it.

    inputs: the layer's array arguments by Flax input name, torch's values converted to Flax
    layout ([N, H, W, C] where torch had [N, C, H, W]); ``floats`` are the floating ones, in
    ``float_names`` order, the arguments that ``forward`` / ``fwd_bwd`` take (and differentiate).
    params: the layer's ``params`` subtree (linen-style) whose gradients it computes: all of it,
    less ``fixed``, the parameters of the layers beneath it that are judged in their own rows
    (``_layer_runs.split_params``), which it reads but does not differentiate; its other
    collections (``batch_stats``) are closed over. cots: torch's cotangents at the layer's outputs in Flax
    layout, by Flax output path (None: forward only). Inputs and cotangents are numpy (views of
    torch's recorded values where the layout allows), moved to the device when the layer runs.
    All three functions are pure and jittable.
    """

    row: LayerRow
    torch_call: TorchCall
    flax_path: tuple[str, ...]
    fn: Callable  # fn(params, inputs by Flax input name) -> the layer's output pytree
    params: Mapping
    inputs: dict[str, np.ndarray]
    float_names: list[str]
    cots: dict[str, np.ndarray] | None
    out_layouts: dict[str, str]  # by torch output path
    in_layouts: dict[str, _InputLayout]  # by Flax input name
    torch_names: dict[str, str]  # Flax input name -> torch input name
    out_map: dict[str, str]  # Flax output path -> torch output path
    # remake(computing=(dtype, checked)) -> the layer cloned to compute in dtype (None: no clone
    # differs), for the twin's own noise (FlaxTwin.layer_fn)
    remake: Callable[..., Callable | None] | None = None
    # What decides ``fn``'s program besides its arguments (the Linen module, the call's non-array
    # arguments), for sharing one compile between equal layers (parity._layer_runs); None when
    # ``fn`` closes over arrays (BatchNorm statistics, an NNX graph): never shared.
    static: tuple | None = None
    fixed: Mapping = field(default_factory=dict)

    @property
    def floats(self) -> list[np.ndarray]:
        """The float inputs in Flax layout, ``float_names`` order: the second argument of forward."""
        return [self.inputs[n] for n in self.float_names]

    @property
    def others(self) -> dict[str, np.ndarray]:
        """The inputs that are not floating (ids, integer masks), by Flax input name."""
        return {n: a for n, a in self.inputs.items() if n not in self.float_names}

    def forward(self, params: Mapping, floats: Sequence[jax.Array], fn: Callable | None = None,
                others: Mapping[str, jax.Array] | None = None, fixed: Mapping | None = None) -> dict[str, jax.Array]:
        """The layer's outputs by Flax output path (parity.runtime.flatten), Flax layout, for
        ``params`` and ``floats`` (Flax layout) in place of the captured ones (``fn``: another
        build of the layer, e.g. computing in float64; ``others``: another layer's non-float
        inputs, run by this one's program: parity._layer_runs; ``fixed``: the parameters not
        differentiated, ``self.fixed`` when None: pass them as an argument under jit, or they
        are compiled in as constants)."""
        inputs = self.inputs if others is None else {**self.inputs, **others}
        both = _layer_runs.merged(params, self.fixed if fixed is None else fixed)
        return flatten((fn or self.fn)(both, {**inputs, **dict(zip(self.float_names, floats))}))

    def fwd_bwd(self, params: Mapping, floats: Sequence[jax.Array], cots: Mapping[str, jax.Array] | None,
                fn: Callable | None = None, others: Mapping[str, jax.Array] | None = None,
                fixed: Mapping | None = None):
        """(outputs as ``forward``, (param grads tree, [input grads, Flax layout, like floats]) from
        the VJP with ``cots`` (Flax layout, by Flax output path; outputs without one get zero));
        the gradients are None when ``cots`` is None or does not fit the outputs' shapes (the
        forward comparison then says why). The gradients are those of ``params`` alone: ``fixed``
        (as ``forward``) is read, not differentiated, so XLA leaves out their weight-gradient work."""
        out, vjp = jax.vjp(lambda p, f: self.forward(p, f, fn, others, fixed), params, floats)
        if cots is None or any(p in cots and cots[p].shape != o.shape for p, o in out.items()):
            return out, None
        ct = {p: (cots[p].astype(o.dtype) if p in cots and jnp.issubdtype(o.dtype, jnp.floating)
                  else (jnp.zeros_like(o) if jnp.issubdtype(o.dtype, jnp.floating)
                        else np.zeros(o.shape, jax.dtypes.float0))) for p, o in out.items()}
        return out, vjp(ct)

    def release(self) -> None:
        """Drop the arrays once judged (the analysis streams: run, judge, free)."""
        self.inputs, self.cots, self.params, self.fixed, self.remake = {}, None, {}, {}, None

    def check(self, out: Mapping[str, np.ndarray], rows: "RowJudge | Tolerance",
              probe: TorchCall | None = None, own: Mapping[str, np.ndarray] | None = None) -> Comparison | None:
        """``out`` (by Flax output path, Flax layout, as ``forward`` returns) against torch's
        outputs of this call, leaf by leaf in the resolved layouts; None when no leaf has one.
        rows: the check's RowJudge (probe: the probe run's same call), or a Tolerance (the table)."""
        if isinstance(rows, Tolerance):
            rows = RowJudge(Table(rows), Table(rows))
        by_torch = {self.out_map.get(p, p): np.asarray(o) for p, o in out.items()}
        own_vals = None if own is None else (by_torch, {self.out_map.get(p, p): np.asarray(o) for p, o in own.items()})
        return _compare_leaves(self.row.name, by_torch, self.torch_call.output_values, self.out_layouts, rows,
                               grad=False, tc=self.torch_call, probe_vals=probe.output_values if probe else None,
                               own=own_vals)


@dataclass
class PairedCall:
    """One torch module call and the Flax side at the same place, from one recorded run of each.

    row: the report row (names, backward order); its notes say what was not compared and why the
    layer cannot run alone. flax_outputs / flax_cots: the Flax model's own values at this call's
    outputs (Flax layout) and their cotangents, by *torch* output path; None when no Flax module
    was recorded here. out_layouts: torch output path -> layout, for the leaves whose layout is
    known. flax_inputs / in_layouts: the Flax model's own float inputs to this call by *torch*
    input name, with their layouts (the flatten permutation already undone), for the inputs whose
    pairing and layout are sure. layer: the Flax layer ready to run alone, None when it cannot
    (``reason``) or was not prepared (the root with prepare_root=False).
    """

    row: LayerRow
    torch_call: TorchCall
    flax_outputs: dict[str, np.ndarray] | None = None
    flax_cots: dict[str, np.ndarray] = field(default_factory=dict)
    out_layouts: dict[str, str] = field(default_factory=dict)
    flax_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    in_layouts: dict[str, str] = field(default_factory=dict)
    layer: IsolatedLayer | None = None
    key: str | None = None  # the Flax call (call_key); None: not paired
    out_map: dict[str, str] = field(default_factory=dict)  # Flax output path -> torch output path
    input_map: dict[str, str] = field(default_factory=dict)  # torch input name -> Flax input name
    flatten: tuple[int, ...] | None = None  # the plan's flatten before this Linear, if any

    def inputs_from(self, call_inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This call's Flax inputs (as one Flax run recorded them) by torch input name, for the
        inputs in ``in_layouts``; a flattened Linear's with the flatten permutation undone."""
        out = {}
        for tn in self.in_layouts:
            f = np.asarray(call_inputs[self.input_map[tn]])
            out[tn] = f if self.flatten is None else _InputLayout(AS_IS, self.flatten).to_torch(f, tn)
        return out

    @property
    def is_root(self) -> bool:
        return self.torch_call.path == "" and self.torch_call.call == 0

    @property
    def reason(self) -> str:
        """Why the Flax layer cannot run alone ("" when it can)."""
        return "" if self.layer is not None else "; ".join(self.row.notes) or "the Flax layer cannot run alone"


def _descendants(t_calls: Sequence[TorchCall]) -> list[list[int]]:
    """Indices of the calls made inside each torch call: started after it, completed before it."""
    return [[j for j in range(i) if t_calls[j].start > tc.start] for i, tc in enumerate(t_calls)]


def _holds(f_run: FlaxRun, key: str, among: set[str], cache: dict[str, frozenset[str]]) -> frozenset[str]:
    """The calls of ``among`` that the Flax call ``key`` is or made (began after it, ended before it)."""
    if key not in cache:
        fc = f_run.calls[key]
        cache[key] = frozenset(k for k in among if k == key or
                               fc.start < f_run.calls[k].start and f_run.calls[k].end < fc.end)
    return cache[key]


@dataclass(frozen=True)
class _Pairing:
    """Where one torch call is paired: the Flax path and call key (None: not paired), a note for
    the row, and whether the Flax module's variables are its own subtree (an ``nn.Sequential``
    built inline in a compact method holds layers whose variables sit in its parent's: it cannot
    be run alone on its own variables)."""

    path: tuple[str, ...]
    key: str | None
    by: str | None = None  # LayerRow.paired_by
    note: str = ""
    runs_alone: bool = True


def _pair_calls(t_calls: Sequence[TorchCall], f_run: FlaxRun, plan: PortPlan) -> list[_Pairing]:
    """The pairing of the per-layer rows, one per torch call.

    Layers that own tensors are paired as the port paired them (``_flax_path_of``): that pairing
    is the premise of the whole check. Any other module (a container, a parameter-free layer) is
    paired by its name rule only when the Flax call there holds exactly the port's layers that
    the torch call holds (by call nesting, not by path: an ``nn.Sequential`` built inline in a
    compact method holds layers that sit beside it in the variable tree). When it does not (a
    torch ``nn.Sequential`` spelled as a list of layers in ``setup``: ``shortcut_0``,
    ``shortcut_1`` and no ``shortcut``), the one Flax call that does hold exactly them is its
    pair; with none, or several, the row is not paired and says why.
    """
    recorded = {fc.path for fc in f_run.calls.values()}
    port_paths = {layer.info.torch_path for layer in plan.layers}
    paths = [_flax_path_of(tc.path, plan, recorded) for tc in t_calls]
    keys = [call_key(fp, tc.call) for fp, tc in zip(paths, t_calls)]
    by_port = [tc.path in port_paths and k in f_run.calls for tc, k in zip(t_calls, keys)]
    port_keys = {k for k, sure in zip(keys, by_port) if sure}
    inside = _descendants(t_calls)
    cache: dict[str, frozenset[str]] = {}

    def own(key: str) -> bool:
        top = f_run.calls[key].path
        return all(f_run.calls[k].path[:len(top)] == top for k in _holds(f_run, key, port_keys, cache))

    out: list[_Pairing] = []
    for i, tc in enumerate(t_calls):
        key = keys[i] if keys[i] in f_run.calls else None
        missing = "no Flax module at this path (parameter-free layer inlined as a function?)"
        if by_port[i] or (tc.path == "" and tc.call == 0):
            out.append(_Pairing(paths[i], key, ("port" if by_port[i] else "name") if key else None,
                                "" if key else missing))
            continue
        want = frozenset(keys[j] for j in inside[i] if by_port[j])
        if key is not None and key not in port_keys and _holds(f_run, key, port_keys, cache) == want:
            out.append(_Pairing(paths[i], key, "name", runs_alone=own(key)))
            continue
        if not want:
            out.append(_Pairing(paths[i], None, None, missing if key is None else
                                f"not paired: the Flax module at {flax_path_str(paths[i])} holds layers "
                                "this torch module does not"))
            continue
        fits = [k for k in f_run.calls if k not in port_keys and _holds(f_run, k, port_keys, cache) == want]
        held = ", ".join(sorted(k.split("#")[0] for k in want))
        if len(fits) == 1:
            path = f_run.calls[fits[0]].path
            out.append(_Pairing(path, fits[0], "layers", f"paired with flax {flax_path_str(path)}: the Flax module that "
                                               f"holds exactly its layers ({held})", own(fits[0])))
        else:
            why = (f"{len(fits)} Flax modules hold exactly its layers" if fits
                   else "no Flax module holds exactly its layers")
            out.append(_Pairing(paths[i], None, None, f"not paired: {why} ({held}); its layers are compared one by one"))
    return out


def _shape_difference(t_out: Mapping[str, np.ndarray], f_out: Mapping[str, np.ndarray]) -> str | None:
    """Why two outputs of a structurally paired call cannot be the same thing (leaves missing on
    the Flax side, or shapes that agree in no layout), None when they can."""
    missing = sorted(set(t_out) - set(f_out))
    if missing:
        return f"flax returns {sorted(f_out)}, torch {sorted(t_out)}"
    for p, t in t_out.items():
        if not fitting_layouts(np.shape(t), np.shape(f_out[p])):
            return f"{p}: torch {tuple(np.shape(t))}, flax {tuple(np.shape(f_out[p]))} agree in no layout"
    return None


def _input_pairs(tc: TorchCall, fc: FlaxCall, f_inputs: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """(torch input name, Flax input name) of the float inputs that surely correspond: position by
    position when both sides take as many arrays, else only the first float input of each (HF
    layers take masks, positions and flags differently on each side; the hidden state leads)."""
    def floating(x) -> bool:
        return jnp.issubdtype(np.asarray(x).dtype, jnp.floating)

    if len(tc.inputs) == len(fc.input_names):
        return [(t, f) for t, f in zip(tc.inputs, fc.input_names)
                if f in f_inputs and floating(tc.input_values[t]) and floating(f_inputs[f])]
    t_first = next((t for t in tc.inputs if floating(tc.input_values[t])), None)
    f_first = next((f for f in fc.input_names if f in f_inputs and floating(f_inputs[f])), None)
    return [(t_first, f_first)] if t_first is not None and f_first is not None else []


def isolated_layers(
    t_calls: Sequence[TorchCall],
    f_run: FlaxRun,
    twin: FlaxTwin,
    variables: Mapping,
    plan: PortPlan,
    layouts: ActivationLayouts,
    *,
    grads: bool,
    prepare_root: bool = True,
) -> list[PairedCall]:
    """Every torch call paired with the Flax side (``_pair_calls``), in execution order, each layer
    prepared to run alone on torch's input: THE pairing that the per-layer analysis and the
    per-layer speed profile (parity.benchmark.layer_profile) both use.

    t_calls: run_torch(capture=True).calls; f_run: forward_backward(capture=True) of the same
    input; layouts: the activation layouts of the torch calls; variables: the Flax variables of
    the run (linen-style). grads=False prepares no cotangents (forward only). prepare_root=False
    leaves the top module unprepared (the checker's whole-model verdicts are its isolated ones).
    A layer's outputs take the layout the caller declared for it (``output_layout=`` by layer
    path), else the one in which the two sides' shapes agree, else its kind's (``resolve``). A
    module paired by structure (not by the port) whose outputs cannot be the same thing on both
    sides is not compared: its row says "not paired" and why.
    """
    # Backward order: a module's backward finishes after its children's, and later modules'
    # backward runs first, so sort by forward *start* descending.
    by_start = sorted(t_calls, key=lambda c: -c.start)
    bwd_pos = {(c.path, c.call): i for i, c in enumerate(by_start)}
    port_paths = {layer.info.torch_path for layer in plan.layers}
    paired = []
    for tc, pairing in zip(t_calls, _pair_calls(t_calls, f_run, plan)):
        fpath, key = pairing.path, pairing.key
        row = LayerRow(tc.path, flax_path_str(fpath), tc.torch_type, tc.call,
                       backward_order=bwd_pos[(tc.path, tc.call)], paired_by=pairing.by, start=tc.start)
        pc = PairedCall(row, tc)
        paired.append(pc)
        if pairing.note:
            row.notes.append(pairing.note)
        if key is None:
            continue
        t_out = tc.output_values
        out_map = _align_outputs(list(f_run.call_outputs[key]), list(t_out))
        f_out = {out_map.get(p, p): v for p, v in f_run.call_outputs[key].items()}
        differs = _shape_difference(t_out, f_out)
        if differs and tc.path not in port_paths and not pc.is_root:
            # paired by structure only: different shapes say the two modules are not the same thing
            row.notes.append(f"not paired with flax {row.flax_path}: {differs}; not compared")
            row.paired_by = None
            continue
        pc.flax_outputs, pc.key, pc.out_map = f_out, key, out_map
        pc.flax_cots = {out_map.get(p, p): v for p, v in f_run.call_output_cots.get(key, {}).items()}
        for p, t in t_out.items():
            if layouts.is_declared(tc.path, tc.call, p):
                pc.out_layouts[p] = layouts.outputs[(tc.path, tc.call)][p]
                continue
            lay, why = resolve(layouts.outputs[(tc.path, tc.call)].get(p), t.shape,
                               f_out[p].shape if p in f_out else None)
            if lay is None:
                row.notes.append(f"{p}: {why}; not compared")
            else:
                pc.out_layouts[p] = lay
        f_inputs = f_run.call_inputs.get(key, {})
        flatten_ = pc.flatten = _flatten_of(tc.path, plan)
        t_lay = layouts.inputs.get((tc.path, tc.call), {})
        for tn, fn in _input_pairs(tc, f_run.calls[key], f_inputs):
            t, f = tc.input_values[tn], np.asarray(f_inputs[fn])
            if flatten_ is not None:  # compared in torch's feature order (PairedCall.inputs_from)
                lay = AS_IS if f.shape == t.shape else None
            else:
                lay, _ = resolve(t_lay.get(tn), t.shape, f.shape)
            if lay is not None and lay in fitting_layouts(t.shape, f.shape):
                pc.input_map[tn], pc.in_layouts[tn] = fn, lay
        pc.flax_inputs = pc.inputs_from(f_inputs)
        if pc.is_root and not prepare_root:
            continue
        if not pairing.runs_alone:
            row.notes.append(f"the layers of flax {row.flax_path} keep their variables in its parent's "
                             "(built inline in a compact method); not run alone")
            continue
        pc.layer = _prepare(row, tc, f_run.calls[key], f_inputs, twin, variables, tuple(fpath),
                            pc.out_layouts, grads, layouts, flatten_, out_map)
    return paired


def analyze_layers(
    t_calls: Sequence[TorchCall],
    f_run: FlaxRun,
    twin: FlaxTwin,
    variables: Mapping,
    plan: PortPlan,
    layouts: ActivationLayouts,
    *,
    grads: bool,
    train: bool,
    rows: RowJudge,
    param_grads: Mapping[str, np.ndarray],
    progress: Callable[[str], None] | None = None,
    root: tuple[Comparison | None, Comparison | None] | None = None,
    release_param_grads: bool = False,
) -> list[LayerRow]:
    """Per-layer rows in execution order from one recorded run of each side (parity.runtime).

    t_calls: run_torch(capture=True).calls; f_run: forward_backward(capture=True); layouts: the
    activation layouts of the torch calls. grads=False skips the backward columns. param_grads:
    torch's parameter gradients of the same run. rows: how each tensor is judged (RowJudge: by
    measured noise where a probe run has the same tensor). root: the top module's isolated
    (forward, backward) verdicts, which *are* the whole-model check, so the top module is not
    rerun. Pairing and the layers run alone: ``isolated_layers``. release_param_grads: each of
    ``param_grads`` (a dict the caller reads no more) is dropped from it once its row has judged
    it for good (GPT-2-medium's float64 gradients: 2.7 GB, let go as the rows go).
    """
    say = progress or (lambda msg: None)
    tied = getattr(plan, "tied", None) or {}
    paired = isolated_layers(t_calls, f_run, twin, variables, plan, layouts, grads=grads,
                             prepare_root=root is None)

    def judge_inputs(pc: PairedCall, values: Mapping[str, np.ndarray]) -> Comparison | None:
        """Flax inputs of a layer (by torch name, PairedCall.inputs_from) against torch's, judged
        as activations are (probe: the probe run's same inputs)."""
        tc = pc.torch_call
        probe = rows.probe_call(tc)
        return _compare_leaves(f"input of {pc.row.name}", values, {n: tc.input_values[n] for n in values},
                               pc.in_layouts, rows, grad=False, tc=tc,
                               probe_vals=probe.input_values if probe else None)

    low = next((pc for pc in paired if pc.flax_outputs is not None and _below_float64(pc)), None)
    if rows.ref_tol is not None and rows.dtype == "float64" and low is not None:
        rows.all_float32 = True
        low.row.notes.append("the Flax twin computes in float32 here although the rows run in float64 (its "
                             "dtype?): every row is judged by float32 noise")
    for pc in paired:
        row, tc = pc.row, pc.torch_call
        if pc.flax_outputs is None:
            continue
        probe = rows.probe_call(tc)
        t_out = tc.output_values
        row.accumulated = _compare_leaves(row.name, pc.flax_outputs, t_out, pc.out_layouts, rows, grad=False, tc=tc,
                                          probe_vals=probe.output_values if probe else None)
        row.input_accumulated = judge_inputs(pc, pc.flax_inputs)
        t_g = {p: g for p, g in tc.output_grads.items() if p in pc.out_layouts}
        # Not at the root: its output cotangent is the seeded one on both sides (nothing computed),
        # and torch's hook on a returned tensor also sums the tensor's uses inside the root (BERT's
        # pooler reads last_hidden_state), which a perturbation of Flax's returned value cannot see.
        if grads and t_g and set(t_g) <= set(pc.flax_cots) and not pc.is_root:
            row.grad_accumulated = _compare_leaves(f"d/d {row.name}", {p: pc.flax_cots[p] for p in t_g}, t_g,
                                                   pc.out_layouts, rows, grad=True, tc=tc,
                                                   probe_vals=probe.output_grads if probe else None)
        if root is not None and pc.is_root:
            row.isolated, row.grad_isolated = root

    jobs = [pc.layer for pc in paired if pc.layer is not None]
    say(f"per-layer: {len(jobs)} layers alone on torch's inputs")
    totals = _ParamGradTotals(t_calls)

    def judge_job(job: IsolatedLayer, result, total) -> None:
        failed, first = _judge(job, result, plan, param_grads, tied, rows, total)
        if not job.row.ok:
            if total is not None:  # the gradients that passed are final: freed before the own run
                _keep_grads_of(total, job.flax_path, plan, failed)
            own = _own_run(job, rows, plan, failed)
            if own is not None:  # judged again, the twin's own rounding noise measured
                own_total = own[1][0] if own[1] is not None and total is not None and totals.calls[
                    job.torch_call.path] == 1 else None
                _judge(job, result, plan, param_grads, tied, rows, total, own, own_total, first=(first, failed))
        if release_param_grads:  # each parameter is judged in one row (split_params): final here
            for name in first:
                if name in param_grads:  # del, not pop: a Spill (parity._spill) deletes its file unread
                    del param_grads[name]
    waiting: dict[str, tuple[IsolatedLayer, object]] = {}  # call 0 of a module called again later
    # Streamed: run a chunk, judge it, free it (all at once, every layer's outputs and parameter
    # gradients were held together). A parameter's gradient is computed and judged once, in the
    # innermost row that can judge it (BERT-base's query kernel was in five: encoder, layer.i,
    # attention, self and query; GPT-2's transformer row computed the whole model's gradients,
    # 2.8 GB in float64 for GPT-2-medium).
    _layer_runs.split_params(jobs, plan, Counter(tc.path for tc in t_calls))
    shared = _layer_runs.shared_programs(jobs)  # one compile per kind of layer met more than once
    for chunk in _layer_runs.chunks(jobs):
        big = sum(map(_layer_runs.job_bytes, chunk)) > _layer_runs.CHUNK_BYTES // 4
        for job, result in zip(chunk, _layer_runs.run_jobs(chunk, shared)):
            if isinstance(result, Exception):  # a layer that cannot run alone is reported, not fatal
                job.row.notes.append(f"could not run the Flax layer alone: {type(result).__name__}: {result}"[:200])
            path = job.torch_call.path
            complete = totals.add(job, result)
            if job.torch_call.call == 0 and not isinstance(result, Exception):
                waiting[path] = (job, result)
            else:
                if not isinstance(result, Exception):
                    judge_job(job, result, None)
                job.release()
            if complete and path in waiting:  # torch's gradient sums every call: judged once all ran
                first, first_result = waiting.pop(path)
                judge_job(first, first_result, totals.pop(path))
                first.release()
        if big:  # a container's layer (GPT-2's transformer: the model's weights in float64) freed
            give_back()
    for job, result in waiting.values():  # some call of the module did not run alone
        judge_job(job, result, None)
        job.release()
    _mark_boundaries(paired, judge_inputs,
                     lambda offsets: forward_backward(twin, variables, f_run.args, None, capture=True, offsets=offsets))
    return [pc.row for pc in paired]


def _computed_from(tc: TorchCall, nodes: set[int], limit: int = 200_000) -> bool:
    """Whether a float input of ``tc`` was computed from an autograd node in ``nodes`` (by id)."""
    stack = [x.grad_fn for x in tc.arrived.values() if getattr(x, "grad_fn", None) is not None]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if id(node) in nodes:
            return True
        seen.add(id(node))
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def _scale_fit(pc: PairedCall) -> str:
    """"torch = c x flax" for the first compared output, when one factor fits (information only)."""
    p = next((p for p in pc.out_layouts if p in (pc.flax_outputs or {})), None)
    if p is None:
        return ""
    try:
        f = np.asarray(to_torch_layout(np.asarray(pc.flax_outputs[p]), pc.out_layouts[p], p), np.float64)
    except ValueError:
        return ""
    t = np.asarray(pc.torch_call.output_values[p], np.float64)
    if f.shape != t.shape or not np.any(f):
        return ""
    c = float(np.sum(f * t) / np.sum(f * f))
    residual = float(np.linalg.norm(t - c * f) / max(np.linalg.norm(t), np.finfo(np.float64).tiny))
    return f"; torch's output is {c:.6g} x the Flax module's (residual {residual:.1e})"


def _mark_boundaries(paired: Sequence[PairedCall],
                     judge_inputs: Callable[[PairedCall, Mapping[str, np.ndarray]], Comparison | None],
                     rerun: Callable[[Mapping[str, Mapping[str, np.ndarray]]], FlaxRun]) -> None:
    """Layers whose module boundary differs between the sides (``LayerRow.boundary``).

    A layer whose Flax module misses work that torch does inside the module and the Flax model
    does right after it (XGLM's embedding scale ``sqrt(d_model)``: inside torch's
    ``XGLMScaledWordEmbedding``, after ``nn.Embed`` in Flax), or does work torch does after it,
    is off alone and in the Flax model's own run, yet the Flax model hands the next layer
    computed from its output (the first to start after it whose float input torch computed from
    this layer's output and whose inputs the sides can be compared on) the same input as torch.
    A real bug whose error the model attenuates below tolerance (a 1e-3 query weight through a
    softmax) looks the same there, so the two are told apart by handing the Flax model torch's
    output at this layer (``rerun`` with offsets): a bug is then gone and that input stays clean;
    a boundary that differs does the moved work twice (or not at all) and that input goes wrong.
    Only then the row says "boundary differs" and is judged at that later layer.
    """
    order = sorted(range(len(paired)), key=lambda i: paired[i].torch_call.start)
    for i, pc in enumerate(paired):
        row, tc = pc.row, pc.torch_call
        if row.isolated is None or row.isolated.ok or not _dirty(row.accumulated):
            continue
        made = {id(o.grad_fn) for o in tc.outputs.values() if o.grad_fn is not None}
        if not made:
            continue  # no autograd graph (frozen module): nothing says which layer consumes it
        later = None
        for j in order:
            cand = paired[j]
            # (a layer that starts after this one and completes before it runs inside it)
            if cand.torch_call.start <= tc.start or j < i or cand.row.input_accumulated is None:
                continue
            if _computed_from(cand.torch_call, made):
                later = cand
                break
        if later is None or not later.row.input_accumulated.ok:
            continue
        offsets = {}
        for fp, tp in pc.out_map.items():
            if tp in pc.out_layouts:
                torch_value = to_flax_layout(tc.output_values[tp], pc.out_layouts[tp], tp)
                if np.shape(torch_value) == np.shape(pc.flax_outputs[tp]):
                    offsets[fp] = torch_value - pc.flax_outputs[tp]
        try:
            handed = rerun({pc.key: offsets})
            with_torch = judge_inputs(later, later.inputs_from(handed.call_inputs[later.key]))
        except Exception as exc:  # noqa: BLE001 -- the rerun is evidence, not the check
            row.notes.append(f"could not hand the Flax model torch's output here: {type(exc).__name__}: {exc}"[:200])
            continue
        if not _dirty(with_torch):
            continue  # torch's value here leaves that input clean: the error is this layer's own
        row.boundary = later.row.name
        row.notes.append(
            f"boundary differs: off alone (rel_norm {row.isolated.rel_norm:.3e}) and in the Flax model's own "
            f"run, yet the Flax model hands {later.row.name}, the next layer computed from its output, the "
            f"same input as torch, and a wrong one (rel_norm {with_torch.rel_norm:.3e}) when handed torch's "
            f"output here{_scale_fit(pc)}: work done inside this module on one side and outside it on the "
            f"other; judged at {later.row.name}")


def _below_float64(pc: PairedCall) -> bool:
    """A float64 torch call whose Flax twin returned a float below float64."""
    def width(values) -> set[int]:
        return {np.asarray(v).dtype.itemsize for v in values if jnp.issubdtype(np.asarray(v).dtype, jnp.floating)}

    return 8 in width(pc.torch_call.output_values.values()) and bool(width(pc.flax_outputs.values()) - {8})


class _ParamGradTotals:
    """Each module's isolated parameter gradients summed over all its calls, as the calls run.

    torch records one gradient per parameter, the sum over every call of its module (ALBERT runs
    one shared layer num_hidden_layers times); one call's VJP is only its share of it. The sum of
    every call's share, each at torch's input and cotangent for that call, is what compares; a
    module with a call that did not run alone (or without gradients) has no total.
    """

    def __init__(self, t_calls: Sequence[TorchCall]):
        self.calls = Counter(tc.path for tc in t_calls)
        self.ran: Counter = Counter()
        self.sums: dict[str, object] = {}

    def add(self, job: IsolatedLayer, result) -> bool:
        """Count ``job``'s call and add its parameter gradients; True when every call of its module ran."""
        path = job.torch_call.path
        self.ran[path] += 1
        if isinstance(result, Exception) or result[1] is None or not job.params:
            self.sums[path] = None
        elif path not in self.sums:
            self.sums[path] = result[1][0]
        elif self.sums[path] is not None:
            self.sums[path] = jax.tree_util.tree_map(lambda a, b: a + b, self.sums[path], result[1][0])
        return self.ran[path] == self.calls[path]

    def pop(self, path: str):
        """The total of a module whose calls all ran (None: some call had no parameter gradients)."""
        return self.sums.pop(path, None)


def _own_run(job: IsolatedLayer, rows: RowJudge, plan: PortPlan, failed: set[str]):
    """The layer alone, on the same inputs, cloned to compute truly in float64, or None; of its
    parameter gradients, those of the layers holding the parameters in ``failed`` (torch names)
    alone: a row holding many (a container whose layers cannot run alone) would otherwise
    compute and hold every one's float64 gradient a second time beside the first run's, for the
    few its judge needs.

    Where the twin computes in float32 inside the float64 rows' run (an HF module's dtype=float32
    field: RowJudge.all_float32), a row's error is the twin's float32 rounding, judged against
    torch's float32 probe. XLA and ATen round differently (BERT-base's value-projection gradients:
    50-130 eps against 6-16), so a row of a correct twin can exceed k x torch's noise: the twin's
    own noise counts, as it does for the model's tensors (parity.judge). Run only for a row that
    fails without it: own noise only ever widens the bound.
    """
    if rows.ref_tol is None or not rows.all_float32 or rows.dtype != "float64" or job.remake is None:
        return None
    fn = job.remake(computing=("float64", rows.probe_dtype))
    if fn is None:
        return None
    _, wanted = param_grads_for(plan, [f"param:{n}" for n in failed])

    def run(x):
        out, grads = job.fwd_bwd(x[0], x[2], x[3], fn=fn, fixed=x[1])
        if grads is None or not isinstance(grads[0], Mapping):
            return out, grads
        return out, (wanted_grads(grads[0], wanted, tuple(job.flax_path)), *grads[1:])
    try:
        return to_host(jax.jit(run)((job.params, job.fixed, job.floats, job.cots)))
    except Exception:  # noqa: BLE001 - the float64 clone cannot run alone: the row stands as judged
        return None


def _prepare(row: LayerRow, tc: TorchCall, fc: FlaxCall, f_inputs: Mapping[str, np.ndarray], twin: FlaxTwin,
             variables: Mapping, fpath: tuple[str, ...], out_layouts: dict, grads: bool,
             layouts: ActivationLayouts, flatten_: tuple[int, ...] | None,
             out_map: dict[str, str]) -> IsolatedLayer | None:
    """The Flax layer of ``fc`` on torch's inputs of ``tc``, or None with the reason in row.notes."""
    t_names = list(tc.inputs)
    if len(t_names) != len(fc.input_names):
        row.notes.append(f"inputs differ: torch {len(t_names)} tensors, flax {len(fc.input_names)} arrays; "
                         "not run alone")
        return None
    arrays, in_layouts, names = {}, {}, {}
    t_lay = layouts.inputs.get((tc.path, tc.call), {})
    for tn, fn in zip(t_names, fc.input_names):
        t = tc.input_values[tn]
        f_shape = np.shape(f_inputs[fn]) if fn in f_inputs else None
        if flatten_ is not None:
            lay = _InputLayout(AS_IS, flatten_)
        else:
            kind, why = resolve(t_lay.get(tn), t.shape, f_shape)
            if kind is None:
                row.notes.append(f"input {tn}: {why}; not run alone")
                return None
            lay = _InputLayout(kind)
        try:
            x = lay.to_flax(t, f"{row.name} {tn}")
        except ValueError as exc:
            row.notes.append(f"input {tn}: {exc}; not run alone")
            return None
        # HF-style models hand a layer differently prepared inputs on each side (an extended float
        # mask in torch, the raw integer mask in Flax): running the Flax layer on torch's would
        # blame it for a difference it does not have.
        if f_shape is not None and (tuple(x.shape) != tuple(f_shape) or
                                    jnp.issubdtype(x.dtype, jnp.floating) != jnp.issubdtype(f_inputs[fn].dtype, jnp.floating)):
            row.notes.append(f"input {tn}: torch gives {tuple(t.shape)} {t.dtype}, the Flax layer takes "
                             f"{tuple(f_shape)} {np.dtype(f_inputs[fn].dtype)}; not run alone")
            return None
        # Integer inputs (ids, positions) carry no rounding: other values mean the two sides hand
        # this layer different things (HF BartLearnedPositionalEmbedding gets token ids in torch
        # and computes positions itself; Flax's embedding gets the positions), not an error of it.
        if (f_shape is not None and not jnp.issubdtype(x.dtype, jnp.floating)
                and not np.array_equal(np.asarray(x), np.asarray(f_inputs[fn]))):
            row.notes.append(f"input {tn}: integer values differ between the sides (torch hands this layer "
                             "other indices than Flax does); not run alone")
            return None
        # numpy, a view of torch's recorded value where the layout allows: a job holds no copy
        # until its chunk runs (jit takes numpy arguments), so the rows never hold every
        # layer's inputs twice
        arrays[fn], in_layouts[fn], names[fn] = np.asarray(x), lay, tn
    float_names = [n for n, a in arrays.items() if jnp.issubdtype(a.dtype, jnp.floating)]
    sub = _subtree(variables, fpath)
    cots = None
    t_g = {p: g for p, g in tc.output_grads.items() if p in out_layouts}
    if grads and t_g:
        to_f = {t: f for f, t in out_map.items()}
        cots = {to_f.get(p, p): np.asarray(to_flax_layout(g, out_layouts[p], f"d/d {row.name} {p}"))
                for p, g in t_g.items()}
    # Only params travel as arguments: other collections (BatchNorm statistics) are closed over,
    # as is an NNX submodule's graph, so such a layer's program is its own.
    static = None if twin.nnx or set(sub) - {"params"} else (fc.module, fc.args, fc.kwargs)
    return IsolatedLayer(row, tc, fpath, twin.layer_fn(fc, sub), sub.get("params", {}), arrays, float_names, cots,
                         out_layouts, in_layouts, names, out_map,
                         remake=lambda computing: twin.layer_fn(fc, sub, computing=computing), static=static)


def _judge(job: IsolatedLayer, result, plan: PortPlan, t_param_grads: Mapping[str, np.ndarray],
           tied: Mapping[str, str], rows: RowJudge, total, own=None, own_total=None,
           first: tuple[dict[str, Comparison], set[str]] | None = None) -> tuple[set[str], dict[str, Comparison]]:
    """Judge ``job``'s isolated outputs and input gradients; with call 0 of a module, its parameter
    gradients as ``total`` (the sum over every call, _ParamGradTotals; None: not judged per layer).
    own / own_total: the same layer's run (and total) truly in float64 (``_own_run``), whose
    distance to ``result`` is the twin's own rounding noise. first: the first judgment's parameter
    comparisons and the names that failed there: those alone are judged again (``total`` may hold
    no others: a passed gradient is final, the twin's own noise only widens the bound). Returns
    the names of the parameters whose gradients failed and their comparisons by name."""
    row, tc = job.row, job.torch_call
    probe = rows.probe_call(tc)
    out, grads = result
    own_out, own_grads = own if own is not None else (None, None)
    row.isolated = job.check(out, rows, probe, own=own_out)
    if grads is None:
        return set(), {}
    p_grads, in_grads = grads
    own_in = own_grads[1] if own_grads is not None else [None] * len(in_grads)
    comps: list[Comparison] = []
    by_name: dict[str, Comparison] = {}
    for fn, g, og in zip(job.float_names, in_grads, own_in):
        tn = job.torch_names[fn]
        t = tc.input_grads.get(tn)
        if t is not None:
            name = f"d/d {tn} of {row.name}"
            lay = job.in_layouts[fn]
            axis = "auto" if lay.flatten is None else None
            try:
                # converted to torch layout here (a flattened Linear input is permuted, not
                # transposed), so the judge's layout only names the slice axis
                g_t = lay.to_torch(np.asarray(g), name)
                comps.append(rows.judge(name, g_t, t, grad=True, tc=tc,
                                        probe_value=probe.input_grads.get(tn) if probe else None,
                                        axis=slice_axis(lay.layout, np.ndim(t)) if axis == "auto" else None,
                                        own=None if og is None else (g_t, lay.to_torch(np.asarray(og), name))))
            except ValueError as exc:
                comps.append(failed_comparison(name, str(exc), rows.grad))
    if job.params and tc.call == 0:
        # torch's parameter gradient sums every call of this module: judge the sum of the Flax
        # layer's per-call gradients (equal to this call's own when it ran once).
        if total is None:
            if first is None:
                row.notes.append("parameter gradients not judged per layer: some call of this module did "
                                 "not run alone (torch's gradient sums every call); judged whole-model")
        elif first is None:
            by_name = _param_grad_comps(row, total, job.flax_path, plan, t_param_grads, tied, rows, tc, own_total)
        else:
            by_name = {**first[0], **_param_grad_comps(row, total, job.flax_path, plan, t_param_grads, tied, rows,
                                                       tc, own_total, names=first[1])}
        comps.extend(by_name.values())
    row.grad_isolated = worst_of([c for c in comps if c is not None])
    return {name for name, c in by_name.items() if not c.ok}, by_name


def _param_grad_comps(row: LayerRow, p_grads, fpath, plan: PortPlan,
                      t_param_grads: Mapping[str, np.ndarray], tied: Mapping[str, str],
                      rows: RowJudge, tc: TorchCall | None = None, own_grads=None,
                      names: set[str] | None = None) -> dict[str, Comparison]:
    """The isolated gradients of the parameters beneath ``row`` (``p_grads``: the Flax layer's,
    at ``fpath``) judged against torch's, by torch name; tied ones are left to the model level
    (a note says so); with ``names``, those alone (judged again: the notes are made)."""
    named = _named_grads(p_grads, fpath, plan)
    own_named = _named_grads(own_grads, fpath, plan) if own_grads is not None else {}
    prefix = f"{row.torch_path}." if row.torch_path else ""
    shared = set(tied) | set(tied.values())
    judged = []
    for name, value in named.items():
        if not name.startswith(prefix) or name not in t_param_grads or (names is not None and name not in names):
            continue
        if name in shared:
            # A tied tensor's torch gradient is the sum over every layer that uses it; this layer
            # alone sees one use. Its total is judged at model level ("grad <name>").
            row.notes.append(f"{name} is tied ({'alias of ' + tied[name] if name in tied else 'shared'}); "
                             "its gradient is judged whole-model")
            continue
        judged.append((name, value))

    def one(item) -> Comparison:
        name, value = item
        return rows.judge(f"grad {name} (isolated)", value, t_param_grads[name], grad=True, tc=tc,
                          probe_value=rows.probe_params.get(name), axis=0,
                          own=(value, own_named[name]) if name in own_named else None)
    # A row may hold many (a container's whose layers cannot run alone, a model's embeddings):
    # judged side by side in worker threads, in order (parity._threads.in_order).
    return dict(zip((name for name, _ in judged), in_order(one, judged)))


def _keep_grads_of(p_grads, fpath, plan: PortPlan, names: set[str]) -> None:
    """Drop from ``p_grads`` (a layer's parameter gradients, its subtree at ``fpath``: nested dicts,
    changed in place) every gradient but those of the layers holding the parameters ``names``
    (torch names), as the own run computes them (parity.runtime.param_grads_for)."""
    _, wanted = param_grads_for(plan, [f"param:{n}" for n in names])

    def prune(tree, path: tuple) -> None:
        for k in list(tree):
            if isinstance(tree[k], dict):
                prune(tree[k], (*path, k))
                if not tree[k]:
                    del tree[k]
            elif not wanted((*fpath, *path, k)):
                del tree[k]
    if isinstance(p_grads, dict):  # (an immutable tree stays whole: correct, only held longer)
        prune(p_grads, ())


def _named_grads(p_grads, fpath, plan: PortPlan) -> dict[str, np.ndarray]:
    """A layer's parameter gradients (its subtree) by torch name, in torch layout, through the
    port's own flax -> torch mapping (kernel transposes, flips, flatten permutations) cut to the
    layers that own them, rather than through a whole model's tree of zeros around them."""
    flat = {tuple(str(p) for p in (*fpath, *k)): np.asarray(v)
            for k, v in traverse_util.flatten_dict(dict(p_grads)).items()}
    owners = [layer for layer in plan.layers if any(
        t.collection == "params" and layer.flax_leaf("params", t.flax_name)[1:] in flat for t in layer.rule.tensors)]
    return replace(plan, layers=owners).to_torch({"params": traverse_util.unflatten_dict(flat)},
                                                 collections=("params",))
