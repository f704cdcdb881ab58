"""``cantata check-replay``: stored histories against the current code, call for call.

Each checked run is re-executed in a dry mode: recorded results are replayed, and
the execution stops at the first call history has no result for (the run's
frontier: a step in flight, a timer, a wait, or a new call); no step runs and
nothing is written. Every durable call the code makes on the way (steps, timers,
waits, emits, children, ``ctx.now``/``random``/``uuid``, ``set_attributes``) is
noted with its key and, for steps, the shape of its arguments. The run is then
reported when that sequence differs from its recorded history, in order:

- the i-th call of the code is not the i-th recorded call (a call inserted,
  deleted, renamed or moved before the frontier — including calls *before* a step
  that is being retried, which a lenient replay would not notice until later);
- the arguments of a recorded step now have another shape (types or keys);
- the code ends while history holds further completed calls;
- the code fails where history explains no failure, and not with the error the run
  recorded when it ended (a run that failed in its own code fails the same way).

A run whose cancellation reached its code (history records where: the
``cancelled#1`` marker) is replayed with that cancellation: it is raised into the
code at the first call history has no outcome for, as a resumed run meets it, so
the cleanup the code ran replays too and the marker is compared in its place.

A choreographed saga run is also reported when a hop of it in flight is for a step
its saga no longer has in the code (:func:`check_hops`): its workflow replays, but no
worker of the code handles that hop.

Compensations and ``ctx.patched`` markers are not compared: they are not calls of
the workflow's code path. Nor are recorded values the code makes anew (a ``ctx.now()``
added where history has none): they have no effect and nothing recorded to differ
from. See docs/operating.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cantata.declare.defs import StepDef, WorkflowDef
from cantata.errors import Cancelled
from cantata.model import codec
from cantata.model.records import (
    DELIVERY_PENDING,
    Attempt,
    EntryKind,
    HistoryEntry,
    RunRecord,
    RunWrite,
    superseded_keys,
)
from cantata.model.status import LIVE_STATUSES, RunStatus

from . import cleanup
from .journal import FINAL, Journal
from .runner import RunExecution
from .saga.choreographed import HOPS, MAP
from .saga.hops import is_stray, lost_hop
from .versioning import args_shape

if TYPE_CHECKING:
    from .engine import Engine
    from .saga.declaration import Saga

_HOPS_READ = 10_000  # records of a run's transaction read to find its hops in flight


class App(Protocol):
    """An open app (``cantata.App``): its engine reads the store and the declarations."""

    @property
    def engine(self) -> Engine: ...

# Failures a replay may legitimately re-raise: they are recorded in history.
_RECORDED = ("StepFailed", "Cancelled", "DeadlineExceeded", "WaitTimeout", "WorkflowCallError")
# Not calls of the workflow's code path: left out of the comparison.
_NOT_COMPARED = (EntryKind.COMPENSATION, EntryKind.PATCH)


@dataclass(frozen=True, slots=True)
class ReplayProblem:
    """A stored run the current code would break.

    ``problem`` is ``non_determinism`` (the calls differ: ``call`` is the 1-based
    position of the first difference, ``recorded`` and ``current`` the two calls; or
    a choreographed saga's hop in flight is for a step the code's saga lacks: no
    ``call``, ``recorded`` the hop's group), ``would_fail`` or ``unknown_workflow``.
    """

    run_id: str
    workflow: str
    status: str
    problem: str
    detail: str
    version: str | None = None
    call: int | None = None
    recorded: str | None = None
    current: str | None = None


@dataclass(slots=True)
class ReplayReport:
    """What ``check-replay`` checked, per recorded version, and what it found."""

    checked: dict[str, int] = field(default_factory=dict)  # version ("-": none) -> runs
    problems: list[ReplayProblem] = field(default_factory=list)
    # More runs than the limit were there: the oldest were not checked (not a pass).
    incomplete: bool = False

    def broken(self, version: str) -> int:
        return sum(1 for p in self.problems if (p.version or "-") == version)


class _Frontier(BaseException):
    """The replay reached new work: everything before it matched history."""


class _NotingJournal(Journal):
    """The journal of a dry run: notes the key of every call the code makes."""

    def __init__(self, runtime: _DryRun) -> None:
        super().__init__(runtime)
        self.calls: list[str] = []

    def next_key(self, base: str) -> str:
        key = super().next_key(base)
        self.calls.append(key)
        return key

    async def check_new_call(self, key: str) -> None:
        try:
            await super().check_new_call(key)
        except Cancelled:
            # The cancellation reached the code before this call began: the call was
            # never made (its key is taken, as in the run that recorded the history).
            self.calls.remove(key)
            raise


class _DryRun(RunExecution):
    """A run executed without effects, noting every durable call its code makes.

    It implements the same runtime interface as the engine's execution (runtime.py),
    the journal and ``ctx`` unchanged on top: only the effects (``commit``, ``defer``,
    ``wait_until``, a new call beginning, the run's end) stop at the run's frontier.
    """

    def __init__(self, engine: Engine, run: RunRecord, wdef: WorkflowDef) -> None:
        # No cancel request or deadline: they would stop the replay before its frontier
        # (a cancellation history records is delivered again instead, see load).
        super().__init__(engine, dataclasses.replace(
            run, cancel_requested=False, deadline_at=None
        ), wdef)
        self.journal = self.noting = _NotingJournal(self)
        self.shapes: dict[str, str] = {}
        self.recorded: list[HistoryEntry] = []  # the stored history, as loaded
        self.ended = False  # the code ran to its end (returned or raised)
        self.failure: str | None = None

    async def load(self) -> None:
        await super().load()
        self.recorded = list(self.journal.history.values())
        if cleanup.MARKER in self.journal.history:
            # The cancellation reached the code: it meets it again where it did, at the
            # first call history has no outcome for (the run's frontier).
            self.request_interrupt(Cancelled())

    def check_interrupt(self) -> None:
        if self.cancel_pending() and not self.compensating and not self.api.cancel_delivered:
            if self._unreplayed_before(self.journal.history[cleanup.MARKER]):
                # The code is not where the cancellation reached it: a call recorded
                # before the marker was not made. Stop: compare() names the difference.
                raise _Frontier()
            self.noting.calls.append(cleanup.MARKER)
        super().check_interrupt()

    def _unreplayed_before(self, marker: HistoryEntry) -> bool:
        return any(e.key not in self.journal.consumed and e.seq < marker.seq
                   for e in self.recorded if e.kind not in _NOT_COMPARED)

    def new_calls(self) -> list[str]:
        """The code's durable calls, less the recorded values (``ctx.now``, ``random``,
        ``uuid``, ``set_attributes``...) it makes anew: they have no effect and no
        recorded counterpart, so inserting one breaks nothing."""
        known = {e.key for e in self.recorded}
        fresh = {k for k, e in self.journal.history.items()
                 if k not in known and e.kind in (EntryKind.VALUE, EntryKind.ATTRS)}
        return [k for k in self.noting.calls if k not in fresh]

    async def call_step(
        self, sdef: StepDef, args: list[Any], key: str, kind: EntryKind = EntryKind.STEP
    ) -> Any:
        if kind != EntryKind.COMPENSATION:
            self.shapes[key] = args_shape(args)
        return await super().call_step(sdef, args, key, kind)

    def new_call(self, key: str) -> None:
        super().new_call(key)
        raise _Frontier()  # a call history has no record of: new work, stop before it

    def defer(self, write: RunWrite) -> None:
        self.pending.extend(write.entries)

    async def commit(self, write: RunWrite) -> None:
        raise _Frontier()

    async def wait_until(
        self, wake_at: float | None, wake: Any = None, *, poll: bool = True, park: Any = None,
        interrupt: Any = "raise", busy: bool = False,
    ) -> None:
        if interrupt == "raise":
            self.check_interrupt()  # as a real wait does first
        raise _Frontier()

    async def _unwind(self, final: RunStatus, error: str) -> None:
        self.ended = True
        if not error.startswith(_RECORDED):
            self.failure = error
        raise _Frontier()

    async def _finish(self, status: RunStatus, **kw: Any) -> None:
        self.ended = True
        raise _Frontier()


def _recorded_shape(entry: HistoryEntry) -> str | None:
    if not entry.detail:
        return None
    info = codec.loads(entry.detail)
    return info.get("shape") if isinstance(info, dict) else None


def compare(
    run: RunRecord, history: Sequence[HistoryEntry], calls: Sequence[str],
    shapes: dict[str, str], ended: bool, failure: str | None = None,
) -> ReplayProblem | None:
    """The first difference between a run's recorded calls and the code's, if any
    (``failure``: the error the code ended with, when it raised one history does not
    record)."""
    recorded = [e for e in sorted(history, key=lambda e: e.seq) if e.kind not in _NOT_COMPARED]

    def problem(i: int, entry: HistoryEntry, current: str | None, detail: str,
                kind: str = "non_determinism") -> ReplayProblem:
        return ReplayProblem(run.run_id, run.workflow, str(run.status), kind,
                             f"call {i + 1}: {detail}", run.version, i + 1, entry.key, current)

    for i, entry in enumerate(recorded):
        if i >= len(calls):
            if entry.status not in FINAL and not ended:
                continue  # a call in flight beside the frontier (parallel branches)
            if ended and failure is not None:  # the code raises before this call
                return problem(i, entry, None, f"history recorded {entry.key!r} but the "
                               f"code now fails there: {failure}", "would_fail")
            where = "the code now ends there" if ended else (
                f"the code stops at {calls[-1]!r} before making it" if calls
                else "the code makes no call"
            )
            return problem(i, entry, None, f"history recorded {entry.key!r} but {where}")
        if calls[i] != entry.key:
            return problem(i, entry, calls[i], f"history recorded {entry.key!r} but the code "
                           f"now calls {calls[i]!r}")
        old, new = _recorded_shape(entry), shapes.get(entry.key)
        if old is not None and new is not None and old != new:
            return problem(i, entry, calls[i], f"{entry.key!r} was called with arguments "
                           f"shaped {old} and is now called with {new}")
    return None


async def check_run(
    engine: Engine, run: RunRecord, wdef: WorkflowDef,
    loaded: tuple[list[HistoryEntry], list[Attempt]] | None = None,
) -> ReplayProblem | None:
    """Dry-replay one stored run with ``engine``'s code; the problem found, if any
    (``loaded``: the history and attempts to replay, instead of the stored ones)."""
    dry = _DryRun(engine, run, wdef)
    dry.preloaded = loaded
    with contextlib.suppress(_Frontier):
        await dry._execute_run()
    for _ in range(3):  # let parallel branches (asyncio.gather) note their calls too
        await asyncio.sleep(0)
    diverged = dry.journal.divergence
    if diverged is not None and diverged.recorded == diverged.new:
        # the code makes the recorded call but meets it otherwise (a branch it no longer
        # cancels there): the calls themselves do not differ
        return ReplayProblem(run.run_id, run.workflow, str(run.status), "non_determinism",
                             f"call {diverged.position}: {diverged.differs}", run.version,
                             diverged.position, diverged.recorded, diverged.new)
    found = compare(run, dry.recorded, dry.new_calls(), dry.shapes, dry.ended,
                    dry.failure)
    if found is None and dry.failure is not None and not _failed_so(run, dry.failure):
        found = ReplayProblem(run.run_id, run.workflow, str(run.status), "would_fail",
                              dry.failure, run.version)
    return found


async def check_kept(
    engine: Engine, run: RunRecord, wdef: WorkflowDef, *, retry: bool = False
) -> ReplayProblem | None:
    """:func:`check_run` of ``run`` as it is, or with ``retry`` of the history a retry
    would keep of it (``superseded_keys``: the failed entry and what followed go), as
    an operator's retry or re-pin is checked before it is accepted."""
    store = engine.store
    history = await store.load_history(run.app, run.run_id)
    attempts = await store.load_attempts(run.app, run.run_id)
    if retry:
        gone = set(superseded_keys([(e.key, e.seq, e.kind, e.status) for e in history]))
        history = [e for e in history if e.key not in gone]
        attempts = [a for a in attempts if a.key not in gone]
    return await check_run(engine, run, wdef, loaded=(history, attempts))


def _failed_so(run: RunRecord, failure: str) -> bool:
    """The run recorded this very failure when it ended (or began to compensate): the
    code fails the way it did, which the run's record explains (a workflow called with
    arguments it does not take, a bug the run already met)."""
    recorded = run.error or ""
    return recorded == failure or recorded.startswith(f"{failure}; compensation failed")


async def _runs_to_check(app: App, all_runs: bool, limit: int) -> tuple[list[RunRecord], bool]:
    """The newest ``limit`` runs to check, and whether more were there."""
    store, name = app.engine.store, app.engine.app
    if all_runs:
        runs = await store.list_runs(name, limit=limit + 1)
    else:
        runs = []
        for status in LIVE_STATUSES:
            runs += await store.find_runs(name, status=status, limit=limit + 1)
        runs.sort(key=lambda r: r.created_at, reverse=True)
    return runs[:limit], len(runs) > limit


async def replay_report(app: App, *, all_runs: bool = False, limit: int = 1000) -> ReplayReport:
    """Dry-replay stored runs of ``app`` (live ones unless ``all_runs``) with its code:
    the newest ``limit`` of them (``incomplete`` says when more were there)."""
    report = ReplayReport()
    runs, report.incomplete = await _runs_to_check(app, all_runs, limit)
    for run in runs:
        version = run.version or "-"
        report.checked[version] = report.checked.get(version, 0) + 1
        wdef = app.engine.router.workflows.get(run.workflow)
        if wdef is None:
            report.problems.append(ReplayProblem(
                run.run_id, run.workflow, str(run.status), "unknown_workflow",
                f"workflow {run.workflow!r} is not registered in this code", run.version,
            ))
            continue
        found = await check_run(app.engine, run, wdef)
        if found is None and wdef.spec is not None and run.status in LIVE_STATUSES:
            found = await check_hops(app.engine, run, wdef.spec)
        if found is not None:
            report.problems.append(found)
    return report


async def check_hops(engine: Engine, run: RunRecord, saga: Saga) -> ReplayProblem | None:
    """A choreographed saga run whose hop in flight is for a step this code's saga does
    not have (renamed or removed): no worker of this code handles it, so the run would
    wait there (:mod:`.saga.hops`). Its workflow replays fine: the hops are the calls."""
    code = {saga.name: saga.hop_groups()}
    patterns = [(h.group, h.pattern) for h in engine.router.handlers]
    records = await engine.store.trace_records(engine.app, run.correlation_id,
                                               limit=_HOPS_READ)
    mine = {e.id: e for e, _ in records.events
            if isinstance(e.data, dict) and e.data.get("run_id") == run.run_id}
    delivered: dict[str, list[str]] = {}
    for d in records.deliveries:
        delivered.setdefault(d.event.id, []).append(d.group)
    names = {d.name: d.detail for d in await engine.store.declarations(engine.app)
             if d.kind == "handler"}
    hops = set(code[saga.name])
    reacted = {p for g, p in patterns if g in hops}
    for d in records.deliveries:
        event = mine.get(d.event.id)
        if event is None or d.status != DELIVERY_PENDING:
            continue
        data = event.data
        run_map = data.get(MAP)
        run_hops = None if run_map is None else list(data.get(HOPS) or ())
        if run_hops is not None and d.group not in run_hops:
            continue  # a group of another map: settled, nothing waits for it
        if run_map is not None and run_map != saga.map_id and d.group in hops:
            return ReplayProblem(
                run.run_id, run.workflow, str(run.status), "non_determinism",
                f"the run's hop of group {d.group} (event {event.type}) is in flight, but "
                f"the run is of map {run_map} of saga {saga.name} and this code has map "
                f"{saga.map_id} (a deploy changed the saga's steps): workers of this code "
                "leave the run's hops to a worker whose code has its map, so the run would "
                "wait there; let it finish on the old code first",
                run.version, None, d.group, None,
            )
        if d.group in hops and is_stray(saga.name, event.type, reacted):
            return ReplayProblem(
                run.run_id, run.workflow, str(run.status), "non_determinism",
                f"the run's event {event.type} waits for group {d.group}, but no hop of "
                f"saga {saga.name} in this code reacts to it (an event of an earlier map "
                "of the saga: a step renamed or removed), so the run would wait there; "
                "let it pass that hop on the old code first",
                run.version, None, f"{d.group}: {event.type}", None,
            )
        hop = lost_hop(d.group, event.type, delivered[event.id], code, patterns, run_hops)
        if hop is None or not hop.waits:
            continue
        info = codec.loads(names[d.group]) if names.get(d.group) else None
        step = info.get("handler") if isinstance(info, dict) else None
        step = str(step or d.group).rsplit("<locals>.", 1)[-1]
        return ReplayProblem(
            run.run_id, run.workflow, str(run.status), "non_determinism",
            f"the run's hop for step {step!r} of saga {saga.name} (group {d.group}, event "
            f"{event.type}) is in flight, but the saga in this code has no such step "
            f"(its hops: {', '.join(code[saga.name])}): no worker of this code handles it, "
            "so the run would wait there; let it pass that hop on the old code first",
            run.version, None, d.group, None,
        )
    return None


async def check_replay(
    app: App, *, all_runs: bool = False, limit: int = 1000
) -> list[ReplayProblem]:
    """The runs of ``app`` its current code would break (see :func:`replay_report`)."""
    return (await replay_report(app, all_runs=all_runs, limit=limit)).problems
