"""The outbox relay: hands events committed to the store to an external broker.

At-least-once: events are marked published only after the broker accepted them,
so a crash in between republishes them; the broker drops ids it has seen
(JetStream ``Nats-Msg-Id``) and the store's inbox makes a late duplicate harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from cantata.broker.base import Broker, BrokerStore
from cantata.errors import EventsRefused, error_text
from cantata.model.codec import new_id
from cantata.model.event import Event
from cantata.model.records import DELIVERY_PENDING
from cantata.store.base import EVENTS, Settlement
from cantata.store.roles import EventStore

log = logging.getLogger("cantata.broker")


async def relay_once(
    store: BrokerStore,
    broker: Broker,
    app: str,
    limit: int = 500,
    on_relayed: Callable[[Sequence[Event[Any]]], None] | None = None,
) -> int:
    """Publish up to ``limit`` unpublished events of ``app``, oldest first.

    An event the broker refuses for good (too large, a type it cannot carry) never
    blocks the others: its pending deliveries are dead-lettered with the broker's
    reason and it leaves the outbox.

    Returns:
        How many events left the outbox (published, or refused and dead-lettered).
    """
    events = await store.unpublished_events(app, limit=limit)
    if not events:
        return 0
    refused: dict[str, str] = {}
    try:
        await broker.publish(app, events)
    except EventsRefused as exc:
        refused = exc.refused
        for event in events:
            if event.id in refused:
                await dead_letter_refused(store, app, event, refused[event.id])
    await store.mark_published(app, [e.id for e in events])
    if on_relayed is not None:
        on_relayed([e for e in events if e.id not in refused])
    return len(events)


async def dead_letter_refused(store: EventStore, app: str, event: Event[Any], reason: str) -> None:
    """Dead-letter every pending delivery of an event the broker refused."""
    groups = []
    for d in await store.deliveries(app, event.id):
        if d.status != DELIVERY_PENDING:
            continue
        settled = await store.settle_delivery(
            app, d.group, event.id,
            Settlement("dead", d.attempts, error=reason, dead_letter_id=new_id()),
        )
        if settled:
            groups.append(d.group)
    log.warning(
        "the broker refused event %s of type %.80s (%s); dead-lettered for %s",
        event.id, event.type, reason,
        f"group(s) {', '.join(groups)}" if groups else "no group (none had it pending)",
    )


class OutboxRelay:
    """Runs :func:`relay_once` for one app until stopped.

    It runs at once when the store reports new events in this process and polls
    every ``poll_interval`` seconds for events committed by other processes. When
    the broker is unreachable it logs once and keeps trying.
    """

    def __init__(
        self,
        store: BrokerStore,
        broker: Broker,
        app: str,
        *,
        poll_interval: float = 0.2,
        batch: int = 500,
        on_relayed: Callable[[Sequence[Event[Any]]], None] | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.app = app
        self.poll_interval = poll_interval
        self.batch = batch
        self.on_relayed = on_relayed
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = False
        self._failing = False

    async def start(self) -> None:
        """Start relaying in a background task (call from a running event loop)."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        if not self._listening:  # the store cannot drop listeners: add ours once
            self.store.add_listener(self._on_change)
            self._listening = True
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"cantata-relay:{self.app}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop relaying; a batch being published is finished (and marked) first and,
        unless the broker was failing, what the outbox holds then is sent too (so a
        client that publishes and exits delivers), within ``timeout`` seconds."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wakeup.set()
        try:
            await asyncio.wait_for(task, timeout)
            if not self._failing:
                await asyncio.wait_for(self._drain(), timeout)
        except TimeoutError:
            log.warning("outbox relay of app %s did not stop in %ss", self.app, timeout)
        except Exception as exc:  # the events stay in the outbox for the next relay
            log.warning("outbox relay of app %s: last publish failed (%s)", self.app,
                        error_text(exc))

    async def _drain(self) -> None:
        while await relay_once(self.store, self.broker, self.app, self.batch) >= self.batch:
            pass

    def wake(self) -> None:
        """Relay now rather than at the next poll (safe from any thread)."""
        loop = self._loop
        if loop is None or self._task is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wakeup.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(self._wakeup.set)

    def _on_change(self, channel: str) -> None:
        if channel == EVENTS:
            self.wake()

    async def _run(self) -> None:
        failing = self._failing = False
        while not self._stopping.is_set():
            self._wakeup.clear()
            try:
                count = await relay_once(
                    self.store, self.broker, self.app, self.batch, self.on_relayed
                )
            except Exception as exc:
                if not failing:
                    log.warning(
                        "outbox relay of app %s failed (%s); retrying", self.app, error_text(exc)
                    )
                failing = self._failing = True
                count = 0
            else:
                if failing:
                    log.info("outbox relay of app %s works again", self.app)
                failing = self._failing = False
            if count >= self.batch:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_interval)
