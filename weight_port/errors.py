"""Named errors of the weight port. Each says what is wrong and where (keys, shapes, files)."""
from __future__ import annotations

from collections.abc import Sequence


class PortError(Exception):
    """Base class: anything the port refuses to convert."""


class KeyMismatchError(PortError):
    """Missing, unexpected or mis-shaped keys, all listed at once (never just the first)."""

    def __init__(
        self,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
        *,
        context: str = "",
        hint: str = "",
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: " + "; ".join(self.missing))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: " + "; ".join(self.unexpected))
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatch: " + "; ".join(self.mismatched))
        prefix = f"{context}: " if context else ""
        self.hint = hint
        super().__init__(prefix + " | ".join(parts) + (f" | hint: {hint}" if hint else ""))


class NoRuleError(PortError):
    """A torch layer type (with parameters) that no conversion rule covers."""

    def __init__(self, entries: Sequence[tuple[str, str]]):
        self.entries = list(entries)
        listed = ", ".join(f"{path or '<root>'} ({type_name})" for path, type_name in self.entries)
        super().__init__(
            f"no conversion rule for {listed}; register one with "
            "weight_port.register_rule(TorchLayerType, Rule(...)) (see README, 'Extending the port')"
        )


class ShapeMismatchError(KeyMismatchError):
    """Every key lines up but some shapes do not (e.g. a class token of another length)."""


class AttributeMismatchError(PortError):
    """The Flax twin is configured differently from the torch layer (eps, momentum, groups).

    The port copies tensors; it cannot change a Flax module's hyperparameters, so a twin built
    with Flax's defaults (LayerNorm epsilon 1e-6 vs torch 1e-5) would compute something else.
    """

    def __init__(self, entries: Sequence[str]):
        self.entries = list(entries)
        super().__init__(f"{len(self.entries)} attribute mismatch: " + "; ".join(self.entries))


class NonFiniteWeightError(PortError):
    """NaN or Inf in source tensors (usually a diverged run); opt out with allow_nonfinite=True."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        super().__init__(
            f"NaN/Inf in {len(self.keys)} tensor(s): " + ", ".join(self.keys)
            + " (pass allow_nonfinite=True / --allow-nonfinite to port them anyway)"
        )


class CheckpointError(PortError):
    """A checkpoint file that cannot be read: truncated, corrupt, or of an unknown kind."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        super().__init__(f"cannot read checkpoint {self.path}: {reason}")


class UnsafeCheckpointError(CheckpointError):
    """A .pt/.pth file that only loads by unpickling arbitrary objects (refused: it can run code)."""


class AmbiguousPairingError(PortError):
    """Two Flax modules fit one torch layer equally well and no traced order decides between them."""

    def __init__(self, torch_path: str, candidates: Sequence[str], why: str):
        self.torch_path = torch_path
        self.candidates = list(candidates)
        super().__init__(
            f"torch {torch_path or '<root>'} fits flax {' and '.join(self.candidates)} "
            f"({why}); pass rename=[(r'^{torch_path}$', '<flax/path>')] or an example input so "
            "both models can be traced"
        )


class FlattenOrderError(PortError):
    """A Dense after a flatten whose feature order the port cannot decide without more input."""

    def __init__(self, entries: Sequence[str]):
        self.entries = list(entries)
        super().__init__(
            "cannot tell whether these Dense inputs are flattened channels-first on the torch side: "
            + "; ".join(self.entries)
            + ". Pass torch_module= (the torch architecture, traced for flatten order) or "
            "flatten={'<linear path>': (C, H, W)} (per-sample torch shape before the flatten; "
            "flatten={'<linear path>': None} when the order already agrees)"
        )


class KernelLayoutError(PortError):
    """Without the Flax module, a kernel whose two possible layouts have the same shape.

    A Flax ConvTranspose with transpose_kernel=True stores [*k, out, in], with False [*k, in, out];
    HF's FlaxConv1D stores [out, in], a Dense [in, out]. With in == out the shapes cannot tell.
    """

    def __init__(self, entries: Sequence[str]):
        self.entries = list(entries)
        super().__init__(
            "cannot tell the Flax kernel layout from shapes (in == out, so [.., in, out] and "
            "[.., out, in] look alike) for " + ", ".join(self.entries)
            + "; pass the Flax module (flax_module=, example_input=) or a PortPlan built with it"
        )


class GroupedKernelLayoutError(KernelLayoutError):
    """A grouped transposed conv (torch ConvTransposeNd(groups>1)) whose Flax kernel is not in
    weight_port.flax_layers.GroupedConvTranspose's layout [*k, in/g, out]: a Flax
    ConvTranspose(transpose_kernel=True) has no groups, and its [*k, out, in] kernel has no
    per-group order the port could map. Refused in both directions, whatever check_attributes says."""

    def __init__(self, entries: Sequence[str]):
        self.entries = list(entries)
        PortError.__init__(
            self,
            "grouped transposed conv with a kernel layout the port cannot map: " + "; ".join(self.entries)
            + "; a torch ConvTransposeNd(groups=g) ports to weight_port.flax_layers.GroupedConvTranspose "
            "(kernel [*k, in/g, out], out ordered group-major as torch's)",
        )
