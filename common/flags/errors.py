"""The error every user mistake becomes: one line, exit code 2."""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in the user's flags or files: reported as one line, exit code 2."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """What a library's exception says, for a one-line error: its first line, cut at `limit`
    characters, or the exception's type where it says nothing (a bare assertion)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:limit]


def format_flags(names) -> str:
    return ", ".join(f"`--{n}`" for n in sorted(names))
