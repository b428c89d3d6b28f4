"""Small checks of user-given values, shared by the CLI, the config and the file readers.

Each raises LddpmError with one line naming the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union

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


# ----------------------------------------------------------------------------- values against type hints


@functools.lru_cache(maxsize=None)
def field_hints(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their resolved type hints (`typing.get_type_hints`), in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _words(hint: Any) -> list[str]:
    """What a type hint accepts, as words for a message: int -> ["an integer"], bool -> ["true", "false"]."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return [w for a in args if a is not type(None) for w in _words(a)]
    if origin is Literal:
        return [json.dumps(a) for a in args]
    if origin in (list, tuple):
        item = {int: "integers", float: "numbers", str: "strings"}.get(args[0] if args else Any, "values")
        return [f"a list of {item}"]
    simple = {bool: ["true", "false"], int: ["an integer"], float: ["a finite number"], str: ["a string"],
              dict: ["a table"], Any: ["any value"]}
    return simple[dict if origin is dict else hint]


def describe_type(hint: Any) -> str:
    """The accepted values of a type hint in words: 'an integer', 'true, false or "auto"'."""
    words = _words(hint)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _accept(hint: Any, value: Any) -> tuple[bool, Any]:
    """(whether `value` fits `hint`, the value lightly coerced: ints to float for float, lists for list[...])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, None
    if origin in (Union, types.UnionType):
        for option in args:
            ok, coerced = _accept(option, value)
            if ok:
                return True, coerced
        return False, None
    if origin is Literal:  # the type too, so that true is not taken for 1
        return any(type(value) is type(a) and value == a for a in args), value
    if hint is bool or hint is str:
        return isinstance(value, hint), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, None
        item = args[0] if args else Any  # list[X] and tuple[X, ...]
        items = [_accept(item, v) for v in value]
        if not all(ok for ok, _ in items):
            return False, None
        return True, (list if origin is list else tuple)(c for _, c in items)
    if hint is dict or origin is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else None
    raise TypeError(f"lddpm.checks.check_type does not know the type hint {hint!r}")  # a new kind of field: add it


def check_type(where: str, hint: Any, value: Any, fix: str = "") -> Any:
    """`value` checked against a type hint, returned lightly coerced (int -> float, tuple -> list for list[...]).

    Knows bool, int, float (finite), str, Any, list[X], tuple[X, ...], dict, Literal[...] and unions such as
    `str | None` or `bool | Literal["auto"]`, so dataclass fields of these types need no code of their own.
    A mismatch raises LddpmError `WHERE = VALUE: expected WHAT` (+ `fix`); None for a field that is not
    optional reads `WHERE must not be empty`.
    """
    ok, coerced = _accept(hint, value)
    if ok:
        return coerced
    if value is None:
        raise LddpmError(f"{where} must not be empty (expected {describe_type(hint)}){fix}")
    raise LddpmError(f"{where} = {value!r}: expected {describe_type(hint)}{fix}")
