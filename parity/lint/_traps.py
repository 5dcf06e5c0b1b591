"""Layer-convention traps: GELU exact vs tanh, conv geometry and 'SAME' padding, dropout left
on, pooling ceil_mode and count_include_pad."""
from __future__ import annotations

import torch

from parity.lint._common import Finding, closest, flax_path_of, guess_flax_path, pair_by_scope, tpath
from parity.lint._torch import TorchCall
from parity.lint._trace import Eqn, FlaxTrace
from weight_port import flax_path_str


# --- GELU ------------------------------------------------------------------------------------------
def _flax_gelus(eqns: list[Eqn]) -> dict[tuple[str, ...], list[str]]:
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


def gelu_findings(torch_module, plan, trace: FlaxTrace, calls: list[TorchCall], nnx: bool) -> list[Finding]:
    torch_gelus = [(tpath(p), m.approximate, flax_path_of(p, plan, nnx))
                   for p, m in torch_module.named_modules() if isinstance(m, torch.nn.GELU)]
    torch_gelus += [(f"{tpath(c.path)} (inline gelu)", c.kwargs["approximate"], guess_flax_path(c.path, nnx))
                    for c in calls if c.op == "gelu"]
    out = []
    flax = _flax_gelus(trace.eqns)
    # Each torch gelu goes to the Flax scope nearest its path; per scope, the two sides' counts
    # of exact and tanh gelus must agree, and the torch gelus of the kind in surplus are named.
    by_scope: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for where, approx, fpath in torch_gelus:
        scope = fpath if fpath in flax else closest(fpath, flax)
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


# --- convolutions ----------------------------------------------------------------------------------
def _same_pads(n: int, k: int, s: int, d: int) -> tuple[int, int]:
    """XLA's 'SAME' padding (lo, hi) of one spatial axis of size n."""
    eff = (k - 1) * d + 1
    total = max((-(-n // s) - 1) * s + eff - n, 0)
    return total // 2, total - total // 2


def _flax_padding(fmod) -> str:
    """The Flax conv's padding attribute as written ('SAME', 'VALID', ...); Linen and NNX alike."""
    return str(getattr(fmod, "padding", "")).upper()


def conv_findings(plan, trace: FlaxTrace) -> list[Finding]:
    out = []
    # Only a scope with exactly one conv is paired (pairing several convs of one scope by order
    # is a guess this lint does not make).
    by_scope: dict[tuple[str, ...], list[Eqn]] = {}
    for e in trace.eqns:
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
        if _flax_padding(getattr(layer.info, "flax_module", None)) == "SAME" and any(s > 1 for s in m.stride):
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


# --- dropout ---------------------------------------------------------------------------------------
def dropout_findings(torch_module, trace: FlaxTrace, train: bool, nnx: bool) -> list[Finding]:
    if train:
        return []
    drops = [p for p, m in torch_module.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    scopes = sorted({e.scope for e in trace.eqns if e.prim == "random_bits"})
    out = []
    for scope in scopes:
        best = closest(scope, [guess_flax_path(p, nnx) for p in drops])
        t = next((p for p in drops if guess_flax_path(p, nnx) == best), None)
        out.append(Finding("dropout-on", tpath(t) if t is not None else "-", flax_path_str(scope),
                           "the Flax twin draws random bits (dropout left on?) while the check runs "
                           "in eval mode, where torch's dropout is off"))
    return out


# --- pooling ---------------------------------------------------------------------------------------
_POOLS = (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AvgPool1d,
          torch.nn.AvgPool2d, torch.nn.AvgPool3d)
_AVG_POOLS = (torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d)


def pool_ceil_findings(torch_module, nnx: bool) -> list[Finding]:
    return [Finding("pool-ceil", tpath(p), flax_path_str(guess_flax_path(p, nnx)),
                    "torch pools with ceil_mode=True; Flax pooling floors the output size: they "
                    "differ wherever (size + 2*padding - kernel) is not a multiple of the stride")
            for p, m in torch_module.named_modules() if isinstance(m, _POOLS) and m.ceil_mode]


def _flax_avg_pools(trace: FlaxTrace) -> dict[tuple[str, ...], list[tuple[Eqn, bool]]]:
    """{scope: [(padded sum-pool equation, counts padding)]}: flax avg_pool is a reduce_window
    sum, then a division by the window size (count_include_pad=True) or by the same sum-pool of
    ones (False, the count of real elements in each window)."""
    out: dict[tuple[str, ...], list[tuple[Eqn, bool]]] = {}
    for e in trace.eqns:
        if e.prim != "reduce_window_sum" or not any(lo or hi for lo, hi in e.params.get("padding", ())):
            continue
        if trace.constant(e.invars[0]) is not None or _is_ones(trace, e.invars[0]):
            continue  # the sum-pool of ones (the divisor), not a pooled activation
        divs = [r for r in trace.readers(e.outvars[0]) if r.prim == "div" and r.invars[0] is e.outvars[0]]
        if not divs:
            continue  # a sum pool (no average): nothing to count
        by = trace.source(divs[0].invars[1])
        counts_pad = not (by is not None and by.prim == "reduce_window_sum")
        out.setdefault(e.scope, []).append((e, counts_pad))
    return out


def _is_ones(trace: FlaxTrace, v) -> bool:
    e = trace.source(v)
    while e is not None and e.prim in ("broadcast_in_dim", "convert_element_type", "reshape"):
        c = trace.constant(e.invars[0])
        if c is not None:
            return True
        e = trace.source(e.invars[0])
    return False


def pool_pad_findings(torch_module, trace: FlaxTrace, nnx: bool) -> list[Finding]:
    """torch AvgPool with padding > 0 divides border windows by the full window size
    (count_include_pad=True, torch's default) or by the real elements (False); flax avg_pool has
    the same switch (default True). Named when the two sides' choices differ."""
    torch_pools = [(tpath(p), m, guess_flax_path(p, nnx)) for p, m in torch_module.named_modules()
                   if isinstance(m, _AVG_POOLS) and any(_tuple(m.padding))]
    out = []
    for (where, m, _), (e, f_counts) in pair_by_scope(torch_pools, _flax_avg_pools(trace)):
        if bool(m.count_include_pad) == f_counts:
            continue
        k = _tuple(m.kernel_size)
        window = " x ".join(map(str, k * (len(e.params["window_dimensions"]) - 2) if len(k) == 1 else k))
        word = lambda counts: "the full window" if counts else "the real elements"  # noqa: E731
        out.append(Finding("pool-count-include-pad", where, flax_path_str(e.scope) + " (inline avg_pool)",
                           f"torch {type(m).__name__}(padding={m.padding}) count_include_pad={m.count_include_pad} "
                           f"divides each border window by {word(m.count_include_pad)}, Flax avg_pool "
                           f"count_include_pad={f_counts} by {word(f_counts)} ({window} window): border "
                           "outputs differ"))
    return out


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


__all__ = ["conv_findings", "dropout_findings", "gelu_findings", "pool_ceil_findings", "pool_pad_findings"]
