"""``App``: the one root object. Declarations, lifecycle and the client API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cantata.app_options import (
    DEFAULT_MAX_RUNS,
    check_backend,
    check_max_runs,
    check_options,
    served,
)
from cantata.app_router import RouterFacade
from cantata.app_runtime import Runtime
from cantata.broker.base import Broker
from cantata.choreography.orphans import find_orphans, report_orphans
from cantata.choreography.publish import new_event, repeated
from cantata.choreography.redrive import redrive
from cantata.declare.defs import check_arguments, workflow_name
from cantata.declare.router import Router
from cantata.engine.clock import Clock, SystemClock
from cantata.engine.engine import Engine
from cantata.engine.handle import RunHandle
from cantata.engine.hooks import Hook, Hooks
from cantata.errors import (
    ConfigurationError,
    DeadLetterNotFound,
    UnknownWorkflow,
)
from cantata.model import codec, secrets
from cantata.model.checks import actor_or, check_run_id, check_seconds, check_text
from cantata.model.event import Event
from cantata.model.idempotency import check_given_key
from cantata.model.records import DeadLetter, GroupRetired, RunInfo
from cantata.model.signing import Signer
from cantata.model.status import RunStatus, parse_status
from cantata.store.audit import AuditKey, key_from_env, make_key, publish_repeated_entry
from cantata.store.base import Store
from cantata.store.tx import Tx

if TYPE_CHECKING:
    from cantata.engine.repin import RepinReport
    from cantata.flow.schedules import Schedules
    from cantata.model.flow import QueueStats
    from cantata.observability.groups import GroupInfo
    from cantata.observability.node import TraceNode
    from cantata.observability.stalled import Stall

log = logging.getLogger("cantata")

DEFAULT_STORE = "sqlite:///cantata.db"
DEFAULT_BROKER = "embedded"


def _audit_key(
    given: str | bytes | None, previous: Sequence[str | bytes] | None
) -> AuditKey | None:
    """The app's audit key: ``given`` with its ``previous`` keys, else
    ``$CANTATA_AUDIT_KEY`` with ``$CANTATA_AUDIT_PREVIOUS_KEYS`` (each named when it is
    the one that is invalid), else none."""
    if given is not None or previous is not None:
        return make_key(given, previous)
    return key_from_env(os.environ)


class App(RouterFacade):
    """A Cantata application: one namespace of runs, events and dead letters.

    Its decorators (``@app.step``, ``@app.workflow``, ``@app.on``, ...) declare into
    the :class:`~cantata.Router` it holds, ``app.router``.

    Args:
        name: the namespace shared by every service of one system.
        store: a URL (``sqlite:///file.db``, ``memory://``, ``postgresql://…``) or a
            :class:`~cantata.store.base.Store`; defaults to ``$CANTATA_STORE`` then
            ``sqlite:///cantata.db``.
        broker: ``embedded``, ``nats://…`` or a :class:`~cantata.broker.base.Broker`;
            defaults to ``$CANTATA_BROKER`` then ``embedded``.
        clock: where timers read time (``cantata.testing`` passes a skipping clock).
        lease: seconds after which this worker's work is taken over once it falls
            silent; recorded with each heartbeat, so other workers judge it by this
            lease whatever their own (docs/leases.md).
        poll_interval: seconds between looks for work committed by other processes.
        services: serve only these services' workflows, steps and handler groups.
        signing_keys: key id -> secret; events this app publishes or emits are signed
            (HMAC-SHA256) with ``signing_key_id`` and verified with any listed key.
        signing_key_id: the key that signs (default: the first of ``signing_keys``).
        require_signatures: dead-letter unsigned or forged events before any handler,
            trigger or wait sees them.
        legacy_signatures: what to do with signatures of the legacy form, which bind an
            event to no app (made by releases before signatures covered the app):
            ``"accept"`` them (the default, so an upgrade keeps working), also ``"sign"``
            in that form (while services of an earlier release still verify), or
            ``"refuse"`` them once every service signs in the new form
            (docs/security.md, docs/deploy.md).
        max_payload: the most bytes of JSON one argument, result or event may take;
            larger ones are refused with ``PayloadTooLarge`` naming both sizes.
        offload_above: events larger than this many bytes travel on the broker as a
            reference to their copy in the store (claim check), and ``max_payload`` no
            longer bounds what the store keeps.
        audit_key: keys the audit chain (HMAC-SHA256) so that it cannot be rewritten
            without the key; defaults to ``$CANTATA_AUDIT_KEY``. Keep it outside the store.
        audit_previous_keys: the keys the chain was keyed with before ``audit_key``,
            newest first (a rotation, docs/security.md): they verify the records written
            before the switch, never write; with ``audit_key`` only. Defaults, with the
            key, to ``$CANTATA_AUDIT_PREVIOUS_KEYS`` (comma-separated).
        shutdown_grace: seconds a stop (:meth:`close`, SIGTERM) lets steps and handlers
            in progress finish before releasing what is left (docs/leases.md).
        version: the code version recorded on each run this app starts (default: a
            hash of its workflows' and steps' code); its workers take runs of this
            version and runs of others whose history this code replays.
        any_version: its workers take runs of every version, unchecked.
        park_after: seconds a run may wait in ``ctx.sleep``, ``ctx.wait_for_event``,
            ``ctx.call`` or a step's retry backoff in memory before it is evicted
            (released in the store with what wakes it, resumed from its history by any
            worker when it wakes); ``None`` keeps every waiting run in memory. Only with
            the system clock.
        hot_runs: the most waiting runs kept in memory; past it the longest-waiting
            one is evicted at once (with ``park_after`` set).
        max_runs: the most runs in progress in this worker process (``None``: no
            bound). Its claims take no more than its room, and a start past it is
            stored for any worker with room, so a burst spreads over the processes of
            ``cantata worker --processes N``. A run that only waits (``ctx.sleep``,
            ``ctx.wait_for_event``, ``ctx.call``, a step's retry backoff), in memory
            or parked, does not count (docs/flow-control.md, "Runs per worker").
    """

    def __init__(
        self,
        name: str,
        store: str | Store | None = None,
        broker: str | Broker | None = None,
        *,
        clock: Clock | None = None,
        lease: float = 10.0,
        poll_interval: float = 0.2,
        services: Iterable[str] | None = None,
        concurrency: int = 256,
        signing_keys: Mapping[str, str | bytes] | None = None,
        signing_key_id: str | None = None,
        require_signatures: bool = False,
        legacy_signatures: str = "accept",
        audit_key: str | bytes | None = None,
        audit_previous_keys: Sequence[str | bytes] | None = None,
        max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
        offload_above: int | None = None,
        shutdown_grace: float = 30.0,
        version: str | None = None,
        any_version: bool = False,
        park_after: float | None = 60.0,
        hot_runs: int = 10_000,
        max_runs: int | None = DEFAULT_MAX_RUNS,
    ) -> None:
        check_options(
            name, lease=lease, poll_interval=poll_interval, shutdown_grace=shutdown_grace,
            max_payload=max_payload, offload_above=offload_above, version=version,
        )
        for kind, spec in (("store", store), ("broker", broker)):
            if spec is not None:
                check_backend(kind, spec)
        self.router = Router()
        self.name = name
        self._store_spec = store if store is not None else os.environ.get(
            "CANTATA_STORE", DEFAULT_STORE
        )
        self._broker_spec = broker if broker is not None else os.environ.get(
            "CANTATA_BROKER", DEFAULT_BROKER
        )
        for spec in (self._store_spec, self._broker_spec):
            if isinstance(spec, str):
                secrets.remember(spec)
        self.clock = clock or SystemClock()
        self.lease = lease
        self.poll_interval = poll_interval
        self.services = served(services)
        self.concurrency = concurrency
        self.signer = Signer(signing_keys, signing_key_id, require=require_signatures,
                             app=name, legacy=legacy_signatures)
        self.audit_key = _audit_key(audit_key, audit_previous_keys)
        self.max_payload = max_payload
        self.offload_above = offload_above
        self.shutdown_grace = shutdown_grace
        self._force_stop: asyncio.Event | None = None
        self._version = version
        self.any_version = any_version
        if park_after is not None and (not isinstance(park_after, int | float) or park_after < 0):
            raise ConfigurationError(
                f"park_after must be None or seconds >= 0, got {park_after!r}"
            )
        if not isinstance(hot_runs, int) or hot_runs < 0:
            raise ConfigurationError(f"hot_runs must be a whole number >= 0, got {hot_runs!r}")
        self.park_after = None if park_after is None else float(park_after)
        self.hot_runs = hot_runs
        self.max_runs = check_max_runs(max_runs)
        self._runtime: Runtime | None = None  # while open
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it is open on
        self._lock: asyncio.Lock | None = None  # opens and closes, one at a time
        self._lock_loop: asyncio.AbstractEventLoop | None = None  # the loop of _lock
        self._opened = 0
        self.hooks = Hooks()

    def configure(
        self, *, store: str | Store | None = None, broker: str | Broker | None = None
    ) -> None:
        """Point a not-yet-open app at another store or broker (the CLI's ``--store``).

        Raises:
            ConfigurationError: the app is open, or ``store`` / ``broker`` is neither
                a URL nor a backend object.
        """
        if self._loop is not None and self._loop.is_closed():
            self._drop_loop(self._loop)
        if self._loop is not None:  # open, or being opened or closed
            raise ConfigurationError(f"app {self.name!r} is open: configure it before opening")
        for kind, spec in (("store", store), ("broker", broker)):
            if spec is not None:
                check_backend(kind, spec)
        if store is not None:
            self._store_spec = store
        if broker is not None:
            self._broker_spec = broker

    def add_hook(self, hook: Hook) -> None:
        """Install an extension hook (tracing, metrics, …); see :mod:`cantata.engine.hooks`."""
        hook.app_name = self.name
        self.hooks.add(hook)

    def __repr__(self) -> str:
        return f"App({self.name!r})"

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def store(self) -> Store:
        """The open store (raises if the app is not open)."""
        return self.engine.store

    @property
    def engine(self) -> Engine:
        if self._runtime is None:
            raise ConfigurationError(
                f"app {self.name!r} is not open: use `async with app:` or "
                "`async with app.client():` first"
            )
        return self._runtime.engine

    @property
    def is_open(self) -> bool:
        """Whether the app is open (as a worker or as a client)."""
        return self._runtime is not None

    @property
    def _engine(self) -> Engine | None:
        return self._runtime.engine if self._runtime is not None else None

    @property
    def _broker(self) -> Broker | None:
        return self._runtime.broker if self._runtime is not None else None

    @property
    def backends(self) -> tuple[str | Store, str | Broker]:
        """The store and broker this app opens (URLs or objects)."""
        return self._store_spec, self._broker_spec

    @property
    def metrics(self) -> Any:
        """Counters of this process (runs by status, retries, dead letters, orphans)."""
        return self.engine.metrics

    async def open(self, *, serve: bool = True) -> None:
        """Open store and broker, record declarations; with ``serve`` run a worker here.

        Opens and closes of one app are taken one at a time: tasks that open it at once
        share one open app, and an open that meets a close waits for it, then opens anew.
        """
        async with self._lifecycle("open"):
            if self._runtime is not None:
                if serve and not self._runtime.engine.serving:
                    await self._runtime.serve(self)
                self._opened += 1
                return
            self._loop = asyncio.get_running_loop()  # from now: other loops are refused
            try:
                # (open from the moment its engine exists: steps and handlers this
                # worker claims while it opens may use the app, app.start, app.publish)
                await Runtime.open(self, serve, made=self._made)
            except BaseException:
                self._runtime = None
                self._loop = None
                raise
            self._opened = 1

    def _made(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def _lifecycle(self, doing: str) -> asyncio.Lock:
        """The lock that takes this app's opens and closes one at a time, bound to the
        running event loop (a new one for a closed app used from another loop)."""
        if self._loop is not None:
            self._check_loop(doing)
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def _check_loop(self, doing: str) -> None:
        """Refuse to use the open app from an event loop other than the one it is open
        on: its connections and tasks belong to that loop. An app whose loop is closed
        is forgotten there first (:meth:`_drop_loop`): nothing of it can run any more."""
        if self._loop is not None and self._loop.is_closed():
            self._drop_loop(self._loop)
            return
        if asyncio.get_running_loop() is not self._loop:
            raise ConfigurationError(
                f"cannot {doing} app {self.name!r}: it is open on another event loop "
                "(another thread's `async with app:`, or a `cantata.sync.connect(app)` "
                "block); use it from that loop, or close it there first"
            )

    def _drop_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The app is open on ``loop``, which was stopped or closed before the app's
        close finished (a second Ctrl-C in ``asyncio.run`` or while a ``cantata.sync``
        block closed): nothing more runs there, so the app counts as closed from now on.
        Its connections are dropped as they are; what its worker held is taken over
        when its lease expires, as after a crash."""
        if self._loop is not loop:
            return
        if self._runtime is not None:
            log.warning(
                "app %r was left open on an event loop that stopped before its close "
                "finished (interrupted?): its connections are dropped and it counts as "
                "closed; runs and deliveries its worker held resume elsewhere once its "
                "lease (%.0f s) expires", self.name, self.lease,
            )
        self._runtime = None
        self._loop = None
        self._opened = 0
        self._force_stop = None
        self._lock = self._lock_loop = None

    async def close(self) -> None:
        """Stop gracefully and close connections.

        Claims nothing more; steps and handlers in progress finish for up to
        ``shutdown_grace`` seconds (or until :meth:`force_stop`); what is left is
        released at once for other workers. A stop never counts as an attempt.
        """
        if self._runtime is None:
            return
        async with self._lifecycle("close"):
            runtime = self._runtime
            if runtime is None:  # closed by another task while this one waited
                return
            self._opened -= 1
            if self._opened > 0:
                return
            self._force_stop = asyncio.Event()
            await runtime.close(self.shutdown_grace, self._force_stop)
            self._force_stop = None
            self._runtime = None
            self._loop = None

    def force_stop(self) -> None:
        """End a graceful stop in progress at once (a second SIGTERM or SIGINT): what
        still runs is released now. Does nothing when no stop is under way."""
        if self._force_stop is not None:
            self._force_stop.set()

    async def __aenter__(self) -> App:
        await self.open(serve=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[App]:
        """Open the app without executing anything: start, publish and query only."""
        await self.open(serve=False)
        try:
            yield self
        finally:
            await self.close()

    async def run_worker(self) -> None:
        """Serve this app's workflows and handlers until cancelled (``cantata worker``).

        Raises:
            StoreUpgraded: a newer Cantata migrated the store while this worker served
                (raised after the graceful stop): restart it with the new release.
        """
        await self.open(serve=True)
        engine = self.engine
        try:
            await engine.must_stop.wait()
        finally:
            await self.close()
        if engine.upgraded is not None:
            raise engine.upgraded

    def _emitted(self, events: list[Event[Any]]) -> None:
        if self._runtime is not None:
            self._runtime.emitted(events)

    # -- orchestration ---------------------------------------------------------------------

    async def start(
        self,
        workflow: Callable[..., Any] | str,
        *args: Any,
        idempotency_key: str | None = None,
        deadline: float | None = None,
        correlation_id: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        partition: str | None = None,
        actor: str | None = None,
    ) -> RunHandle:
        """Start a run of ``workflow`` (a function or its name) with JSON arguments.

        Args:
            idempotency_key: the same key returns the same run.
            deadline: seconds; past it the run fails with ``DeadlineExceeded`` and compensates.
            correlation_id: join an existing business transaction.
            queue: wait in this queue (declared with ``app.queue``) before beginning;
                defaults to the workflow's ``@app.workflow(queue=...)``.
            priority: with a queue of ``priorities=True``, lower numbers begin first.
            partition: with a queue, its limits apply per partition key.
            actor: the operator starting it (``cantata start`` passes ``cli:user@host``):
                the run's ``run.created`` audit record names them, in the transaction
                that creates the run (default: ``system``, as for runs Cantata starts;
                a start that finds its idempotency key's run records nothing).

        Raises:
            UnknownWorkflow: no service of this app declares it.
            UnknownQueue: no process of this app declares ``queue``.
            ConfigurationError: ``priority`` is not an int, ``partition`` not a string;
                ``idempotency_key``, ``correlation_id`` or ``partition`` is longer than
                500 characters (the store indexes it); ``idempotency_key``,
                ``correlation_id``, ``partition`` or ``actor`` holds a NUL character or
                a lone surrogate (no store keeps it as given).
            SerializationError: an argument is not JSON-serialisable, or (when this
                process has the workflow's code) does not match its parameter's declared
                type, as the worker would restore it (nothing is stored).
            IdempotencyConflict: the key was used with other arguments.
            StoreUnavailable: the store could not store the run. When its answer to the
                run's creation was lost (the run may be stored), start finds out by the
                run's id for up to one lease first, and returns the run if it is stored;
                only after that does it raise, naming the run's id and how to find out
                (starting again with the same ``idempotency_key`` is safe).
        """
        handle, _ = await self._start(
            workflow, *args, idempotency_key=idempotency_key, deadline=deadline,
            correlation_id=correlation_id, queue=queue, priority=priority, partition=partition,
            actor=actor,
        )
        return handle

    async def _start(
        self,
        workflow: Callable[..., Any] | str,
        *args: Any,
        idempotency_key: str | None = None,
        deadline: float | None = None,
        correlation_id: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        partition: str | None = None,
        actor: str | None = None,
    ) -> tuple[RunHandle, bool]:
        """:meth:`start`, and whether this call created the run (``False``: the
        idempotency key's run existed and nothing was started), as the store told it:
        of simultaneous first starts with one key, exactly one is told ``True``."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            self._check_loop("start a run of")  # (an app open under a sync block)
        engine = self.engine
        name = workflow_name(workflow)
        who = check_text("actor", actor) if actor else None
        wdef = engine.router.workflows.get(name)
        if wdef is None and not await engine.knows_workflow(name):
            known = ", ".join(await self._workflow_names()) or "none"
            raise UnknownWorkflow(
                f"no workflow named {name!r} in app {self.name!r} (known: {known}); "
                "register it with @app.workflow in a service of this app"
            )
        if wdef is not None and not wdef.sig.plain:
            # Its code is here and a parameter is typed (a model, a dataclass, a date):
            # arguments the worker would refuse are refused before the run is written.
            check_arguments(wdef, args, engine.max_payload)
        if deadline is not None:  # (None passes both checks: no call on every start)
            check_seconds("deadline", deadline)
        if idempotency_key is not None:
            check_given_key(idempotency_key)
        if (queue is None and priority == 0 and partition is None and wdef is not None
                and wdef.queue is None and type(priority) is int):
            entry = None  # no queue: what entry_for says, without its checks' coroutine
        else:
            from cantata.flow.queues import entry_for

            entry = await entry_for(engine, name, queue, priority, partition)
        run, created = await engine.create_run(
            name, list(args), idempotency_key=idempotency_key, deadline=deadline,
            correlation_id=correlation_id, queue=entry, actor=who,
        )
        return self._handle(engine, run.run_id, name), created

    async def _workflow_names(self) -> list[str]:
        """The workflows this process's code registers and those any service of the app
        declared in the store (what the console's ``GET /api/workflows`` lists)."""
        declared = await self.engine.store.declarations(self.name)
        return sorted({d.name for d in declared if d.kind == "workflow"} | set(self.workflows))

    async def _group_names(self) -> list[str]:
        """The handler groups (and ``start_on`` triggers' groups) this process's code has
        and those any service of the app declared in the store."""
        declared = await self.engine.store.declarations(self.name)
        return sorted({d.name for d in declared if d.kind in ("handler", "trigger")}
                      | {h.group for h in self.handlers})

    async def _unknown_group(self, group: str) -> str | None:
        """Why ``group`` names no group of this app (naming the known ones), for a filter
        that found nothing; ``None`` when it is one (a group without dead letters)."""
        known = await self._group_names()
        if group in known:
            return None
        return (f"no handler group {group!r} in app {self.name!r} "
                f"(known: {', '.join(known) or 'none'})")

    def asgi(self, *, stream_interval: float = 0.5) -> Any:
        """The operator console (HTTP API and dashboard) as an ASGI application, to mount
        in your own (docs/console.md). It opens this app as a client on first use.

        Args:
            stream_interval: seconds between looks for changes made by other processes
                (the dashboard's live updates).
        """
        from cantata.server.app import create_app

        return create_app(self, stream_interval=stream_interval)

    @property
    def version(self) -> str:
        """The code version of this app: ``App(version=...)`` or a hash of its code."""
        if self._version is not None:
            return self._version
        from cantata.engine.versioning import code_version

        return code_version(self.router)

    async def find_runs(
        self,
        idempotency_key: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        workflow: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 100,
        version: str | None = None,
    ) -> list[RunInfo]:
        """Runs matching every given filter, newest first, with their attributes.

        ``attributes`` are search attributes set by ``ctx.set_attributes``; a run must
        hold all of them (numbers and strings match by text: 42 finds "42"). ``version``:
        the runs pinned to that code version (docs/operating.md, versions).

        Raises:
            UnknownAttribute: a name no run of this app has set, or malformed.
        """
        from cantata.engine.recovery import find_runs

        return await find_runs(
            self.engine, idempotency_key=idempotency_key, attributes=attributes,
            workflow=workflow, status=status, limit=limit, version=version,
        )

    async def repin_runs(
        self,
        from_version: str,
        to_version: str | None = None,
        *,
        workflow: str | None = None,
        dry_run: bool = False,
        actor: str | None = None,
        limit: int = 1000,
    ) -> RepinReport:
        """Pin the live runs of ``from_version`` to this code's version (a rollback's
        way back to older code), each only once this code replays its whole history
        and while no live worker holds it; audited as ``run.repinned`` by ``actor``.
        ``to_version``, if given, must be this code's version. With ``dry_run``, the
        runs are checked and nothing is changed. See docs/operating.md, versions.

        Returns:
            The runs it moved (or would move) and those it left, each with why.

        Raises:
            ConfigurationError: this app has no workflow code, or is not of
                ``to_version``; or ``workflow`` is not in its code.
        """
        from cantata.engine.repin import repin_runs

        return await repin_runs(self.engine, from_version, to_version, workflow=workflow,
                                dry_run=dry_run, actor=actor, limit=limit)

    async def fork(
        self, run_id: str, from_step: str, *, actor: str | None = None
    ) -> RunHandle:
        """A new run of ``run_id``'s workflow and arguments that reuses its recorded
        results before ``from_step`` (a history key, ``"name#n"``) and runs the rest
        with the current code. ``actor`` is audited (default: this process).

        Raises:
            RunNotFound: no such run.
            RunInProgress: the run has not ended.
            StepNotInHistory: the run never reached ``from_step``, or it is not a step
                (a recorded ``set_attributes``, ``patched``, ``set_value``, ``now``...).
        """
        from cantata.engine.recovery import fork

        run = await fork(self.engine, run_id, from_step=from_step, actor=actor)
        return self._handle(self.engine, run.run_id, run.workflow)

    @property
    def schedules(self) -> Schedules:
        """Schedules at run time: ``create``, ``list``, ``pause``, ``resume``, ``trigger``,
        ``delete`` (the app must be open)."""
        from cantata.flow.schedules import Schedules

        return Schedules(lambda: self.engine, self._handle)

    async def queue_stats(self) -> list[QueueStats]:
        """Per queue: runs waiting, in progress, begun in the rate window, oldest waiting."""
        return await self.store.queue_stats(self.name, now=self.clock.now())

    def get_handle(self, run_id: str) -> RunHandle:
        """A handle on an existing run (from any process sharing the store).

        Raises:
            RunNotFound: ``run_id`` is no str (a handle or an event passed for its id).
        """
        if not isinstance(run_id, str):
            check_run_id(run_id)  # names the attribute to pass
        return self._handle(self.engine, run_id)

    def _handle(self, engine: Engine, run_id: str, workflow: str | None = None) -> RunHandle:
        # The handle follows the app: used after the app was closed and opened again,
        # it takes the new engine (a handle kept across `async with app:` blocks).
        return RunHandle(engine, run_id, workflow, current=lambda: self._engine)

    async def list_runs(
        self,
        status: RunStatus | str | None = None,
        workflow: str | None = None,
        limit: int = 50,
    ) -> list[RunInfo]:
        """Runs of this app, newest first (at most ``limit``, 0 or more)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigurationError(
                f"list_runs(limit=...) must be a whole number, 0 or more, got {limit!r}"
            )
        st = parse_status(status)
        if isinstance(workflow, str):
            check_text("list_runs(workflow=...)", workflow, hint="no run has one; check the filter")
        runs = await self.store.list_runs(self.name, status=st, workflow=workflow, limit=limit)
        return [RunInfo.of(r) for r in runs]

    # -- choreography -------------------------------------------------------------------------

    async def publish(
        self,
        type: str,
        data: Any = None,
        *,
        subject: str | None = None,
        correlation_id: str | None = None,
        source: str | None = None,
        id: str | None = None,
        tx: Tx | None = None,
        actor: str | None = None,
    ) -> Event[Any]:
        """Publish an event (committed to the log, then delivered to every group).

        Its correlation id defaults to its own id (a new business transaction). An
        ``id`` already used by an event with the same content is a duplicate: nothing
        is published again and the stored event comes back with ``duplicate=True``.

        Args:
            tx: the ``cantata.Tx`` of an ``@app.transaction`` step: the event is
                appended in that step's transaction (the outbox in the service's
                database), with the run's correlation id unless one is given.
            actor: the operator publishing it (``cantata publish`` passes
                ``cli:user@host``): audited as ``event.published`` by them in the
                transaction that stores the event (both are written, or neither), or
                ``event.publish_repeated`` for a duplicate. Without it nothing is
                audited, as for events workflows and handlers emit.

        Raises:
            ConfigurationError: ``tx`` is not a ``cantata.Tx``; ``actor`` with ``tx``
                (the step's event is the run's); ``actor`` holds a NUL or a lone
                surrogate.
            TransactionClosed: ``tx``'s step has returned (its transaction committed).
            DuplicateEventId: ``id`` was used by an event with different content.
            InvalidEvent: a bad type, or ``id``, ``subject``, ``source`` or
                ``correlation_id`` empty or holding a NUL or a lone surrogate.
            SerializationError: ``data`` is not JSON (or holds NaN or an infinity).
        """
        event, _ = await self._publish(
            type, data, subject=subject, correlation_id=correlation_id, source=source, id=id,
            tx=tx, actor=actor,
        )
        return event

    async def _publish(
        self,
        type: str,
        data: Any,
        *,
        subject: str | None,
        correlation_id: str | None,
        source: str | None = None,
        id: str | None,
        tx: Tx | None = None,
        actor: str | None = None,
    ) -> tuple[Event[Any], bool]:
        """:meth:`publish`, and whether the event is an orphan (nothing in the app listens
        to its type: counted and logged; ``False`` in a ``tx``, checked at its commit).
        A repeated id's stored event (``duplicate``) is told an orphan too, not counted."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            self._check_loop("publish to")  # (an app open under a sync block)
        if tx is not None and not isinstance(tx, Tx):
            raise ConfigurationError(
                "tx= must be the cantata.Tx of the running @app.transaction step, got "
                f"{tx!r}: pass the step's first argument, or leave tx= out"
            )
        if actor and tx is not None:
            raise ConfigurationError(
                "actor= and tx= were both given to publish: an event published in an "
                "@app.transaction step is the run's, committed with its checkpoint; leave "
                "actor= out there (it audits an operator's publish)"
            )
        who = check_text("actor", actor) if actor else None
        event = new_event(
            self.name, type, data, subject=subject, correlation_id=correlation_id,
            source=source, id=id, max_payload=self.engine.max_payload,
            correlate=tx.correlation_id if tx is not None else None,
            causation_id=(tx.run_id or None) if tx is not None else None,
        )
        if tx is not None:
            event = self.signer.sign(event)
            self.engine.check_event(event)
            tx.publish(event)  # appended with the step's checkpoint, orphans checked then
            return event, False
        # An id the caller chose may be taken by another publish of it at the same moment
        # (after the look-up below found nothing): the store says whether this one's
        # append stored the event, and if not, this publish is a repeat of that one.
        stored: list[bool] | None = None
        if id is not None:
            earlier = await self.store.get_event(self.name, id)
            if earlier is not None:  # nothing is published: an orphan still, not counted
                return await self._repeated(earlier, event, who)
            stored = []
        event = self.signer.sign(event)
        with self.hooks.publish(event):
            if self.hooks:
                traceparent = self.hooks.traceparent()
                if traceparent != event.traceparent:  # (no new event for the same None)
                    event = dataclasses.replace(event, traceparent=traceparent)
            self.engine.check_event(event)
            # (through the broker: it may hand the event to this worker's handlers). An
            # operator's publish is audited by the append that stores the event, in its
            # transaction: a crash leaves both or neither, a retry records it once.
            broker = self._broker
            counts = await (
                self.store.append_events(self.name, [event], actor=who, stored=stored)
                if broker is None
                else broker.append(self.name, [event], actor=who, stored=stored))
        if stored == [False]:  # another publish of the id stored it first
            earlier = await self.store.get_event(self.name, event.id)
            if earlier is not None:
                return await self._repeated(earlier, event, who)
        self._emitted([event])
        if not counts or counts[0] != 0:
            return event, False
        # The event is stored: a failed read of the declarations is no failed publish
        # (a caller retrying it would publish the event twice), it is logged and the
        # event checked with the next emit; meanwhile it is not told an orphan.
        orphans = await report_orphans(self.engine, [event])
        return event, any(o.id == event.id for o in orphans or ())

    async def _repeated(
        self, earlier: Event[Any], event: Event[Any], who: str | None
    ) -> tuple[Event[Any], bool]:
        """A publish of an id already stored: the stored event (``duplicate``) and
        whether it is an orphan, as :meth:`_publish` answers; an operator's is recorded
        as ``event.publish_repeated``. Nothing is published.

        Raises:
            DuplicateEventId: ``event`` has other content than ``earlier``.
        """
        event = repeated(earlier, event)
        if who is not None:  # an operator's publish: recorded as the repeat it is
            await self.store.record_action(
                self.name, *publish_repeated_entry(who, event.id, event.type))
        return event, bool(await find_orphans(self.engine, [event]))

    # -- observability --------------------------------------------------------------------

    async def trace(self, correlation_id: str) -> TraceNode:
        """The whole business transaction as a tree (root: the run or event that began it).

        Raises:
            TraceNotFound: nothing in this app carries that id.
        """
        from cantata.observability.trace import build_trace

        return await build_trace(self.store, self.name, correlation_id)

    async def stalled(self, older_than: float = 300) -> list[Stall]:
        """Transactions with no progress for ``older_than`` seconds, each with its reason."""
        from cantata.observability.stalled import find_stalls

        return await find_stalls(
            self.store, self.name, older_than=older_than, now=self.clock.now()
        )

    async def dead_letters(
        self, limit: int = 100, *, group: str | None = None, type: str | None = None
    ) -> list[DeadLetter]:
        """Deliveries that failed for good, oldest first: the first ``limit`` of
        ``group``'s (default: every group's) whose event is of ``type`` (default: any)."""
        return await self.store.dead_letters(self.name, limit=limit, group=group, type=type)

    async def redrive(self, older_than: float = 60.0) -> int:
        """Publish again the events a group has had pending for over ``older_than``
        seconds (the broker lost them, or they are stuck); groups that handled them
        already are not bothered. The broker takes them even if it saw their ids
        within its duplicate window.

        Returns:
            How many events went out again (0 with the embedded broker, which reads
            pending deliveries straight from the store).
        """
        assert self._broker is not None
        return await redrive(self.store, self._broker, self.name, older_than)

    async def replay(self, dead_letter_id: str, *, actor: str | None = None) -> DeadLetter:
        """Redeliver a dead letter to its group (keeping the event's correlation id).

        ``actor`` is recorded in the audit log (default: this process).

        Raises:
            DeadLetterNotFound: no such dead letter.
        """
        dl = await self.store.replay_dead_letter(
            self.name, _dead_letter_id(dead_letter_id), self.clock.now(),
            actor=actor_or(actor, f"process:{self.engine.worker_id}"),
        )
        assert self._broker is not None
        await self._broker.redeliver(self.name, dl.group, dl.event)
        return dl

    async def discard(self, dead_letter_id: str, *, actor: str | None = None) -> DeadLetter:
        """Remove a dead letter for good (it is not redelivered); audited with ``actor``.

        Raises:
            DeadLetterNotFound: no such dead letter.
        """
        return await self.store.discard_dead_letter(
            self.name, _dead_letter_id(dead_letter_id),
            actor=actor_or(actor, f"process:{self.engine.worker_id}"),
        )


    # -- handler groups -------------------------------------------------------------------

    async def groups(self) -> list[GroupInfo]:
        """Every handler group and ``start_on`` trigger declared in this app (by any of
        its processes), by name: the event types it is declared for, its pending
        deliveries (how many, the oldest's time, how many a live worker is handling),
        its dead letters, and the live workers that serve it now."""
        from cantata.observability.groups import groups

        return await groups(self.store, self.name, now=self.clock.now())

    async def retire_group(self, group: str, *, actor: str | None = None) -> GroupRetired:
        """Retire a handler group (or a trigger: ``"start:<workflow>"``) no code serves
        any more: its declaration is removed, so new events get no delivery for it, and
        its pending deliveries are ended as retired (the trace shows them so); its dead
        letters stay. ``actor`` is audited (default: this process). Retiring it again
        changes nothing.

        Raises:
            GroupInUse: a live worker serves the group (named in the message).
        """
        from cantata.observability.groups import retire

        return await retire(
            self.store, self.name, check_text("group", group), now=self.clock.now(),
            actor=actor_or(actor, f"process:{self.engine.worker_id}"),
        )

def _dead_letter_id(dead_letter_id: str) -> str:
    """A dead letter id to look up: one holding a NUL or a lone surrogate is no id."""
    return check_text("dead letter id", dead_letter_id, error=DeadLetterNotFound,
                      hint="no dead letter has such an id; see app.dead_letters()")
