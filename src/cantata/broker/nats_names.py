"""Names on a NATS server: streams, subjects and consumers of one app.

For an app ``shop`` (and no prefix):

- stream ``CANTATA_shop`` holding subjects ``cantata.shop.>``;
- an event of type ``order.placed`` goes to ``cantata.shop.order.placed``;
- dead-letter replays to a group go to ``cantata.shop._replay.<group>`` (no event type
  may start with ``_replay``);
- durable consumers are named ``<group>-<digest of group and pattern>``; the one
  that keeps events from outside of a type workflows wait for (nats_outside) is
  ``_cantata-outside-<digest of the pattern>`` (no group's consumer has that name: a
  group's digest is of its own name, which is never empty).

A broker URL with ``?prefix=staging`` gives every name its own space, so two
environments can use one server: stream ``CANTATA-staging_shop``, subjects
``staging.cantata.shop.>``, consumers ``staging_<group>-<digest>``. The prefix may
hold letters, digits and ``-`` only, so a prefixed stream name can never be an
unprefixed one (``CANTATA_`` + app) nor another prefix's.

The outbox relay marks its own messages with a ``Cantata-Outbox`` header whose value
is :func:`outbox_mark`: the store's id and the stream's name (``<store id>/<stream>``).
A stream belongs to one store (nats_streams), so the pair says "a copy of an event
this store holds for this app": the consumer keeping events from outside for waits
acks only those unread. A copy another store's relay published (another
environment's stream, another app's, a clone of this store under another prefix),
carried here by a tool that kept the headers, has another mark and is read as an
outside message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from cantata.errors import ConfigurationError

# No event type or pattern may start with it (model.event.RESERVED_FIRST_TOKENS), so a
# replay subject is never an event's subject.
REPLAY = "_replay"
#: The header of the outbox relay's messages: a copy of an event the store holds. Its
#: value is :func:`outbox_mark` (Cantata before it wrote ``1``).
OUTBOX_HEADER = "Cantata-Outbox"
#: The longest store-id part of an outbox mark (a longer or odd id is hashed).
MARK_ID_MAX = 64
_MARK_ID_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{MARK_ID_MAX}}}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9-]{1,32}$")
# Longer names are shortened with a hash: JetStream names are at most 255 characters,
# and every subject must fit the server's control line.
_MAX_TOKEN = 128
_EVENTS_KEPT = 4096  # event types whose subject a Names remembers


def digest(*parts: str, n: int = 10) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


def token(name: str) -> str:
    """``name`` as one NATS subject token, also valid in stream and consumer names.

    Names that need changing (odd characters, or longer than 128 characters) get a
    hash suffix, so two names never share a token.
    """
    if _TOKEN_RE.fullmatch(name) and len(name) <= _MAX_TOKEN:
        return name
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:48]}_{digest(name, n=8)}"


def check_prefix(prefix: str) -> str:
    """Validate a ``?prefix=`` of a broker URL (``""``: no prefix)."""
    if prefix and (not _PREFIX_RE.fullmatch(prefix) or prefix.lower() == "cantata"):
        raise ConfigurationError(
            f"broker prefix {prefix!r} is invalid: use 1-32 letters, digits or '-' "
            "(not 'cantata'), such as ?prefix=staging"
        )
    return prefix


@dataclass(frozen=True, slots=True)
class Names:
    """Where one app's events live on the server, under an optional prefix.

    The subject prefix and the subject of each event type are worked out once (a
    regular expression match each): they are asked for per event and per copy
    (docs/performance.md, the choreography path)."""

    app: str
    prefix: str = ""
    _subjects: str = field(default="", init=False, repr=False, compare=False)
    _replays: str = field(default="", init=False, repr=False, compare=False)
    _stream: str = field(default="", init=False, repr=False, compare=False)
    _events: dict[str, str] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        base = f"cantata.{token(self.app)}"
        subjects = f"{self.prefix}.{base}" if self.prefix else base
        object.__setattr__(self, "_subjects", subjects)
        object.__setattr__(self, "_replays", f"{subjects}.{REPLAY}.")
        stream = (f"CANTATA-{self.prefix}_{token(self.app)}" if self.prefix
                  else f"CANTATA_{token(self.app)}")
        object.__setattr__(self, "_stream", stream)

    @property
    def stream(self) -> str:
        """The JetStream stream that holds the app's events."""
        return self._stream

    @property
    def subjects(self) -> str:
        """Every subject of the app starts with this."""
        return self._subjects

    def event(self, event_type: str) -> str:
        """Where an event of ``event_type`` is published."""
        subject = self._events.get(event_type)
        if subject is None:
            subject = f"{self._subjects}.{event_type}"
            if len(self._events) < _EVENTS_KEPT:
                self._events[event_type] = subject
        return subject

    def replay(self, group: str) -> str:
        """Where dead-letter replays to ``group`` are published."""
        return f"{self._replays}{token(group)}"

    def is_replay(self, subject: str) -> bool:
        return subject.startswith(self._replays)

    def consumer(self, group: str, pattern: str | None) -> str:
        """The durable consumer of ``group`` for ``pattern`` (``None``: its replays)."""
        tail = "replay" if pattern is None else digest(group, pattern)
        name = f"{token(group)}-{tail}"
        return f"{self.prefix}_{name}" if self.prefix else name

    def outside(self, pattern: str) -> str:
        """The durable consumer that keeps events from outside of ``pattern`` (a type
        workflows wait for), shared by every worker of the app."""
        name = f"_cantata-outside-{digest('', 'outside', pattern)}"
        return f"{self.prefix}_{name}" if self.prefix else name


def outbox_mark(store_id: str, stream: str) -> str:
    """The ``Cantata-Outbox`` value of the relay of store ``store_id`` on ``stream``:
    ``<store id>/<stream>`` (an id longer than :data:`MARK_ID_MAX` characters, or with
    characters other than letters, digits, ``_`` and ``-``, as a digest of it). Only
    letters, digits, ``_``, ``-`` and one ``/``: it goes into a header as it is."""
    if not _MARK_ID_RE.fullmatch(store_id):
        store_id = digest(store_id, n=32)
    return f"{store_id}/{stream}"


def mark_size(stream: str) -> int:
    """The most bytes :func:`outbox_mark` takes for ``stream`` (whatever the store)."""
    return MARK_ID_MAX + 1 + len(stream)


# The unprefixed names, as functions (what tests and tools outside a broker use).


def stream_name(app: str) -> str:
    """The JetStream stream that holds ``app``'s events (no prefix)."""
    return Names(app).stream


def subject_prefix(app: str) -> str:
    """Every subject of ``app`` starts with this (``cantata.<app>``)."""
    return Names(app).subjects


def event_subject(app: str, event_type: str) -> str:
    """Where an event of ``event_type`` is published (no prefix)."""
    return Names(app).event(event_type)


def replay_subject(app: str, group: str) -> str:
    """Where dead-letter replays to ``group`` are published (no prefix)."""
    return Names(app).replay(group)


def consumer_name(group: str, pattern: str | None) -> str:
    """The durable consumer of ``group`` for ``pattern`` (``None``: its replay consumer)."""
    return Names("-").consumer(group, pattern)
