"""Checking what a client sends: ids, times, cursors. A bad value is a 400 naming its
field, never a 500."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import re

import orjson
from starlette.convertors import Convertor, register_url_convertor

from cantata.errors import CantataError, ConfigurationError, InvalidEvent, UnknownAttribute
from cantata.model.attributes import index_value, parse_attr
from cantata.model.checks import NAME_PATTERN, brief, check_text
from cantata.model.codec import nonfinite_path
from cantata.model.event import check_publish
from cantata.model.idempotency import check_correlation_id, check_given_key
from cantata.model.status import RunStatus
from cantata.server.errors import ApiError, bad_input

# Ids Cantata makes (run ids, dead letters'), names: printable, no spaces, bounded. Keys
# a caller chose (idempotency keys, correlation ids, event ids) are any text: see key(),
# start_keys() and event_attributes().
ID_PATTERN = r"^[\x21-\x7e]{1,200}$"
_ID_RE = re.compile(ID_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)
# Keys a caller chose (idempotency keys, correlation ids): any text, bounded. App.start
# takes up to 500 characters; keys Cantata makes from them (a schedule's tick, a child
# run's) may be longer.
MAX_KEY = 2000
MAX_LIMIT = 500
MAX_ATTRS = 20  # attr= filters of one query (each is one index look-up)
HALF_MICROSECOND = 5e-7


class _Text(Convertor[str]):
    """A path parameter of any text, '/' and line breaks included (Starlette's ``path``
    converter stops at a line break: a schedule's name, a group's or a correlation id
    holding one would find no route, a bare 404). Routes name it ``{x:cantata_text}``;
    registered when this module is imported, before any route is made."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("cantata_text", _Text())


def ident(field: str, value: str | None) -> str | None:
    """An id Cantata makes (a run's, a dead letter's) or an event type."""
    if value is None:
        return None
    if not _ID_RE.fullmatch(value):
        raise bad_input(field, f"{field} must be 1-200 printable characters without spaces")
    return value


def key(field: str, value: str | None) -> str | None:
    """A key a caller chose to find runs by (idempotency key, correlation id): any text
    ``app.start`` takes (spaces, ``/``, letters outside ASCII), of 1 to :data:`MAX_KEY`
    characters, without a NUL or a lone surrogate (no key holds one)."""
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_KEY:
        raise bad_input(field, f"{field} must be 1-{MAX_KEY} characters, got {len(value)}")
    try:
        check_text(field, value)
    except CantataError:
        raise bad_input(field, f"{field} {brief(value)} holds a NUL character or a lone "
                        "surrogate, which no key holds: check the value") from None
    return value


def start_keys(idempotency_key: str | None, correlation_id: str | None) -> None:
    """A start's ``idempotency_key`` and ``correlation_id`` as ``app.start`` takes them
    (its own checks: any text of up to 500 characters without a NUL or a lone
    surrogate; a key not empty), else a 400 naming the field."""
    for field, value, check in (("idempotency_key", idempotency_key, check_given_key),
                                ("correlation_id", correlation_id, check_correlation_id)):
        try:
            check(value)
        except ConfigurationError as exc:
            raise bad_input(field, str(exc)) from None


def event_attributes(event_type: str, **given: str | None) -> None:
    """An event's attributes a publisher gives (``correlation_id``, ``subject``, ``id``)
    as ``app.publish`` takes them (its own check: any text, not empty, without a NUL or
    a lone surrogate; up to 500 characters where the store indexes it), else a 400
    naming the field."""
    try:  # (the type first: an attribute's check checks it too, and would be named)
        check_publish(event_type)
    except InvalidEvent as exc:
        raise bad_input("type", str(exc)) from None
    for field, value in given.items():
        try:
            check_publish(event_type, **{field: value})
        except InvalidEvent as exc:
            raise bad_input(field, str(exc)) from None


def required_ident(field: str, value: str) -> str:
    out = ident(field, value)
    assert out is not None
    return out


def name(field: str, value: str | None) -> str | None:
    """A workflow, group or step name."""
    if value is None:
        return None
    if not _NAME_RE.fullmatch(value):
        raise bad_input(field, f"{field} must be 1-200 letters, digits, '_', '.', ':' or '-'")
    return value


