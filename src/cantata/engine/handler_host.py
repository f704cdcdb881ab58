"""The engine as the choreography consumer's host (:class:`~cantata.choreography.host.
ConsumerHost`): the few things a handler delivery needs of this worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from cantata.choreography.context import HandlerContext
from cantata.choreography.orphans import report_orphans
from cantata.declare.defs import HandlerDef, TriggerDef
from cantata.declare.router import Router
from cantata.errors import IdempotencyConflict
from cantata.fencing import Fence
from cantata.flow.limits import release_handler_slot, take_handler_slot
from cantata.flow.queues import default_entry
from cantata.model.event import Event
from cantata.model.idempotency import trigger_keys
from cantata.quietlog import QuietLog

from .hooks import Hooks
from .pauses import handler_fence
from .saga.hops import stray_event

if TYPE_CHECKING:
    from .engine import Engine
    from .metrics import Metrics


class EngineHost:
    """What :class:`~cantata.choreography.consumer.Consumer` uses of an engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def app(self) -> str:
        return self._engine.app

    @property
    def worker_id(self) -> str:
        return self._engine.worker_id

    @property
    def lease(self) -> float:
        return self._engine.lease

    @property
    def router(self) -> Router:
        return self._engine.router

    @property
    def metrics(self) -> Metrics:
        return self._engine.metrics

    @property
    def hooks(self) -> Hooks:
        return self._engine.hooks

    @property
    def quiet(self) -> QuietLog:
        return self._engine.quiet

    def serves(self, declaration: HandlerDef | TriggerDef) -> bool:
        if isinstance(declaration, HandlerDef) and declaration.step is not None \
                and declaration.step not in self.router.steps:
            return False  # a saga's hop whose step this code lacks (another service's)
        services = self._engine.services
        if services is None:
            return True
        if isinstance(declaration, TriggerDef):
            return self._engine.serves(declaration.workflow)
        # The group is the reacting service; a Router's service= names it too, and a
        # choreographed saga's own handlers follow the saga's workflow.
        if declaration.group in services:
            return True
        if declaration.service is not None:
            return declaration.service in services
        return declaration.workflow is not None and self._engine.serves(declaration.workflow)

    def stray(self, group: str, event: Event[Any]) -> str | None:
        return stray_event(self.router, group, event)

    def pause_fence(self, held_by_lease: bool) -> Fence:
        return handler_fence(self._engine, held_by_lease)

    def signature_problem(self, event: Event[Any], *, required: bool) -> Exception | None:
        return self._engine.signer.problem(event, required=required)

    def handler_context(self, hdef: HandlerDef, event: Event[Any]) -> HandlerContext:
        e = self._engine
        return HandlerContext(
            e.app, hdef.group, event, f"cantata/{e.app}/{hdef.group}",
            traceparent=e.hooks.traceparent if e.hooks.takers("traceparent") else None,
            check=e.check_event,
            store=e.store, sign=e.signer.sign if e.signer else None,
            max_payload=e.max_payload,
        )

    async def start_run(self, trigger: TriggerDef, event: Event[Any]) -> None:
        # One run per (workflow, event id): the event's shared key, unless the run of
        # another workflow the event also starts took it (model/idempotency.py).
        shared, own = trigger_keys(trigger.workflow, event.id)
        # The run waits in its workflow's queue, as any start of it does.
        queue = await default_entry(self._engine, trigger.workflow)
        for key in (shared, own):
            try:
                await self._engine.create_run(
                    trigger.workflow, [event.data], idempotency_key=key,
                    correlation_id=event.correlation_id or event.id, causation_id=event.id,
                    queue=queue,
                )
                return
            except IdempotencyConflict as exc:
                if key == own or exc.other_workflow is None:
                    raise

    async def take_slot(
        self, hdef: HandlerDef, event_id: str, extend: Callable[[], Awaitable[None]]
    ) -> str | None:
        return await take_handler_slot(self._engine, hdef, event_id, extend)

    async def release_slot(self, hdef: HandlerDef, holder: str) -> None:
        await release_handler_slot(self._engine, hdef, holder)

    async def report_orphans(self, events: Sequence[Event[Any]]) -> None:
        await report_orphans(self._engine, events)
