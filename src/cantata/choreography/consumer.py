"""Runs handlers for the messages a broker delivers: validation, retries, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import pydantic

from cantata.broker.base import Broker, BrokerMessage, Subscription, stored_emitted
from cantata.declare.defs import Parameters
from cantata.errors import CantataError, WorkerLost, error_text
from cantata.fencing import BodyFenced, guarded
from cantata.graceful import wait_or_force
from cantata.model import codec
from cantata.model.event import Event, matches
from cantata.model.records import DeliveryOutcome
from cantata.model.retry import HANDLER_RETRY
from cantata.store.faults import wait_out

from .context import HandBack, HandlerContext
from .host import ConsumerHost
from .logcontext import handler_context

if TYPE_CHECKING:
    from cantata.declare.defs import HandlerDef, TriggerDef

log = logging.getLogger("cantata.consumer")
T = TypeVar("T")


def validation_text(exc: pydantic.ValidationError) -> str:
    """``ValidationError: field 'x': message; ...`` naming every bad field."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(data)"
        parts.append(f"field {loc!r}: {err['msg']}")
    return f"ValidationError: {'; '.join(parts)}"


class Consumer:
    """Subscribes each handler group (and each workflow trigger) of this process.

    It talks to the worker through ``host`` (:class:`~cantata.choreography.host.
    ConsumerHost`), never to the engine itself (docs/architecture.md).
    """

    def __init__(
        self,
        host: ConsumerHost,
        broker: Broker,
        *,
        on_emitted: Callable[[list[Event[Any]]], None],
        concurrency: int = 64,
    ) -> None:
        self.host = host
        self.broker = broker
        self.on_emitted = on_emitted
        self.concurrency = concurrency
        self._subs: list[Subscription] = []
        self._active: set[asyncio.Task[Any]] = set()  # tasks running a delivery here
        self._cutting = False  # a stop past its grace is cancelling handlers
        self.cut_short = 0  # handlers a stop cancelled past its grace
        # of which: handlers that had finished, their outcome not stored yet (_settle)
        self.unstored = 0
        self._settling: set[asyncio.Task[Any]] = set()

    def groups(self) -> dict[str, list[str]]:
        """group -> patterns, for the handlers and triggers this process serves."""
        router = self.host.router
        out: dict[str, list[str]] = {}
        for h in router.handlers:
            if self.host.serves(h):
                out.setdefault(h.group, []).append(h.pattern)
        for t in router.triggers:
            if self.host.serves(t):
                out.setdefault(t.group, []).append(t.pattern)
        return out

    async def start(self) -> None:
        for group, patterns in self.groups().items():
            sub = await self.broker.subscribe(
                self.host.app, group, sorted(set(patterns)), self._handler_for(group),
                worker_id=self.host.worker_id, concurrency=self.concurrency,
            )
            self._subs.append(sub)

    async def stop(
        self, deadline: float | None = None, force: asyncio.Event | None = None
    ) -> None:
        """Stop receiving; handlers in progress finish until ``deadline`` (loop time;
        ``None``: without limit) or ``force``, then are cancelled and their messages
        handed back at once (docs/leases.md)."""
        stopping = asyncio.ensure_future(
            asyncio.gather(*(sub.stop() for sub in self._subs), return_exceptions=True)
        )
        if deadline is not None:
            stopped = asyncio.Event()
            stopping.add_done_callback(lambda _: stopped.set())
            await wait_or_force(stopped, deadline, force or asyncio.Event())
            if not stopping.done() and self._active:
                unstored = len(self._active & self._settling)
                log.warning("stopping: %d handler(s) still running after the grace%s; "
                            "cancelling them and handing their events back",
                            len(self._active), f" ({unstored} of them finished, their "
                            "outcome not stored: the store did not answer)" if unstored
                            else "")
                self._cutting = True
                self.cut_short += len(self._active)
                self.unstored += unstored
                for task in list(self._active):
                    task.cancel()
        await stopping
        self._subs.clear()

    def _handler_for(self, group: str) -> Callable[[BrokerMessage], Awaitable[None]]:
        async def handle(msg: BrokerMessage) -> None:
            await self.handle(group, msg)

        return handle

    async def handle(self, group: str, msg: BrokerMessage) -> None:
        """Process one delivery end to end; never raises for a handler's failure."""
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            await self._handle(group, msg)
        except asyncio.CancelledError:
            if self._cutting and not getattr(msg, "settled", False):
                # Cut short by a stop: hand the event back now rather than after the
                # broker's redelivery timeout.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await msg.retry("Interrupted: the worker stopped before the handler "
                                        "finished", 0.0)
            raise
        finally:
            if task is not None:
                self._active.discard(task)

    async def _handle(self, group: str, msg: BrokerMessage) -> None:
        if msg.event is None:
            log.warning("group %s got an invalid message: %s", group, msg.error)
            self.host.metrics.dead_lettered += 1
            await msg.dead(f"InvalidEvent: {msg.error}")
            return
        event = msg.event
        trigger = next(
            (t for t in self.host.router.triggers
             if t.group == group and matches(t.pattern, event.type)),
            None,
        )
        hdef = None if trigger is not None else self.host.router.handler_for(group, event.type)
        if trigger is None and hdef is None:
            try:
                stray = self.host.stray(group, event)
            except HandBack as back:
                await self._hand_back(msg, event, back)
                return
            if stray is not None:
                log.warning("dead-lettering event %s for group %s: %s", event.id, group, stray)
                await self._dead(group, msg, event, stray)
                return
            await msg.complete()
            return
        refused = self.host.signature_problem(
            event, required=hdef is not None and hdef.require_signature
        )
        if refused is not None:
            log.warning("dead-lettering event %s for group %s: %s", event.id, group, refused)
            await self._dead(group, msg, event, error_text(refused))
            return
        if trigger is not None:
            misfit = self._misfit(trigger, event)
            if misfit is not None:  # (data that cannot get better: not retried)
                log.warning("dead-lettering event %s for group %s: %s", event.id, group,
                            misfit)
                await self._dead(group, msg, event, misfit)
                return
            await self._start_run(trigger, msg, event)
            return
        assert hdef is not None
        await self._run_handler(hdef, msg, event)

    async def _dead(self, group: str, msg: BrokerMessage, event: Event[Any], error: str) -> None:
        """Dead-letter a delivery its handler never ran for (a refused signature, bad
        data for a typed handler, too many workers lost): counted, and told to the hooks
        as a handler's dead outcome (``cantata_dead_letters_total``), in 0 s."""
        self.host.metrics.dead_lettered += 1
        await msg.dead(error)
        hooks = self.host.hooks
        if hooks:
            hooks.notify("handler_finished", group, event, 0.0, DeliveryOutcome.DEAD, error)

    def _misfit(self, trigger: TriggerDef, event: Event[Any]) -> str | None:
        """Why ``event``'s data cannot be the argument of the run ``trigger`` starts (its
        workflow's code is here and declares a type the data does not match, as the
        run's worker would restore it), as a typed handler's bad data is named;
        ``None`` when it fits, or nothing is declared to check it against."""
        wdef = self.host.router.workflows.get(trigger.workflow)
        if wdef is None or wdef.sig.plain:
            return None
        try:  # (as the run's arguments are stored: bytes as their base64 text)
            args = orjson.loads(codec.dumps([event.data], "event data"))
        except CantataError:  # (the run's creation says why, as before)
            return None
        found = wdef.sig.mismatch(args)
        if found is None:
            return None
        i, declared, exc = found
        return (f"{validation_text(exc)} (event data as workflow {wdef.name!r} "
                f"{Parameters.named(wdef).argument(i)}, declared "
                f"{codec.type_name(declared)}: no run was started)")

    async def _start_run(self, trigger: TriggerDef, msg: BrokerMessage, event: Event[Any]) -> None:
        """A workflow trigger's delivery: the run started (once: keyed by the event),
        wrapped and reported to the hooks as a handler of the trigger's group is."""
        hooks = self.host.hooks
        started = time.perf_counter()
        with hooks.handler(trigger.group, event, msg.attempt):
            try:
                # Waited out like a settlement (an outage, a full disk): the creation is
                # keyed by the event, so trying it again changes nothing once it is
                # stored, and a store away is no failure of the trigger's.
                await self._settle(lambda: self.host.start_run(trigger, event))
            except Exception as exc:
                outcome = await self._failed(msg, HANDLER_RETRY, exc, retryable=True)
                if hooks:
                    hooks.notify("handler_finished", trigger.group, event,
                                 time.perf_counter() - started, outcome, error_text(exc))
                return
            await msg.complete()
            if hooks:
                hooks.notify("handler_finished", trigger.group, event,
                             time.perf_counter() - started, DeliveryOutcome.DONE, None)

    async def _run_handler(self, hdef: HandlerDef, msg: BrokerMessage, event: Event[Any]) -> None:
        retry = hdef.retry
        if msg.attempt > retry.max_attempts:
            lost = WorkerLost(
                f"handler {hdef.name} of group {hdef.group} was cut short {msg.attempt - 1} "
                "time(s) by a worker crash"
            )
            await self._dead(hdef.group, msg, event, error_text(lost))
            return
        if hdef.model is not None:
            try:
                data = codec.validate(hdef.model, event.data)
            except pydantic.ValidationError as exc:
                await self._dead(hdef.group, msg, event, validation_text(exc))
                return
            event = event.with_data(data)
        ctx = self.host.handler_context(hdef, event)
        ctx.attempt = msg.attempt
        slot = (None if hdef.concurrency is None  # (no slot to wait for, nor coroutines)
                else await self.host.take_slot(hdef, event.id, msg.extend))
        try:
            await self._invoke(hdef, msg, event, ctx, retry)
        finally:
            if slot is not None:
                await self.host.release_slot(hdef, slot)

    async def _invoke(
        self, hdef: HandlerDef, msg: BrokerMessage, event: Event[Any], ctx: HandlerContext,
        retry: Any,
    ) -> None:
        hooks = self.host.hooks
        started = time.perf_counter()
        with hooks.handler(hdef.group, event, msg.attempt), \
                handler_context(event.id, hdef.group, msg.attempt):
            try:
                # Guarded: never resumed past a pause of this worker longer than the
                # fence, when another worker may have the delivery (docs/leases.md).
                fenced = self.host.pause_fence(getattr(msg, "held_by_lease", False))
                stall = self.host.lease * 0.75
                if hdef.is_async:
                    body = hdef.fn(event, ctx) if hdef.wants_ctx else hdef.fn(event)
                    await guarded(body, fenced, stall)
                else:
                    args = (event, ctx) if hdef.wants_ctx else (event,)
                    await guarded(asyncio.to_thread(hdef.fn, *args), fenced, stall)
            except HandBack as back:
                await self._hand_back(msg, event, back)
                return
            except BodyFenced:
                # Not a failure: hand the event back (refused if another worker has it),
                # for after a lease: not to this worker again before its heartbeat has
                # got through, which would stop it again at once.
                with contextlib.suppress(Exception):
                    await msg.retry("Paused: the worker was paused past its lease before "
                                    "the handler finished", self.host.lease)
                return
            except Exception as exc:
                outcome = await self._failed(msg, retry, exc, retryable=retry.is_retryable(exc))
                if hooks:
                    hooks.notify("handler_finished", hdef.group, event,
                                 time.perf_counter() - started, outcome, error_text(exc))
                return
            completed = await self._settle(lambda: msg.complete(ctx.emitted))
            if hooks:
                hooks.notify("handler_finished", hdef.group, event,
                             time.perf_counter() - started, DeliveryOutcome.DONE, None)
        if completed:
            self.host.metrics.handled += 1
            # what this settlement stored: not an event another handler emitted with
            # the same id first (a choreographed saga's join), counted once
            emitted = stored_emitted(msg, ctx.emitted) if ctx.emitted else []
            if emitted:
                self.on_emitted(emitted)
                if hooks:
                    hooks.notify("emitted", emitted, "handler")
                # (best-effort: the delivery is settled, a failed check is logged, rate-
                # limited, and tried again with the next emit)
                await self.host.report_orphans(emitted)

    async def _hand_back(self, msg: BrokerMessage, event: Event[Any], back: HandBack) -> None:
        """Hand the delivery back to its group for another worker (:class:`HandBack`):
        not an attempt (its claim counted one, taken back here), due again after a
        delay that grows with the event's age (0.2 s for a fresh one, at most 30 s), so
        a delivery that waits long for a worker of its kind costs little."""
        age = max(0.0, time.time() - event.timestamp)
        text, delay = error_text(back), min(30.0, max(0.2, age / 10))
        hand_back = getattr(msg, "hand_back", None)  # (the embedded broker's: see there)
        if hand_back is not None:
            await self._settle(lambda: hand_back(text, delay))
            return
        msg.attempt = max(0, msg.attempt - 1)
        await self._settle(lambda: msg.retry(text, delay))

    async def _failed(
        self, msg: BrokerMessage, retry: Any, exc: Exception, *, retryable: bool
    ) -> DeliveryOutcome:
        """Retry or dead-letter the message; returns which."""
        text = error_text(exc)
        self.host.metrics.handler_failures += 1
        if retryable and msg.attempt < retry.max_attempts:
            self.host.metrics.retries += 1
            await self._settle(lambda: msg.retry(text, retry.delay(msg.attempt)))
            return DeliveryOutcome.RETRY
        else:
            log.warning("dead-lettering %s for group %s: %s", msg.event and msg.event.type,
                        msg.group, text)
            self.host.metrics.dead_lettered += 1
            await self._settle(lambda: msg.dead(text))
            return DeliveryOutcome.DEAD

    async def _settle(self, record: Callable[[], Awaitable[T]]) -> T:
        """Record a handler's outcome, waiting out a store outage or a full disk: the
        handler ran, and running it again because its commit failed would repeat its
        side effects (the delivery stays this live worker's meanwhile). A stop past its
        grace hands the event back instead (counted in ``unstored``)."""
        task = asyncio.current_task()  # (the delivery's task, in self._active)
        assert task is not None
        self._settling.add(task)
        try:
            return await wait_out(
                record, quiet=self.host.quiet, key="handler-settle",
                what="recording handler outcomes", give_up=lambda: self._cutting,
                max_delay=self.host.lease / 4,
            )
        finally:
            self._settling.discard(task)
