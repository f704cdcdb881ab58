"""OpenTelemetry spans for runs, steps, handlers and publishes (``pip install 'cantata[otel]'``).

    from cantata.observability.otel import OpenTelemetryHook
    app.add_hook(OpenTelemetryHook())          # uses the global tracer provider

Events carry the W3C ``traceparent`` of the span that emitted them, and a handler's
span continues that trace, so Jaeger or Tempo show one trace across a workflow, the
events it emits and the handlers of other services. Handler and publish spans follow
the OpenTelemetry messaging conventions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from cantata.engine.hooks import Hook
from cantata.errors import ConfigurationError
from cantata.model.event import Event
from cantata.model.records import RunRecord

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ConfigurationError(
        f"OpenTelemetry is not installed ({exc}): pip install 'cantata[otel]'"
    ) from None

_PROPAGATOR = TraceContextTextMapPropagator()
MESSAGING_SYSTEM = "cantata"


def _parent(traceparent: str | None) -> otel_context.Context | None:
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


class OpenTelemetryHook(Hook):
    """Creates spans through a tracer from ``tracer_provider`` (default: the global one)."""

    def __init__(self, tracer_provider: Any = None) -> None:
        self.tracer = trace.get_tracer("cantata", tracer_provider=tracer_provider)

    @contextlib.contextmanager
    def _span(self, name: str, kind: SpanKind, attributes: dict[str, Any],
              parent: otel_context.Context | None = None) -> Iterator[None]:
        with self.tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=attributes, record_exception=True,
            set_status_on_exception=True,
        ):
            yield

    def run(self, run: RunRecord, traceparent: str | None) -> AbstractContextManager[None]:
        parent = _parent(traceparent)
        if parent is None and trace.get_current_span().get_span_context().is_valid:
            parent = None  # keep the caller's current span (app.start inside a span)
        return self._span(
            f"workflow {run.workflow}", SpanKind.INTERNAL,
            {"cantata.run_id": run.run_id, "cantata.workflow": run.workflow,
             "cantata.correlation_id": run.correlation_id, "cantata.app": run.app},
            parent,
        )

    def run_finished(self, run: RunRecord, status: str, error: str | None) -> None:
        span = trace.get_current_span()
        span.set_attribute("cantata.run_status", status)
        if status != "completed":
            span.set_status(Status(StatusCode.ERROR, error or status))

    def step(self, run: RunRecord, name: str, key: str, attempt: int,
             kind: str) -> AbstractContextManager[None]:
        return self._span(
            f"{kind} {name}", SpanKind.INTERNAL,
            {"cantata.run_id": run.run_id, "cantata.step": name, "cantata.step_key": key,
             "cantata.attempt": attempt, "cantata.correlation_id": run.correlation_id},
        )

    def handler(self, group: str, event: Event[Any], attempt: int) -> AbstractContextManager[None]:
        return self._span(
            f"process {event.type}", SpanKind.CONSUMER,
            {"messaging.system": MESSAGING_SYSTEM, "messaging.operation.type": "process",
             "messaging.operation.name": "process", "messaging.destination.name": event.type,
             "messaging.message.id": event.id, "messaging.consumer.group.name": group,
             "cantata.correlation_id": event.correlation_id or event.id,
             "cantata.attempt": attempt},
            _parent(event.traceparent),
        )

    def handler_finished(self, group: str, event: Event[Any], seconds: float, outcome: str,
                         error: str | None) -> None:
        span = trace.get_current_span()
        span.set_attribute("cantata.outcome", outcome)
        if error:
            span.set_status(Status(StatusCode.ERROR, error))

    def publish(self, event: Event[Any]) -> AbstractContextManager[None]:
        return self._span(
            f"publish {event.type}", SpanKind.PRODUCER,
            {"messaging.system": MESSAGING_SYSTEM, "messaging.operation.type": "send",
             "messaging.operation.name": "publish", "messaging.destination.name": event.type,
             "messaging.message.id": event.id,
             "cantata.correlation_id": event.correlation_id or event.id},
        )

    def traceparent(self) -> str | None:
        if not trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")
