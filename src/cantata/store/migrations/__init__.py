"""Versioned SQL migrations, one folder per dialect: ``NNNN_name.sql`` applied in order.

The schema version of this Cantata is the highest number present, so adding a
migration is adding a file.
"""

from __future__ import annotations

from importlib import resources
from importlib.abc import Traversable


def scripts(dialect: str) -> dict[int, Traversable]:
    """The migration scripts of ``dialect`` (``sqlite`` or ``postgres``) by version."""
    folder = resources.files("cantata.store").joinpath(f"migrations/{dialect}")
    found: dict[int, Traversable] = {}
    for f in folder.iterdir():
        head = f.name.split("_", 1)[0]
        if f.name.endswith(".sql") and head.isdigit():
            found[int(head)] = f
    return found


def latest(dialect: str) -> int:
    """The schema version the scripts of ``dialect`` bring a store to."""
    return max(scripts(dialect))
