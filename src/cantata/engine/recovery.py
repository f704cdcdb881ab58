"""Recovering runs after the fact: retry a failed run, fork a run from a step, and
find runs by key or search attribute (docs/operating.md).

Retry keeps the run and its history: the failed step and what came after it are
superseded (kept apart under the run's next epoch, see
:meth:`cantata.store.base.Store.retry_run`), so the run replays its completed steps
and executes the failed one again with the current code. Fork makes a new run that
starts with the source run's recorded results before a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cantata.errors import (
    ConfigurationError,
    HistoryNotReplayable,
    RunNotFound,
    RunNotRetryable,
    StepNotInHistory,
    UnknownAttribute,
)
from cantata.model import codec
from cantata.model.access import RunQuery
from cantata.model.attributes import check_name, index_value
from cantata.model.checks import actor_or, check_run_id, check_text
from cantata.model.flow import QueueEntry
from cantata.model.records import RunInfo, RunRecord
from cantata.model.status import RunStatus, parse_status

from .saga.choreographed import ran_choreographed, start_key
from .versioning import current_version

if TYPE_CHECKING:
    from cantata.declare.defs import WorkflowDef
    from cantata.store.base import Store

    from .engine import Engine


async def _version_for(engine: Engine, workflow: str) -> str | None:
    """The version a retried or forked run is pinned to: this process's, when it has the
    workflow's code; otherwise (the command line) the newest version that has served
    the app — the deployed fix."""
    if workflow in engine.router.workflows:
        return engine.version
    return await current_version(engine.store, engine.app)


async def _queue_for(engine: Engine, run_id: str, workflow: str) -> QueueEntry | None:
    """Where a retried or forked run waits to begin: the queue (partition, priority) the
    run ``run_id`` waited in while its row is kept, else its workflow's queue
    (``@app.workflow(queue=...)``, as a start by name finds it), else none."""
    from cantata.flow.queues import entry_for

    entry = await engine.store.run_queue(engine.app, run_id)
    if entry is not None:
        return entry
    return await entry_for(engine, workflow, None, 0, None)


async def retry(
    engine: Engine, run_id: str, *, include_compensated: bool = False, actor: str | None = None,
    force: bool = False,
) -> RunRecord:
    """Make a failed run live again from its failed step (see the module docstring)."""
    check_run_id(run_id)
    who = actor_or(actor, f"process:{engine.worker_id}")
    run = await engine.store.get_run(engine.app, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in app {engine.app!r}: check the id")
    if run.status in (RunStatus.FAILED, RunStatus.COMPENSATED) \
            and await _choreographed(engine.store, run):
        start = start_key(run.workflow)
        raise RunNotRetryable(
            f"run {run_id} is a choreographed saga run ({run.workflow}): its steps ran as "
            "handlers of other services, and a retry would only replay the end its run "
            f"recorded ({run.status}), running no step again; to run it again with the "
            f"deployed code, fork it from its start: `cantata fork {run_id} --from-step "
            f"{start}` (the console's Fork, from {start}), or start a new run")
    wdef = engine.router.workflows.get(run.workflow)
    if wdef is not None and not force and (run.status == RunStatus.FAILED or (
            include_compensated and run.status == RunStatus.COMPENSATED)):
        await _check_retry(engine, run, wdef)
    engine.forget_ended(run_id)
    return await engine.store.retry_run(
        engine.app, run_id, include_compensated=include_compensated,
        version=await _version_for(engine, run.workflow),
        actor=who, now=engine.clock.now(), queue=await _queue_for(engine, run_id, run.workflow),
    )


async def _check_retry(engine: Engine, run: RunRecord, wdef: WorkflowDef) -> None:
    """Nothing, if this code (the version a retry from here pins the run to) replays what
    the retry keeps of the run's history.

    Raises:
        HistoryNotReplayable: naming the first call that differs and what to do.
    """
    from .replaycheck import check_kept

    problem = await check_kept(engine, run, wdef, retry=True)
    if problem is None:
        return
    where = f" at or before {problem.recorded}" if problem.recorded else ""
    raise HistoryNotReplayable(
        f"run {run.run_id} ({run.workflow}) cannot be retried with this code (version "
        f"{engine.version}): the history the retry keeps does not replay on it "
        f"({problem.detail}), so the run would wait for ever or fail with "
        f"NonDeterminismError; retry it from code that replays its history (the code that "
        f"ran it, version {run.version or 'unknown'}, or this change guarded by "
        f"ctx.patched), fork it from a step{where} (`cantata fork {run.run_id} --from-step "
        "KEY`), or retry it anyway with force=True (`cantata retry --force`)"
    )


async def _choreographed(store: Store, run: RunRecord) -> bool:
    """Whether ``run`` ran as a choreographed saga: its history is the saga's start
    event and its wait for the saga's end (its steps are other services' handlers)."""
    return ran_choreographed(
        run.workflow, {e.key for e in await store.load_history(run.app, run.run_id)})


async def fork(
    engine: Engine, run_id: str, *, from_step: str, actor: str | None = None
) -> RunRecord:
    """A new run of ``run_id``'s workflow and arguments, with its recorded results
    before ``from_step`` (``name#n``; a bare name means its first call)."""
    if not isinstance(from_step, str) or not from_step.strip():
        raise ConfigurationError("fork needs from_step, the history key of a call: 'name#n'")
    check_text("fork from_step", from_step)
    check_run_id(run_id)
    who = actor_or(actor, f"process:{engine.worker_id}")
    key = from_step if "#" in from_step else f"{from_step}#1"
    source = await engine.store.get_run(engine.app, run_id)
    if source is None:
        raise RunNotFound(f"no run {run_id!r} in app {engine.app!r}: check the id")
    start = start_key(source.workflow)
    if key != start and await _choreographed(engine.store, source):
        # forked from its wait, the new run would reuse its start without emitting it,
        # so no hop runs, and wait for an end that never comes
        raise StepNotInHistory(
            f"run {run_id} is a choreographed saga run ({source.workflow}): its steps ran "
            f"as handlers, not as calls of its history; fork it from its start, {start}, "
            "to run its steps again")
    now = engine.clock.now()
    new_id = codec.new_id()
    run = RunRecord(
        run_id=new_id, app=engine.app, workflow=source.workflow, status=RunStatus.PENDING,
        args=source.args, created_at=now, updated_at=now, correlation_id=new_id,
        causation_id=source.run_id, args_hash=source.args_hash, service=source.service,
        version=await _version_for(engine, source.workflow),
    )
    return await engine.store.fork_run(
        engine.app, run_id, run, before_key=key, actor=who,
        queue=await _queue_for(engine, run_id, source.workflow),
    )


async def find_runs(engine: Engine, **filters: Any) -> list[RunInfo]:
    """Runs matching every filter, newest first, each with its search attributes
    (the filters of :func:`find_records`)."""
    return [RunInfo.of(r, attrs) for r, attrs in await find_records(engine, **filters)]


async def find_records(
    engine: Engine,
    *,
    idempotency_key: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    workflow: str | None = None,
    status: RunStatus | str | None = None,
    limit: int = 100,
    version: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[tuple[RunRecord, dict[str, str]]]:
    """Stored runs matching every filter, newest first, with their search attributes.

    ``since``/``until`` (POSIX seconds) bound the runs' creation time, inclusive /
    exclusive: the runs are then read by the console's query, as ``GET /api/runs``
    reads them with its ``since``/``until`` (``cantata runs --since/--until``).

    Raises:
        ConfigurationError: an unknown status or a limit below 1, or a key or workflow
            name holding a NUL character or a lone surrogate.
        UnknownAttribute: an attribute name no run of the app has set, or malformed.
    """
    st = parse_status(status)
    if limit < 1:
        raise ConfigurationError(f"limit must be >= 1, got {limit}")
    for what, text in (("idempotency_key", idempotency_key), ("workflow", workflow),
                       ("version", version)):
        if isinstance(text, str):  # a NUL key was refused at start: say so, match nothing
            check_text(f"find_runs({what}=...)", text, hint="no run has one; check the filter")
    wanted = {check_name(name): index_value(name, value)
              for name, value in (attributes or {}).items()}
    if since is None and until is None:
        runs = await engine.store.find_runs(
            engine.app, idempotency_key=idempotency_key, attributes=wanted or None,
            workflow=workflow, status=st, limit=limit, version=version,
        )
    else:  # a window of creation times: the API's query, its bounds (created_at)
        runs = await engine.store.query_runs(engine.app, RunQuery(
            workflow=workflow, status=st, since=since, until=until,
            idempotency_key=idempotency_key, version=version,
            attributes=tuple(wanted.items()), limit=limit,
        ))
    if wanted and not runs:  # nothing found: say so if a name is unknown (a typo)
        await check_attribute_names(engine.store, engine.app, wanted)
    attrs = await engine.store.run_attributes(engine.app, [r.run_id for r in runs])
    return [(r, attrs.get(r.run_id, {})) for r in runs]


async def check_attribute_names(store: Store, app: str, names: Iterable[str]) -> None:
    """Nothing, if some run of ``app`` has set each of ``names``.

    Raises:
        UnknownAttribute: the first name no run has set (a typo), with the known ones.
    """
    known = set(await store.attribute_names(app))
    for name in names:
        if name not in known:
            raise UnknownAttribute(
                f"no run of app {app!r} has set attribute {name!r} (known: "
                f"{', '.join(sorted(known)) or 'none'}); set it with ctx.set_attributes"
            )
