"""One step of a run: replay or attempts (with retries), remote steps as tasks, hooks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import TYPE_CHECKING, Any

import orjson

from cantata.declare.defs import StepDef
from cantata.errors import DeadlineExceeded, StepFailed
from cantata.fencing import InlineBody, body_ended
from cantata.flow.limits import release_step_slot, retime_step_begin, take_step_slot
from cantata.model import codec
from cantata.model.records import (
    COMPENSATION,
    ENTRY_COMPLETED,
    ENTRY_RUNNING,
    TASK_WITHDRAWN,
    Attempt,
    EntryKind,
    EntryStatus,
    HistoryEntry,
    LostAttempt,
    RunWrite,
    TaskRecord,
    TaskStatus,
)

from .branches import branch_stopped, marked
from .checkpoint import defer_one
from .heartbeat import Beat, beat_for, first_beat
from .invoke import invoke_step, scoped_step
from .ownership import FENCE_AT
from .parking import parking_for
from .pauses import PAUSED, StepStalled, await_excuses
from .runtime import Watch
from .signals import _BranchStopped, _DeadlinePassed, _Fenced
from .versioning import args_shape

if TYPE_CHECKING:
    from .runner import RunExecution

WORKER_LOST = (
    LostAttempt.WORKER_LOST,
    "the worker running this attempt stopped (crash or kill) before the attempt finished",
)
# An attempt a live worker cut short itself (a graceful stop past its grace): recorded,
# but not counted as an attempt; the next attempt takes its number (docs/leases.md).
INTERRUPTED = (
    LostAttempt.INTERRUPTED,
    "the worker stopped gracefully before the attempt finished; not counted as an attempt",
)

_SHAPE_DETAILS: dict[str, str] = {}  # args_shape -> its entry's detail (few per app)


def _shape_detail(text: str) -> str:
    detail = _SHAPE_DETAILS.get(text)
    if detail is None:
        detail = codec.dumps({"shape": text})
        if len(_SHAPE_DETAILS) < 4096:
            _SHAPE_DETAILS[text] = detail
    return detail


# The detail of a call of one plain scalar argument, by its type: _shape_detail of its
# args_shape (tests/engine/test_step_shortcuts.py compares them).
_ONE_SCALAR_DETAIL = {t: _shape_detail(args_shape([v]))
                      for t, v in ((type(None), None), (bool, True), (int, 1), (float, 1.5),
                                   (str, "s"))}


async def call_step(
    x: RunExecution,
    sdef: StepDef,
    args: list[Any],
    key: str,
    kind: EntryKind = EntryKind.STEP,
) -> Any:
    """Run (or replay) one step or compensation and return its decoded JSON result.

    Compensations skip the journal's checks: they run after the workflow's code path.
    """
    # (records' module constants, not EntryKind.X: an enum class's attribute is slow
    # on Python 3.11, docs/performance.md round twenty-five)
    path = kind != COMPENSATION
    call = (x.journal.replay_or_begin_now(kind, sdef.name, key, path)
            or await x.journal.replay_or_begin(kind, sdef.name, key=key, check=path,
                                               check_resumed=path))
    entry = call.entry
    if entry is not None and call.replayed:
        if entry.status == ENTRY_COMPLETED:
            return codec.loads(entry.result)
        etype, _, emsg = (entry.error or "Error: ").partition(": ")
        if entry.error_type == TASK_WITHDRAWN:
            x.check_interrupt()  # as when it was withdrawn: for this cancel or deadline
        raise StepFailed(sdef.name, entry.error_type or etype, emsg, entry.attempts)
    if entry is None:  # committed with its first attempt
        shape = None
        if path:  # (one plain scalar, the usual: its detail from a table, no calls)
            shape = _ONE_SCALAR_DETAIL.get(type(args[0])) if len(args) == 1 else None
            if shape is None:
                shape = _shape_detail(args_shape(args))
        entry = x.journal.record(call, ENTRY_RUNNING, detail=shape)
    if sdef.service is not None and x.engine.is_remote(sdef):  # (no service: local)
        return await call_remote(x, sdef, args, entry)
    clock = x.engine.clock
    # in progress when the run was last left (a crash, a stop): it goes on even if its
    # branch is to begin nothing new (it had begun)
    if key in x.attempts:  # attempts recorded before this execution (it resumed the run)
        resuming = path and in_flight(x, key)
        write, last, n, number, lost = prior_attempts(x, key)
    else:  # (the usual: what in_flight and prior_attempts give then, without the calls)
        resuming, write, last, n, number, lost = False, RunWrite(), None, 0, 0, []
    retry = sdef.retry
    while True:
        if n >= retry.max_attempts and last is not None:
            # Some of these attempts' workers may have been paused, not dead: give them
            # one lease to excuse their attempts first (docs/leases.md).
            excused = await await_excuses(x, key, lost) if lost else 0
            if excused:
                n -= excused
                lost = [a for a in lost if a.error_type == WORKER_LOST[0]]
                continue
            return await step_failed(x, entry, write, last, n)
        if x.engine.draining:  # (park_if_stopping's own test: no coroutine otherwise)
            await x.park_if_stopping()
        # (stops' usual answer, False, without its call: no interrupt, and the step's
        # branch not cancelled)
        if path and (x.interrupt.done() or ((step := x.api.open_steps.get(key)) is not None
                                            and step.cancelled)) and stops(x, key, resuming):
            return await step_stopped(x, entry, write, last, n)
        if entry.wake_at is not None:  # the backoff after a failed attempt
            await backoff(x, entry.wake_at, path, key)
            if path and stops(x, key, resuming):
                return await step_stopped(x, entry, write, last, n)
        # A limited step waits for its slot here, before the attempt is recorded
        # (released when execute_body ends, or when the attempt's start cannot be
        # committed: the run was taken over meanwhile, its new owner asks for a slot of
        # its own, flow/limits.py).
        stamped = None
        limited = sdef.concurrency is not None or sdef.rate is not None
        if limited:
            stamped = await take_step_slot(x, sdef, key)
            if path and stops(x, key, resuming):
                await release_step_slot(x, sdef, key)
                return await step_stopped(x, entry, write, last, n)
        resuming = False
        n += 1
        number += 1  # not n: an excused attempt may lie between counted ones
        now = clock.now()
        # (begun_at's answer without its call when it is ``now``: no attempt of this
        # number began in this execution, and the run had no attempts of the step)
        earlier = x.mine.get((key, number))
        attempt = Attempt(key, number, earlier.started_at if earlier is not None
                          else begun_at(x, key, number, now) if key in x.attempts else now)
        entry.attempts, entry.status = n, ENTRY_RUNNING
        entry.started_at = entry.started_at or now
        entry.wake_at = None  # its backoff is over
        write.attempts.append(attempt)
        write.entries.append(entry)
        try:
            await x.commit(write)
        except BaseException:
            if limited:  # the attempt never began
                await release_step_slot(x, sdef, key)
            raise
        # (the next write is made where one is needed: the usual end defers its records
        # without one)
        x.inflight[key] = attempt
        x.mine[(key, number)] = attempt
        try:
            value = await execute_fenced(x, sdef, args, key, number, kind, stamped)
            result = codec.dumps(value, sdef.result_what, limit=x.engine.max_payload)
        except _Fenced:
            # Stopped because this worker's hold lapsed (a store outage, a pause): not
            # an attempt. Once the store answers, the same attempt starts again, after
            # its fenced start checkpoint proves the run is still ours. It is still the
            # attempt in progress, so it goes on even if its branch is to begin nothing
            # new meanwhile (as after a crash: ``resuming``). Before, a step of a branch
            # the workflow's code had cancelled was stopped here for good, its entry
            # left ``running`` and its attempt open in a run that went on and ended.
            write = RunWrite()
            del x.inflight[key]
            await x.engine.ownership.regained()
            n -= 1
            number -= 1
            resuming = path
            continue
        except Exception as exc:
            write = RunWrite()
            del x.inflight[key]
            attempt.ended_at = clock.now()
            attempt.error_type, attempt.error = type(exc).__name__, str(exc)
            last = (attempt.error_type, attempt.error)
            write.attempts.append(attempt)
            if x.past_deadline and isinstance(exc, DeadlineExceeded):
                # cut at the run's deadline (cut_at_deadline): failed, not retried;
                # the run stops (with the interrupt the deadline set)
                with contextlib.suppress(StepFailed):  # (not marked: no cancel raised)
                    await step_failed(x, entry, write, last, n, mark=False)
                x.check_interrupt()
                raise _DeadlinePassed() from None
            retryable = retry.is_retryable(exc)
            if retryable and n >= retry.max_attempts and lost:
                n -= await await_excuses(x, key, lost)
                lost = [a for a in lost if a.error_type == WORKER_LOST[0]]
            if not retryable or n >= retry.max_attempts:
                return await step_failed(x, entry, write, last, n)
            entry.error, entry.error_type = f"{last[0]}: {last[1]}", last[0]
            # The next attempt's due time, stored with this failed attempt: a worker
            # resuming the run (after a restart or a crash) waits for it too.
            entry.wake_at = clock.now() + retry.delay(n)
            write.entries.append(entry)
            await x.commit(write)
            write = RunWrite()
            x.engine.metrics.retries += 1
            continue  # (the backoff is waited at the top of the loop)
        del x.inflight[key]
        attempt.ended_at = clock.now()
        entry.status, entry.result, entry.ended_at = ENTRY_COMPLETED, result, attempt.ended_at
        entry.error = entry.error_type = None
        defer_one(x, entry, attempt)
        return orjson.loads(result)  # (codec.loads without its call: dumps' own text)


async def backoff(x: RunExecution, due: float, path: bool, key: str) -> None:
    """Wait until ``due``, when a step's next attempt may start (its entry's stored
    ``wake_at``). A step of the workflow's code path waits as a sleep does: a cancel
    or the deadline ends the wait, and a long one parks the run in the store until it
    is due (engine/parking.py); so does its branch being stopped (see :func:`stops`).
    A compensation's next attempt always comes."""
    clock = x.engine.clock
    if not path:
        await clock.sleep(due - clock.now())
        return

    async def stopped() -> bool:
        return stop_asked(x, key)

    if not stop_asked(x, key):
        await x.wait_until(due, stopped, poll=False, park=parking_for(due),
                           interrupt="return")