def status(value: str | None) -> RunStatus | None:
    if value is None:
        return None
    try:
        return RunStatus(value)
    except ValueError:
        raise bad_input(
            "status", f"status must be one of {', '.join(s.value for s in RunStatus)}"
        ) from None


def limit(value: int | None, default: int = 50) -> int:
    if value is None:
        return default
    if not 1 <= value <= MAX_LIMIT:
        raise bad_input("limit", f"limit must be between 1 and {MAX_LIMIT}")
    return value


def timestamp(field: str, value: str | None) -> float | None:
    """An RFC 3339 time (a zone is required: ``Z`` or ``+02:00``), or POSIX seconds."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or abs(seconds) > 1e11:
            raise bad_input(field, f"{field} is out of range")
        return seconds
    try:
        when = dt.datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise bad_input(
            field, f"{field} must be an RFC 3339 time such as 2026-01-31T12:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise bad_input(field, f"{field} needs a time zone (for example a trailing Z)")
    # Stored times are float seconds; the API shows them rounded to the microsecond. A
    # bound given as a shown time means every run shown at that microsecond or later
    # (since) / before it (until), so the bound sits half a microsecond earlier.
    return when.timestamp() - HALF_MICROSECOND


def seconds(field: str, value: float | None, default: float) -> float:
    if value is None:
        return default
    if not math.isfinite(value) or not 0 <= value <= 10 * 365 * 86400:
        raise bad_input(field, f"{field} must be a number of seconds >= 0")
    return value


def finite(field: str, value: object) -> None:
    """A 400 naming ``field`` when the JSON sent holds a NaN or an infinity (Python's
    JSON reader takes them; JSON has neither, and the store would keep ``null``)."""
    where = nonfinite_path(value)
    if where is not None:
        at = "" if where == "the value" else f" at {where}"
        raise ApiError(400, "serialization", f"{field} holds a NaN or infinite number{at}: "
                       'JSON has neither; send null or a string such as "NaN" instead', field)


def attributes(values: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``attr=NAME=VALUE`` filters (as ``cantata runs --attr``) as ``(name, indexed
    text)`` pairs a run must all hold; a malformed one is a 422 naming ``attr`` (what
    was sent quoted only in part: it may be long)."""
    out: list[tuple[str, str]] = []
    if len(values or []) > MAX_ATTRS:
        raise ApiError(422, "invalid_input", f"attr is given {len(values or [])} times; "
                       f"filter on at most {MAX_ATTRS} attributes", "attr")
    for text in values or []:
        if "=" not in text:
            raise ApiError(422, "invalid_input", f"attr {brief(text)} is malformed: use "
                           "attr=NAME=VALUE (for example attr=customer_id=42)", "attr")
        try:
            name, value = parse_attr(text)
            out.append((name, index_value(name, value)))
        except UnknownAttribute as exc:
            raise ApiError(422, "invalid_input", f"attr {brief(text)}: {exc}",
                           "attr") from None
    return tuple(out)


# -- cursors: opaque to clients, base64url of a small JSON value ---------------------------


def encode_cursor(value: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def _decode(text: str) -> object:
    if len(text) > 600:
        raise ValueError("too long")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return orjson.loads(raw)


def run_cursor(value: str | None) -> tuple[float, str] | None:
    """The ``(created_at, run_id)`` a runs cursor stands for."""
    if value is None:
        return None
    try:
        pair = _decode(value)
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("not a pair")
        at, run_id = pair
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not isinstance(
                run_id, str):
            raise ValueError("wrong types")
        if not math.isfinite(at) or not _ID_RE.fullmatch(run_id):
            raise ValueError("wrong values")
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise bad_input("cursor", "cursor is not one this API gave out: "
                        "pass back next_cursor unchanged") from None
    return float(at), run_id


def audit_cursor(value: str | None) -> int:
    """The last ``seq`` an audit page ended at (0: from the start)."""
    if value is None:
        return 0
    try:
        seq = _decode(value)
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 2**62:
            raise ValueError("wrong value")
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise bad_input("cursor", "cursor is not one this API gave out: "
                        "pass back next_cursor unchanged") from None
    return seq
