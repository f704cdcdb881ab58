"""An open app's parts and their lifecycle: store, broker, engine, and while the app
serves, the choreography consumer; the outbox relay when the broker needs one.

``App`` holds one :class:`Runtime` while it is open (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cantata.broker.base import Broker
from cantata.broker.binding import Binding
from cantata.choreography.consumer import Consumer
from cantata.choreography.relay import OutboxRelay
from cantata.declare.records import declaration_records
from cantata.engine.engine import Engine
from cantata.engine.handler_host import EngineHost
from cantata.engine.identity import new_worker_id
from cantata.errors import ConfigurationError, StoreReadOnly
from cantata.model.event import Event
from cantata.observability.graph import workflow_shape
from cantata.store.base import Store

if TYPE_CHECKING:
    from cantata.app import App


class Runtime:
    """The open store, broker and engine of one app (and its consumer and relay)."""

    def __init__(self, store: Store, broker: Broker, engine: Engine) -> None:
        self.store = store
        self.broker = broker
        self.engine = engine
        self.consumer: Consumer | None = None
        self.relay: OutboxRelay | None = None

    @classmethod
    async def open(
        cls, app: App, serve: bool, made: Callable[[Runtime], None]
    ) -> None:
        """Open store and broker, record the declarations; with ``serve`` run a worker.

        ``made`` is given the runtime as soon as its engine exists, before anything is
        claimed (what this worker runs while it opens can reach the app: ``app.start``,
        ``app.publish``). Nothing half-open is left behind when this fails: pools,
        connections, loops.
        """
        from cantata.broker.factory import broker_from_url
        from cantata.store.factory import store_from_url

        store_spec, broker_spec = app.backends
        store = store_from_url(store_spec) if isinstance(store_spec, str) else store_spec
        # its own outage warnings, as the worker's, and its connections' limits, before
        # it connects
        store.adopt_timing(lease=app.lease)
        await store.open()
        store.set_audit_key(app.name, app.audit_key)
        broker = broker_from_url(broker_spec) if isinstance(broker_spec, str) else broker_spec
        # The app's lease before connecting (NATS pings its server by it, see
        # broker/nats.py PING_LEAST); the worker's own hold is given once it serves.
        broker.adopt_timing(lease=app.lease, poll_interval=app.poll_interval)
        try:
            await broker.open(store)
            try:
                await broker.attach(app.name, offload_above=app.offload_above)
            except BaseException:
                await broker.close()
                raise
        except BaseException:
            await store.close()
            raise
        engine = Engine(
            app.name, app.router, store, app.clock, worker_id=new_worker_id(),
            lease=app.lease, poll_interval=app.poll_interval, services=app.services,
            hooks=app.hooks, signer=app.signer,
            max_payload=app.max_payload if app.offload_above is None else None,
            version=app.version, any_version=app.any_version,
            park_after=app.park_after, hot_runs=app.hot_runs, max_runs=app.max_runs,
        )
        runtime = cls(store, broker, engine)
        made(runtime)
        try:
            await runtime._start(app, serve)
        except BaseException:
            with contextlib.suppress(Exception):
                await runtime.close(0.0, asyncio.Event())
            raise

    async def _start(self, app: App, serve: bool) -> None:
        engine, store, broker = self.engine, self.store, self.broker
        engine.check_event = functools.partial(broker.check_event, app.name)
        declarations = declaration_records(app.router, workflow_shape)
        if declarations:
            try:
                await store.declare(app.name, declarations)
            except StoreReadOnly:
                if serve:
                    raise
                # A client of a read-only store can still read (runs, trace, dlq list).
        from cantata.flow.service import declare_queues

        try:
            await declare_queues(engine, app.router)  # schedules: once it serves
        except StoreReadOnly:
            if serve:
                raise
        if broker.relays_outbox:
            self.relay = OutboxRelay(
                store, broker, app.name,
                on_relayed=lambda events: app.hooks.notify("relayed", events),
            )
            await self.relay.start()
        if serve:
            await self.serve(app)

    async def serve(self, app: App) -> None:
        """Run a worker here: claim runs, and consume the handler groups served here."""
        from cantata.engine.versioning import declare_version
        from cantata.flow.service import declare_schedules
        from cantata.observability.logs import install_record_factory

        install_record_factory()  # records logged in steps and handlers carry their ids
        engine = self.engine
        unverifiable = [h.name for h in app.router.handlers if h.require_signature]
        if unverifiable and not app.signer:
            raise ConfigurationError(
                f"handler(s) {', '.join(unverifiable)} require signed events but app "
                f"{app.name!r} has no signing_keys to verify them: "
                "App(signing_keys={'k1': secret})"
            )
        await declare_version(engine)  # before claiming: its place among deployed versions
        await declare_schedules(engine, app.router)  # (before the scheduler starts)
        consumer = Consumer(
            EngineHost(engine), self.broker, on_emitted=self.emitted,
            concurrency=app.concurrency,
        )
        # The groups it serves are in this worker's first heartbeat (versioning.
        # worker_info), and the app's full declarations, with the broker this worker
        # takes the app's events through (an operator's redelivery must use it too),
        # are written once that heartbeat is in and before anything is claimed or
        # subscribed: a start that fails at this write has served nothing. After the
        # heartbeat, because a retire of a group racing this start must either see this
        # worker serving the group or be followed by this write (observability/groups.py
        # retire). No broker's subscribe declares (docs/architecture.md), so nothing
        # written later replaces these rows.
        engine.handler_groups = sorted(consumer.groups())
        declarations = [*declaration_records(app.router, workflow_shape),
                        Binding.of(self.broker).declaration()]

        async def declare() -> None:
            await self.store.declare(app.name, declarations)

        await engine.start_serving(before_claiming=declare)
        # App(lease=..., poll_interval=...) governs deliveries as well as runs, and the
        # engine's one heartbeat keeps both this worker's runs and its deliveries.
        self.broker.adopt_timing(lease=engine.lease, poll_interval=engine.poll_interval,
                                 may_take_over=engine.ownership.may_take_over,
                                 clock=engine.clock)
        engine.claimer_wakers.append(self.broker.wake)  # (the embedded broker's claims)
        engine.ownership.hold()  # released once the consumer has drained (close)
        self.consumer = consumer
        await consumer.start()
        keep = getattr(self.broker, "keep_outside", None)
        if keep is not None:
            # Events another system puts on the broker reach a wait only once stored: a
            # broker that carries them (NATS) stores those of the types the workflows
            # served here wait for (broker/nats_outside.py), here found in their code
            # and later as runs reach waits.
            async def keep_for_waits(types: list[str]) -> None:
                await keep(app.name, types, worker_id=engine.worker_id,
                           since=lambda: engine.store.oldest_live_run(app.name),
                           on_stored=engine.events_appended)

            await keep_for_waits(sorted({t for wf, t in app.router.waits if engine.serves(wf)}))
            engine.waits_reached = keep_for_waits

    def emitted(self, events: Sequence[Event[Any]]) -> None:
        """Events were committed here: wake what waits for them, hand them to this
        process's handlers (Broker.hand_off), and offer them to the relay."""
        self.engine.events_appended(list(events))
        if self.consumer is not None:
            # Handled here at once where this process serves the group (the broker's
            # own delivery follows; see Broker.hand_off). First, so that the handlers'
            # commits are under way while the relay publishes.
            self.broker.hand_off(self.engine.app, events)
        if self.relay is not None:
            self.relay.offer(events)  # published now, not after an outbox read

    async def close(self, grace: float, force: asyncio.Event) -> None:
        """Stop gracefully (docs/leases.md), then close the connections."""
        deadline = asyncio.get_running_loop().time() + grace
        stops = [self.engine.stop(grace, force, keep_worker=True)]
        consumer = self.consumer
        if consumer is not None:
            stops.append(consumer.stop(deadline, force))
        await asyncio.gather(*stops)
        if consumer is not None:
            self.engine.cut_short += consumer.cut_short
            self.engine.unstored += consumer.unstored
            self.consumer = None
            await self.engine.ownership.release()  # the heartbeat ends with the drain
        # Only now: while handlers drain, the worker's row keeps their deliveries its own.
        await self.engine.forget_worker()
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        await self.broker.close()
        await self.store.close()
