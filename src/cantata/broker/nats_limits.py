"""What a NATS server refuses, checked before it can refuse it.

A NATS server closes the connection of a client whose protocol line is longer than
its ``max_control_line`` (4096 bytes unless configured), and nats-py refuses, before
sending, a message larger than the ``max_payload`` the server announced in its INFO.
Left unchecked, one such event would be retried by the outbox relay forever and
block every event behind it; checked here, it is refused where it is made (with a
clear error, before anything is stored), and one that still reaches the relay is
dead-lettered with the reason (see :func:`cantata.choreography.relay.relay_once`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors

from cantata.broker.nats_names import OUTBOX_HEADER, Names, mark_size
from cantata.errors import ConfigurationError, InvalidEvent, PayloadTooLarge
from cantata.model.event import STRUCTURED_CONTENT_TYPE, Event, check_pattern

# nats-server's default max_control_line; it is not announced in INFO.
DEFAULT_MAX_CONTROL_LINE = 4096
# Longest JetStream stream or consumer name; a group name longer than this is a
# mistake rather than a name (consumer names are hashed to fit anyway).
MAX_GROUP = 255
# Room the rest of a protocol line takes besides the subject: verb, reply inbox
# (~60 bytes), header and total sizes; for a consumer, the API subject around it.
_PUBLISH_OVERHEAD = 128
_CONSUMER_OVERHEAD = 128


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one connected server."""

    max_payload: int  # from the server's INFO
    max_control_line: int = DEFAULT_MAX_CONTROL_LINE

    def check_event(self, names: Names, event: Event[Any], payload: bytes | None = None) -> None:
        """Raise if the server would refuse ``event`` (published to its subject).

        Raises:
            InvalidEvent: its subject would not fit the server's protocol line.
            PayloadTooLarge: the message would exceed the server's max_payload.
        """
        subject = names.event(event.type)
        room = self.max_control_line - _PUBLISH_OVERHEAD
        if len(subject.encode()) > room:
            raise InvalidEvent(
                f"event type of {len(event.type)} characters is too long for NATS: its "
                f"subject ({len(subject.encode())} bytes) would exceed the server's "
                f"control line limit ({self.max_control_line} bytes); use a type of at most "
                f"{room - len(names.subjects) - 1} characters"
            )
        size = len(payload if payload is not None else event.to_json()) + header_size(
            event.id, names)
        if size > self.max_payload:
            raise PayloadTooLarge(
                f"event {event.id} of type {event.type} is {size} bytes as a NATS message, "
                f"over the server's max_payload of {self.max_payload} bytes; send less data "
                "(store the rest elsewhere and pass a reference), set App(offload_above=...) "
                "so that large events travel as a claim check (kept in the store), or raise "
                "max_payload in the server's configuration"
            )

    def check_subscription(self, names: Names, group: str, patterns: Sequence[str]) -> None:
        """Raise if a group or one of its patterns cannot be a NATS consumer.

        Raises:
            ConfigurationError: the group name is too long or a pattern is invalid or
                too long for the server.
        """
        if not group or len(group) > MAX_GROUP:
            raise ConfigurationError(
                f"group name of {len(group)} characters is invalid on NATS: use 1 to "
                f"{MAX_GROUP} characters (group {group[:40]!r}...)"
            )
        room = self.max_control_line - _CONSUMER_OVERHEAD - len(names.stream)
        for pattern in patterns:
            try:
                check_pattern(pattern)
            except InvalidEvent as exc:
                raise ConfigurationError(f"group {group[:40]!r}: {exc}") from None
            subject = names.event(pattern)
            if len(subject.encode()) > room:  # it is part of the create request's subject
                raise ConfigurationError(
                    f"group {group[:40]!r}: pattern of {len(pattern)} characters is too "
                    f"long for NATS (the server's control line is {self.max_control_line} "
                    f"bytes); use a pattern of at most {room - len(names.subjects) - 1} "
                    "characters"
                )


def header_size(event_id: str, names: Names) -> int:
    """Bytes of the header block nats-py adds to a published event (its message id,
    with room for a re-drive's suffix, the CloudEvents content type and the relay's
    own header, its mark as long as any store's on ``names.stream``)."""
    return _HEADER_ROOM + len(event_id.encode()) + mark_size(names.stream)


# header_size without the id and the mark: "NATS/1.0", "Nats-Msg-Id: <id>:again-" + 32
# digits, the content type, the relay's header, the blank line (worked out once: it is
# asked for per event)
_HEADER_ROOM = len(
    f"NATS/1.0\r\nNats-Msg-Id: :again-{'0' * 32}\r\n"
    f"Content-Type: {STRUCTURED_CONTENT_TYPE}\r\n{OUTBOX_HEADER}: \r\n\r\n".encode()
)


def refusal(exc: BaseException) -> str | None:
    """The reason if ``exc`` says the server refused a message for good, else ``None``
    (a transient failure: the publish is tried again)."""
    if isinstance(exc, nats.errors.MaxPayloadError):
        return "the message is larger than the server's max_payload"
    if isinstance(exc, nats.js.errors.BadRequestError):  # e.g. over the stream's size limit
        return f"JetStream refused it: {exc.description or exc}"
    text = str(exc).lower()
    if "control line" in text:
        return f"the server refused it: {exc}"
    return None
