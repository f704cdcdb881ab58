"""Declarations: steps, workflows, handlers and triggers, collected by a Router."""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from cantata.errors import RegistrationError
from cantata.model.codec import Signature, signature_of
from cantata.model.event import Event, check_pattern, check_type
from cantata.model.flow import QueueSpec, Rate, check_limit
from cantata.model.retry import HANDLER_RETRY, STEP_RETRY, Retry

F = TypeVar("F", bound=Callable[..., Any])

STEP_ATTR = "__cantata_step__"
WORKFLOW_ATTR = "__cantata_workflow__"
STANDALONE_ATTR = "__cantata_standalone__"  # a step usable without registration
DECLARED_ATTR = "__cantata_must_be_declared__"  # a remote stub whose service must exist


@dataclass(frozen=True, slots=True)
class StepDef:
    """A registered step."""

    name: str  # qualified: "service.name" for a step served by another service
    fn: Callable[..., Any]
    retry: Retry
    timeout: float | None
    service: str | None
    is_async: bool
    sig: Signature
    heartbeat_timeout: float | None = None  # seconds of silence that lose an attempt
    transactional: bool = False  # @app.transaction: called with a cantata.Tx first
    concurrency: int | None = None  # calls in progress across the cluster at most
    rate: Rate | None = None  # calls begun per window across the cluster at most


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """A registered workflow."""

    name: str
    fn: Callable[..., Any]
    sig: Signature
    service: str | None = None
    spec: Any = None  # a Saga's map, when the workflow was generated from one
    cleanup_timeout: float = 60.0  # seconds a cancelled run may spend cleaning up
    queue: str | None = None  # runs wait in this queue (@app.workflow(queue=...))


@dataclass(frozen=True, slots=True)
class QueryDef:
    """A read-only query of a workflow's runs, answered from their recorded state."""

    name: str
    workflow: str
    fn: Callable[..., Any]
    is_async: bool


@dataclass(frozen=True, slots=True)
class HandlerDef:
    """A registered event handler."""

    pattern: str
    group: str
    fn: Callable[..., Any]
    retry: Retry
    model: Any  # the T of Event[T], or None
    is_async: bool
    wants_ctx: bool
    emits: tuple[str, ...] = ()
    service: str | None = None
    require_signature: bool = False
    concurrency: int | None = None  # the group's handlers in progress across the cluster

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


@dataclass(frozen=True, slots=True)
class TriggerDef:
    """``app.start_on(pattern, workflow)``: an event starts a workflow run."""

    pattern: str
    workflow: str

    @property
    def group(self) -> str:
        return f"start:{self.workflow}"


def patterns_overlap(a: str, b: str) -> bool:
    """True if some event type matches both patterns."""
    pa, pb = a.split("."), b.split(".")
    return len(pa) == len(pb) and all(x == y or "*" in (x, y) for x, y in zip(pa, pb, strict=True))


def _event_model(fn: Callable[..., Any]) -> Any:
    """The ``T`` of a handler's ``event: Event[T]`` parameter (``None`` if untyped).

    Only the event parameter's annotation is resolved, so an annotation elsewhere that
    cannot be resolved (a ``TYPE_CHECKING`` import for ``ctx``) does not matter; an
    event annotation that cannot be resolved is a registration error, never silently
    an untyped handler.
    """
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise RegistrationError(
            f"handler {fn.__qualname__} takes no parameter: declare `(event, ctx)` or `(event)`"
        )
    ann = params[0].annotation
    if ann is inspect.Parameter.empty:
        return None
    if isinstance(ann, str):
        try:
            ann = eval(ann, getattr(fn, "__globals__", {}), _closure_names(fn))
        except Exception as exc:
            if "Event" not in ann:
                return None
            raise RegistrationError(
                f"cannot resolve the event annotation {params[0].annotation!r} of handler "
                f"{fn.__qualname__} ({type(exc).__name__}: {exc}); define the model at module "
                "level so the annotation can be resolved"
            ) from None
    if typing.get_origin(ann) is Event:
        args = typing.get_args(ann)
        if args and args[0] is not Any:
            return args[0]
    return None