def stop_asked(x: RunExecution, key: str) -> bool:
    """The branch of step ``key`` is to begin nothing new: the workflow's code cancelled
    it (engine/branches.py), or the run stopped its branches (it failed or returned)."""
    step = x.api.open_steps.get(key)
    if step is not None and step.cancelled:
        return True
    return x.interrupted() and isinstance(x.interrupt.result(), _BranchStopped)


def stops(x: RunExecution, key: str, resuming: bool) -> bool:
    """At a durable point of step ``key``, before an attempt: True if the step stops
    here (its branch is to begin nothing new, and no attempt of it was in progress
    when the run was last left); a cancel or the deadline is raised."""
    if not x.interrupt.done():  # the usual case, in short
        step = x.api.open_steps.get(key)
        return step is not None and step.cancelled and not resuming
    if stop_asked(x, key):
        return not resuming
    x.check_interrupt()
    return False


def in_flight(x: RunExecution, key: str) -> bool:
    """The last recorded attempt of ``key`` was cut short (a crash, a graceful stop, a
    pause): the step was in progress when the run was last left."""
    recorded = x.attempts.get(key)
    if not recorded:
        return False
    last = recorded[-1]
    return last.ended_at is None or last.error_type in (
        WORKER_LOST[0], INTERRUPTED[0], PAUSED[0])


