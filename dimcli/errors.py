"""User-facing errors.

A `DimError` is a mistake the user can fix (a bad path, a bad setting, a file that is not
what it claims to be). The CLI prints its message as one line and exits with its code;
no traceback reaches the user. Anything else that escapes is a bug in dimcli.
"""

from __future__ import annotations


class DimError(Exception):
    """An error the user can act on; the message says what was wrong and how to fix it."""

    exit_code: int = 1


class UsageError(DimError):
    """Invalid options or settings (exit code 2, like a command-line usage error)."""

    exit_code = 2


class BadImageError(DimError):
    """An image file that cannot be decoded; the message is the reason."""


class ModelFileError(DimError):
    """A model file that is missing, damaged, or not a dimcli encoder."""


class NonFiniteLossError(DimError):
    """Training produced a NaN or infinite loss term."""
