"""The error every user mistake becomes: one line, exit code 2."""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the user's flags or files: reported as one line, exit code 2."""


def format_flags(names) -> str:
    return ", ".join(f"`--{n}`" for n in sorted(names))
