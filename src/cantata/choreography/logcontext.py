"""Which handler attempt is running, for the log records logged inside it.

Set by the consumer around each handler attempt; read by the log record factory of
:mod:`cantata.observability.logs` (docs/workflow-api.md).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HandlerLog:
    """What a handler's records carry."""

    event_id: str
    group: str
    attempt: int


_handler: contextvars.ContextVar[HandlerLog | None] = contextvars.ContextVar(
    "cantata_handler_log", default=None
)


class handler_context:  # (used as a function: ``with handler_context(...)``)
    """Records logged inside this block carry the handler's event id, group and attempt.

    A class rather than a ``@contextmanager`` generator: it is entered once per handler
    attempt, and a generator's frame and wrapper cost more than the work itself
    (docs/performance.md, the choreography path)."""

    __slots__ = ("_log", "_token")

    def __init__(self, event_id: str, group: str, attempt: int) -> None:
        self._log = HandlerLog(event_id, group, attempt)

    def __enter__(self) -> None:
        self._token = _handler.set(self._log)

    def __exit__(self, *exc: object) -> None:
        _handler.reset(self._token)
