"""Config values are checked by their fields' type hints (lddpm.checks.check_type), for any section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from lddpm import checks
from lddpm.config import SECTIONS, Config, apply_overrides, validate
from lddpm.errors import LddpmError
from lddpm.nn import network_config


@dataclass
class LaterSection:
    """A section of field types no current section has: it needs no code in the checker."""

    name: str | None = None
    mode: Literal["fast", "exact"] = "fast"
    sizes: tuple[int, ...] = (1, 2)
    weights: list[float] = field(default_factory=lambda: [0.5])
    extra: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0


@pytest.mark.parametrize("key,value,expected", [
    ("name", None, None), ("name", "x", "x"), ("mode", "exact", "exact"), ("sizes", [3, 4], (3, 4)),
    ("weights", (1, 2.5), [1.0, 2.5]), ("extra", {"a": 1}, {"a": 1}), ("scale", 2, 2.0),
])
def test_a_new_sections_values_are_accepted_and_coerced(key, value, expected):
    hint = checks.field_hints(LaterSection)[key]
    out = checks.check_type(f"later.{key}", hint, value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("key,value,match", [
    ("name", 3, "later.name = 3: expected a string"),
    ("mode", "slow", 'later.mode = \'slow\': expected "fast" or "exact"'),
    ("sizes", [1, 2.5], r"later.sizes = \[1, 2.5\]: expected a list of integers"),
    ("sizes", [True], "expected a list of integers"),
    ("weights", [float("nan")], "expected a list of numbers"),
    ("extra", [1], "expected a table"),
    ("scale", float("inf"), "later.scale = inf: expected a finite number"),
    ("scale", True, "expected a finite number"),
    ("mode", None, "later.mode must not be empty"),
])
def test_a_new_sections_bad_values_name_the_field_and_the_type(key, value, match):
    with pytest.raises(LddpmError, match=match):
        checks.check_type(f"later.{key}", checks.field_hints(LaterSection)[key], value)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_config_field_has_a_type_the_checker_knows(section):
    for key, hint in checks.field_hints(SECTIONS[section]).items():
        assert checks.describe_type(hint), f"{section}.{key}"
        default = getattr(SECTIONS[section](), key)
        assert checks.check_type(f"{section}.{key}", hint, default) == default  # every default passes


def test_bf16_takes_true_false_or_auto_only():
    assert apply_overrides(Config(), ['run.bf16="auto"']).run.bf16 == "auto"
    for bad in ('"yes"', "1"):
        with pytest.raises(LddpmError, match='run.bf16 = .*: expected true, false or "auto"'):
            apply_overrides(Config(), [f"run.bf16={bad}"])


@pytest.mark.parametrize("section,key,value,match", [
    ("run", "steps", "10", r"run.steps = '10': expected an integer"),
    ("run", "bf16", "yes", r"run.bf16 = 'yes': expected true, false or \"auto\""),
    ("optim", "lr", float("nan"), "optim.lr = nan: expected a finite number"),
    ("optim", "betas", [0.9, "x"], "optim.betas = .*: expected a list of numbers"),
    ("data", "root", 3, "data.root = 3: expected a string"),
])
def test_validate_checks_the_types_of_a_config_built_in_python(section, key, value, match):
    config = Config()
    setattr(getattr(config, section), key, value)
    with pytest.raises(LddpmError, match=match):
        validate(config)


def test_network_configs_use_the_same_checks():
    with pytest.raises(LddpmError, match=r"UNetConfig field channel_mult = \[1, 'x'\]: expected a list of integers "
                                         r"\(check model.overrides.channel_mult"):
        network_config("unet", "tiny", channel_mult=[1, "x"])
    with pytest.raises(LddpmError, match="UNetConfig field dropout = nan: expected a finite number"):
        network_config("unet", "tiny", dropout=float("nan"))
