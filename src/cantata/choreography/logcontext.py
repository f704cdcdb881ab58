"""Which handler attempt is running, for the log records logged inside it.

Set by the consumer around each handler attempt; read by the log record factory of
:mod:`cantata.observability.logs` (docs/workflow-api.md).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def handler_context(event_id: str, group: str, attempt: int) -> Iterator[None]:
    """Records logged inside this block carry the handler's event id, group and attempt."""
    token = _handler.set(HandlerLog(event_id, group, attempt))
    try:
        yield
    finally:
        _handler.reset(token)
