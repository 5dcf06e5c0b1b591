"""A static trap lint: read the torch module and its Flax twin's jaxpr, before any number is
compared, and name each known convention difference with both locations.

Torch side: module attributes (nn.GELU(approximate=...), Dropout, ConvNd geometry, pooling
ceil_mode) and inline calls (F.gelu) found by torch.fx, one trace per module with every child
kept as a leaf, so an inline op is attributed to the module whose ``forward`` called it.
Flax side: one ``jax.make_jaxpr`` of the twin's apply; each equation's
``source_info.name_stack`` ("Model/block/conv") gives the Flax module path that produced it
(the first component, the top module's class name, is dropped; equations inside a nested jaxpr
inherit the stack of the equation that holds them).

Pairing: a torch layer with parameters goes to the Flax path the weight port chose
(``PortPlan.layers``); a parameter-free one to weight_port.naming.torch_to_flax_path's rule,
and, when the Flax op is inline (nn.gelu in a parent's ``__call__``), to the Flax scope sharing
the longest prefix with that path.

Traps read: GELU exact (erf) vs tanh approximation; conv stride / dilation / groups and padding
('SAME' with stride > 1 against torch's symmetric padding, with the input sizes where they
differ); dropout drawing random bits in an eval-mode check; torch pooling with ceil_mode=True
(Flax pooling floors). Not read: resize antialias, norm eps / momentum (the weight port's
attribute check warns about those), attention scaling, count_include_pad.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import torch

from weight_port.naming import flax_path_str, torch_to_flax_path

LINT_ERROR = "lint-error"


@dataclass(frozen=True)
class Finding:
    """One convention difference. torch_where: torch module path ("<root>" for the top module;
    "<path> (inline gelu)" for an op called in that module's forward). flax_where: Flax module
    path ("block/conv"; "(inline gelu)" appended likewise)."""

    kind: str  # "gelu", "conv-padding", "conv-geometry", "dropout-on", "pool-ceil", "lint-error", "note"
    torch_where: str
    flax_where: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} at torch {self.torch_where} / Flax {self.flax_where}: {self.message}"


@dataclass(frozen=True)
class _Eqn:
    """One jaxpr equation with the Flax module path (tuple) that produced it."""

    prim: str
    scope: tuple[str, ...]
    params: dict
    in_shapes: tuple


def _eqns(jaxpr, stack: str = "") -> list[_Eqn]:
    out = []
    for e in jaxpr.eqns:
        own = str(e.source_info.name_stack)
        full = "/".join(s for s in (stack, own) if s)
        scope = tuple(full.split("/")[1:]) if full else ()  # drop the top module's class name
        shapes = tuple(getattr(v.aval, "shape", None) for v in e.invars)
        out.append(_Eqn(e.primitive.name, scope, dict(e.params), shapes))
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            out += _eqns(sub, full)
    return out


def _flax_eqns(twin, variables: Mapping, args: tuple) -> list[_Eqn]:
    """Every equation of one trace of the twin (a dropout RNG supplied, so a twin that draws
    random bits in eval traces instead of failing on a missing 'dropout' stream)."""
    if twin.nnx:
        fn = lambda v, a: twin.apply(v, a)[0]  # noqa: E731  (NNX modules carry their own RNGs)
    else:
        def fn(v, a):
            mutable = [c for c in v if c != "params"] if twin.train else False
            return twin.module.apply(dict(v), *a, rngs={"dropout": jax.random.PRNGKey(0)},
                                     mutable=mutable, **twin.kwargs)
    closed = jax.make_jaxpr(fn)(dict(variables), tuple(args))
    return _eqns(closed.jaxpr)


# --- torch side ------------------------------------------------------------------------------------
def _inline_gelus(module: torch.nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """[(torch module path, approximate)] for every F.gelu called in a module's own forward, and
    the paths whose forward torch.fx could not trace (skipped)."""
    import torch.fx

    class _Own(torch.fx.Tracer):  # every child a leaf: only this module's own ops appear
        def is_leaf_module(self, m, qualname):
            return True

    found, failed = [], []
    for path, mod in module.named_modules():
        if type(mod).__module__.startswith("torch.nn."):
            continue  # a built-in layer or container: read by its attributes, no user-written forward
        try:
            graph = _Own().trace(mod)
        except Exception:  # noqa: BLE001  (fx cannot trace data-dependent control flow: skip it)
            failed.append(path or "<root>")
            continue
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.nn.functional.gelu:
                found.append((path, node.kwargs.get("approximate", "none")))
    return found, failed


def _flax_path_of(torch_path: str, plan) -> tuple[str, ...]:
    if plan is not None:
        for layer in plan.layers:
            if layer.info.torch_path == torch_path:
                return tuple(layer.info.flax_path)
    return torch_to_flax_path(torch_path)


def _closest(target: tuple[str, ...], scopes) -> tuple[str, ...] | None:
    """The scope sharing the longest prefix with ``target`` (None when ``scopes`` is empty)."""
    def common(s):
        n = 0
        while n < min(len(s), len(target)) and s[n] == target[n]:
            n += 1
        return n, -abs(len(s) - len(target))
    return max(scopes, key=common, default=None)


def _tpath(p: str) -> str:
    return p or "<root>"


# --- the traps -------------------------------------------------------------------------------------
def _flax_gelus(eqns: list[_Eqn]) -> dict[tuple[str, ...], list[str]]:
    """{Flax scope: ["tanh" | "erf", ...]}, one entry per gelu call: jax.nn.gelu(approximate=True)
    is x**3 (integer_pow) then tanh in one scope; the exact one is erf (erfc in current JAX)."""
    out: dict[tuple[str, ...], list[str]] = {}
    cubes: dict[tuple[str, ...], int] = {}
    for e in eqns:
        if e.prim == "integer_pow" and e.params.get("y") == 3:
            cubes[e.scope] = cubes.get(e.scope, 0) + 1
        elif e.prim == "tanh" and cubes.get(e.scope):  # a plain tanh activation has no cube
            cubes[e.scope] -= 1
            out.setdefault(e.scope, []).append("tanh")
        elif e.prim in ("erf", "erfc"):
            out.setdefault(e.scope, []).append("erf")
    return out


def _gelu_findings(torch_module, plan, eqns) -> list[Finding]:
    torch_gelus = [(_tpath(p), m.approximate, _flax_path_of(p, plan))
                   for p, m in torch_module.named_modules() if isinstance(m, torch.nn.GELU)]
    inline, failed = _inline_gelus(torch_module)
    torch_gelus += [(f"{_tpath(p)} (inline gelu)", a, torch_to_flax_path(p)) for p, a in inline]
    out = []
    if failed:
        out.append(Finding("note", ", ".join(failed), "-", "torch.fx could not trace these modules' "
                           "forward: inline torch ops there (F.gelu) are not read"))
    flax = _flax_gelus(eqns)
    # Each torch gelu goes to the Flax scope nearest its path; per scope, the two sides' counts
    # of exact and tanh gelus must agree, and the torch gelus of the kind in surplus are named.
    by_scope: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for where, approx, fpath in torch_gelus:
        scope = fpath if fpath in flax else _closest(fpath, flax)
        if scope is not None:
            by_scope.setdefault(scope, []).append((where, "tanh" if approx == "tanh" else "erf"))
    name = {"erf": "exact (erf)", "tanh": "tanh approximation"}
    for scope, gelus in by_scope.items():
        f_kinds = list(flax[scope])
        for where, kind in gelus:
            if kind in f_kinds:
                f_kinds.remove(kind)
                continue
            other = next((k for k in f_kinds if k != kind), None)
            if other is None:
                continue  # more torch gelus than Flax ones here: not this lint's call
            f_kinds.remove(other)
            # Flax gelu is a function, never a module: always an inline op of the scope calling it.
            out.append(Finding("gelu", where, flax_path_str(scope) + " (inline gelu)",
                               f"torch GELU is {name[kind]}, Flax gelu is {name[other]} "
                               "(flax.linen.gelu defaults to approximate=True); differs by up to ~1e-3"))
    return out


def _same_pads(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """XLA's 'SAME' padding (lo, hi) of one spatial axis of size n."""
    eff = (k - 1) * d + 1
    total = max((-(-n // s) - 1) * s + eff - n, 0)
    return total // 2, total - total // 2


def _conv_findings(plan, eqns) -> list[Finding]:
    out = []
    # Only a scope with exactly one conv is paired (an NNX twin has no name stack: every eqn
    # is at the root, and pairing its convs by order is a guess this lint does not make).
    by_scope: dict[tuple[str, ...], list[_Eqn]] = {}
    for e in eqns:
        if e.prim == "conv_general_dilated" and e.scope:
            by_scope.setdefault(e.scope, []).append(e)
    convs = {s: es[0] for s, es in by_scope.items() if len(es) == 1}
    for layer in plan.layers if plan is not None else []:
        m = layer.info.torch_module
        if not isinstance(m, torch.nn.modules.conv._ConvNd) or m.transposed:
            continue
        fpath = tuple(layer.info.flax_path)
        e = convs.get(fpath)
        if e is None:
            continue
        tw, fw = layer.info.torch_path, flax_path_str(fpath)
        geometry = [(nm, tuple(t), tuple(f)) for nm, t, f in (
            ("stride", m.stride, e.params["window_strides"]), ("dilation", m.dilation, e.params["rhs_dilation"]),
            ("groups", (m.groups,), (e.params["feature_group_count"],))) if tuple(t) != tuple(f)]
        for nm, t, f in geometry:
            out.append(Finding("conv-geometry", tw, fw, f"{nm}: torch {t}, Flax {f}"))
        if geometry or isinstance(m.padding, str):
            continue
        spatial = e.in_shapes[0][1:-1] if e.in_shapes[0] is not None else ()
        pads = tuple(tuple(p) for p in e.params["padding"])
        want = tuple((p, p) for p in m.padding)
        fmod = getattr(layer.info, "flax_module", None)
        if str(getattr(fmod, "padding", "")).upper() == "SAME" and any(s > 1 for s in m.stride):
            # 'SAME' pads by input size: list, per axis, the sizes (up to 4 strides past the
            # kernel) where XLA's (lo, hi) is not torch's (p, p).
            for ax, (k, s, d, p) in enumerate(zip(m.kernel_size, m.stride, m.dilation, m.padding)):
                bad = [n for n in range(max((k - 1) * d + 1 - 2 * p, 1), (k - 1) * d + 1 + 4 * s + 1)
                       if _same_pads(n, k, s, d) != (p, p)]
                if bad:
                    parity = ("even" if all(n % 2 == 0 for n in bad) else
                              "odd" if all(n % 2 for n in bad) else None)
                    sizes = (f"{parity} input sizes ({', '.join(map(str, bad))}, ...)" if parity
                             else "input sizes " + ", ".join(map(str, bad)))
                    out.append(Finding("conv-padding", tw, fw,
                                       f"Flax padding='SAME' with stride {s} pads axis {ax} asymmetrically "
                                       f"where torch pads ({p}, {p}) (kernel {k}): differs at {sizes}"
                                       + (f"; this input ({spatial[ax]}) is one" if ax < len(spatial)
                                          and spatial[ax] in bad else "")))
        elif pads != want:
            out.append(Finding("conv-padding", tw, fw, f"padding at input {tuple(spatial)}: torch {want}, "
                               f"Flax {pads}"))
    return out


def _dropout_findings(torch_module, eqns, train: bool) -> list[Finding]:
    if train:
        return []
    drops = [p for p, m in torch_module.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    scopes = sorted({e.scope for e in eqns if e.prim == "random_bits"})
    out = []
    for scope in scopes:
        best = _closest(scope, [torch_to_flax_path(p) for p in drops])
        t = next((p for p in drops if torch_to_flax_path(p) == best), None)
        out.append(Finding("dropout-on", _tpath(t) if t is not None else "-", flax_path_str(scope),
                           "the Flax twin draws random bits (dropout left on?) while the check runs "
                           "in eval mode, where torch's dropout is off"))
    return out


def _pool_findings(torch_module) -> list[Finding]:
    pools = (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AvgPool1d,
             torch.nn.AvgPool2d, torch.nn.AvgPool3d)
    return [Finding("pool-ceil", _tpath(p), flax_path_str(torch_to_flax_path(p)),
                    "torch pools with ceil_mode=True; Flax pooling floors the output size: they "
                    "differ wherever (size + 2*padding - kernel) is not a multiple of the stride")
            for p, m in torch_module.named_modules() if isinstance(m, pools) and m.ceil_mode]


def lint_pair(torch_module: torch.nn.Module, flax_module, example_input, *, input_layouts=None,
              variables: Mapping | None = None, train: bool = False, train_kwarg: str | None = None,
              plan=None) -> list[Finding]:
    """Known convention traps between ``torch_module`` and its Flax twin, each with both locations.

    example_input: the torch module's positional arguments in torch layout (as parity.check).
    input_layouts: per input leaf layout, as parity.check's ``input_layout`` (default: inferred).
    variables: Flax variables (default: ported from the torch module); plan: the weight port's
    PortPlan when the caller already has one (pairs torch layers to Flax paths). Never raises:
    an exception inside the lint is one Finding of kind "lint-error" naming it.
    Cost: one jax.make_jaxpr of the twin, one torch.fx trace per non-built-in torch module.
    """
    try:
        from parity.runtime import FlaxTwin, as_args, flax_inputs, torch_inputs, train_mode_matters
        from parity.runtime import input_layouts as infer_layouts

        args = torch_inputs(as_args(example_input), torch.float32, "cpu", False)
        layouts = infer_layouts(torch_module, args, input_layouts)
        if plan is None or variables is None:
            from weight_port.layout import AS_IS
            from weight_port.plan import build_plan
            plain = [layouts.get(f"input[{i}]", AS_IS) for i in range(len(args))]
            plan = plan or build_plan(torch_module, flax_module, args, input_layout=plain,
                                      check_attributes="warn")
            variables = variables if variables is not None else plan.to_flax(torch_module.state_dict())
        twin = FlaxTwin(flax_module, train=train, train_kwarg=train_kwarg,
                        train_mode_matters=train_mode_matters(torch_module))
        return lint_traced(torch_module, twin, variables, flax_inputs(args, layouts), plan, train=train)
    except Exception as exc:  # noqa: BLE001  (a lint crash must never break a check)
        return [_crash(exc)]


def lint_traced(torch_module: torch.nn.Module, twin, variables: Mapping, flax_args: tuple, plan, *,
                train: bool) -> list[Finding]:
    """lint_pair for a caller that already has the twin, its variables, the Flax-layout inputs
    and the port's plan (parity.check). Never raises (a "lint-error" Finding instead)."""
    try:
        eqns = _flax_eqns(twin, variables, flax_args)
        return (_gelu_findings(torch_module, plan, eqns) + _conv_findings(plan, eqns)
                + _dropout_findings(torch_module, eqns, train) + _pool_findings(torch_module))
    except Exception as exc:  # noqa: BLE001  (a lint crash must never break a check)
        return [_crash(exc)]


def _crash(exc: Exception) -> Finding:
    return Finding(LINT_ERROR, "-", "-", f"the trap lint failed: {type(exc).__name__}: {exc}")


__all__ = ["Finding", "LINT_ERROR", "lint_pair", "lint_traced"]