async def step_stopped(
    x: RunExecution, entry: HistoryEntry, write: RunWrite, last: tuple[str, str] | None, n: int
) -> Any:
    """Step ``entry`` stops before its next attempt, its branch to begin nothing new.

    Not begun yet: nothing of it was recorded, and ``_BranchStopped`` is raised. Else
    (it waited to retry) it fails for good with its last attempt's error, recorded, so
    that a replay meets the same outcome."""
    if n == 0 or last is None:
        raise branch_stopped(x)
    entry.wake_at = None
    note = f" (its branch stopped before attempt {n + 1}: not attempted again)"
    return await step_failed(x, entry, write, (last[0], last[1] + note), n)


def begun_at(x: RunExecution, key: str, number: int, now: float) -> float:
    """The start time of attempt ``number`` of step ``key`` beginning ``now``: the time it
    first began if that number was written before (begun again here after a fence,
    or taking the number of an attempt cut short, interrupted or excused), since the
    store keeps an attempt's first start time and an excuse names the attempt by it
    (:meth:`~cantata.store.base.Store.excuse_attempts`); else ``now``. (With the
    second begin's time, a worker whose run was taken after it began a fenced step
    again excused nothing, and that attempt stayed charged ``WorkerLost``.)"""
    earlier = x.mine.get((key, number))
    if earlier is not None:
        return earlier.started_at
    for a in x.attempts.get(key, ()):
        if a.attempt == number:
            return a.started_at
    return now


