"""Exceptions lkfx raises on purpose.

`LkfxError` is bad input or usage: the message says what is wrong and how to fix it (the CLI prints it on one
line and exits 2). `CheckError` is a numeric mismatch found by `check=True` / `--check` (the CLI exits 1).
`PassError` wraps an unexpected failure inside a pass and names that pass.
"""

from __future__ import annotations


class LkfxError(ValueError):
    """Bad input or usage; the message says how to fix it."""


class CheckError(AssertionError):
    """Outputs of the original and the rewritten model differ beyond tolerance."""


class PassError(RuntimeError):
    """A pass failed unexpectedly; the message names the pass."""
