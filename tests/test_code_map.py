"""docs/code-map.md has a row for every file of src/lddpm, and the names its rows quote exist."""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lddpm"
ROW = re.compile(r"^\| `([^`]+)` \| (.+) \|$")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\(\))?$")  # `name`, `a.b`, `name()`


def _rows() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "docs" / "code-map.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def _files() -> list[str]:
    return sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("."))


def test_every_file_has_a_row_and_every_row_a_file():
    rows, files = _rows(), _files()
    missing = [f for f in files if not any(fnmatch.fnmatchcase(f, pattern) for pattern in rows)]
    assert not missing, f"docs/code-map.md has no row for: {missing}"
    stale = [pattern for pattern in rows if not any(fnmatch.fnmatchcase(f, pattern) for f in files)]
    assert not stale, f"docs/code-map.md has rows for files that do not exist: {stale}"
    python = [f for f in files if f.endswith(".py")]
    assert all(f in rows for f in python), "every .py file has a row of its own (no pattern)"


def _module(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return "lddpm" if parts == ("__init__",) else ".".join(("lddpm", *[p for p in parts if p != "__init__"]))


def _resolve(module, dotted: str):
    """`dotted` in the row's module, else from the package root (`cli.entry`)."""
    first, *rest = dotted.split(".")
    obj = getattr(module, first, None)
    if obj is None:
        obj = importlib.import_module(f"lddpm.{first}")
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _registered(module) -> set[str]:
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    return set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


@pytest.mark.parametrize("path", sorted(p for p in _rows() if p.endswith(".py")))
def test_the_names_a_row_quotes_exist(path):
    text = _rows()[path]
    quoted = re.findall(r"`([^`]+)`", text)
    try:
        module = importlib.import_module(_module(path))
    except ImportError as exc:  # an optional dependency (onnxruntime, transformers, diffusers) is missing
        pytest.skip(f"{path}: {exc}")
    if path.startswith("commands/") and hasattr(module, "register"):
        commands = _registered(module)
        named = [q.removeprefix("lddpm ") for q in quoted if not q.startswith("-")]
        assert named and set(named) <= commands, f"{path} registers {sorted(commands)}, the row says {named}"
        return
    for token in quoted:
        if NAME.match(token):
            assert _resolve(module, token.removesuffix("()")) is not None, f"{path}: `{token}`"
