"""``ctx``: what a workflow may call. Every call is recorded and replayed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import random as _random
import uuid as _uuid
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from cantata.choreography.orphans import report_orphans
from cantata.declare.defs import (
    DECLARED_ATTR,
    REMOTE_SERVICE_ATTR,
    STANDALONE_ATTR,
    STEP_ATTR,
    StepDef,
    check_arguments,
    step_name,
    workflow_name,
)
from cantata.errors import (
    StoreError,
    UnknownStep,
    UnknownWorkflow,
    WaitTimeout,
    WorkflowCallError,
)
from cantata.flow.queues import check_call, default_entry
from cantata.model import codec
from cantata.model.attributes import index_attributes
from cantata.model.checks import check_seconds
from cantata.model.event import Event, check_publish, check_type
from cantata.model.idempotency import trigger_event
from cantata.model.records import UNADDRESSED, EntryKind, EntryStatus, RunWrite
from cantata.model.status import RunStatus

from . import versioning, wait_look
from .event_waits import Wants
from .heartbeat import workflow_run
from .journal import Save
from .parking import parking_for
from .runtime import Watch
from .signals import _StoreFailed

if TYPE_CHECKING:
    from .engine import Engine
    from .runtime import WorkflowRuntime


P = ParamSpec("P")
R = TypeVar("R")


def _outage_resumes(
    call: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """A ``ctx`` call whose engine code reads or writes the store (a child's creation,
    a wait's declaration, an emit's write...): a store error met there is an
    outage, raised as ``_StoreFailed`` (the run goes on from its history, where the
    call is replayed or made again), never in the workflow's code, where an ``except
    Exception`` could take it for a business failure and compensate."""

    @functools.wraps(call)
    async def outage_resumes(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await call(*args, **kwargs)
        except StoreError as exc:
            raise _StoreFailed(exc) from exc

    return outage_resumes


class _Recorded:
    """What ``ctx.set_attributes`` returns: awaiting it commits the recorded call now."""

    def __init__(self, runtime: WorkflowRuntime | None) -> None:
        self._x = runtime

    def __await__(self) -> Generator[Any, None, None]:
        if self._x is None:
            return None
        return (yield from self._x.commit(RunWrite()).__await__())


class WorkflowContext:
    """The ``ctx`` passed to a workflow: durable calls, timers, events, recorded values."""

    def __init__(self, runtime: WorkflowRuntime) -> None:
        self._x = runtime  # the run, through the runtime interface (runtime.py)
        # Built in the run's task, before the workflow's code runs in it: errors of
        # calls made there outside a step (cantata.heartbeat) can name the run.
        workflow_run.set((runtime.wdef.name, runtime.run.run_id))

    @property
    def run_id(self) -> str:
        """This run's id."""
        return self._x.run.run_id

    @property
    def workflow(self) -> str:
        """This run's workflow name."""
        return self._x.wdef.name

    @property
    def correlation_id(self) -> str:
        """The business transaction this run belongs to."""
        return self._x.run.correlation_id

    # -- steps -------------------------------------------------------------------

    async def _step_def(self, step: Callable[..., Any] | str, what: str) -> StepDef:
        engine = self._x.engine
        name = step_name(step)  # raises UnknownStep for an undecorated function
        found = engine.router.steps.get(name)
        if found is None and getattr(step, STANDALONE_ATTR, False):
            found = getattr(step, STEP_ATTR)  # e.g. cantata.http_step: needs no registration
            if hasattr(step, REMOTE_SERVICE_ATTR):  # an app.remote_step stub
                found = await _remote_stub_def(engine, step, found, what)
        if found is None:
            found = await engine.remote_step(name)
        if found is None:
            # A function decorated by another app, or by a Router never included, is not
            # declared in this app: running it anyway would bypass what the app serves.
            raise UnknownStep(
                f"{what} {name!r} is not a registered step in app {engine.app!r}: register it "
                "with @app.step (or @router.step and app.include(router)) (known steps: "
                f"{', '.join(sorted(engine.router.steps)) or 'none'})"
            )
        return found

    async def run(
        self,
        step: Callable[..., Any] | str,
        *args: Any,
        compensate: Callable[..., Any] | str | None = None,
    ) -> Any:
        """Run a step durably and return its result (replayed after a crash).

        Args:
            step: a function decorated with ``@app.step`` or a step name.
            args: JSON-serialisable arguments.
            compensate: a step that undoes this one; registered once this step succeeds,
                called with the same arguments if the run later fails or is cancelled.

        Raises:
            StepFailed: the step exhausted its attempts (the same error on every replay).
            asyncio.CancelledError: the workflow's own code cancelled the task awaiting
                this call (an ``asyncio.TaskGroup`` whose other branch failed, a
                timeout around it) while the step was in progress: the step ended
                first, its outcome recorded and its compensation registered if it
                completed (docs/guide.md).
        """
        steps = self._x.engine.router.steps
        try:
            # The usual case without a coroutine: a function of this app's router (its
            # name read here, as step_name does, without the call).
            name = step if isinstance(step, str) else getattr(step, STEP_ATTR, None)
            sdef = None if name is None else steps.get(
                name if isinstance(name, str) else name.name)
            if sdef is None:
                sdef = await self._step_def(step, "step")
            comp = (
                None if compensate is None
                else steps.get(step_name(compensate))
                or await self._step_def(compensate, "compensation")
            )
        except StoreError as exc:  # a remote step's declaration read: see _outage_resumes
            raise _StoreFailed(exc) from exc
        x = self._x
        plain = codec.plain_args(args, sdef.args_what, limit=x.engine.max_payload)
        key = x.journal.next_key(sdef.name)
        value = await x.run_step(sdef, plain, key, comp)
        if sdef.sig.plain_result:
            return value
        return codec.restore(value, sdef.sig.result, sdef.result_what)

    @_outage_resumes
    async def compensate(self) -> int:
        """Run the compensations registered so far, newest first, durably; returns how
        many ran.

        They are then forgotten: a second call runs only those registered since. A
        workflow that returns after compensations ran this way ends ``compensated``
        (``handle.result()`` raises ``WorkflowCompensated`` whose ``.result`` is the
        returned value); it may also go on running steps first.

        Raises:
            StepFailed: a compensation failed for good (the others were still run).
        """
        from .compensation import compensate

        return await compensate(self._x)

    # -- values published to clients ---------------------------------------------------

    @_outage_resumes
    async def set_value(self, key: str, value: Any) -> None:
        """Record ``value`` (JSON) under ``key``, durably, for ``handle.get_value(key)``
        and queries in any process. Setting a key again replaces its value.

        Raises:
            SerializationError: ``value`` is not JSON-serialisable (nothing is recorded).
        """
        from .values import set_value

        await set_value(self._x, key, value)

    # -- recorded values -------------------------------------------------------------

    def _value(self, name: str, make: Callable[[], Any]) -> Any:
        x = self._x
        call = x.journal.lookup(EntryKind.VALUE, name)
        if call.entry is not None:
            return codec.loads(call.entry.result)
        value = make()
        now = x.now()
        x.journal.record(call, EntryStatus.COMPLETED, save=Save.WITH_NEXT,
                         result=codec.dumps(value), started_at=now, ended_at=now)
        return value

    def now(self) -> dt.datetime:
        """The current time (UTC), recorded: a replay sees the same value."""
        ts = self._value("now", self._x.engine.clock.now)
        return dt.datetime.fromtimestamp(float(ts), dt.UTC)

    def random(self) -> float:
        """A random float in [0, 1), recorded."""
        return float(self._value("random", _random.random))

    def uuid(self) -> _uuid.UUID:
        """A random UUID, recorded."""
        return _uuid.UUID(str(self._value("uuid", lambda: str(_uuid.uuid4()))))

    def set_attributes(self, **attributes: Any) -> _Recorded:
        """Set search attributes of this run (``customer_id=42``), recorded like a step.

        Values are str, int, float or bool; ``app.find_runs(attributes=...)`` and
        ``cantata runs --attr NAME=VALUE`` find the run by them. The call is recorded in
        history and committed with the run's next write (``await`` it to commit now);
        a replay does not set them again. See docs/operating.md.

        Raises:
            UnknownAttribute: a name or value that cannot be indexed.
        """
        indexed = index_attributes(attributes)
        x = self._x
        call = x.journal.lookup(EntryKind.ATTRS, "set_attributes")
        if call.entry is not None:
            return _Recorded(None)
        now = x.now()
        x.journal.record(
            call, EntryStatus.COMPLETED, save=Save.SOON, started_at=now, ended_at=now,
            result=codec.dumps(attributes, "search attributes"), detail=codec.dumps(indexed),
        )
        return _Recorded(x)

    def patched(self, change_id: str) -> bool:
        """``True`` if this run takes the code path of change ``change_id``.

        A run that reaches this call for the first time under code containing it gets
        ``True`` (and a marker in its history, so every replay gets ``True`` again); a
        run replaying a history recorded by older code past this point gets ``False``
        and keeps the old path. The answer is fixed for the whole run. Once no run
        older than the change is live, drop the old branch (keeping the call is
        harmless). See docs/operating.md.
        """
        return versioning.patched(self._x, change_id)

    # -- timers ------------------------------------------------------------------------

    @_outage_resumes
    async def sleep(self, seconds: float) -> None:
        """Durable timer: the wake time is stored, so a crash does not restart the wait.

        Raises:
            ConfigurationError: ``seconds`` is not a number >= 0 (in the workflow's code,
                before anything is recorded).
        """
        check_seconds("ctx.sleep(seconds)", seconds, zero=True, none=False)
        j = self._x.journal
        call = await j.replay_or_begin(EntryKind.SLEEP, "sleep")
        if call.replayed:
            return
        entry = call.entry
        if entry is None:
            now = self._x.now()
            entry = await j.begin(call, EntryStatus.WAITING, started_at=now,
                                  wake_at=now + seconds,
                                  detail=codec.dumps({"seconds": seconds}))
        await j.await_final(entry, park=parking_for(entry.wake_at))
        await j.settle(entry, EntryStatus.COMPLETED, save=Save.WITH_NEXT)

    # -- events ---------------------------------------------------------------------------

    @_outage_resumes
    async def emit(self, type: str, data: Any = None, *, subject: str | None = None) -> Event[Any]:
        """Publish an event from the workflow, exactly once (recorded in history)."""
        check_publish(type, subject=subject)  # as app.publish checks them
        x = self._x
        call = await x.journal.replay_or_begin(EntryKind.EMIT, type, base=f"emit:{type}")
        if call.entry is not None:
            return Event.from_cloudevent(codec.loads(call.entry.result))
        key = call.key
        event = Event(
            type=type,
            data=codec.loads(
                codec.dumps(data, f"data of event {type}", limit=x.engine.max_payload)
            ),
            id=str(_uuid.uuid5(_uuid.NAMESPACE_URL, f"cantata:{x.run.run_id}:{key}")),
            source=f"cantata/{x.run.app}/{x.wdef.name}",
            subject=subject,
            correlation_id=x.run.correlation_id,
            causation_id=x.run.run_id,
            traceparent=x.engine.traceparent_for(x.run),
        )
        event = x.engine.signer.sign(event)
        x.engine.check_event(event)
        now = x.now()
        await x.journal.begin(call, EntryStatus.COMPLETED, events=[event],
                              result=event.to_json().decode(), started_at=now, ended_at=now)
        if x.engine.hooks:
            x.engine.hooks.notify("emitted", [event], "workflow")
        # A diagnostic, best-effort: the event is stored; a failed read of the store's
        # declarations is logged and tried again with the next emit, never an outage.
        await report_orphans(x.engine, [event])
        return event

    @_outage_resumes
    async def wait_for_event(
        self,
        type: str,
        *,
        match: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Event[Any]:
        """Wait for the first event of ``type`` whose data matches ``match``.

        Events published since the run started count, even before the wait began (for
        a run started by ``app.start_on``, those published after its trigger event,
        never that event itself); each event is taken by one wait of this run, also
        when several wait at once.

        Raises:
            WaitTimeout: no matching event within ``timeout`` seconds (recorded, so a
                replay raises it again).
        """
        check_type(type)
        check_seconds(f"ctx.wait_for_event({type!r}) timeout", timeout, zero=True)
        x = self._x
        j = x.journal
        call = await j.replay_or_begin(EntryKind.WAIT, type, base=f"wait:{type}")
        entry = call.entry
        if entry is not None and call.replayed:
            if entry.status == EntryStatus.FAILED:
                raise WaitTimeout(entry.error or f"no {type} event arrived in time")
            return Event.from_cloudevent(codec.loads(entry.result))
        engine = x.engine
        if entry is None:
            now = x.now()
            entry = await j.begin(
                call, EntryStatus.WAITING, started_at=now,
                wake_at=None if timeout is None else now + timeout,
                detail=codec.dumps({"type": type, "match": dict(match or {}), "timeout": timeout}),
            )
        await engine.declare_wait(x.wdef.name, type)
        found: list[Event[Any]] = []
        # A run started by an event started, for its waits, with that event: what
        # followed it counts even if stored before a worker created the run.
        trigger = trigger_event(x.run)

        async def look() -> bool:
            return await wait_look.look(engine, j, x.run, type, match, trigger, found)

        # No polling per wait: news of events wakes only the waits one of them may
        # match (engine/event_waits.py), each of which then looks for itself.
        await j.await_final(entry, look, watch=Watch("event", type, Wants(match)), poll=False,
                            park=parking_for(entry.wake_at, type, match))
        if not found:
            error = f"no {type} event matching {dict(match or {})} within {timeout} s"
            await j.settle(entry, EntryStatus.FAILED, error_type="WaitTimeout", error=error)
            raise WaitTimeout(error)
        event = found[0]  # (taken by look())
        await j.settle(entry, EntryStatus.COMPLETED, result=event.to_json().decode())
        return event

    # -- child workflows ----------------------------------------------------------------

    @_outage_resumes
    async def start_child(self, workflow: Callable[..., Any] | str, *args: Any) -> str:
        """Start a child workflow (durably, exactly once) without waiting; returns its run id."""
        run_id, _ = await self._child(workflow, args, wait=False)
        return run_id

    @_outage_resumes
    async def call(self, workflow: Callable[..., Any] | str, *args: Any) -> Any:
        """Run a child workflow durably and return its result.

        Raises:
            WorkflowCallError: the child did not complete.
        """
        _, value = await self._child(workflow, args, wait=True)
        return value

    async def _child(
        self, workflow: Callable[..., Any] | str, args: tuple[Any, ...], wait: bool
    ) -> tuple[str, Any]:
        x = self._x
        engine = x.engine
        name = workflow_name(workflow)
        j = x.journal
        base = f"child:{name}"
        child_def = engine.router.workflows.get(name)
        if child_def is not None and not child_def.sig.plain and not j.next_recorded(base):
            # Its code is here and a parameter is typed: arguments its worker would
            # refuse raise here, in the parent, before the call takes a place in history
            # (a caught refusal leaves the run's calls as if it had not been made, and a
            # replay meets it again). A call recorded already replays as it was.
            check_arguments(child_def, args, engine.max_payload, where=(
                f"ctx.{'call' if wait else 'start_child'} in run {x.run.run_id} of "
                f"{x.wdef.name}: "))
        call = await j.replay_or_begin(EntryKind.CHILD, name, base=base)
        entry = call.entry
        if entry is not None and call.replayed:
            info = codec.loads(entry.detail)
            if entry.status == EntryStatus.FAILED:
                raise WorkflowCallError(entry.error or f"child {name} failed")
            return str(info["run_id"]), self._child_result(name, entry.result)
        if entry is None:
            if not await engine.knows_workflow(name):
                raise UnknownWorkflow(
                    f"child workflow {name!r} is not registered in app {engine.app!r}"
                )
            # The child waits in its workflow's queue, as any start of it does.
            queue = await default_entry(engine, name)
            if queue is not None and wait:
                await check_call(engine, x.run.run_id, x.wdef.name, name, queue)
            # Never a child without its parent: a parent started here and not stored
            # yet is stored first (a crash, or a lost answer, between the two writes
            # would leave a child whose parent never existed). The child's key makes
            # its creation, made again after a lost answer, return the same child.
            await x.store_first()
            child, _ = await engine.create_run(
                # A retried run's new call is a new child (the old one ended for good).
                name, list(args), idempotency_key=f"child:{x.run.run_id}:{call.key}"
                + (f"@{x.run.epoch}" if x.run.epoch else ""),
                correlation_id=x.run.correlation_id, causation_id=x.run.run_id,
                parent_run_id=x.run.run_id, queue=queue,
            )
            now = x.now()
            entry = await j.begin(
                call, EntryStatus.WAITING if wait else EntryStatus.COMPLETED, started_at=now,
                ended_at=None if wait else now, detail=codec.dumps({"run_id": child.run_id}),
            )
        child_id = str(codec.loads(entry.detail)["run_id"])
        if not wait:
            return child_id, None
        final: list[Any] = []

        async def look() -> bool:
            run = await engine.store.get_run(x.run.app, child_id)
            if run is not None and run.status.is_final:
                final.append(run)
                return True
            return False

        await j.await_final(entry, look, watch=Watch("run", child_id), park=parking_for(None))
        run = final[0]
        if run.status == RunStatus.COMPLETED:
            await j.settle(entry, EntryStatus.COMPLETED, result=run.result)
            return child_id, self._child_result(name, run.result)
        error = f"child run {child_id} of {name} ended {run.status}: {run.error}"
        await j.settle(entry, EntryStatus.FAILED, error=error, error_type="WorkflowCallError")
        raise WorkflowCallError(error)

    def _child_result(self, name: str, result: str | None) -> Any:
        """A child's JSON result, restored to its return annotation when declared here."""
        value = codec.loads(result)
        wdef = self._x.engine.router.workflows.get(name)
        if wdef is None:
            return value
        return codec.restore(value, wdef.sig.result, f"result of child workflow {name}")


async def _remote_stub_def(engine: Engine, stub: Any, sdef: StepDef, what: str) -> StepDef:
    """The step an ``app.remote_step`` stub calls: as declared by its service (whose
    workers take its tasks), or, while no service has declared it, for the service the
    stub names, else for the service that will declare it (its name is no guide)."""
    name, given = sdef.name, getattr(stub, REMOTE_SERVICE_ATTR)
    declared = await engine.remote_step(name)
    if declared is None:
        if getattr(stub, DECLARED_ATTR, False):
            raise UnknownStep(
                f"{what} {name!r}: no service of app {engine.app!r} has declared it; start "
                "that service once, or use app.remote_step(name, wait_for_service=True)"
            )
        return sdef if given is not None else dataclasses.replace(sdef, service=UNADDRESSED)
    if given is not None and given != declared.service:
        raise UnknownStep(
            f"{what} {name!r}: app.remote_step names service {given!r}, but the step is "
            f"declared by service {declared.service!r}, whose workers run it: drop "
            "service= or name that service"
        )
    return declared
