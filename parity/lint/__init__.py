"""A static trap lint: read the torch module and its Flax twin's jaxpr, before any number is
compared, and name each known convention difference with both locations.

Torch side: module attributes (nn.GELU(approximate=...), Dropout, ConvNd geometry, pooling,
nn.Upsample, nn.MultiheadAttention) and inline calls (F.gelu, F.interpolate,
F.scaled_dot_product_attention, a hand-written softmax attention) recorded during one real
forward on the check's inputs: a torch function mode inside the module hooks credits each call to
the innermost module running, so an inline op is attributed to the module whose ``forward``
called it on any model that runs, data-dependent control flow included (parity.lint._torch).
Flax side: one ``jax.make_jaxpr`` of the twin's apply (parity.lint._trace); each equation
carries the Flax module path that produced it -- a Linen twin's name stack, an NNX twin's
submodule scopes opened through the engine's NNX capture -- and the ``jax.image.resize`` calls
are recorded with their arguments.

Pairing: a torch layer with parameters goes to the Flax path the weight port chose
(``PortPlan.layers``); a parameter-free one to the naming rule (Linen 'blocks_0', NNX
'blocks/0'), and, when the Flax op is inline (nn.gelu in a parent's ``__call__``), to the Flax
scope sharing the longest prefix with that path.

Traps read: GELU exact (erf) vs tanh approximation; conv stride / dilation / groups and padding
('SAME' with stride > 1 against torch's symmetric padding, with the input sizes where they
differ); dropout drawing random bits in an eval-mode check; torch pooling with ceil_mode=True
(Flax pooling floors); average pooling count_include_pad; resize antialias (when down-sampling),
method and align_corners (parity.lint._resize); attention logits scaled by a different constant
(parity.lint._attention); a norm whose Flax twin uses the one-pass (fast) variance, where the
check's input has a large mean against its spread (parity.lint._norms). Not read here: norm eps /
momentum (the weight port's attribute check warns about those).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from parity.lint._attention import attention_findings
from parity.lint._common import LINT_ERROR, Finding
from parity.lint._norms import fast_variance_watch
from parity.lint._resize import resize_findings
from parity.lint._torch import inline_calls, traced_ops
from parity.lint._trace import flax_trace as _flax_eqns
from parity.lint._traps import (conv_findings, dropout_findings, gelu_findings, pool_ceil_findings,
                                pool_pad_findings)


def lint_pair(torch_module: torch.nn.Module, flax_module, example_input, *, input_layouts=None,
              variables: Mapping | None = None, train: bool = False, train_kwarg: str | None = None,
              plan=None) -> list[Finding]:
    """Known convention traps between ``torch_module`` and its Flax twin, each with both locations.

    example_input: the torch module's positional arguments in torch layout (as parity.check).
    input_layouts: per input leaf layout, as parity.check's ``input_layout`` (default: inferred).
    variables: Flax variables (default: ported from the torch module); plan: the weight port's
    PortPlan when the caller already has one (pairs torch layers to Flax paths). Never raises:
    an exception inside the lint is one Finding of kind "lint-error" naming it.
    Cost: one jax.make_jaxpr of the twin, one torch forward without gradients.
    """
    try:
        from parity.runtime import FlaxTwin, as_args, flax_inputs, torch_inputs, train_mode_matters
        from parity.runtime import input_layouts as infer_layouts

        args = torch_inputs(as_args(example_input), torch.float32, "cpu", False)
        layouts = infer_layouts(torch_module, args, input_layouts)
        twin = FlaxTwin(flax_module, train=train, train_kwarg=train_kwarg,
                        train_mode_matters=train_mode_matters(torch_module))
        if plan is None or variables is None:
            from weight_port.layout import AS_IS
            from weight_port import build_plan
            plain = [layouts.get(f"input[{i}]", AS_IS) for i in range(len(args))]
            plan = plan or build_plan(torch_module, flax_module, args, input_layout=plain,
                                      check_attributes="warn")
            variables = variables if variables is not None else plan.to_flax(torch_module.state_dict())
        return lint_traced(torch_module, twin, variables, flax_inputs(args, layouts), plan, train=train,
                           torch_args=args)
    except Exception as exc:  # noqa: BLE001  (a lint crash must never break a check)
        return [_crash(exc)]


@dataclass
class TorchSide:
    """What the lint reads of a torch forward its caller runs itself (``watch_forward``): that
    forward's ops (run_torch(ops=True).ops, set by the caller) and the norms' fast-variance
    findings (set when the watch ends)."""

    ops: list | None = None
    fast_variance: list[Finding] = field(default_factory=list)


@contextlib.contextmanager
def watch_forward(torch_module: torch.nn.Module, plan, train: bool) -> Iterator[TorchSide]:
    """The lint's torch side read from the caller's own forward of ``torch_module`` (on the
    check's inputs, run inside the block with run_torch(ops=True); set ``.ops`` from it): then
    lint_traced(torch_side=...) runs no forward of its own. parity.check reads it off the run it
    judges: a model's forward fewer per check."""
    side = TorchSide()
    with fast_variance_watch(torch_module, plan, train) as found:
        yield side
    side.fast_variance = found


def lint_traced(torch_module: torch.nn.Module, twin, variables: Mapping, flax_args: tuple, plan, *,
                train: bool, torch_args: tuple | None = None, torch_side: TorchSide | None = None) -> list[Finding]:
    """lint_pair for a caller that already has the twin, its variables, the Flax-layout inputs
    and the port's plan (parity.check). torch_args: the same inputs in torch layout, for the
    one torch forward that reads the inline ops (F.gelu, F.interpolate, attention) and for the
    traps that depend on the data (fast variance); without them those are not read (a "note"
    says so). torch_side: that forward's reading, made by the caller (``watch_forward``):
    torch_args are then not run. The forward leaves ``torch_module`` as it found it. Never
    raises (a "lint-error" Finding instead)."""
    try:
        trace = _flax_eqns(twin, variables, flax_args)
        if torch_side is not None and torch_side.ops is not None:
            calls, notes, fast_variance = inline_calls(torch_module, torch_side.ops), [], torch_side.fast_variance
        else:
            with fast_variance_watch(torch_module, plan, train) as fast_variance:  # the same forward
                calls, notes = _inline(torch_module, torch_args, train)
        nnx = twin.nnx
        return (notes + gelu_findings(torch_module, plan, trace, calls, nnx) + conv_findings(plan, trace)
                + dropout_findings(torch_module, trace, train, nnx) + pool_ceil_findings(torch_module, nnx)
                + pool_pad_findings(torch_module, trace, nnx) + resize_findings(torch_module, trace, calls, nnx)
                + attention_findings(torch_module, plan, trace, calls, nnx)
                + fast_variance)
    except Exception as exc:  # noqa: BLE001  (a lint crash must never break a check)
        return [_crash(exc)]


def _inline(torch_module: torch.nn.Module, torch_args: tuple | None, train: bool) -> tuple[list, list[Finding]]:
    """(the inline torch calls of one forward, a "note" when they could not be read)."""
    unread = "inline torch ops (F.gelu, F.interpolate, attention) are not read"
    if torch_args is None:
        return [], [Finding("note", "-", "-", f"no torch inputs given: {unread}")]
    try:
        return inline_calls(torch_module, traced_ops(torch_module, torch_args, train=train)), []
    except Exception as exc:  # noqa: BLE001  (the rest of the lint stands without them)
        return [], [Finding("note", "<root>", "-", f"the torch forward failed ({type(exc).__name__}: {exc}): "
                            f"{unread}")]


def _crash(exc: Exception) -> Finding:
    return Finding(LINT_ERROR, "-", "-", f"the trap lint failed: {type(exc).__name__}: {exc}")


__all__ = ["Finding", "LINT_ERROR", "TorchSide", "lint_pair", "lint_traced", "watch_forward"]
