"""Resize traps: torch ``F.interpolate`` / ``nn.Upsample`` against ``jax.image.resize``.

- antialias: jax.image.resize defaults to antialias=True, torch to False. Antialiasing widens
  the interpolation kernel by the down-sampling factor, so it only changes anything when an axis
  gets smaller; when up-sampling the kernel scale is max(1, in/out) = 1 on both sides and they
  agree, so no finding is made there (named with the sizes when it down-samples).
- method: torch mode vs jax method (nearest / linear / cubic); the cubic coefficient (torch
  bicubic a=-0.75 without antialias, -0.5 with it; jax 'cubic' -0.5, 'cubic-pytorch' -0.75
  unless antialiased); torch 'nearest' (source index floor(i * in/out)) vs jax nearest
  (floor((i + 0.5) * in/out), torch's 'nearest-exact'), named only for the sizes where the two
  pick different pixels.
- align_corners=True: jax.image.resize has none (it always samples at half-pixel centres, which
  is torch's align_corners=False).
"""
from __future__ import annotations

import math

import torch

from parity.lint._common import Finding, guess_flax_path, pair_by_scope, tpath
from parity.lint._torch import TorchCall
from parity.lint._trace import FlaxTrace, ResizeCall
from weight_port import flax_path_str

_TORCH_METHOD = {"nearest": "nearest", "nearest-exact": "nearest", "linear": "linear", "bilinear": "linear",
                 "trilinear": "linear", "bicubic": "cubic", "area": "area"}
_JAX_METHOD = {"cubic_pytorch": "cubic"}  # one family for the mode check; coefficients below


def _torch_resizes(torch_module, calls: list[TorchCall], nnx: bool) -> list[tuple]:
    """[(torch where, mode, align_corners, antialias, guessed Flax path)] in module order."""
    out = [(tpath(p), m.mode, bool(m.align_corners), False, guess_flax_path(p, nnx))
           for p, m in torch_module.named_modules() if isinstance(m, torch.nn.Upsample)]
    out += [(f"{tpath(c.path)} (inline interpolate)", c.kwargs.get("mode", "nearest"),
             bool(c.kwargs.get("align_corners")), bool(c.kwargs.get("antialias")), guess_flax_path(c.path, nnx))
            for c in calls if c.op == "interpolate"]
    return out


def _cubic_a(method: str, antialias: bool) -> float:
    """jax's cubic coefficient: Keys a=-0.5, except 'cubic-pytorch' without antialias (OpenCV's
    and torch's a=-0.75; with antialias jax runs it as plain 'cubic')."""
    return -0.75 if method == "cubic_pytorch" and not antialias else -0.5


def _nearest_differs(n_in: int, n_out: int) -> bool:
    torch_idx = [min(math.floor(i * n_in / n_out), n_in - 1) for i in range(n_out)]
    jax_idx = [min(math.floor((i + 0.5) * n_in / n_out), n_in - 1) for i in range(n_out)]
    return torch_idx != jax_idx


def resize_findings(torch_module, trace: FlaxTrace, calls: list[TorchCall], nnx: bool) -> list[Finding]:
    by_scope: dict[tuple[str, ...], list[ResizeCall]] = {}
    for r in trace.resizes:
        by_scope.setdefault(r.scope, []).append(r)
    out = []
    for (where, mode, corners, t_aa, _), r in pair_by_scope(_torch_resizes(torch_module, calls, nnx), by_scope):
        fw = flax_path_str(r.scope) + " (inline resize)"
        axes = [(i, a, b) for i, (a, b) in enumerate(zip(r.in_shape, r.out_shape)) if a != b]
        sizes = f"{tuple(a for _, a, _ in axes)} -> {tuple(b for _, _, b in axes)}"
        t_m, f_m = _TORCH_METHOD.get(mode, mode), _JAX_METHOD.get(r.method, r.method)
        if t_m != f_m:
            out.append(Finding("resize-method", where, fw, f"torch mode={mode!r}, Flax jax.image.resize "
                               f"method={r.method!r}"))
            continue
        if f_m == "cubic" and _cubic_a(r.method, r.antialias) != (-0.5 if t_aa else -0.75):
            out.append(Finding("resize-method", where, fw, f"torch bicubic (antialias={t_aa}) uses the cubic "
                               f"coefficient a={-0.5 if t_aa else -0.75}, jax.image.resize method={r.method!r} "
                               f"(antialias={r.antialias}) a={_cubic_a(r.method, r.antialias)}: they differ off "
                               "the input grid (jax's 'cubic-pytorch' without antialias is torch's a=-0.75)"))
        if mode == "nearest":
            bad = ", ".join(f"{a} -> {b}" for _, a, b in axes if _nearest_differs(a, b))
            if bad:
                out.append(Finding("resize-method", where, fw, "torch mode='nearest' picks source pixel "
                                   "floor(i * in/out), jax nearest floor((i + 0.5) * in/out) (torch's "
                                   f"'nearest-exact'): they pick different pixels at {bad}"))
        if corners and f_m in ("linear", "cubic"):
            out.append(Finding("resize-align-corners", where, fw, f"torch align_corners=True (mode={mode!r}) "
                               "maps the corner pixels onto each other; jax.image.resize has no align_corners "
                               f"(half-pixel centres, torch's align_corners=False): differs at {sizes}"))
        down = [(a, b) for _, a, b in axes if b < a]
        if f_m != "nearest" and t_aa != r.antialias and down:
            out.append(Finding("resize-antialias", where, fw,
                               f"torch antialias={t_aa}, Flax jax.image.resize antialias={r.antialias} "
                               "(jax's default is True, torch's False) while down-sampling "
                               f"{', '.join(f'{a} -> {b}' for a, b in down)}: antialiasing widens the "
                               "kernel by the factor there (on up-sampling the two agree)"))
    return out


__all__ = ["resize_findings"]
