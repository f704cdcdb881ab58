"""``ctx`` of an event handler: emit events in the handler's transaction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cantata.errors import CantataError
from cantata.model import codec
from cantata.model.event import Event, check_publish


class HandBack(CantataError):
    """Raised by a handler (or the consumer's host) to say the delivery is another
    worker's to handle: the consumer hands it back to its group, not counted as an
    attempt, for a worker whose code it is (a choreographed saga's hop of a run of
    another map: ``engine/saga/choreographed.own_hop``). The text is recorded as the
    delivery's error, so ``cantata stalled`` and the trace say why it waits."""

    code = "handed_back"


class HandlerContext:
    """Passed to ``@app.on`` handlers as ``ctx``.

    Events emitted here are committed together with the handler's completion (the
    transactional outbox): if the handler fails, none of them is ever delivered; if
    the event is redelivered after success, none is emitted twice.
    """

    def __init__(
        self,
        app: str,
        group: str,
        event: Event[Any],
        source: str,
        traceparent: Callable[[], str | None] | None = None,
        check: Callable[[Event[Any]], None] | None = None,
        store: Any = None,
        sign: Callable[[Event[Any]], Event[Any]] | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.app = app
        self.group = group
        self.event = event
        self.attempt = 1
        self._source = source
        self.emitted: list[Event[Any]] = []
        self._traceparent = traceparent
        self._check = check
        self._store = store  # read by the library's own handlers (a saga's join)
        self._sign = sign
        self._max_payload = max_payload

    @property
    def correlation_id(self) -> str:
        """The business transaction of the event being handled."""
        return self.event.correlation_id or self.event.id

    async def emit(self, type: str, data: Any = None, *, subject: str | None = None) -> Event[Any]:
        """Emit an event caused by the one being handled (same correlation id)."""
        check_publish(type, subject=subject)
        event = Event(
            type=type,
            data=codec.loads(
                codec.dumps(data, f"data of event {type}", limit=self._max_payload)
            ),
            source=self._source,
            subject=subject if subject is not None else self.event.subject,
            correlation_id=self.correlation_id,
            causation_id=self.event.id,
            traceparent=(self._traceparent and self._traceparent()) or self.event.traceparent,
        )
        if self._sign is not None:
            event = self._sign(event)
        if self._check is not None:
            self._check(event)  # what the broker would refuse fails the handler here
        self.emitted.append(event)
        return event
