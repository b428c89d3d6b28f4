"""The one exception type for mistakes a user can fix (bad config, missing data, corrupt file), and the name check."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class LddpmError(Exception):
    """An error caused by user input; the CLI prints its message without a traceback."""


def check_choice(where: str, value: Any, allowed: Iterable[str]) -> None:
    """Raise LddpmError naming `where` and the choices when `value` is not one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise LddpmError(f"{where} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")
