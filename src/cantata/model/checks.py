"""The one check of a numeric option (seconds, factors): each refusal names the option,
what was given and what to pass, in the same words wherever the option is taken."""

from __future__ import annotations

import math
from numbers import Real
from typing import TypeGuard

from cantata.errors import ConfigurationError


def check_number(
    what: str, value: object, *, error: type[ConfigurationError] = ConfigurationError
) -> float:
    """``value`` as a real number (an int or a float: not a bool, a string or NaN).

    Raises:
        ConfigurationError (or ``error``): naming ``what`` and the value.
    """
    if not _is_number(value):
        raise error(f"{what} must be a number, got {value!r}")
    return float(value)


def check_seconds(
    what: str,
    value: object,
    *,
    zero: bool = False,
    none: bool = True,
    error: type[ConfigurationError] = ConfigurationError,
) -> float | None:
    """``value`` as a duration in seconds, > 0 (>= 0 with ``zero``); ``None`` stays
    ``None`` (no limit) unless ``none`` is false.

    Raises:
        ConfigurationError (or ``error``, e.g. ``RegistrationError`` for a decorator's
        option): naming ``what`` and the value, for a non-number (a bool, a string,
        NaN) or a number out of range.
    """
    if value is None and none:
        return None
    bound = ">= 0" if zero else "> 0"
    if not _is_number(value):
        raise error(f"{what} must be a number of seconds {bound}, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise error(f"{what} must be {bound} seconds, got {value!r}")
    return float(value)


def _is_number(value: object) -> TypeGuard[Real]:
    return (not isinstance(value, bool) and isinstance(value, Real)
            and not math.isnan(value))
