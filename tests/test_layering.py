"""The import graph runs one way: cli/commands -> study -> train/evaluate -> pipeline -> sampling -> solvers
-> diffusion -> schedule, with nn, data, metrics and config as leaves (metrics may read data caches)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lddpm"

# A module may import modules of a lower rank (or of its own component); nothing imports upward.
RANK = {
    "errors": -1,
    "checks": 0, "io": 0, "seeding": 0, "datasets": 0, "progress": 0,
    "config": 1, "schedule": 1, "nn": 1, "data": 1, "grid": 1, "checkpoint": 1, "tasks": 1,
    "metrics": 2, "distributed": 2, "diffusion": 2, "guidance": 2, "tracking": 2,
    "solvers": 2.5,  # the sigma-space samplers: below the registry in sampling, above diffusion (noise) and schedule
    "sampling": 3,
    "editing": 3.5,  # SDEdit, RePaint, task networks, denoising over the samplers; pipeline's methods call it
    "pipeline": 4,
    "train": 5, "evaluate": 5, "convert": 5,
    "report": 6,
    "study": 7, "serve": 7,
    "commands": 8, "cli": 9, "__main__": 10,
}
ALLOWED_UPWARD = {("report", "study.schema")}  # the report reads the row fields from the study file's schema


def _component(module: str) -> str:
    return module.split(".")[0]


def _imports() -> list[tuple[str, str, int]]:
    """(importing module, imported lddpm module, line) for every import in the package, in functions too."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts)
        if module == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lddpm"):
                names = [node.module] if node.module != "lddpm" else [f"lddpm.{a.name}" for a in node.names]
                found += [(module, n[len("lddpm."):], node.lineno) for n in names if n != "lddpm"]
            elif isinstance(node, ast.Import):
                found += [(module, a.name[len("lddpm."):], node.lineno) for a in node.names if a.name.startswith("lddpm.")]
    return found


def test_every_component_has_a_rank():
    assert {_component(m) for m, _, _ in _imports()} | {_component(t) for _, t, _ in _imports()} <= set(RANK) | {"__version__"}


@pytest.mark.parametrize("importer,imported,line", _imports())
def test_imports_point_down_the_layers(importer, imported, line):
    a, b = _component(importer), _component(imported)
    if a == b or b == "__version__" or (a, imported) in ALLOWED_UPWARD:
        return
    assert RANK[a] > RANK[b], f"lddpm.{importer} (line {line}) imports lddpm.{imported}, which is not below it"


def test_one_toml_reader():
    """Only lddpm.config parses TOML (tomllib, or tomli on Python 3.10); everyone else calls config.read_toml."""
    readers = set()
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if any(n.split(".")[0] in ("tomllib", "tomli") for n in names):
                readers.add(path.relative_to(SRC).as_posix())
    assert readers == {"config.py"}


def test_no_private_names_imported_across_modules():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lddpm"):
                offenders += [f"{path.relative_to(SRC)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders
