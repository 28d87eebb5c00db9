"""Names as aliases of strategy objects: the one lookup (and refusal) every composite field uses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from relprop.errors import ConfigError

T = TypeVar("T")


def named(name: str, table: Mapping[str, T], what: str) -> T:
    """What `name` stands for in `table`, or a one-line refusal that lists the names."""
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; choose one of: {', '.join(table)}")
    return table[name]