def prior_attempts(
    x: RunExecution, key: str
) -> tuple[RunWrite, tuple[str, str] | None, int, int, list[Attempt]]:
    """The attempts of ``key`` that count, as (write closing the lost ones, last
    error, count, highest number among them, those of them ``WorkerLost``).

    The rule (docs/leases.md): an attempt left unfinished counts as ``WorkerLost``
    (so a step that kills its worker cannot loop forever) unless this live worker
    cut it short itself (it re-took the run, its hold lapsed in a pause or an
    outage); an ``Interrupted`` attempt (a graceful stop) or a ``Paused`` one (its
    worker, paused past its lease, excused it: see :mod:`cantata.engine.pauses`)
    never counts. An attempt that does not count is replaced by the next one above
    the highest that counts, which takes its number.
    """
    write = RunWrite()
    last: tuple[str, str] | None = None
    n = top = 0
    lost: list[Attempt] = []
    for a in x.attempts.get(key, []):
        if a.error_type in (INTERRUPTED[0], PAUSED[0]):
            continue
        if a.ended_at is None:
            if x.engine.cut_short_here(x.run.run_id, key, a.attempt):
                continue
            a.ended_at, (a.error_type, a.error) = x.engine.clock.now(), WORKER_LOST
            write.attempts.append(a)
        n += 1
        top = max(top, a.attempt)
        if a.error_type == WORKER_LOST[0]:
            lost.append(a)
        if a.error_type is not None:
            last = (a.error_type, a.error or "")
    return write, last, n, top, lost


async def call_remote(x: RunExecution, sdef: StepDef, args: list[Any], entry: HistoryEntry) -> Any:
    """A step of another service: a task in the store, executed by that service's workers
    (with their retries and timeout); this run waits for its result."""
    engine, run = x.engine, x.run
    # A retried run's new call of a step is a new task (the old one ended for good).
    task_id = f"{run.run_id}:{entry.key}" + (f"@{run.epoch}" if run.epoch else "")
    info = codec.loads(entry.detail) if entry.detail else {}
    # As when the task was made (a replay may know the step's service by now: the task
    # learns it when it is claimed).
    service = str(info.get("service") or "") if "task" in info else sdef.service or ""
    if "task" not in info:
        now = engine.clock.now()
        entry.started_at = now
        entry.detail = codec.dumps({**info, "service": service, "task": task_id})
        task = TaskRecord(
            task_id,
            run.run_id,
            entry.key,
            sdef.name,
            service,
            codec.dumps(args, f"arguments of step {sdef.name}"),
            created_at=now,
            updated_at=now,
            correlation_id=run.correlation_id,
        )
        await x.commit(RunWrite(entries=[entry], tasks=[task]))
    x.made_tasks = True
    rec = await await_task(x, entry, task_id, service)
    detail = entry.detail
    if not service and rec.service:  # addressed when it was claimed: say to which service
        detail = codec.dumps({**codec.loads(detail or "{}"), "service": rec.service})
    detail = marked(x, entry.key, detail)  # (with its outcome: see engine/branches.py)
    if rec.status == TaskStatus.DONE:
        await x.journal.settle(
            entry, EntryStatus.COMPLETED, attempts=rec.attempts, result=rec.result,
            detail=detail,
        )
        return codec.loads(rec.result)
    etype = rec.error_type or "Error"
    emsg = (rec.error or "").removeprefix(f"{etype}: ")
    await x.journal.settle(
        entry, EntryStatus.FAILED, attempts=rec.attempts, error=f"{etype}: {emsg}",
        error_type=etype, detail=detail,
    )
    if etype == TASK_WITHDRAWN:
        x.check_interrupt()  # withdrawn for the cancel or deadline raised here
    raise StepFailed(sdef.name, etype, emsg, rec.attempts)