def _closure_names(fn: Callable[..., Any]) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    out: dict[str, Any] = {}
    for name, cell in zip(code.co_freevars, cells, strict=False):
        with contextlib.suppress(ValueError):
            out[name] = cell.cell_contents
    return out


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
        def register(f: F) -> F:
            if not callable(f):
                raise RegistrationError(f"@step needs a function, got {f!r}")
            if timeout is not None and timeout <= 0:
                raise RegistrationError(f"step timeout must be > 0 seconds, got {timeout}")
            if heartbeat_timeout is not None and heartbeat_timeout <= 0:
                raise RegistrationError(
                    f"heartbeat_timeout must be > 0 seconds, got {heartbeat_timeout}"
                )
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
        if cleanup_timeout <= 0:
            raise RegistrationError(f"cleanup_timeout must be > 0 seconds, got {cleanup_timeout}")
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
            from .waits import literal_waits

            self.waits.update((wdef.name, t) for t in literal_waits(f))
            self._add_workflow(wdef)
            setattr(f, WORKFLOW_ATTR, wdef)
            from cantata.flow.declare import bind_pending_schedules

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
        self, *, workflow: Callable[..., Any] | str, name: str | None = None
    ) -> Callable[[F], F]:
        """Register a read-only query of ``workflow``'s runs: ``def q(state) -> value``.

        ``state`` is a :class:`~cantata.RunState` built from the run's recorded history
        (values, step results, status), so any process answers it without waking the
        run: ``await handle.query(name)``.

        Args:
            workflow: the workflow (function or name) whose runs it reads.
            name: defaults to the function name.
        """
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
        check_pattern(pattern)
        if not group or not isinstance(group, str):
            raise RegistrationError(f"handler for {pattern!r} needs group='service-name'")
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
                model=_event_model(f),
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
            service: defaults to the part of ``name`` before the first dot.
            wait_for_service: call it even if no service has declared it yet (the task
                waits, visible as a stall, until one does); otherwise such a call is an
                ``UnknownStep`` error.
        """
        svc = service or name.split(".", 1)[0]

        async def stub(*args: Any) -> Any:
            raise RegistrationError(f"{name} runs in service {svc!r}: call it with ctx.run")

        stub.__name__ = stub.__qualname__ = name
        setattr(stub, STEP_ATTR, remote_step_def(name, svc))
        setattr(stub, STANDALONE_ATTR, True)
        setattr(stub, DECLARED_ATTR, not wait_for_service)
        return stub

    def include(self, router: Router | Any) -> None:
        """Add every declaration of ``router`` (or a :class:`~cantata.Saga`) to this one."""
        from .saga import Saga

        if isinstance(router, Saga):
            router.attach(self)
            return
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
            ConfigurationError: a limit is not a whole number > 0.
        """
        from cantata.flow.queues import make_spec

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
        from cantata.flow.declare import schedule_decorator

        return schedule_decorator(self, cron, every, timezone, overlap, catch_up,
                                  catch_up_limit, name)


    def handler_for(self, group: str, event_type: str) -> HandlerDef | None:
        """The one handler of ``group`` for ``event_type``: an exact type beats a wildcard."""
        from cantata.model.event import matches

        wildcard = None
        for h in self.handlers:
            if h.group != group or not matches(h.pattern, event_type):
                continue
            if "*" not in h.pattern:
                return h
            wildcard = wildcard or h
        return wildcard


def _runs_elsewhere(*args: Any) -> Any:
    raise RuntimeError("a remote step runs in its own service's workers, not here")


def remote_step_def(
    name: str, service: str, *, retry: Retry | None = None, timeout: float | None = None
) -> StepDef:
    """A stand-in for a step that another service's workers execute."""
    return StepDef(name, _runs_elsewhere, retry or STEP_RETRY, timeout, service, True,
                   Signature((), inspect.Parameter.empty, Any))


def workflow_name(workflow: Callable[..., Any] | str) -> str:
    """The registered name of a workflow function (or the name itself)."""
    if isinstance(workflow, str):
        return workflow
    wdef = getattr(workflow, WORKFLOW_ATTR, None)
    if wdef is None:
        raise RegistrationError(
            f"{getattr(workflow, '__qualname__', workflow)!r} is not a workflow: decorate it "
            "with @app.workflow"
        )
    return str(wdef.name)


def step_name(step: Callable[..., Any] | str) -> str:
    """The registered name of a step function (or the name itself)."""
    if isinstance(step, str):
        return step
    sdef = getattr(step, STEP_ATTR, None)
    if sdef is None:
        from cantata.errors import UnknownStep

        raise UnknownStep(
            f"{getattr(step, '__qualname__', step)!r} is not a registered step: decorate it "
            "with @app.step (or @router.step and app.include(router))"
        )
    return str(sdef.name)
