"""What every trap of the lint shares: the Finding, and how a torch location is paired with a
Flax one (the weight port's pairing for layers with parameters, the naming rule otherwise, and
the nearest Flax scope for an op written inline in a parent's call)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from weight_port import torch_to_flax_path

LINT_ERROR = "lint-error"


@dataclass(frozen=True)
class Finding:
    """One convention difference. torch_where: torch module path ("<root>" for the top module;
    "<path> (inline gelu)" for an op called in that module's forward). flax_where: Flax module
    path ("block/conv"; "(inline gelu)" appended likewise)."""

    # "gelu", "conv-padding", "conv-geometry", "dropout-on", "pool-ceil", "pool-count-include-pad",
    # "resize-antialias", "resize-method", "resize-align-corners", "attention-scale", "fast-variance",
    # "lint-error", "note"
    kind: str
    torch_where: str
    flax_where: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} at torch {self.torch_where} / Flax {self.flax_where}: {self.message}"


def tpath(p: str) -> str:
    return p or "<root>"


def guess_flax_path(torch_path: str, nnx: bool) -> tuple[str, ...]:
    """Where a parameter-free torch layer's twin lives: NNX keeps torch's attribute path
    ('blocks.0.mlp' -> ('blocks', '0', 'mlp'): nnx.List indices are path entries); Linen names
    list members 'blocks_0' (weight_port.naming)."""
    if nnx:
        return tuple(torch_path.split(".")) if torch_path else ()
    return torch_to_flax_path(torch_path)


def flax_path_of(torch_path: str, plan, nnx: bool) -> tuple[str, ...]:
    if plan is not None:
        for layer in plan.layers:
            if layer.info.torch_path == torch_path:
                return tuple(layer.info.flax_path)
    return guess_flax_path(torch_path, nnx)


def closest(target: tuple[str, ...], scopes: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The scope sharing the longest prefix with ``target`` (None when ``scopes`` is empty)."""
    def common(s):
        n = 0
        while n < min(len(s), len(target)) and s[n] == target[n]:
            n += 1
        return n, -abs(len(s) - len(target))
    return max(scopes, key=common, default=None)


def pair_by_scope(torch_items: list, flax_by_scope: dict) -> list[tuple]:
    """[(torch item, Flax item)]: each torch item (whose last field is its guessed Flax path)
    goes to the Flax scope equal to (else nearest) that path, and takes that scope's next
    unpaired Flax item in order; torch items left over (more than the Flax side has) are dropped."""
    taken = {s: 0 for s in flax_by_scope}
    out = []
    for item in torch_items:
        fpath = item[-1]
        scope = fpath if fpath in flax_by_scope else closest(fpath, flax_by_scope)
        if scope is None or taken[scope] >= len(flax_by_scope[scope]):
            continue
        out.append((item, flax_by_scope[scope][taken[scope]]))
        taken[scope] += 1
    return out


__all__ = ["Finding", "LINT_ERROR", "closest", "flax_path_of", "guess_flax_path", "pair_by_scope", "tpath"]
