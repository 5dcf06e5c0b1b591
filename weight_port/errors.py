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
        super().__init__(prefix + " | ".join(parts))


class NoRuleError(PortError):
    """A torch layer type (with parameters) that no conversion rule covers."""

    def __init__(self, entries: Sequence[tuple[str, str]]):
        self.entries = list(entries)
        listed = ", ".join(f"{path or '<root>'} ({type_name})" for path, type_name in self.entries)
        super().__init__(
            f"no conversion rule for {listed}; register one with "
            "weight_port.register_rule(TorchLayerType, Rule(...)) (see README, 'Extending the port')"
        )
