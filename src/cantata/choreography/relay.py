"""The outbox relay: hands events committed to the store to an external broker.

At-least-once: events are marked published only after the broker accepted them,
so a crash in between republishes them; the broker drops ids it has seen
(JetStream ``Nats-Msg-Id``) and the store's inbox makes a late duplicate harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from cantata.broker.base import Broker, BrokerStore
from cantata.errors import BrokerNotConnected, EventsRefused, error_text
from cantata.graceful import finish_unless
from cantata.model.codec import new_id
from cantata.model.event import Event
from cantata.model.records import DELIVERY_PENDING, DeliveryOutcome
from cantata.store.base import EVENTS, Settlement
from cantata.store.roles import EventStore
from cantata.store.roles.lifecycle import idle_wait

log = logging.getLogger("cantata.broker")

# Batches of published ids a relay keeps to drop a late offer of one (OutboxRelay._sent).
SENT_KEPT = 4


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
            Settlement(DeliveryOutcome.DEAD, d.attempts, error=reason, dead_letter_id=new_id()),
        )
        if settled:
            groups.append(d.group)
    log.warning(
        "the broker refused event %s of type %.80s (%s); dead-lettered for %s",
        event.id, event.type, reason,
        f"group(s) {', '.join(groups)}" if groups else "no group (none had it pending)",
    )


class OutboxRelay:
    """Runs the outbox relay for one app until stopped.

    Events this process commits are offered to it (:meth:`offer`) and published at
    once, without reading the outbox first; it also reads the outbox when the store
    reports new events, for events committed by other processes (or offered to a relay
    that was down): every ``poll_interval`` seconds besides, or, while the store hears
    other processes' commits (PostgreSQL's ``listening``), only after a safety-net wait
    (``idle_wait``; docs/performance.md, "Idle workers"), and every ``poll_interval``
    while the broker fails. Events are
    marked published in batches, up to ``mark_delay`` seconds after the broker took
    them, so that marking costs no commit per hop: if the process dies before the
    mark, they are published again, and the broker drops the ids it has seen (and the
    inbox makes a later duplicate harmless); a due mark goes before an outbox read, so
    that the read does not return (and decode) them again. After a pass that published
    offered events, the next outbox read waits up to ``read_delay`` seconds, or up to
    ``mark_delay`` when the last read found nothing that was not offered; a commit heard
    while that read is put off, whose events were offered as their committer resumed,
    wakes no pass at all (a hop here is not followed by a turn of the relay's task). An
    offered event every delivery of which this worker holds (the broker's
    ``held_here``: handed off here, nobody else waits for it) is published up to
    ``offer_delay`` seconds later, in a batch, so that publishing stays off the hops
    that handle it here. An outbox
    read returns the oldest ``batch`` unpublished events, those it knows (offered,
    published but not yet marked) skipped: one that was not offered is found once
    what is before it left the outbox. An event read and published before its
    committer offered it (the commit's notification came first) is not published
    again by that offer. When the broker is unreachable it logs once and keeps
    trying.
    """

    def __init__(
        self,
        store: BrokerStore,
        broker: Broker,
        app: str,
        *,
        poll_interval: float = 0.2,
        batch: int = 500,
        mark_delay: float = 0.05,
        read_delay: float = 0.005,
        offer_delay: float = 0.05,
        on_relayed: Callable[[Sequence[Event[Any]]], None] | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.app = app
        self.poll_interval = poll_interval
        self.batch = batch
        self.mark_delay = mark_delay
        self.on_relayed = on_relayed
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = False
        self._failing = False
        self._fresh: list[Event[Any]] = []  # offered, not yet published
        self.offer_delay = offer_delay
        self._later: list[Event[Any]] = []  # offered and held here: published soon
        self._later_since = 0.0
        # wakes the relay when they are due; cancelled when a pass publishes them first
        # (a full batch, or a wait that ended then), so that it wakes no pass that
        # finds nothing offered and reads the outbox for nothing
        self._later_timer: asyncio.TimerHandle | None = None
        self._unmarked: dict[str, None] = {}  # published, not yet marked (in order)
        # Published lately, marked or not: an event this process committed may be read
        # from the outbox and published (and marked) before its committer resumes to
        # offer it (its commit's notification came first, under load by far); that
        # offer then publishes nothing. Each id is offered once: it is forgotten then,
        # and the oldest beyond ``SENT_KEPT`` batches (events never offered here).
        self._sent: dict[str, None] = {}
        self._unmarked_since = 0.0
        self.read_delay = read_delay
        self._read_after = 0.0  # monotonic time: a pass with offered events reads then
        self._read_pending = False
        self._offered = False  # events offered since the last pass (published now or soon)
        self._offers = 0  # offers made so far (a commit heard looks whether one followed)
        self._heard_due = False  # a look after a commit heard is scheduled (_after_heard)
        self._heard_offers = 0  # ``_offers`` when that commit was heard
        self._waiting: asyncio.Timeout | None = None  # the wait between passes, if waiting

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
        client that publishes and exits delivers), within ``timeout`` seconds. A broker
        not reached yet (it said so at open) leaves the events in the outbox without
        another warning, even if the relay had no pass to find that out before; so does
        a broker that is gone (a NATS client reconnecting), at once: the stop does not
        wait out its publish timeouts."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wakeup.set()
        try:
            # A broker that is gone (not connected now) cannot take the batch under way
            # or the rest: it is not waited for (its publish would end in a timeout); the
            # events stay in the outbox, and what was published and not yet marked is
            # published again by the next relay (the broker drops the ids it has seen).
            ended = await finish_unless({task}, timeout, self._broker_gone)
            if not ended and not self._broker_gone():
                raise TimeoutError
            async with asyncio.timeout(timeout):  # (not wait_for: a cancel is never lost)
                await self._mark(force=True)
            if ended and not self._failing and not self._broker_gone():
                drain = asyncio.ensure_future(self._drain())
                if not await finish_unless({drain}, timeout, self._broker_gone):
                    if not self._broker_gone():
                        raise TimeoutError
                    return
                drain.result()  # (what it raised)
        except TimeoutError:
            log.warning("outbox relay of app %s did not stop in %ss", self.app, timeout)
        except BrokerNotConnected:
            pass  # (the broker said so once at open: the events wait in the outbox)
        except Exception as exc:  # the events stay in the outbox for the next relay
            log.warning("outbox relay of app %s: last publish failed (%s)", self.app,
                        error_text(exc))
        finally:
            self._fresh.clear()
            self._later.clear()
            self._cancel_later_timer()
            self._unmarked.clear()
            self._sent.clear()

    def _broker_gone(self) -> bool:
        """Whether the broker says it is not connected now (a NATS client reconnecting,
        or not reached yet); a broker that cannot tell is taken for connected."""
        reachable = getattr(self.broker, "reachable", None)  # (NatsBroker)
        return reachable is not None and not reachable

    def _cancel_later_timer(self) -> None:
        if self._later_timer is not None:
            self._later_timer.cancel()
            self._later_timer = None

    async def _drain(self) -> None:
        while await relay_once(self.store, self.broker, self.app, self.batch) >= self.batch:
            pass

    def offer(self, events: Sequence[Event[Any]]) -> None:
        """Events this process has just committed: publish them now (from the event
        loop the relay runs on)."""
        if self._task is None or not events:
            return
        self._offers += 1
        sent = self._sent
        if sent:
            late = {e.id for e in events if e.id in sent}
            if late:  # published already: read from the outbox before this offer
                for i in late:
                    del sent[i]
                events = [e for e in events if e.id not in late]
                if not events:
                    return  # (a commit heard for them needs no pass: _after_heard)
        self._offered = True
        held_here = getattr(self.broker, "held_here", None)  # (NatsBroker)
        if held_here is not None and self.offer_delay > 0:
            now = [e for e in events if not held_here(e.id)]
            if len(now) < len(events):
                ids = {e.id for e in now}
                if not self._later:
                    self._later_since = time.monotonic()
                    if self._loop is not None:
                        self._later_timer = self._loop.call_later(self.offer_delay,
                                                                  self.wake)
                self._later.extend(e for e in events if e.id not in ids)
                if len(self._later) >= self.batch:
                    self.wake()
            events = now
            if not events:
                return
        self._fresh.extend(events)
        self.wake()

    def wake(self) -> None:
        """Relay now rather than at the next poll (safe from any thread)."""
        loop = self._loop
        if loop is None or self._task is None:
            return
        if _running_loop() is loop:
            self._wakeup.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(self._wakeup.set)

    def _on_change(self, channel: str) -> None:
        if channel != EVENTS:
            return
        loop = self._loop
        if (self._waiting is None or self._task is None or loop is None
                or _running_loop() is not loop):
            self.wake()  # (a pass under way sees it: it runs again)
            return
        # Most often a commit of this process whose committer offers what it stored once
        # it resumes, right after this notification: a callback looks then whether the
        # relay has anything to do, rather than a pass of the relay's task per hop.
        if not self._heard_due:
            self._heard_due = True
            self._heard_offers = self._offers
            loop.call_soon(self._after_heard)

    def _after_heard(self) -> None:
        """After a commit heard while waiting: wake the relay, unless what the commit
        stored was offered since (as a pass would find, :meth:`_pass`) and there is
        nothing to do but the outbox read put off until ``_read_after``: the wait then
        ends by that time, no pass now."""
        self._heard_due = False
        waiting = self._waiting
        if waiting is None or self._wakeup.is_set():
            return  # a pass is under way or due: it sees what was offered
        now = time.monotonic()
        later_due = bool(self._later) and now - self._later_since >= self.offer_delay
        if (self._offers == self._heard_offers or self._fresh or later_due
                or now >= self._read_after):
            self.wake()
            return
        self._offered = False  # (taken into account, as a pass takes it)
        self._read_pending = True
        deadline = asyncio.get_running_loop().time() + (self._read_after - now)
        when = waiting.when()
        if when is None or when > deadline:
            waiting.reschedule(deadline)

    async def _pass(self) -> int:
        """Publish what was offered, then what the outbox holds besides; mark what is
        due. Returns how many events the outbox read gave."""
        if not (self._offered or self._fresh):
            # Woken by a commit of this process, most likely: its notification comes
            # before the committer resumes to offer what it stored, and a relay that was
            # running already (a pass that yielded, a timer) runs first. A loop turn lets
            # the committer offer them, so that this pass does not read the outbox for
            # them (it reads it all the same when nothing was offered).
            await asyncio.sleep(0)
        if self._later and (len(self._later) >= self.batch or
                            time.monotonic() - self._later_since >= self.offer_delay):
            self._fresh.extend(self._later)
            self._later = []
            self._cancel_later_timer()
        # Offered since the last pass, held ones (published a moment later) included:
        # the commit that woke this pass most likely stored just those.
        offered, self._offered = self._offered or bool(self._fresh), False
        if self._fresh:
            # Let handlers handed these events in this process start (and queue their
            # commits) before the publishing takes the event loop.
            await asyncio.sleep(0)
            # If this fails they are not lost: the outbox read below finds them later.
            fresh, self._fresh = self._fresh, []
            await self._publish([e for e in fresh if e.id not in self._sent])
        now = time.monotonic()
        if offered and now < self._read_after:
            # The commit that woke this pass most likely stored just what was offered:
            # the read (for what else it stored) waits a moment, so that a chain of
            # hops pays one read per read_delay instead of one per hop.
            self._read_pending = True
            await self._mark()
            return 0
        self._read_pending = False
        # Marked first when due: the read returns the published but unmarked events
        # too (to skip them), decoded for nothing.
        await self._mark()
        skip: dict[str, None] | set[str] = self._unmarked
        if self._later:  # (published soon: not now by this read)
            skip = set(self._unmarked) | {e.id for e in self._later}
        # The oldest ``batch`` only, not as many more as it skips: in a busy process
        # the outbox is mostly what was offered (held back, or not yet marked), and
        # reading (decoding) all of it cost about one event decode per event. An event
        # that was not offered is found all the same: what it is behind leaves the
        # outbox within offer_delay + mark_delay, and a later read returns it.
        events = await self.store.unpublished_events(self.app, limit=self.batch)
        if self._fresh or self._later:
            # offered while the read ran (its commit's notification came first): they
            # go out with the offered ones, not twice, and the held ones a moment later
            skip = set(skip) | {e.id for e in self._fresh} | {e.id for e in self._later}
        events = [e for e in events if e.id not in skip][: self.batch]
        # A read that found only what was offered (the usual case in a process that
        # serves and relays its own events) waits longer before the next one after
        # offered events: up to mark_delay rather than read_delay.
        self._read_after = now + (self.read_delay if events else self.mark_delay)
        await self._publish(events)
        await self._mark()
        return len(events)

    async def _publish(self, events: list[Event[Any]]) -> None:
        if not events:
            return
        refused: dict[str, str] = {}
        try:
            await self.broker.publish(self.app, events)
        except EventsRefused as exc:
            refused = exc.refused
            for event in events:
                if event.id in refused:
                    await dead_letter_refused(self.store, self.app, event, refused[event.id])
        if not self._unmarked:
            self._unmarked_since = time.monotonic()
        ids = dict.fromkeys(e.id for e in events)
        self._unmarked.update(ids)
        sent = self._sent
        sent.update(ids)
        if len(sent) > SENT_KEPT * self.batch:
            for i in list(itertools.islice(sent, len(sent) - SENT_KEPT * self.batch)):
                del sent[i]
        if self.on_relayed is not None:
            self.on_relayed([e for e in events if e.id not in refused])

    async def _mark(self, *, force: bool = False) -> None:
        """Mark published what the broker took, once ``mark_delay`` has passed since the
        first of them (or a batch is full)."""
        if not self._unmarked:
            return
        if (not force and len(self._unmarked) < self.batch
                and time.monotonic() - self._unmarked_since < self.mark_delay):
            return
        ids = list(self._unmarked)
        try:
            await self.store.mark_published(self.app, ids)
        finally:  # failed: they are read and published again (the broker drops them)
            for i in ids:
                self._unmarked.pop(i, None)
            self._unmarked_since = time.monotonic()

    def _wait_time(self) -> float:
        now, wait = time.monotonic(), self.poll_interval
        if not self._failing:  # (a failing broker is tried again every poll_interval)
            wait = idle_wait(self.store, wait)
        if self._unmarked:
            wait = min(wait, self._unmarked_since + self.mark_delay - now)
        if self._read_pending:
            wait = min(wait, self._read_after - now)
        if self._later:
            wait = min(wait, self._later_since + self.offer_delay - now)
        return max(0.0, wait)

    async def _run(self) -> None:
        self._failing = False
        warned = False  # this failing streak was reported
        while not self._stopping.is_set():
            self._wakeup.clear()
            try:
                count = await self._pass()
            except Exception as exc:
                # a broker still being connected at open said so once already
                if not warned and not isinstance(exc, BrokerNotConnected):
                    log.warning(
                        "outbox relay of app %s failed (%s); retrying", self.app, error_text(exc)
                    )
                    warned = True
                self._failing = True
                count = 0
            else:
                if warned:
                    log.info("outbox relay of app %s works again", self.app)
                self._failing = warned = False
            if count >= self.batch:
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wait_time()) as waiting:  # (no task)
                    self._waiting = waiting
                    try:
                        await self._wakeup.wait()
                    finally:
                        self._waiting = None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
