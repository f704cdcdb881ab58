"""Steps of a workflow's branches, and cancels of a branch by the workflow's own code.

A workflow runs steps concurrently in branches (``asyncio.gather``,
``asyncio.TaskGroup``, ``asyncio.create_task``). asyncio cancels a branch on the
workflow's behalf: a ``TaskGroup`` cancels the others when one fails, a timeout in the
workflow's code cancels what it wraps. A step in progress then would be cut, though
its effect may still complete (a sync body's thread goes on, another service
completes its task), and it would never be compensated. Here a cancel of a step's
branch by the workflow's code does not reach the step (docs/guide.md, "Steps run
concurrently"):

- the step ends as it will (its attempt in progress, or its task a worker of another
  service holds) and its outcome is recorded; it begins nothing new (no further
  attempt; a task no worker holds is withdrawn);
- its compensation is registered if it completed, so the run's unwind undoes it;
- then the cancel is raised in the branch (``asyncio.CancelledError``, instead of the
  step's result), and its history entry says so (``"cancelled": true`` in its
  detail): a replay raises the cancel there again, once the code cancels the branch
  again, instead of going on past the step. The mark is committed with the step's
  outcome whenever the cancel came first (:func:`marked`): a step's completion
  waits for the run's next write, which the mark's is; a failure, a remote step's
  outcome and a transactional step's completion (in its own transaction) carry it.
  Written in a later checkpoint, a crash in between would leave an outcome without
  its mark, and the recovered run would go on in the cancelled branch. Only a
  cancel that comes while that outcome is being committed is recorded later (the
  step then ended before the cancel, as far as its history tells).

How the cancel is kept from the step:

- in the run's own task (:class:`RunTask`) a step's body runs inline
  (:class:`cantata.fencing.InlineBody`); the task holds back a cancel asked while one
  of the workflow's steps is in progress, unless the body asked it (its timeouts and
  task groups, the step's own ``timeout=``: :func:`cantata.fencing.in_body`) or the
  engine did (a fence, the run's deadline, the worker letting the run go), and
  raises it once the step has ended;
- in any other task (a branch) a step runs in a task of its own, which the branch's
  cancel does not reach: the branch waits for it, then is cancelled.

The engine's own cancels (``RunExecution.let_go``) are never held back: they stop the
run's task and the steps' tasks at once. Nor is a cancel asked from the engine's own
code while it runs in the run's task for a step (its slot, its checkpoints, a remote
step's reads: :data:`IN_ENGINE`): that is a timeout of the engine's or of a store
driver's (``asyncio.timeout``, and ``asyncio.wait_for`` from Python 3.12, cancel the
task they run in), and it is passed on, so that the timeout ends as its code expects
(``TimeoutError``, a store error the engine retries), never taken for a cancel of the
step's branch. Held back, it would have stopped the step, raised ``CancelledError`` in
the workflow's code and marked the step cancelled in history for a store that was
only slow. The engine's code still prefers ``asyncio.wait(..., timeout=...)``, which
cancels no one (``cancel_safe.wait_event``; the store's connects,
``store/postgres_pool.py``'s ``connect_apart``).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from cantata.errors import StepFailed, StoreError
from cantata.fencing import in_body
from cantata.model.records import (
    BRANCH_CANCELLED,
    RunWrite,
    branch_cancelled,
    mark_branch_cancelled,
)

from .compensation import register
from .journal import FINAL
from .signals import _BranchStopped, _StoreFailed

if TYPE_CHECKING:
    from cantata.declare.defs import StepDef

    from .runner import RunExecution



#: True while the engine's own code runs in a run's task for a step of the workflow's
#: (:func:`run_step`): a cancel of the run's task asked from there (a timeout's, whose
#: timer runs in the context it was set in) is the engine's, not the workflow code's.
IN_ENGINE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "cantata_in_engine", default=False)


@dataclass(slots=True)
class OpenStep:
    """A ``ctx.run`` in progress."""

    key: str
    name: str
    cancelled: bool = False  # the workflow's code cancelled its branch meanwhile


class RunTask(asyncio.Task[None]):
    """The task executing one run: a cancel asked by the workflow's code while one of
    its steps is in progress in this task is held back until the step has ended."""

    def __init__(
        self, coro: Coroutine[Any, Any, None], execution: RunExecution, *, name: str
    ) -> None:
        super().__init__(coro, name=name)
        self.execution = execution
        self.held = 0  # cancels held back while the step in progress ends

    def cancel(self, msg: Any | None = None) -> bool:
        x = self.execution
        step = x.inline_step
        if step is None or x.letting_go or in_body() or IN_ENGINE.get() or self.done():
            return super().cancel(msg)
        step.cancelled = True  # it stops at its next durable point
        self.held += 1
        x.wakeup.set()  # a wait of the step (a backoff, another service's task) looks
        return True

    def engine_cancel(self) -> bool:
        """A cancel of the engine's own (a fence, the deadline, letting the run go)."""
        return super().cancel()

    def release_held(self) -> None:
        """Deliver the cancels held back (raised at the task's next suspension)."""
        held, self.held = self.held, 0
        for _ in range(held):
            super().cancel()


