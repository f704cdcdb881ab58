"""OpenTelemetry spans and Prometheus metrics built on the hooks."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind
from prometheus_client import generate_latest
from pydantic import BaseModel

import cantata
from cantata import App, Event, Retry
from cantata.observability.metrics import PrometheusHook
from cantata.observability.otel import OpenTelemetryHook
from tests.helpers import eventually


def parent(span: ReadableSpan) -> SpanContext:
    """The context of ``span``'s parent (the span has one)."""
    assert span.parent is not None, span.name
    return span.parent


def build(hook: cantata.engine.hooks.Hook) -> tuple[App, list[str]]:
    app = App("traced", store="memory://", poll_interval=0.05)
    app.add_hook(hook)
    seen: list[str] = []

    @app.step
    async def reserve(order: dict[str, Any]) -> str:
        return "ok"

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def flaky(order: dict[str, Any]) -> str:
        if cantata.step_info().attempt == 1:
            raise ConnectionError("blip")
        return "ok"

    @app.workflow
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> str:
        await ctx.run(reserve, order)
        await ctx.run(flaky, order)
        await ctx.emit("order.placed", order)
        return "done"

    @app.on("order.placed", group="shipping")
    async def ship(event: Event[Any], ctx: cantata.HandlerContext) -> None:
        seen.append(event.id)
        await ctx.emit("shipment.created", event.data)

    @app.on("shipment.created", group="notifications")
    async def notify(event: Event[Any]) -> None:
        seen.append(event.id)

    return app, seen


async def test_one_trace_spans_workflow_event_and_handlers_of_other_groups() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app, seen = build(OpenTelemetryHook(tracer_provider=provider))
    async with app:
        handle = await app.start("place_order", {"id": 1})
        assert await handle.result(timeout=5) == "done"
        await eventually(lambda: len(seen) == 2)
        await eventually(lambda: len([s for s in exporter.get_finished_spans()
                                    if s.name.startswith("process")]) == 2)
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    assert {"workflow place_order", "step reserve", "step flaky", "process order.placed",
            "process shipment.created"} <= set(by_name)
    assert len({s.context.trace_id for s in spans}) == 1, [s.name for s in spans]
    run_span = by_name["workflow place_order"]
    assert parent(by_name["step reserve"]).span_id == run_span.context.span_id
    handler = by_name["process order.placed"]
    assert handler.kind == SpanKind.CONSUMER
    assert handler.attributes is not None
    assert handler.attributes["messaging.consumer.group.name"] == "shipping"
    assert handler.attributes["messaging.destination.name"] == "order.placed"
    assert parent(by_name["process shipment.created"]).span_id == handler.context.span_id
    assert len([s for s in spans if s.name == "step flaky"]) == 2  # one span per attempt


async def test_publish_span_is_the_parent_of_the_handler() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app, seen = build(OpenTelemetryHook(tracer_provider=provider))
    async with app:
        event = await app.publish("order.placed", {"id": 2})
        assert event.traceparent is not None
        await eventually(lambda: len(seen) == 2)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    publish = spans["publish order.placed"]
    assert publish.kind == SpanKind.PRODUCER
    assert parent(spans["process order.placed"]).span_id == publish.context.span_id


async def test_prometheus_metrics() -> None:
    hook = PrometheusHook()
    app, seen = build(hook)
    async with app:
        await (await app.start("place_order", {"id": 3})).result(timeout=5)
        await eventually(lambda: len(seen) == 2)
        await app.publish("nobody.listens", {})
        await hook.refresh(app)
    text = generate_latest(hook.registry).decode()
    assert 'cantata_runs_total{app="traced",status="completed",workflow="place_order"} 1.0' in text
    assert 'cantata_step_failed_attempts_total{app="traced",step="flaky"} 1.0' in text
    assert 'cantata_handler_duration_seconds_count{app="traced",group="shipping",outcome="done"}' \
        in text
    assert 'cantata_orphan_events{app="traced",type="nobody.listens"} 1.0' in text
    assert "cantata_stalled_transactions" in text and "cantata_outbox_lag_events" in text


class Paid(BaseModel):
    n: int


async def test_a_dead_letter_made_before_the_handler_ran_is_counted() -> None:
    """Bad data for a typed handler is dead-lettered at once: counted as the group's
    dead letter, as one reached after retries is."""
    hook = PrometheusHook()
    app = App("traced", store="memory://", poll_interval=0.05)
    app.add_hook(hook)

    @app.on("order.paid", group="ledger")
    async def book(event: Event[Paid]) -> None: ...

    async with app:
        await app.publish("order.paid", {"n": "not a number"})
        await eventually(lambda: app.metrics.dead_lettered == 1)
        assert [d.group for d in await app.dead_letters()] == ["ledger"]
    text = generate_latest(hook.registry).decode()
    assert 'cantata_dead_letters_total{app="traced",group="ledger"} 1.0' in text, text
    assert 'cantata_handler_duration_seconds_count{app="traced",group="ledger",outcome="dead"}' \
        in text


async def test_a_workflow_trigger_is_a_consumer_span_and_a_handler_of_its_group() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    prometheus = PrometheusHook()
    app = App("traced", store="memory://", poll_interval=0.05)
    app.add_hook(OpenTelemetryHook(tracer_provider=provider))
    app.add_hook(prometheus)
    done: list[int] = []

    @app.workflow
    async def fulfil(ctx: cantata.WorkflowContext, data: dict[str, Any]) -> None:
        done.append(data["id"])

    app.start_on("order.accepted", fulfil)
    async with app:
        await app.publish("order.accepted", {"id": 7})
        await eventually(lambda: done == [7])
    spans = [s for s in exporter.get_finished_spans()
             if s.kind == SpanKind.CONSUMER and s.name == "process order.accepted"]
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    text = generate_latest(prometheus.registry).decode()
    assert ('cantata_handler_duration_seconds_count{app="traced",group="start:fulfil",'
            'outcome="done"} 1.0') in text, text


async def test_an_event_two_handlers_emit_with_one_id_is_counted_once() -> None:
    """A choreographed saga's join: both handlers emit the very same event (one id), the
    store keeps it once, and the ``emitted`` hook and the published counter see it once."""
    await _join_counted_once("embedded://")


async def test_an_event_two_handlers_emit_with_one_id_is_counted_once_on_nats(
    broker_url: str,
) -> None:
    await _join_counted_once(broker_url)


async def _join_counted_once(broker: str) -> None:
    from cantata.engine.saga.choreographed import emit

    hook = PrometheusHook()
    app = App("traced", store="memory://", broker=broker, poll_interval=0.05)
    app.add_hook(hook)
    handled: list[str] = []

    async def join(event: Event[Any], ctx: cantata.HandlerContext) -> None:
        handled.append(ctx.group)
        await emit(ctx, "order.joined", {"run_id": "r1"}, cause=event)

    app.on("order.placed", group="left")(join)
    app.on("order.placed", group="right")(join)

    @app.on("order.joined", group="ship")
    async def ship(event: Event[Any]) -> None:
        handled.append("ship")

    async with app:
        await app.publish("order.placed", {"id": 1})
        await eventually(lambda: sorted(handled) == ["left", "right", "ship"])
    text = generate_latest(hook.registry).decode()
    assert ('cantata_events_published_total{app="traced",origin="handler",'
            'type="order.joined"} 1.0') in text, text
