"""Prometheus metrics (``pip install 'cantata[metrics]'``).

    from cantata.observability.metrics import PrometheusHook
    metrics = PrometheusHook()
    app.add_hook(metrics)
    await metrics.refresh(app)      # now and then: stalled transactions, outbox lag

Exposes runs by status, step and handler latency histograms, failed attempts,
dead letters, orphan events, stalled transactions, the outbox lag and, per queue,
runs waiting, in progress, begun in the rate window and the age of the oldest
waiting (the figures of ``cantata queues``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cantata.engine.hooks import Hook
from cantata.errors import ConfigurationError
from cantata.model.event import Event
from cantata.model.records import DeliveryOutcome, RunRecord

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ConfigurationError(
        f"prometheus_client is not installed ({exc}): pip install 'cantata[metrics]'"
    ) from None

if TYPE_CHECKING:
    from cantata.app import App

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class PrometheusHook(Hook):
    """Records Cantata's metrics in ``registry`` (default: a new one, see ``.registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.runs = Counter("cantata_runs_total", "Runs that ended, by final status",
                            ["app", "workflow", "status"], registry=r)
        self.step_seconds = Histogram("cantata_step_duration_seconds",
                                      "Duration of step attempts", ["app", "step", "outcome"],
                                      buckets=_BUCKETS, registry=r)
        self.step_failures = Counter("cantata_step_failed_attempts_total",
                                     "Step attempts that raised (each is retried or fails the "
                                     "step)", ["app", "step"], registry=r)
        self.handler_seconds = Histogram("cantata_handler_duration_seconds",
                                         "Duration of handler attempts",
                                         ["app", "group", "outcome"], buckets=_BUCKETS,
                                         registry=r)
        self.handler_retries = Counter("cantata_handler_retries_total",
                                       "Handler attempts that will be retried", ["app", "group"],
                                       registry=r)
        self.dead_letters = Counter("cantata_dead_letters_total", "Deliveries dead-lettered",
                                    ["app", "group"], registry=r)
        self.published = Counter("cantata_events_published_total",
                                 "Events committed to the log, by origin: publish (app.publish), "
                                 "workflow (ctx.emit) or handler (a handler's ctx.emit)",
                                 ["app", "type", "origin"], registry=r)
        self.relayed_total = Counter("cantata_events_relayed_total",
                               "Events the outbox relay handed to the external broker",
                               ["app", "type"], registry=r)
        self.orphans = Gauge("cantata_orphan_events", "Orphan events seen by this process",
                             ["app", "type"], registry=r)
        self.stalled = Gauge("cantata_stalled_transactions",
                             "Transactions with no progress, by reason", ["app", "reason"],
                             registry=r)
        self.outbox_lag = Gauge("cantata_outbox_lag_events",
                                "Events committed but not yet handed to the external broker",
                                ["app"], registry=r)
        self.queue_waiting = Gauge("cantata_queue_waiting_runs", "Runs waiting in a queue",
                                   ["app", "queue"], registry=r)
        self.queue_in_progress = Gauge("cantata_queue_in_progress_runs",
                                       "Runs of a queue begun and not ended",
                                       ["app", "queue"], registry=r)
        self.queue_rate = Gauge("cantata_queue_recent_begins",
                                "Runs of a queue begun in its rate window (60 s without a "
                                "rate)", ["app", "queue"], registry=r)
        self.queue_oldest = Gauge("cantata_queue_oldest_waiting_seconds",
                                  "Age of the oldest run waiting in a queue (0: none)",
                                  ["app", "queue"], registry=r)

    def run_finished(self, run: RunRecord, status: str, error: str | None) -> None:
        self.runs.labels(run.app, run.workflow, status).inc()

    def step_finished(self, run: RunRecord, name: str, attempt: int, seconds: float,
                      error: BaseException | None) -> None:
        outcome = "ok" if error is None else "error"
        self.step_seconds.labels(run.app, name, outcome).observe(seconds)
        if error is not None:
            self.step_failures.labels(run.app, name).inc()

    def handler_finished(self, group: str, event: Event[Any], seconds: float,
                         outcome: DeliveryOutcome, error: str | None) -> None:
        app = self.app_name
        self.handler_seconds.labels(app, group, outcome).observe(seconds)
        if outcome == DeliveryOutcome.RETRY:
            self.handler_retries.labels(app, group).inc()
        elif outcome == DeliveryOutcome.DEAD:
            self.dead_letters.labels(app, group).inc()

    def publish(self, event: Event[Any]) -> None:
        self.published.labels(self.app_name, event.type, "publish").inc()

    def emitted(self, events: Sequence[Event[Any]], origin: str) -> None:
        for event in events:
            self.published.labels(self.app_name, event.type, origin).inc()

    def relayed(self, events: Sequence[Event[Any]]) -> None:
        for event in events:
            self.relayed_total.labels(self.app_name, event.type).inc()

    async def refresh(self, app: App, *, stalled_after: float = 300.0) -> None:
        """Update the gauges that need the store: stalled transactions, outbox lag, orphans."""
        counts: dict[str, int] = {}
        for stall in await app.stalled(older_than=stalled_after):
            counts[stall.reason] = counts.get(stall.reason, 0) + 1
        from cantata.observability.stalled import QUEUED, REASONS

        for reason in (*REASONS, QUEUED):
            self.stalled.labels(app.name, reason).set(counts.get(reason, 0))
        lag = len(await app.store.unpublished_events(app.name, limit=100_000))
        broker = app._broker
        self.outbox_lag.labels(app.name).set(lag if broker and broker.relays_outbox else 0)
        for event_type, n in app.metrics.orphans.items():
            self.orphans.labels(app.name, event_type).set(n)
        now = app.clock.now()
        for q in await app.queue_stats():
            self.queue_waiting.labels(app.name, q.name).set(q.waiting)
            self.queue_in_progress.labels(app.name, q.name).set(q.in_progress)
            self.queue_rate.labels(app.name, q.name).set(q.began_last_window)
            oldest = 0.0 if q.oldest_waiting_at is None else max(now - q.oldest_waiting_at, 0.0)
            self.queue_oldest.labels(app.name, q.name).set(oldest)
        self.refreshed_at = time.time()
