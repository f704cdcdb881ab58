"""Search attributes: names and the indexed text form of their values (pure, no I/O).

A run's attributes (``ctx.set_attributes(customer_id=42)``) are stored as text so
one index serves every type and the CLI's ``--attr customer_id=42`` finds the run
whether 42 was set as a number or a string: strings stay as they are, numbers are
their JSON text, booleans ``true``/``false`` (see docs/operating.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from cantata.errors import UnknownAttribute
from cantata.model.checks import brief, check_text

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
MAX_VALUE = 1000  # characters of one indexed value


def check_name(name: str) -> str:
    """``name`` if it is a valid attribute name.

    Raises:
        UnknownAttribute: it is not 1-64 letters, digits, ``_``, ``.`` or ``-``
            starting with a letter or ``_``.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UnknownAttribute(
            f"attribute name {brief(name) if isinstance(name, str) else repr(name)} is "
            "invalid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or '_' (for example customer_id)"
        )
    return name


def index_value(name: str, value: Any) -> str:
    """The indexed text form of one attribute value.

    Raises:
        UnknownAttribute: the value is not a str, int, float or bool (or is too long).
    """
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UnknownAttribute(f"attribute {name!r} = {value!r}: use a finite number")
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, str):
        text = check_text(f"attribute {name!r}", value, error=UnknownAttribute)
    else:
        raise UnknownAttribute(
            f"attribute {name!r} has a {type(value).__name__} value: attributes are str, int, "
            "float or bool (index a field of a larger value instead)"
        )
    if len(text) > MAX_VALUE:
        raise UnknownAttribute(
            f"attribute {name!r} is {len(text)} characters long; at most {MAX_VALUE} are indexed"
        )
    return text


def index_attributes(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Check names and values; return ``{name: indexed text}``."""
    return {check_name(k): index_value(k, v) for k, v in attributes.items()}


def parse_attr(text: str) -> tuple[str, str]:
    """``"customer_id=42"`` (the CLI's ``--attr``) → ``("customer_id", "42")``.

    Raises:
        UnknownAttribute: no ``=``, or the name is invalid.
    """
    name, sep, value = text.partition("=")
    if not sep:
        raise UnknownAttribute(
            f"--attr {brief(text)} is malformed: use NAME=VALUE (customer_id=42)"
        )
    return check_name(name.strip()), value
