"""Errors the ``parity`` command reports as one line with exit code 2.

Kept in its own module (not parity.cli) so that ``python -m parity.cli`` and the ``parity``
script raise and catch the very same class.
"""
from __future__ import annotations


class UsageError(Exception):
    """Bad arguments or setup found after parsing; reported as one line, exit 2."""
