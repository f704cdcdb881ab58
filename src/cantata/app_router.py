"""``App``'s decorators: each forwards to the :class:`~cantata.declare.Router` the app
holds (``app.router``). An App is not a Router; it holds one (docs/architecture.md).

The docstrings are the Router's own (copied at the end of this module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from cantata.declare.defs import HandlerDef, QueryDef, StepDef, TriggerDef, WorkflowDef
from cantata.declare.router import Router
from cantata.model.flow import QueueSpec, Rate
from cantata.model.retry import Retry

F = TypeVar("F", bound=Callable[..., Any])


class RouterFacade:
    """The decorator API of an object that holds a :class:`Router` as ``self.router``."""

    router: Router

    # -- what is declared (read from the router) -------------------------------------

    @property
    def service(self) -> str | None:
        return self.router.service

    @property
    def steps(self) -> dict[str, StepDef]:
        return self.router.steps

    @property
    def workflows(self) -> dict[str, WorkflowDef]:
        return self.router.workflows

    @property
    def handlers(self) -> list[HandlerDef]:
        return self.router.handlers

    @property
    def triggers(self) -> list[TriggerDef]:
        return self.router.triggers

    @property
    def queries(self) -> dict[tuple[str, str], QueryDef]:
        return self.router.queries

    @property
    def waits(self) -> set[tuple[str, str]]:
        return self.router.waits

    @property
    def queues(self) -> dict[str, QueueSpec]:
        return self.router.queues

    @property
    def schedule_specs(self) -> dict[str, Any]:
        return self.router.schedule_specs

    # -- decorators ------------------------------------------------------------------

    @overload
    def step(self, fn: F, /) -> F: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        service: str | None = None,
        heartbeat_timeout: float | None = None,
        concurrency: int | None = None,
        rate: Rate | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
        service: str | None = None,
        heartbeat_timeout: float | None = None,
        concurrency: int | None = None,
        rate: Rate | None = None,
    ) -> F | Callable[[F], F]:
        register: Callable[[F], F] = self.router.step(
            name=name, retry=retry, timeout=timeout, service=service,
            heartbeat_timeout=heartbeat_timeout, concurrency=concurrency, rate=rate,
        )
        return register(fn) if fn is not None else register

    @overload
    def transaction(self, fn: F, /) -> F: ...

    @overload
    def transaction(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Callable[[F], F]: ...

    def transaction(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> F | Callable[[F], F]:
        register: Callable[[F], F] = self.router.transaction(
            name=name, retry=retry, timeout=timeout
        )
        return register(fn) if fn is not None else register

    @overload
    def workflow(self, fn: F, /) -> F: ...

    @overload
    def workflow(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        service: str | None = None,
        cleanup_timeout: float = 60.0,
        queue: str | None = None,
    ) -> Callable[[F], F]: ...

    def workflow(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        service: str | None = None,
        cleanup_timeout: float = 60.0,
        queue: str | None = None,
    ) -> F | Callable[[F], F]:
        register: Callable[[F], F] = self.router.workflow(
            name=name, service=service, cleanup_timeout=cleanup_timeout, queue=queue
        )
        return register(fn) if fn is not None else register

    def query(
        self,
        fn: object = None,
        /,
        *,
        workflow: Callable[..., Any] | str | None = None,
        name: str | None = None,
    ) -> Callable[[F], F]:
        # (fn, and workflow=None: a bare @app.query, refused with a RegistrationError)
        return self.router.query(fn, workflow=workflow, name=name)

    def on(
        self,
        pattern: str,
        *,
        group: str,
        retry: Retry | None = None,
        emits: Sequence[str] = (),
        require_signature: bool = False,
        concurrency: int | None = None,
    ) -> Callable[[F], F]:
        return self.router.on(
            pattern, group=group, retry=retry, emits=emits,
            require_signature=require_signature, concurrency=concurrency,
        )

    def start_on(self, pattern: str, workflow: Callable[..., Any] | str) -> None:
        self.router.start_on(pattern, workflow)

    def remote_step(
        self,
        name: str,
        *,
        service: str | None = None,
        wait_for_service: bool = False,
    ) -> Callable[..., Any]:
        return self.router.remote_step(name, service=service, wait_for_service=wait_for_service)

    def include(self, router: Router | Any) -> None:
        self.router.include(router)

    def queue(
        self,
        name: str,
        concurrency: int | None = None,
        per_worker: int | None = None,
        rate: Rate | None = None,
        priorities: bool = False,
    ) -> str:
        return self.router.queue(name, concurrency, per_worker, rate, priorities)

    def schedule(
        self,
        cron: str | None = None,
        *,
        every: float | None = None,
        timezone: str = "UTC",
        overlap: str = "skip",
        catch_up: str = "skip",
        catch_up_limit: int | None = None,
        name: str | None = None,
    ) -> Callable[[F], F]:
        return self.router.schedule(
            cron, every=every, timezone=timezone, overlap=overlap, catch_up=catch_up,
            catch_up_limit=catch_up_limit, name=name,
        )

    def handler_for(self, group: str, event_type: str) -> HandlerDef | None:
        return self.router.handler_for(group, event_type)


for _name in ("step", "transaction", "workflow", "query", "on", "start_on", "remote_step",
              "include", "queue", "schedule", "handler_for"):
    getattr(RouterFacade, _name).__doc__ = getattr(Router, _name).__doc__
