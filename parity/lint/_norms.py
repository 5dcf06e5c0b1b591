"""Fast variance: a Flax norm with ``use_fast_variance=True`` (Flax's default for LayerNorm,
GroupNorm and BatchNorm) computes var = E[x^2] - E[x]^2, torch the two-pass E[(x - mean)^2]. The
one-pass form cancels: in float32 it keeps about eps32 * (1 + mean^2 / var) of the variance, so
it differs from torch only where the normalised values have a large mean against their spread.
That depends on the data, so this trap is read on the check's own input: one torch forward with a
pre-hook on each such norm, named only where the input reaches the ratio where it matters."""
from __future__ import annotations

import torch

from parity.lint._common import Finding, tpath
from weight_port import flax_path_str

# |mean| / std at which float32's one-pass variance is off by >= 1e-4 of the variance:
# eps32 * (1 + r^2) = 1.2e-7 * (1 + 30^2) ~ 1.1e-4. Below it the difference is under the
# float32 forward tolerance; above it the two formulas give visibly different outputs.
FAST_VARIANCE_RATIO = 30.0

_NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)


def _mean_over_std(module: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest |mean| / std over the groups of values this norm normalises together (inf for a
    constant group with a non-zero mean: two-pass gives exactly 0 there, one-pass does not)."""
    x = x.detach().double()
    if isinstance(module, torch.nn.LayerNorm):
        groups = x.reshape(-1, int(torch.tensor(module.normalized_shape).prod()))
    elif isinstance(module, torch.nn.GroupNorm):
        groups = x.reshape(x.shape[0] * module.num_groups, -1)
    else:  # BatchNorm: one group per channel, over the batch and spatial axes
        groups = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean, std = groups.mean(dim=1).abs(), groups.std(dim=1, unbiased=False)
    ratio = torch.where(std > 0, mean / std.clamp_min(1e-300),
                        torch.where(mean > 0, torch.full_like(mean, float("inf")), torch.zeros_like(mean)))
    return float(ratio.max()) if ratio.numel() else 0.0


def fast_variance_findings(torch_module: torch.nn.Module, plan, torch_args: tuple | None,
                           train: bool) -> list[Finding]:
    """One finding per torch norm whose Flax twin uses fast variance and whose input on this
    check reaches FAST_VARIANCE_RATIO (BatchNorm only in train mode: in eval both sides use
    the running variance). torch_args: the torch module's positional inputs, torch layout."""
    if plan is None or torch_args is None:
        return []
    paired = {}
    for layer in plan.layers:
        m, fm = layer.info.torch_module, getattr(layer.info, "flax_module", None)
        if (isinstance(m, _NORMS) and getattr(fm, "use_fast_variance", False)
                and (train or not isinstance(m, torch.nn.modules.batchnorm._BatchNorm))):
            paired[m] = layer
    if not paired:
        return []
    worst: dict[torch.nn.Module, float] = {}

    def pre(mod, args):
        worst[mod] = max(worst.get(mod, 0.0), _mean_over_std(mod, args[0]))

    # A train-mode forward moves BatchNorm running statistics: put them back afterwards, so that
    # reading the inputs leaves the caller's module as it was.
    saved = [(b, b.detach().clone()) for m in torch_module.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in m.buffers(recurse=False)]
    handles = [m.register_forward_pre_hook(pre) for m in paired]
    try:
        with torch.no_grad():
            torch_module(*torch_args)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    out = []
    for m, ratio in worst.items():
        if ratio >= FAST_VARIANCE_RATIO:
            layer = paired[m]
            out.append(Finding(
                "fast-variance", tpath(layer.info.torch_path), flax_path_str(tuple(layer.info.flax_path)),
                f"Flax computes the variance as E[x^2] - E[x]^2 (use_fast_variance=True), torch as "
                f"E[(x - mean)^2]; this input's |mean|/std reaches {ratio:.3g} here (>= "
                f"{FAST_VARIANCE_RATIO:g}), where the one-pass form cancels: set use_fast_variance=False"))
    return out


__all__ = ["FAST_VARIANCE_RATIO", "fast_variance_findings"]
