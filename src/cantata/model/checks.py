"""The shared checks of options: numbers (seconds, factors) and short text (keys, ids,
names). Each refusal names the option, what was given and what to pass, in the same
words wherever the option is taken."""

from __future__ import annotations

import math
import re
from numbers import Real
from typing import TypeGuard

from cantata.errors import CantataError, ConfigurationError, RunNotFound


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


#: The longest duration taken, in seconds: 100 years (of 365.25 days). A wake time,
#: timeout or deadline further away has no date (past year 9999) to show or store.
# A workflow, group or step name, or an event type, as a filter names it (the HTTP
# API's query parameters and the CLI's options check it alike).
NAME_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"
_NAME_RE = re.compile(NAME_PATTERN)


def check_type_filter(option: str, value: str | None) -> str | None:
    """An event type given to filter by (``None`` passes): what ``GET /api/dead-letters?
    type=`` takes, refused alike (no event type holds a space).

    Raises:
        ConfigurationError: naming ``option`` and what an event type is made of.
    """
    if value is None or _NAME_RE.fullmatch(value):
        return value
    raise ConfigurationError(
        f"{option} {brief(value)} is no event type: use 1-200 letters, digits, '_', '.', "
        "':' or '-' (such as order.placed)")


MAX_SECONDS = 3_155_760_000
LONGEST = f"{MAX_SECONDS} seconds (100 years)"


def check_seconds(
    what: str,
    value: object,
    *,
    zero: bool = False,
    none: bool = True,
    error: type[ConfigurationError] = ConfigurationError,
) -> float | None:
    """``value`` as a duration in seconds, > 0 (>= 0 with ``zero``) and at most
    :data:`MAX_SECONDS` (so not infinite); ``None`` stays ``None`` (no limit) unless
    ``none`` is false.

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
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if seconds > MAX_SECONDS:
        raise error(
            f"{what} must be at most {LONGEST}, got {value!r}: pass a shorter duration"
            + (" (or None for no limit)" if none else "")
        )
    return seconds


def _is_number(value: object) -> TypeGuard[Real]:
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        return not math.isnan(value)
    except OverflowError:  # an int too large for a float: a number, not NaN
        return True


def check_text(
    what: str,
    value: str,
    *,
    error: type[CantataError] = ConfigurationError,
    hint: str | None = None,
) -> str:
    """``value`` unchanged if a store can keep it as it is: it holds no NUL character
    and no lone surrogate (a string that is not valid Unicode, so has no UTF-8 form).

    PostgreSQL refuses both and SQLite cuts text at a NUL: a key, id or name holding
    one is refused where it is given, not failed on in a driver or stored changed.
    ``hint`` replaces the advice of the message (for a lookup: "no run has such an id").

    Raises:
        ConfigurationError (or ``error``): naming ``what`` and showing the value; also
            for a value that is no str (an ``Event`` or a ``RunHandle`` where its id
            goes), naming what to pass instead.
    """
    if not isinstance(value, str):
        own = next((a for a in ("run_id", "id") if isinstance(getattr(value, a, None), str)),
                   None)
        raise error(
            f"{what} must be a str, got {type(value).__name__}: "
            + (f"pass its .{own}" if own else "pass the text itself")
        )
    if "\x00" in value:
        raise error(
            f"{what} {value!r} holds a NUL character ('\\x00'): "
            + (hint or "it cannot be stored as given (PostgreSQL refuses it, SQLite cuts the "
               "text there); pass the text without it (binary data belongs in a JSON "
               "payload, e.g. base64-encoded)")
        )
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise error(
                f"{what} {value!r} holds a lone surrogate, so it is not valid Unicode text: "
                + (hint or "pass valid text (decode bytes with their real encoding, not "
                   "errors='surrogateescape')")
            ) from None
    return value


def check_key(
    what: str, value: object, advice: str, *, empty: bool = True, longest: int | None = None
) -> None:
    """An optional key given as an argument: ``None``, or a string (non-empty unless
    ``empty``, at most ``longest`` characters) that :func:`check_text` accepts.

    Raises:
        ConfigurationError: naming ``what``, the value, and ``advice`` (what to pass).
    """
    if value is None:
        return
    if not isinstance(value, str) or not (value or empty):
        kind = "a string" if empty else "a non-empty string"
        raise ConfigurationError(f"{what} must be {kind}, got {value!r}: pass {advice}")
    if longest is not None and len(value) > longest:
        raise ConfigurationError(
            f"{what} is {len(value)} characters long ({value[:40]!r}...): at most "
            f"{longest} are kept (the store indexes it); pass {advice}"
        )
    check_text(what, value)


def check_run_id(run_id: str) -> str:
    """A run id to look up, as :func:`check_text` checks it: no run has an id holding a
    NUL or a lone surrogate, so one is not found (nor handed to a driver that fails).

    Raises:
        RunNotFound: naming the id.
    """
    return check_text("run id", run_id, error=RunNotFound,
                      hint="no run has such an id; check the id")


def actor_or(actor: str | None, default: str) -> str:
    """Who an operator action is audited as: ``actor`` as :func:`check_text` checks it
    (the audit log keeps it), or ``default`` (this process) when none is given.

    Raises:
        ConfigurationError: ``actor`` holds a NUL or a lone surrogate.
    """
    return check_text("actor", actor) if actor else default


SHOWN = 40  # characters of a given text quoted back in a message


def article(word: str) -> str:
    """``a`` or ``an`` before ``word`` as a message writes it (by its first letter:
    "an order.placed event", "a refund.issued event")."""
    return "an" if word[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def brief(text: str) -> str:
    """``text`` quoted for a message, cut to its first :data:`SHOWN` characters when
    longer (a value of any size is refused in a message of a few lines)."""
    if len(text) <= SHOWN:
        return repr(text)
    return f"{text[:SHOWN]!r}… ({len(text)} characters)"