def branch_stopped(x: RunExecution, why: str = "") -> _BranchStopped:
    """The signal to raise at a durable point of a branch that is to begin nothing new.

    A branch the workflow did not await (``asyncio.create_task``) ends with it once the
    run's code has ended, and nobody retrieves it: asyncio would log "Task exception
    was never retrieved" for the engine's own signal. The branch's task retrieves it
    once done; any other exception it ends with is reported as asyncio would (the
    warning naming the step that run's end waited for is the runner's)."""
    _retrieved_when_done(x)
    return _BranchStopped(why) if why else _BranchStopped()


def _retrieved_when_done(x: RunExecution) -> None:
    """The current task (a branch) ends with the engine's stop: retrieve it then."""
    task = asyncio.current_task()
    if task is not None and task is not x.task:
        task.add_done_callback(_retrieve_stop)


def _retrieve_stop(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()  # (retrieved: asyncio logs nothing for it)
    if exc is None or _only_stops(exc):
        return
    task.get_loop().call_exception_handler({
        "message": "Task exception was never retrieved", "exception": exc, "future": task,
    })


def _only_stops(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_stops(e) for e in exc.exceptions)
    return isinstance(exc, _BranchStopped)


async def run_step(
    x: RunExecution, sdef: StepDef, args: list[Any], key: str, comp: StepDef | None
) -> Any:
    """``ctx.run`` of one step whose key is taken: its decoded result, its compensation
    ``comp`` registered once it has completed.

    (One coroutine, not two: this is on every step's path.)

    Raises:
        StepFailed: the step failed for good.
        asyncio.CancelledError: the workflow's code cancelled the step's branch while
            the step was in progress (now or, in a replay, when history says so).
    """
    api = x.api
    open_steps = api.open_steps
    step = OpenStep(key, sdef.name)
    open_steps[key] = step
    task = x.task
    # (x.task: a RunTask; x.riding: it is the task running this, checkpoint.FlushAtYield)
    inline = task is not None and (x.riding or task is asyncio.current_task())
    failure: StepFailed | None = None
    value: Any = None
    engine_code = None
    try:
        if inline:
            x.inline_step = step
            engine_code = IN_ENGINE.set(True)
        try:
            try:
                value = await (
                    x.call_step(sdef, args, key) if inline else _in_own_task(x, sdef, args, step)
                )
            except StepFailed as exc:
                failure = exc
            except StoreError as exc:
                # The engine's own read or write for the step (its slot, a remote step's
                # task) met a store outage: not the workflow's failure, which its code
                # could catch and compensate; the run goes on from its history.
                raise _StoreFailed(exc) from exc
            except _BranchStopped:
                if not step.cancelled:  # (a cancel before it began: nothing was recorded)
                    raise
            else:
                if comp is not None:  # (before the unwind that may be waiting for it)
                    register(x, comp, args, key)
            if step.cancelled:
                await _record_cancel(x, step, inline)
                if inline:
                    assert isinstance(task, RunTask)
                    x.inline_step = None
                    task.release_held()
                    await asyncio.sleep(0)  # raises the cancel held back
                raise asyncio.CancelledError()
        finally:
            if engine_code is not None:
                IN_ENGINE.reset(engine_code)
            if inline:
                x.inline_step = None
                assert isinstance(task, RunTask)
                task.held = 0  # (dropped when something else ended the step)
        # A replay: history says the workflow's code cancelled this step's branch here
        # (records.branch_cancelled; its usual False without its call: an entry whose
        # detail cannot hold the mark)
        entry = x.journal.history.get(key)
        if (entry is not None and entry.detail is not None
                and BRANCH_CANCELLED in entry.detail and branch_cancelled(entry)):
            await _replayed_cancel(x, key)
        if failure is not None:
            api.failed_steps += 1  # the workflow may catch it: see compensation.warn_unrun
            try:
                raise failure
            finally:
                # Its traceback holds this frame: no cycle through this local, which
                # would keep the run's state for the garbage collector to free.
                failure = None
        return value
    finally:
        del open_steps[key]
        if not open_steps and api.steps_settled is not None:  # (None: nobody waited)
            api.steps_settled.set()


def marked(x: RunExecution, key: str, detail: str | None) -> str | None:
    """The ``detail`` to write with step ``key``'s outcome: marked if the workflow's
    code has cancelled the step's branch meanwhile (for a compensation, as it is)."""
    step = x.api.open_steps.get(key)
    return mark_branch_cancelled(detail) if step is not None and step.cancelled else detail


async def _in_own_task(x: RunExecution, sdef: StepDef, args: list[Any], step: OpenStep) -> Any:
    """A step of a branch, in a task of its own: a cancel of the branch does not reach
    it; the branch waits for its outcome."""
    inner = asyncio.ensure_future(x.call_step(sdef, args, step.key))
    x.step_tasks.add(inner)
    try:
        await _outlast(x, inner, step)
    finally:
        x.step_tasks.discard(inner)
    try:
        return inner.result()
    except _BranchStopped:
        _retrieved_when_done(x)  # (the branch's task ends with it too)
        raise


async def _outlast(x: RunExecution, fut: asyncio.Future[Any], step: OpenStep) -> None:
    """Wait for ``fut``. A cancel of the waiting branch by the workflow's code marks the
    step cancelled (it stops at its next durable point) and the wait goes on; the
    engine letting the run go stops ``fut`` too."""
    while not fut.done():
        try:
            await asyncio.wait((fut,))
        except asyncio.CancelledError:
            if x.letting_go:
                fut.cancel()
                raise
            step.cancelled = True
            x.wakeup.set()


async def _record_cancel(x: RunExecution, step: OpenStep, inline: bool) -> None:
    """Record in the step's entry that its branch was cancelled while it ran (nothing
    when the step never began: nothing of it was recorded)."""
    entry = x.journal.history.get(step.key)
    if entry is None or entry.status not in FINAL:
        return
    entry.detail = mark_branch_cancelled(entry.detail)
    held = any(e is entry for e in x.pending)  # its result waits for the next write
    write = RunWrite() if held else RunWrite(entries=[entry])
    if inline:  # (the run's task holds back further cancels meanwhile)
        await x.commit(write)
    else:  # a further cancel of the branch must not cut the write
        await _outlast(x, asyncio.ensure_future(x.commit(write)), step)


async def _replayed_cancel(x: RunExecution, key: str) -> NoReturn:
    """A replay of a step whose branch was cancelled while it ran: the branch gets the
    cancel, not the result, once the code cancels it again (as it did, replaying the
    same calls). If the code ends first, or the run is cancelled or passes its
    deadline meanwhile, that is raised instead.

    Code that no longer cancels the branch there would leave the replay waiting for
    good: past :func:`cancel_grace` without the cancel, the replay has diverged from
    history (``NonDeterminismError``, naming the step).

    Raises:
        NonDeterminismError: the code did not cancel the branch again in time.
    """
    waiter = asyncio.get_running_loop().create_future()
    x.cancel_waiters.add(waiter)
    try:
        await asyncio.wait((waiter, x.interrupt), timeout=cancel_grace(x, key),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        x.cancel_waiters.discard(waiter)
    x.check_interrupt()
    if not waiter.done():
        x.journal.diverged(
            x.journal.position(key), key, key,
            f"history recorded that the workflow's code cancelled the branch of step "
            f"{key!r} while it ran (an asyncio.TaskGroup, a timeout), but the code now "
            f"awaits its result: it did not cancel the branch there within "
            f"{cancel_grace(x, key):.1f} s",
        )
    raise asyncio.CancelledError()


def cancel_grace(x: RunExecution, key: str) -> float:
    """How long a replay waits for the code to cancel step ``key``'s branch again (loop
    seconds): a timer of the code's own (``asyncio.timeout``) that cancelled it was set
    after the run was created and went off before the step ended, so it goes off again
    within that span of the replay; the rest of the code replays at once."""
    entry = x.journal.history[key]
    ended = entry.ended_at if entry.ended_at is not None else x.now()
    return max(ended - x.run.created_at, 0.0) * 1.1 + 0.5