async def await_task(
    x: RunExecution, entry: HistoryEntry, task_id: str, service: str
) -> TaskRecord:
    """Wait for a remote step's task to end; its record.

    A cancel or deadline meeting the run here withdraws the task if no live worker
    holds it (its record then says ``Withdrawn``): no worker ever starts it; so does
    the step's branch being stopped (the run failed or returned, or the workflow's
    code cancelled the branch: engine/branches.py). A task a worker is running is
    awaited as a local step in progress would be: its outcome is recorded (and
    compensated with the run if it succeeded), and the interrupt is raised at the
    run's next durable point. If that worker lets the task go (a retry waits, the
    worker died), it is withdrawn then.
    """
    engine, run = x.engine, x.run
    found: list[TaskRecord] = []
    ending = False
    step = x.api.open_steps.get(entry.key)  # (None for a compensation)

    def cancelled() -> bool:
        return step is not None and step.cancelled

    async def look() -> bool:
        rec = await engine.store.get_task(run.app, task_id)
        if rec is not None and rec.status != TaskStatus.PENDING:
            found.append(rec)
            return True
        if not ending:
            return cancelled()
        # ending: a task no live worker holds any more is withdrawn next
        return rec is not None and rec.owner is None

    watch = Watch("run", task_id)
    while True:
        await x.journal.await_final(entry, look, watch=watch,
                                    interrupt="ignore" if ending else "return")
        if found:
            return found[0]
        if not (ending or x.interrupted() or cancelled()):
            continue
        ending = True
        now = engine.clock.now()
        stopped = x.interrupt.result() if x.interrupted() else None
        why = ("cancelled the branch of this step" if cancelled()
               else "was cancelled" if x.cancel_pending()
               else (str(stopped) or "failed") if isinstance(stopped, _BranchStopped)
               else "passed its deadline")
        who = (f"a worker of service {service!r}" if service
               else f"a service declaring step {entry.name!r}")
        gone = await engine.store.withdraw_tasks(
            run.app, run.run_id, stale_before=now, actor=engine.worker_id,
            task_ids=[task_id],
            error=f"{TASK_WITHDRAWN}: run {run.run_id} {why} before {who} took this step; "
                  "it never ran",
        )
        if gone:
            rec = await engine.store.get_task(run.app, task_id)
            assert rec is not None
            return rec


async def step_failed(
    x: RunExecution, entry: HistoryEntry, write: RunWrite, last: tuple[str, str], n: int,
    *, mark: bool = True,
) -> Any:
    """Record that step ``entry`` failed for good and raise ``StepFailed``: with the
    mark of a cancel of its branch that came meanwhile if ``mark`` (the branch then
    gets that cancel, see engine/branches.py)."""
    entry.status, entry.ended_at = EntryStatus.FAILED, x.engine.clock.now()
    entry.error, entry.error_type, entry.attempts = f"{last[0]}: {last[1]}", last[0], n
    if mark:
        entry.detail = marked(x, entry.key, entry.detail)
    write.entries.append(entry)
    await x.commit(write)
    raise StepFailed(entry.name, last[0], last[1], n)


async def execute_fenced(
    x: RunExecution, sdef: StepDef, args: list[Any], key: str, attempt: int, kind: EntryKind,
    stamped: float | None = None,
) -> Any:
    """Run the step body in this task, guarded: the engine stops it when this worker's
    hold lapses (see :meth:`Engine.fence_self`), and it is never resumed once that may
    have happened (:class:`~cantata.fencing.InlineBody`): raises ``_Fenced`` then, or
    ``StepStalled`` when the body's own code held the event loop past the fence (that
    attempt counts), unless it was a transactional step whose transaction committed
    first: its result is returned then (it completed). A cancel of this task by anyone
    else is passed on."""
    engine = x.engine

    # (serving, or draining in a graceful stop; held while a pause awaits its verdict)
    fenced = engine.ownership.step_fenced

    def stalled(seconds: float) -> None:
        x.stalled[(key, attempt)] = max(seconds, x.stalled.get((key, attempt), 0.0))

    plain = not engine.hooks.hooks and sdef.concurrency is None and sdef.rate is None
    coro = (invoke(x, sdef, args, key, attempt, scoped=True) if plain  # execute_body, bare
            else execute_body(x, sdef, args, key, attempt, kind, stamped))
    # Awaited here, not as a task of its own (issue 19: a task per step cost ~5 % of a
    # saga's time); the guard keeps a task's rules (docs/leases.md).
    # (the run's task when it executes its code: FlushAtYield says so without a call)
    me = x.task if x.riding else asyncio.current_task()
    assert me is not None
    body = InlineBody(coro, fenced, stalled, engine.lease * FENCE_AT, me)
    x.bodies[body] = kind != COMPENSATION  # the deadline cuts steps only
    try:
        return await body
    except asyncio.CancelledError:
        stopped = body.cancelled or body.thrown  # by the engine's fence or the guard
        if body.cancelled:  # the engine's own cancel, taken back: not a cancel of the run
            body.cancelled = False
            me.uncancel()
        if stopped and me.cancelling() == 0:  # (else someone else cancelled the run too)
            if (key, attempt) in x.tx_done:
                # A transactional step stopped once its transaction committed (the stop
                # waited for its COMMIT, store/tx.py): it completed, with this result.
                return x.tx_done[(key, attempt)]
            if body in x.cut:  # cut at the run's deadline
                raise DeadlineExceeded(
                    f"step {sdef.name} attempt {attempt} was still running when run "
                    f"{x.run.run_id} passed its deadline: it was stopped"
                ) from None
            held = x.stalled.get((key, attempt))
            if held is not None:  # its own code held the loop: the attempt counts
                raise StepStalled(
                    f"step {sdef.name} (attempt {attempt}) held its worker's event loop "
                    f"for {held:.1f} s, past 3/4 of the lease ({engine.lease:g} s), so "
                    "another worker could take its run over: move blocking code to a "
                    "sync step or asyncio.to_thread, or raise App(lease=...)"
                ) from None
            raise _Fenced() from None
        raise
    finally:
        x.bodies.pop(body, None)
        if x.cut:  # (both empty but for a deadline, a transactional step)
            x.cut.discard(body)
        if x.tx_done:
            x.tx_done.pop((key, attempt), None)
        if body.cancelled:  # the body swallowed the engine's cancel: take it back
            me.uncancel()


