"""The parts of ``app.publish`` that are about the event itself: checked and encoded
attributes, and what a repeated event id means (docs/guide.md)."""

from __future__ import annotations

import dataclasses
from typing import Any

from cantata.errors import DuplicateEventId
from cantata.model import codec
from cantata.model.checks import article
from cantata.model.codec import new_id
from cantata.model.event import Event, check_publish


def new_event(
    app: str,
    type: str,
    data: Any,
    *,
    subject: str | None,
    correlation_id: str | None,
    source: str | None,
    id: str | None,
    max_payload: int | None,
    correlate: str | None = None,
    causation_id: str | None = None,
) -> Event[Any]:
    """An event of ``app`` with checked attributes and JSON data, made once: its
    correlation id is ``correlation_id`` if given, else ``correlate`` (a transaction
    step's run), else its own id.

    Raises:
        SerializationError: ``data`` is not JSON (or holds NaN or an infinity).
    """
    check_publish(type, id=id, subject=subject, source=source, correlation_id=correlation_id)
    plain = codec.loads(codec.dumps(data, f"data of event {type}", limit=max_payload))
    event_id = id if id is not None else new_id()
    return Event(
        type=type,
        data=plain,
        id=event_id,
        source=source or f"cantata/{app}",
        subject=subject,
        correlation_id=correlation_id or correlate or event_id,
        causation_id=causation_id,
    )


def repeated(earlier: Event[Any], event: Event[Any]) -> Event[Any]:
    """The stored event when ``event`` repeats it (``duplicate=True``).

    Raises:
        DuplicateEventId: ``event`` reuses ``earlier``'s id with other content.
    """
    if not earlier.same_content(event):
        raise DuplicateEventId(
            f"event id {event.id!r} was already used by {article(earlier.type)} "
            f"{earlier.type} event published at {earlier.time} with other content (data "
            f"{earlier.data!r}); "
            f"this {event.type} event (data {event.data!r}) was refused: use a new id"
        )
    return dataclasses.replace(earlier, duplicate=True)
