"""``Router``: the decorators that collect an app's declarations (``app.include(router)``).

``App`` holds one Router and forwards its decorators to it (docs/architecture.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from cantata.errors import RegistrationError
from cantata.model.checks import check_seconds, check_text
from cantata.model.codec import signature_of
from cantata.model.event import check_pattern, check_type
from cantata.model.flow import QueueSpec, Rate, check_limit, make_spec
from cantata.model.retry import HANDLER_RETRY, STEP_RETRY, Retry, check_retry

from .defs import (
    DECLARED_ATTR,
    REMOTE_SERVICE_ATTR,
    STANDALONE_ATTR,
    STEP_ATTR,
    WORKFLOW_ATTR,
    HandlerDef,
    QueryDef,
    StepDef,
    TriggerDef,
    WorkflowDef,
    check_service,
    event_model,
    handler_for,
    patterns_overlap,
    remote_step_def,
    workflow_name,
)
from .schedules import bind_pending_schedules, schedule_decorator
from .waits import literal_waits

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Router:
    """Collects steps, workflows, handlers and triggers; ``app.include(router)`` adds them.

    Args:
        service: the service these declarations belong to (optional).
    """

    service: str | None = None
    steps: dict[str, StepDef] = field(default_factory=dict)
    workflows: dict[str, WorkflowDef] = field(default_factory=dict)
    handlers: list[HandlerDef] = field(default_factory=list)
    triggers: list[TriggerDef] = field(default_factory=list)
    queries: dict[tuple[str, str], QueryDef] = field(default_factory=dict)
    # (workflow, event type) a workflow waits for: declared so the events are no orphans
    waits: set[tuple[str, str]] = field(default_factory=set)
    queues: dict[str, QueueSpec] = field(default_factory=dict)
    schedule_specs: dict[str, Any] = field(default_factory=dict)  # name -> ScheduleSpec

    def __post_init__(self) -> None:
        check_service(self.service, "Router(service=...)")

    # -- steps -------------------------------------------------------------------

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
        """Register a step (async or sync function). Usable bare or with options.

        Args:
            name: defaults to the function name.
            retry: defaults to ``Retry(max_attempts=3, initial_interval=0.5, backoff=2.0,
                max_interval=30.0)``.
            timeout: seconds per attempt.
            service: the service whose workers execute it (defaults to the router's).
            heartbeat_timeout: seconds; an attempt that calls no ``cantata.heartbeat()``
                for longer is lost (``HeartbeatTimeout``) and retried.
            concurrency: most calls in progress at once across all workers.
            rate: ``cantata.Rate(limit, per=seconds)``: most calls begun in any window
                across all workers (waiting for either is not an attempt).
        """
        check_limit("step concurrency", concurrency)
        if rate is not None and not isinstance(rate, Rate):
            raise RegistrationError(f"step rate must be cantata.Rate(...), got {rate!r}")
        return self._step_decorator(fn, name, retry, timeout, service, heartbeat_timeout,
                                    concurrency=concurrency, rate=rate)

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
        """Register a transactional step: ``async def step(tx: cantata.Tx, *args)``.

        Its SQL (``tx.execute`` / ``tx.fetch``), its checkpoint and the events it
        publishes with ``app.publish(..., tx=tx)`` commit in one transaction of the
        store's database (SQLite or PostgreSQL); see ``docs/workflow-api.md``.
        """
        return self._step_decorator(fn, name, retry, timeout, None, None, transactional=True)

    def _step_decorator(
        self,
        fn: F | None,
        name: str | None,
        retry: Retry | None,
        timeout: float | None,
        service: str | None,
        heartbeat_timeout: float | None,
        *,
        transactional: bool = False,
        concurrency: int | None = None,
        rate: Rate | None = None,
    ) -> F | Callable[[F], F]:
        # Checked when the decorator is made, before any run can meet a bad option.
        check_retry("@transaction" if transactional else "@step", retry)
        check_service(service, "@step")
        check_seconds("step timeout", timeout, error=RegistrationError)
        check_seconds("heartbeat_timeout", heartbeat_timeout, error=RegistrationError)

        def register(f: F) -> F:
            if not callable(f):
                raise RegistrationError(f"@step needs a function, got {f!r}")
            if transactional and not inspect.iscoroutinefunction(f):
                raise RegistrationError(
                    f"@transaction step {getattr(f, '__qualname__', f)!r} must be an `async "
                    "def` taking a cantata.Tx first"
                )
            # A transactional step shares the calling run's transaction: it runs in that
            # run's worker, never as a task for another service's workers.
            svc = None if transactional else (service or self.service)
            base = name or f.__name__
            qualified = f"{svc}.{base}" if svc and "." not in base else base
            sdef = StepDef(
                name=qualified,
                fn=f,
                retry=retry or STEP_RETRY,
                timeout=timeout,
                service=svc,
                is_async=inspect.iscoroutinefunction(f),
                sig=signature_of(f, skip=1 if transactional else 0),
                heartbeat_timeout=heartbeat_timeout,
                transactional=transactional,
                concurrency=concurrency,
                rate=rate,
            )
            self._add_step(sdef)
            setattr(f, STEP_ATTR, sdef)
            return f

        return register(fn) if fn is not None else register

    def _add_step(self, sdef: StepDef) -> None:
        old = self.steps.get(sdef.name)
        if old is not None and old.fn is not sdef.fn:
            raise RegistrationError(
                f"two steps are named {sdef.name!r} ({old.fn.__qualname__} and "
                f"{sdef.fn.__qualname__}): give one of them name=..."
            )
        self.steps[sdef.name] = sdef

    # -- workflows ------------------------------------------------------------------

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
        """Register a workflow: ``async def wf(ctx, *args)``. Name defaults to the function's.

        Args:
            cleanup_timeout: seconds a cancelled run may spend in its own cleanup (after
                catching ``cantata.Cancelled``) before it is stopped for good.
            queue: its runs wait in this queue (declared with ``app.queue``) unless
                ``app.start`` names another.
        """
        check_seconds("cleanup_timeout", cleanup_timeout, error=RegistrationError, none=False)
        check_service(service, "@workflow")
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise RegistrationError(f"workflow queue must be a queue's name, got {queue!r}")

        def register(f: F) -> F:
            if not inspect.iscoroutinefunction(f):
                raise RegistrationError(
                    f"workflow {getattr(f, '__qualname__', f)!r} must be an `async def` taking "
                    "`ctx` first"
                )
            wdef = WorkflowDef(name or f.__name__, f, signature_of(f, skip=1),
                               service or self.service, cleanup_timeout=cleanup_timeout,
                               queue=queue)
            self.waits.update((wdef.name, t) for t in literal_waits(f))
            self._add_workflow(wdef)
            setattr(f, WORKFLOW_ATTR, wdef)
            bind_pending_schedules(self, f)
            return f

        return register(fn) if fn is not None else register

    def _add_workflow(self, wdef: WorkflowDef) -> None:
        old = self.workflows.get(wdef.name)
        if old is not None and old.fn is not wdef.fn:
            raise RegistrationError(
                f"two workflows are named {wdef.name!r}: give one of them name=..."
            )
        self.workflows[wdef.name] = wdef

    # -- queries --------------------------------------------------------------------

    def query(
        self,
        fn: object = None,
        /,
        *,
        workflow: Callable[..., Any] | str | None = None,
        name: str | None = None,
    ) -> Callable[[F], F]:
        """Register a read-only query of ``workflow``'s runs: ``def q(state) -> value``.

        ``state`` is a :class:`~cantata.RunState` built from the run's recorded history
        (values, step results, status), so any process answers it without waking the
        run: ``await handle.query(name)``.

        Args:
            workflow: the workflow (function or name) whose runs it reads.
            name: defaults to the function name.

        Raises:
            RegistrationError: no ``workflow=`` (a bare ``@app.query``).
        """
        if fn is not None or workflow is None:
            what = f" above query {getattr(fn, '__name__', fn)}" if fn is not None else ""
            raise RegistrationError(
                "@app.query needs the workflow it answers for: "
                f"@app.query(workflow=place_order){what}, with your workflow or its name"
            )
        wf = workflow_name(workflow)

        def register(f: F) -> F:
            if not callable(f):
                raise RegistrationError(f"@query needs a function, got {f!r}")
            qdef = QueryDef(name or f.__name__, wf, f, inspect.iscoroutinefunction(f))
            old = self.queries.get((wf, qdef.name))
            if old is not None and old.fn is not f:
                raise RegistrationError(
                    f"workflow {wf!r} has two queries named {qdef.name!r}: give one name=..."
                )
            self.queries[(wf, qdef.name)] = qdef
            return f

        return register

    # -- handlers -------------------------------------------------------------------

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
        """Register an event handler for ``pattern`` in ``group`` (the reacting service).

        Args:
            pattern: an event type or one-token wildcards (``order.*``).
            group: every group receives every matching event; handlers of one group
                compete for them.
            retry: defaults to ``Retry(max_attempts=5)``.
            emits: event types the handler may emit (for maps and AsyncAPI).
            require_signature: dead-letter events that are not signed with one of the
                app's ``signing_keys`` before this handler sees them.
            concurrency: most handlers of ``group`` in progress at once across all
                workers (waiting for a slot is not an attempt).
        """
        check_limit(f"handler group {group!r} concurrency", concurrency)
        check_retry(f"@on({pattern!r}, group={group!r})", retry)
        check_pattern(pattern)
        if not group or not isinstance(group, str):
            raise RegistrationError(f"handler for {pattern!r} needs group='service-name'")
        # Any text a store keeps as given (what App(services=...) accepts as a group).
        check_text(f"@on({pattern!r}): group", group, error=RegistrationError)
        for t in emits:
            check_type(t)

        def register(f: F) -> F:
            if not callable(f):
                raise RegistrationError(f"@on needs a function, got {f!r}")
            n_params = len(inspect.signature(f).parameters)
            hdef = HandlerDef(
                pattern=pattern,
                group=group,
                fn=f,
                retry=retry or HANDLER_RETRY,
                model=event_model(f),
                is_async=inspect.iscoroutinefunction(f),
                wants_ctx=n_params >= 2,
                emits=tuple(emits),
                service=self.service,
                require_signature=require_signature,
                concurrency=concurrency,
            )
            self._add_handler(hdef)
            return f

        return register

    def _add_handler(self, hdef: HandlerDef) -> None:
        for other in self.handlers:
            if other.group != hdef.group or (other.fn is hdef.fn and other.pattern == hdef.pattern):
                continue
            exact_a, exact_b = "*" not in hdef.pattern, "*" not in other.pattern
            clash = (
                (exact_a and exact_b and hdef.pattern == other.pattern)
                or (not exact_a and not exact_b and patterns_overlap(hdef.pattern, other.pattern))
            )
            if clash:
                raise RegistrationError(
                    f"group {hdef.group!r} has two handlers for {hdef.pattern!r} "
                    f"({other.name} on {other.pattern!r} and {hdef.name}): each event goes to "
                    "exactly one handler per group; merge them or use another group"
                )
        if any(o.fn is hdef.fn and o.pattern == hdef.pattern and o.group == hdef.group
               for o in self.handlers):
            return
        self.handlers.append(hdef)

    def start_on(self, pattern: str, workflow: Callable[..., Any] | str) -> None:
        """Start one run of ``workflow`` per event matching ``pattern`` (data as argument)."""
        check_pattern(pattern)
        name = workflow_name(workflow)
        trig = TriggerDef(pattern, name)
        if trig not in self.triggers:
            self.triggers.append(trig)

    def remote_step(
        self,
        name: str,
        *,
        service: str | None = None,
        wait_for_service: bool = False,
    ) -> Callable[..., Any]:
        """A typed stand-in for a step served by another service: ``ctx.run(stub, ...)``.

        Args:
            name: the step's qualified name, e.g. ``"inventory.reserve"``.
            service: the service whose workers run it. Without it: the service that
                declared the step (known once one of its workers has started), or, for
                a call made before any service declared it, whichever service declares
                it then (the task waits for it). Given, it must be the declared one
                (``UnknownStep`` at the call otherwise).
            wait_for_service: call it even if no service has declared it yet (the task
                waits, visible as a stall, until one does); otherwise such a call is an
                ``UnknownStep`` error.
        """
        if not isinstance(name, str) or not name.strip(". "):
            raise RegistrationError(
                f"app.remote_step needs the step's full name as a string, e.g. "
                f"'inventory.reserve'; got {name!r}"
            )
        check_service(service, f"app.remote_step({name!r})")
        svc = service or name.split(".", 1)[0]
        if service is None:
            check_service(svc, f"app.remote_step({name!r}) (the service its name begins with)")

        where = f"service {service!r}" if service else "another service"

        async def stub(*args: Any) -> Any:
            raise RegistrationError(f"{name} runs in {where}: call it with ctx.run")

        stub.__name__ = stub.__qualname__ = name
        setattr(stub, STEP_ATTR, remote_step_def(name, svc))
        setattr(stub, STANDALONE_ATTR, True)
        setattr(stub, DECLARED_ATTR, not wait_for_service)
        setattr(stub, REMOTE_SERVICE_ATTR, service)
        return stub

    def include(self, router: Router | Any) -> None:
        """Add every declaration of ``router`` (or a :class:`~cantata.Saga`) to this one.

        Anything with an ``attach(router)`` method (a saga) registers itself: the
        declarations stay free of what generates a saga's workflow and handlers.
        """
        attach = getattr(router, "attach", None)
        if callable(attach):
            attach(self)
            return
        if not isinstance(router, Router):
            inner = getattr(router, "router", None)  # an App: its declarations
            if not isinstance(inner, Router):
                raise RegistrationError(
                    f"app.include needs a cantata.Router, an App or a Saga, got {router!r}"
                )
            router = inner
        for s in router.steps.values():
            self._add_step(s)
        for w in router.workflows.values():
            self._add_workflow(w)
        for h in router.handlers:
            self._add_handler(h)
        for t in router.triggers:
            if t not in self.triggers:
                self.triggers.append(t)
        self.queries.update(router.queries)
        self.waits.update(router.waits)
        for q in router.queues.values():
            self._add_queue(q)
        for sched in router.schedule_specs.values():
            self.schedule_specs[sched.name] = sched

    # -- flow control (see cantata.flow and docs/flow-control.md) ---------------------

    def queue(
        self,
        name: str,
        concurrency: int | None = None,
        per_worker: int | None = None,
        rate: Rate | None = None,
        priorities: bool = False,
    ) -> str:
        """Declare a queue; returns its name (for ``queue=`` on start or workflow).

        Args:
            concurrency: runs of the queue in progress across all workers at most
                (per partition key when runs are started with ``partition=``).
            per_worker: runs of the queue in progress in one worker at most.
            rate: ``cantata.Rate(limit, per=seconds)``: at most ``limit`` runs begin in
                any window of ``per`` seconds (per partition key).
            priorities: lower ``priority=`` numbers begin first (else oldest first).

        Raises:
            ConfigurationError: a limit is not a whole number from 1 to 2**63-1, or
                ``priorities`` is not a bool.
        """
        self._add_queue(make_spec(name, concurrency, per_worker, rate, priorities))
        return name

    def _add_queue(self, spec: QueueSpec) -> None:
        old = self.queues.get(spec.name)
        if old is not None and old != spec:
            raise RegistrationError(
                f"queue {spec.name!r} is declared twice with different limits "
                f"({'; '.join(spec.differences(old))})"
            )
        self.queues[spec.name] = spec

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
        """Start the decorated workflow on a schedule (above or below ``@app.workflow``).

        The workflow's one argument is the tick's time (an aware UTC datetime).

        Args:
            cron: a five-field cron expression, e.g. ``"*/5 * * * *"``.
            every: or a fixed interval in seconds.
            timezone: the IANA zone the cron expression reads in (daylight saving
                handled as cron does).
            overlap: when a tick comes while the previous run is still in progress:
                ``skip`` it, ``buffer_one`` (start it once that run ends) or ``allow``.
            catch_up: ticks missed while no worker ran: ``skip``, ``last`` or ``all``.
            catch_up_limit: with ``all``, at most this many (the latest).
            name: defaults to the workflow's name.

        Raises:
            ConfigurationError: naming an invalid cron, time zone, policy or limit.
        """
        return schedule_decorator(self, cron, every, timezone, overlap, catch_up,
                                  catch_up_limit, name)

    def handler_for(self, group: str, event_type: str) -> HandlerDef | None:
        """The one handler of ``group`` for ``event_type``: an exact type beats a wildcard."""
        return handler_for(self.handlers, group, event_type)
