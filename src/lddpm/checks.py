"""Small checks of user-given values, shared by the CLI, the config and the file readers.

Each raises LddpmError with one line naming the value and the allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lddpm.errors import LddpmError

MAX_RESOLUTION = 4096  # pixels per side: a 4096x4096x3 uint8 image is 48 MiB; beyond that is a typo
MAX_NUM_TIMESTEPS = 100_000  # diffusion steps T: 100x the usual 1000; larger tables only waste memory


def finite_number(where: str, value: Any) -> float:
    """`value` as a float; NaN, infinity and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LddpmError(f"{where} = {value!r}: expected a number")
    if not math.isfinite(value):
        raise LddpmError(f"{where} = {value}: expected a finite number (not NaN or infinity)")
    return float(value)


def int_in_range(where: str, value: Any, low: int = 1, high: int | None = None, why: str = "") -> int:
    """`value` as an int within [low, high]; the message says the range (and why the bound)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LddpmError(f"{where} = {value!r}: expected an integer")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise LddpmError(f"{where} = {value} is out of range: expected an integer {allowed}{why}")
    return value


def resolution(where: str, value: Any) -> int:
    """An image size in pixels, 1..MAX_RESOLUTION."""
    return int_in_range(where, value, 1, MAX_RESOLUTION,
                        f" (lddpm stops at {MAX_RESOLUTION} pixels per side)")


class StrictRecord(dict):
    """A dict read from a user file: a missing key raises LddpmError naming the key and the file."""

    def __init__(self, data: dict, source: str, what: str = "file"):
        super().__init__(data)
        self.source = source
        self.what = what

    def __missing__(self, key):
        raise LddpmError(f"{self.source}: the {self.what} has no {key!r} entry (damaged or edited); "
                         "recreate the file with lddpm")


def strict(data: Any, source: str, what: str = "file") -> Any:
    """Wrap every nested dict of `data` in a StrictRecord (lists are walked, other values kept)."""
    if isinstance(data, dict):
        return StrictRecord({k: strict(v, source, what) for k, v in data.items()}, source, what)
    if isinstance(data, list):
        return [strict(v, source, what) for v in data]
    return data


def check_choice(where: str, value: Any, allowed: Iterable[str]) -> None:
    """Raise LddpmError naming `where` and the choices when `value` is not one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise LddpmError(f"{where} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")
