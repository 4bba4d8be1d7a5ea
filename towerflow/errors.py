"""Which failures are the user's to fix (bad input, a failed gate) and print as one line, not a traceback."""

from __future__ import annotations


class TowerflowError(Exception):
    """Base for expected, user-facing failures: the message names the problem and where it is."""


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, TowerflowError | FileNotFoundError)
