"""Logs that reach the operator: context on every record, text or JSON output.

Records logged inside a step carry ``run_id``, ``step`` and ``attempt``; inside an
event handler, ``event_id``, ``group`` and ``attempt`` (a saga step run by a
handler has both); every other record has the five set to ``None``, so a
formatter naming them (``%(run_id)s``) works for all records. They are attached
by a log record factory that an app installs when it starts serving, so any
handler — the CLI's, pytest's ``caplog``, the user's own — sees them.
``cantata worker --log-level --log-format`` sets up the output (see
docs/workflow-api.md).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson

from cantata.choreography.logcontext import _handler
from cantata.engine.stepinfo import current as _step_info

CONTEXT_FIELDS = ("run_id", "step", "attempt", "event_id", "group")


def context_fields() -> dict[str, Any]:
    """The step or handler context of the running code (empty outside both)."""
    out: dict[str, Any] = {}
    handler = _handler.get()
    if handler is not None:
        out.update(event_id=handler.event_id, group=handler.group, attempt=handler.attempt)
    info = _step_info()
    if info is not None:
        out.update(run_id=info.run_id, step=info.step, attempt=info.attempt)
    return out


_FIELDS = frozenset(CONTEXT_FIELDS)


class _Attributes(dict[str, Any]):
    """A record's ``__dict__`` holding the context fields: a field the factory set to
    ``None`` (no step or handler there) does not count as present, so ``extra=`` may
    still set it (``Logger.makeRecord`` refuses to overwrite what ``in`` finds)."""

    __slots__ = ()

    def __contains__(self, key: object) -> bool:
        if key in _FIELDS and dict.get(self, key) is None:
            return False
        return dict.__contains__(self, key)


_installed: list[Callable[..., logging.LogRecord]] = []


def install_record_factory() -> None:
    """Attach the step/handler context to every log record (once per process): its
    values inside a step or handler, ``None`` elsewhere."""
    if _installed:
        return
    previous = logging.getLogRecordFactory()
    _installed.append(previous)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        attrs = record.__dict__
        if type(attrs) is dict:
            attrs = record.__dict__ = _Attributes(attrs)
        for name, value in context_fields().items():
            if name not in attrs:
                attrs[name] = value
        for name in CONTEXT_FIELDS:
            attrs.setdefault(name, None)
        return record

    logging.setLogRecordFactory(factory)


class ContextFilter(logging.Filter):
    """Adds the step/handler context to records that lack it (for handlers of records
    made before the factory was installed, and as ``-`` for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in context_fields().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, None)
        return True


class TextFormatter(logging.Formatter):
    """``time level logger: message [run_id=… step=… attempt=…]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS
                         if getattr(record, k, None) is not None)
        if not extra:
            return text
        head, sep, tail = text.partition("\n")  # a traceback stays below the line
        return f"{head} [{extra}]{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k in CONTEXT_FIELDS:
            value = getattr(record, k, None)
            if value is not None:
                out[k] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


FORMATS = ("text", "json")


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send every logger's records (the user's too) to stderr at ``level``.

    Raises:
        ValueError: an unknown level or format.
    """
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(
            f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    install_record_factory()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    for name in ("cantata", "cantata.broker", "cantata.queues"):  # (the CLI raises these)
        logging.getLogger(name).setLevel(logging.NOTSET)  # inherit the root's level