async def execute_body(
    x: RunExecution,
    sdef: StepDef,
    args: list[Any],
    key: str,
    attempt: int,
    kind: EntryKind = EntryKind.STEP,
    stamped: float | None = None,
) -> Any:
    if sdef.concurrency is not None or sdef.rate is not None:
        try:
            beat = None
            if stamped is not None:  # (the rate counts the body's begin, not the grant's)
                # The heartbeat's read first: nothing may be awaited between the
                # re-timing's last look at the clock and the body (flow/limits.py).
                beat = await beat_of(x, sdef, key, attempt)
                await retime_step_begin(x, sdef, key, stamped)
            return await with_hooks(x, sdef, args, key, attempt, kind, beat)
        finally:
            await release_step_slot(x, sdef, key)
    return await with_hooks(x, sdef, args, key, attempt, kind)


async def with_hooks(
    x: RunExecution, sdef: StepDef, args: list[Any], key: str, attempt: int, kind: EntryKind,
    beat: Beat | None = None,
) -> Any:
    hooks = x.engine.hooks
    if not hooks:
        return await invoke(x, sdef, args, key, attempt, beat)
    started = time.perf_counter()
    with hooks.step(x.run, sdef.name, key, attempt, kind):
        try:
            value = await invoke(x, sdef, args, key, attempt, beat)
        except Exception as exc:
            hooks.notify(
                "step_finished", x.run, sdef.name, attempt, time.perf_counter() - started, exc
            )
            raise
    hooks.notify("step_finished", x.run, sdef.name, attempt, time.perf_counter() - started, None)
    return value


async def beat_of(x: RunExecution, sdef: StepDef, key: str, attempt: int) -> Beat:
    """The :class:`Beat` of an attempt (a store read after the first attempt: the
    details an earlier one left)."""
    run, store = x.run, x.engine.store
    if attempt == 1:
        return first_beat(store, run.app, run.run_id, sdef.name, key, attempt)
    return await beat_for(store, run.app, run.run_id, sdef.name, key, attempt)


async def invoke(x: RunExecution, sdef: StepDef, args: list[Any], key: str, attempt: int,
                 beat: Beat | None = None, *, scoped: bool = False) -> Any:
    """One attempt: heartbeats kept for the next attempt, transactional or not (``beat``:
    the attempt's, when the caller has it already; ``scoped``: the body's guard awaits
    this directly, in the context it copied for the body, which nothing else uses once
    the body ended: see :func:`~cantata.engine.invoke.invoke_step`)."""
    run = x.run
    if beat is None:  # (a first attempt's without the coroutine of beat_of: no read)
        if attempt == 1:  # (first_beat's, inline: one call fewer on every step)
            beat = Beat((sdef.name, run.run_id), key, attempt, None, functools.partial(
                x.engine.store.record_step_heartbeat, run.app, run.run_id))
        else:
            beat = await beat_of(x, sdef, key, attempt)
    failed = True
    try:
        if sdef.transactional:
            from .transaction import run_transactional

            value = await run_transactional(x, sdef, args, key, attempt, beat)
        elif scoped and sdef.timeout is None:  # (the usual: no coroutine around the body)
            value = await scoped_step(sdef, args, run.run_id, key, attempt, beat)
        else:
            value = await invoke_step(sdef, args, run.run_id, key, attempt, beat=beat,
                                      scoped=scoped)
        failed = False
        return value
    finally:
        body_ended()  # what follows is bookkeeping: not cut (cantata.fencing)
        if not beat.close_now(failed):
            await beat.close(failed)
