"""Options as data: the base of the frozen options dataclasses that travel from the CLI or the
caller to every consumer (parity.pair.CheckOptions, parity.golden.VerifyOptions). Framework-free."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import ClassVar, TypeVar

O = TypeVar("O", bound="Options")


class Options:
    """Mixin of a frozen dataclass whose fields are a public function's keywords: ``of`` merges
    an options value with those keywords, the keywords winning."""

    what: ClassVar[str] = "option"  # how an unknown keyword's error names them ("check option(s)")

    @classmethod
    def of(cls: type[O], options: O | None, **overrides) -> O:
        """``options`` (default: the defaults) with keyword ``overrides``; an unknown keyword is a
        TypeError naming it and the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown {cls.what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        return replace(options or cls(), **overrides) if overrides else (options or cls())


__all__ = ["Options"]
