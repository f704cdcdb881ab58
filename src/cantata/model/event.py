"""The event envelope: CloudEvents 1.0, structured JSON mode (binary mode accepted)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import orjson

from cantata.errors import InvalidEvent
from cantata.model.checks import check_text
from cantata.model.codec import new_id, now_iso

T = TypeVar("T")

SPECVERSION = "1.0"
#: The ``Content-Type`` of a CloudEvent in structured JSON mode.
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
_TYPE_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_PATTERN_RE = re.compile(r"^([A-Za-z0-9_\-]+|\*)(\.([A-Za-z0-9_\-]+|\*))*$")
_OPTIONAL_STRINGS = ("subject", "time", "correlationid", "causationid", "traceparent", "signature")
#: The most characters an event's ``id``, ``type``, ``correlation_id`` and
#: ``causation_id`` may have: the store indexes them, and PostgreSQL cannot index a
#: longer text (an index row is at most 2,704 bytes; 500 characters of up to 4 bytes
#: each leave room for the app name). The same bound on ``app.publish`` and on an
#: event that comes from the broker (docs/security.md).
MAX_ATTRIBUTE = 500
BOUNDED_ATTRIBUTES = ("id", "type", "correlation_id", "causation_id")


#: What to do about a message that is no CloudEvent (said in its error).
SEND_CLOUDEVENT = ("send a CloudEvent 1.0 in structured JSON mode (one JSON object, "
                   "Content-Type: application/cloudevents+json) or in binary mode (ce- "
                   "headers, the data as the body)")
BATCH_NOT_TAKEN = ("a batch (application/cloudevents-batch+json) is not taken: publish "
                   "each event as its own message")

#: First tokens of event types kept for Cantata's own use. The NATS broker sends a
#: group's dead-letter replays to ``<app subjects>._replay.<group>``: an event of type
#: ``_replay.billing`` would travel there, not where a group listening to it reads.
RESERVED_FIRST_TOKENS = ("_replay",)


def _check_type_syntax(event_type: str) -> str:
    if not isinstance(event_type, str) or not _TYPE_RE.fullmatch(event_type):
        raise InvalidEvent(
            f"event type {event_type!r} is invalid: use dot-separated tokens of letters, "
            "digits, '-' and '_' such as 'order.placed'"
        )
    return event_type


def _check_reserved(what: str, name: str) -> None:
    first = name.split(".", 1)[0]
    if first in RESERVED_FIRST_TOKENS:
        raise InvalidEvent(
            f"{what} {name!r} is invalid: its first token {first!r} is reserved (the NATS "
            f"broker's dead-letter replays travel there): rename it, such as "
            f"{name.lstrip('_')!r}"
        )


def check_type(event_type: str) -> str:
    """Validate an event type a program names (publishes, emits, declares or waits
    for): dot-separated tokens, no wildcard, no reserved first token."""
    _check_type_syntax(event_type)
    _check_reserved("event type", event_type)
    return event_type


def check_pattern(pattern: str) -> str:
    """Validate a subscription pattern: an exact type or one-token wildcards (``order.*``),
    no reserved first token."""
    if not isinstance(pattern, str) or not _PATTERN_RE.fullmatch(pattern):
        raise InvalidEvent(
            f"event pattern {pattern!r} is invalid: use an event type such as 'order.placed' "
            "or one-token wildcards such as 'order.*'"
        )
    _check_reserved("event pattern", pattern)
    return pattern


def check_attribute(name: str, value: Any) -> Any:
    """Validate an optional string attribute given by a caller (``None`` passes).

    CloudEvents requires ``id``, ``source`` and ``subject`` to be non-empty strings;
    anything else would be stored converted, or break the JSON form on a broker (and
    a NUL or a lone surrogate cannot be stored: :func:`check_text`).
    """
    if value is not None:
        if type(value) is str and value and value.isascii() and "\x00" not in value:
            return value  # (what check_text lets through, without making its message)
        if not isinstance(value, str) or not value:
            raise InvalidEvent(
                f"event attribute {name!r} must be a non-empty string, got {value!r}"
            )
        check_text(f"event attribute {name!r}", value, error=InvalidEvent)
    return value


def check_length(name: str, value: str | None) -> None:
    """Refuse an indexed attribute (:data:`BOUNDED_ATTRIBUTES`) longer than
    :data:`MAX_ATTRIBUTE` characters.

    Raises:
        InvalidEvent: naming the attribute, its length and the bound.
    """
    if value is not None and len(value) > MAX_ATTRIBUTE:
        raise InvalidEvent(
            f"event attribute {name!r} is {len(value)} characters long ({value[:40]!r}...): "
            f"at most {MAX_ATTRIBUTE} are kept (the store indexes it); use a shorter one"
        )


def check_publish(event_type: str, **attributes: Any) -> None:
    """What every publisher checks before it builds an event (``app.publish`` and a
    workflow's ``ctx.emit``): the type, and each attribute the caller gave."""
    if type(event_type) is not str or event_type not in _CHECKED_TYPES:
        check_type(event_type)
        check_length("type", event_type)
        if type(event_type) is str:
            if len(_CHECKED_TYPES) >= _CHECKED_KEPT:
                _CHECKED_TYPES.clear()
            _CHECKED_TYPES[event_type] = None
    for name, value in attributes.items():
        if value is not None:
            check_attribute(name, value)
            if name in BOUNDED_ATTRIBUTES:
                check_length(name, value)


# Event types that passed check_publish's checks of a type (a program publishes and
# emits a few types over and over, each checked once): the check is a regex and more.
_CHECKED_TYPES: dict[str, None] = {}
_CHECKED_KEPT = 4096


def _is_json_type(content_type: Any) -> bool:
    if content_type is None:
        return True
    if not isinstance(content_type, str):
        raise InvalidEvent("CloudEvent attribute 'datacontenttype' must be a string")
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def _data_of(ce: dict[str, Any]) -> Any:
    """``data``, or ``data_base64`` decoded: parsed when its content type is JSON,
    text for ``text/*``, bytes otherwise."""
    if "data_base64" not in ce:
        return ce.get("data")
    if "data" in ce:
        raise InvalidEvent("a CloudEvent carries 'data' or 'data_base64', not both")
    encoded = ce["data_base64"]
    if not isinstance(encoded, str):
        raise InvalidEvent("CloudEvent attribute 'data_base64' must be a base64 string")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidEvent(f"CloudEvent 'data_base64' is not valid base64 ({exc})") from None
    content_type = ce.get("datacontenttype")
    if _is_json_type(content_type):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(
                f"CloudEvent 'data_base64' decodes to bytes that are not the JSON its "
                f"content type {content_type or 'application/json'!r} says ({exc})"
            ) from None
    if str(content_type).lower().startswith("text/"):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise InvalidEvent(
                f"CloudEvent 'data_base64' is not UTF-8 text although its content type is "
                f"{content_type!r}"
            ) from None
    return raw


def like_pattern(pattern: str) -> str:
    """A SQL ``LIKE`` pattern (escape ``\\``) that every type ``pattern`` matches satisfies;
    rows it finds must still be checked with :func:`matches` (``%`` spans dots)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


#: The data of a claim-check message: the event itself is in the store.
CLAIM_KEY = "$cantata_claim"


def claim_stub(event: Event[Any]) -> Event[Any]:
    """What travels on a broker for an event kept in the store (claim check): every
    attribute, and data that only names the event."""
    return replace(event, data={CLAIM_KEY: event.id})


def is_claim(event: Event[Any]) -> bool:
    """True for a claim-check message (see :func:`claim_stub`)."""
    data = event.data
    return isinstance(data, dict) and len(data) == 1 and data.get(CLAIM_KEY) == event.id


def matches(pattern: str, event_type: str) -> bool:
    """True if ``event_type`` matches ``pattern`` (``*`` stands for exactly one token)."""
    if "*" not in pattern:
        return pattern == event_type
    p, t = pattern.split("."), event_type.split(".")
    return len(p) == len(t) and all(a == "*" or a == b for a, b in zip(p, t, strict=True))


@dataclass(frozen=True, slots=True)
class Event(Generic[T]):
    """One event. ``Event[Model]`` in a handler's signature validates ``data`` as ``Model``.

    Attributes follow CloudEvents: ``id``, ``type``, ``source``, ``subject``, ``time``
    (RFC 3339 string), ``data``, plus ``correlation_id`` (the business transaction),
    ``causation_id`` (what directly caused this event) and ``traceparent`` (W3C).
    """

    type: str
    data: T
    id: str = field(default_factory=new_id)
    source: str = "cantata"
    subject: str | None = None
    time: str = field(default_factory=lambda: now_iso(_time.time()))
    correlation_id: str | None = None
    causation_id: str | None = None
    traceparent: str | None = None
    signature: str | None = None
    #: True on the event :meth:`App.publish` returns for a repeated id (nothing was sent).
    duplicate: bool = field(default=False, compare=False, repr=False)

    def to_cloudevent(self) -> dict[str, Any]:
        """The CloudEvents 1.0 structured-mode JSON object."""
        ce: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": self.data,
        }
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            # binary data (a data_base64 of a content type neither JSON nor text) goes
            # out as it came in, so that from_json gives it back as bytes
            del ce["data"]
            ce["datacontenttype"] = "application/octet-stream"
            ce["data_base64"] = base64.b64encode(bytes(self.data)).decode("ascii")
        if self.subject is not None:
            ce["subject"] = self.subject
        if self.correlation_id is not None:
            ce["correlationid"] = self.correlation_id
        if self.causation_id is not None:
            ce["causationid"] = self.causation_id
        if self.traceparent is not None:
            ce["traceparent"] = self.traceparent
        if self.signature is not None:
            kid, sep, digest = self.signature.rpartition(":")
            ce["signature"] = digest
            if sep and kid:
                ce["signaturekeyid"] = kid
        return ce

    def to_json(self) -> bytes:
        """Serialise as CloudEvents structured JSON."""
        from cantata.model.codec import _default

        return orjson.dumps(self.to_cloudevent(), default=_default)

    @classmethod
    def from_cloudevent(cls, ce: Any) -> Event[Any]:
        """Build an event from a CloudEvents JSON object, validating required attributes."""
        if not isinstance(ce, dict):
            raise InvalidEvent(
                f"not a CloudEvent: expected a JSON object, got {type(ce).__name__}: "
                + (BATCH_NOT_TAKEN if isinstance(ce, list) else SEND_CLOUDEVENT)
            )
        missing = [k for k in ("specversion", "id", "source", "type") if not ce.get(k)]
        if missing:
            raise InvalidEvent(
                f"not a CloudEvent: missing attribute(s) {', '.join(missing)}: a CloudEvent "
                "needs specversion '1.0', id, source and type (non-empty strings)"
            )
        if ce["specversion"] != SPECVERSION:
            raise InvalidEvent(
                f"unsupported CloudEvents specversion {ce['specversion']!r}: only '1.0'"
            )
        for key in ("id", "source", "type"):
            if not isinstance(ce[key], str):
                raise InvalidEvent(f"CloudEvent attribute {key!r} must be a string")
        # Optional attributes end up in store columns and headers: a number or an
        # object here would fail far from the cause (or be stored as garbage).
        for key in _OPTIONAL_STRINGS:
            if ce.get(key) is not None and not isinstance(ce[key], str):
                raise InvalidEvent(
                    f"CloudEvent attribute {key!r} must be a string, got "
                    f"{type(ce[key]).__name__}"
                )
        # (the syntax only: an event stored, recorded or sent before a first token was
        # reserved still reads; one published or emitted here passed it already)
        if type(ce["type"]) is not str or ce["type"] not in _CHECKED_TYPES:
            _check_type_syntax(ce["type"])
        if ce.get("signaturekeyid") is not None and not isinstance(ce["signaturekeyid"], str):
            raise InvalidEvent("CloudEvent attribute 'signaturekeyid' must be a string")
        data = _data_of(ce)
        if isinstance(data, (dict, list, int)):
            from cantata.model.codec import _default

            try:  # a mapping built in Python may hold what JSON cannot carry
                orjson.dumps(data, default=_default)
            except TypeError as exc:
                raise InvalidEvent(
                    f"CloudEvent 'data' of event {ce['type']!r} is not JSON ({exc}): send "
                    "JSON values only (integers within 64 bits, string keys)"
                ) from None
        when = ce.get("time") or now_iso(_time.time())
        try:
            dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidEvent(
                f"CloudEvent attribute 'time' must be an RFC 3339 timestamp, got {when!r}"
            ) from None
        signature = ce.get("signature")
        if signature is not None and ce.get("signaturekeyid"):
            signature = f"{ce['signaturekeyid']}:{signature}"
        return Event(
            type=ce["type"],
            data=data,
            id=ce["id"],
            source=ce["source"],
            subject=ce.get("subject"),
            time=str(when),
            correlation_id=ce.get("correlationid"),
            causation_id=ce.get("causationid"),
            traceparent=ce.get("traceparent"),
            signature=signature,
        )

    @classmethod
    def from_binary(cls, attributes: dict[str, str], body: bytes) -> Event[Any]:
        """Build an event from CloudEvents *binary* mode: the attributes come as
        ``ce-`` headers (``ce-id``, ``ce-type``, ...), the data is the body, and the
        ``Content-Type`` header is its ``datacontenttype``.
        """
        ce: dict[str, Any] = {}
        content_type = None
        for name, value in attributes.items():
            key = name.lower()
            if key.startswith("ce-"):
                ce[key[3:]] = value
            elif key == "content-type":
                content_type = value
        if content_type is not None:
            ce["datacontenttype"] = content_type
        if body:
            ce["data_base64"] = base64.b64encode(body).decode("ascii")
        return cls.from_cloudevent(ce)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event[Any]:
        """Parse CloudEvents structured JSON; garbage raises :class:`InvalidEvent`."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent(f"not JSON: {exc}: {SEND_CLOUDEVENT}") from None
        return cls.from_cloudevent(obj)

    def same_content(self, other: Event[Any]) -> bool:
        """True when ``other`` carries the same thing (the attributes that carry meaning;
        not its time, trace or signature): a repeat of this event, not another one."""
        return (self.type, self.source, self.subject, self.data, self.correlation_id) == (
            other.type, other.source, other.subject, other.data, other.correlation_id)

    def with_data(self, data: Any) -> Event[Any]:
        """A copy carrying other data (used to hand typed data to a handler)."""
        return replace(self, data=data)

    @property
    def timestamp(self) -> float:
        """``time`` as a POSIX timestamp."""
        try:
            return dt.datetime.fromisoformat(self.time.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0


#: What :func:`value_at` gives for a key the data does not hold.
MISSING: Any = object()


def value_at(data: Any, key: str) -> Any:
    """The value of ``data`` under ``key`` (dotted keys nest), or :data:`MISSING`."""
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def match_data(data: Any, match: Mapping[str, Any] | None) -> bool:
    """True if every ``key: value`` of ``match`` equals the event data's (dotted keys nest)."""
    if not match:
        return True
    if not isinstance(data, Mapping):
        return False
    for key, expected in match.items():
        value = value_at(data, key)
        if value is MISSING or value != expected:
            return False
    return True


_INT64 = 2**63
_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def match_filter(match: Mapping[str, Any] | None) -> list[tuple[tuple[str, ...], str | int]]:
    """The ``(key parts, value)`` pairs of a wait's ``match`` that a store may compare in
    its query (``("a", "b")`` for the dotted key ``a.b``): a string without a NUL
    (neither store's JSON functions give one back), or an integer (not a bool) of at
    most 64 bits, under a key none of whose parts holds a character that
    JSON text escapes (``"``, ``\\``, a control character: SQLite finds a key by its
    text as written, escapes and all). An event whose data holds another value there
    cannot match (``ctx.wait_for_event`` compares the values as Python does); the other
    pairs (floats, bools, ``None``, lists, mappings) are left to the caller, which
    checks every event the store returns. A store may compare fewer (PostgreSQL:
    :func:`cantata.store.postgres_events.may_match`)."""
    out: list[tuple[tuple[str, ...], str | int]] = []
    for key, value in (match or {}).items():
        parts = tuple(key.split("."))
        if any(_ESCAPED.search(part) for part in parts):
            continue
        if (isinstance(value, str) and "\x00" not in value) or (
            type(value) is int and -_INT64 <= value < _INT64
        ):
            out.append((parts, value))
    return out


def json_path(parts: Sequence[str]) -> str:
    """SQLite's JSON path of a key's parts: ``$."a"."b"`` (no part holds a ``"``)."""
    return "$" + "".join(f'."{part}"' for part in parts)


#: Integers below this in size are written as their digits whatever their type: a
#: float equal to one is written by the codec (orjson) as those digits and ``.0``, not
#: with an exponent (which it uses from 1e16 on).
_DIGITS_EXACT = 2**53


def match_needles(match: Mapping[str, Any] | None) -> list[str]:
    """Text that an event's stored data must hold for it to match ``match``, a cheap
    test a store may make before it parses the data (``"key":"value"``, ``"key":42``).

    The data of every event is written by the codec (``codec.dumps_event_data``:
    orjson, compact, escaping only ``"``, ``\\`` and control characters), so a string
    value under its innermost key appears as the codec writes it, and an integer as
    its digits (a float equal to it too, followed by ``.0``), from :func:`match_filter`'s
    pairs: not ``0`` and ``1``, which ``false`` and ``true`` equal, nor integers of
    2**53 and more in size."""
    needles: list[str] = []
    for parts, value in match_filter(match):
        if isinstance(value, str):
            written = orjson.dumps(value).decode()
        elif value not in (0, 1) and -_DIGITS_EXACT < value < _DIGITS_EXACT:
            written = str(value)
        else:
            continue
        needles.append(f'"{parts[-1]}":{written}')
    return needles
