"""Progress bars: the one helper every loop that may show progress goes through (tqdm)."""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], enabled: bool, *, desc: str | None = None, unit: str = "it",
                 total: int | None = None, leave: bool = True) -> Iterable[T]:
    """`iterable` under a tqdm bar when `enabled`, else unchanged (tqdm is imported only then)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave)
