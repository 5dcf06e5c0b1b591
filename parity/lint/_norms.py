"""Fast variance: a Flax norm with ``use_fast_variance=True`` (Flax's default for LayerNorm,
GroupNorm and BatchNorm) computes var = E[x^2] - E[x]^2, torch the two-pass E[(x - mean)^2]. The
one-pass form cancels: in float32 it keeps about eps32 * (1 + mean^2 / var) of the variance, so
it differs from torch only where the normalised values have a large mean against their spread.
That depends on the data, so this trap is read on the check's own input: a pre-hook on each such
norm during the lint's one torch forward, named only where the input reaches the ratio where it
matters."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def fast_variance_watch(torch_module: torch.nn.Module, plan, train: bool) -> Iterator[list[Finding]]:
    """Watch the torch forward run inside the block (the lint's one forward, on the check's
    input): a pre-hook on each torch norm whose Flax twin uses fast variance (BatchNorm only in
    train mode: in eval both sides use the running variance). The list yielded holds, once the
    block exits, one finding per such norm whose input reached FAST_VARIANCE_RATIO (none when no
    forward ran). The hooks compute nothing the forward sees, and the block's forward is the one
    that puts the module back as it found it."""
    found: list[Finding] = []
    paired = {}
    for layer in plan.layers if plan is not None else ():
        m, fm = layer.info.torch_module, getattr(layer.info, "flax_module", None)
        if (isinstance(m, _NORMS) and getattr(fm, "use_fast_variance", False)
                and (train or not isinstance(m, torch.nn.modules.batchnorm._BatchNorm))):
            paired[m] = layer
    worst: dict[torch.nn.Module, float] = {}

    def pre(mod, args):
        worst[mod] = max(worst.get(mod, 0.0), _mean_over_std(mod, args[0]))

    handles = [m.register_forward_pre_hook(pre) for m in paired]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
    for m, ratio in worst.items():
        if ratio >= FAST_VARIANCE_RATIO:
            layer = paired[m]
            found.append(Finding(
                "fast-variance", tpath(layer.info.torch_path), flax_path_str(tuple(layer.info.flax_path)),
                f"Flax computes the variance as E[x^2] - E[x]^2 (use_fast_variance=True), torch as "
                f"E[(x - mean)^2]; this input's |mean|/std reaches {ratio:.3g} here (>= "
                f"{FAST_VARIANCE_RATIO:g}), where the one-pass form cancels: set use_fast_variance=False"))


__all__ = ["FAST_VARIANCE_RATIO", "fast_variance_watch"]
