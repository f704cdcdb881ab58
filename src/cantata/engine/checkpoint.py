"""Checkpoints of one run: fenced commits, the deferred step result, the first write."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from cantata.errors import LeaseLost, StoreError
from cantata.model.records import (
    ENTRY_COMPLETED,
    ENTRY_RUNNING,
    Attempt,
    HistoryEntry,
    RunRecord,
    RunWrite,
)
from cantata.store.faults import WAITED_OUT, wait_out

from .creation import create_once
from .signals import _Abandon, _StoreFailed

if TYPE_CHECKING:
    from .runner import RunExecution

log = logging.getLogger("cantata.engine")
T = TypeVar("T")


async def commit(x: RunExecution, write: RunWrite) -> None:
    """Flush lazily recorded entries and write one checkpoint (fenced)."""
    lock = x.commit_lock
    # CommitLock.take_now and release, inline (two calls fewer on every checkpoint:
    # docs/performance.md, round twenty-eight (engine CPU)): a free lock nobody waits
    # for is taken without a coroutine; else acquire() sorts out whose turn it is.
    if lock._locked or lock._waiters:
        await lock.acquire()  # as ``async with``, two coroutines less on every checkpoint
    else:
        lock._locked = True
    try:
        if x.evicted:  # parked in the store by this execution (engine/parking.py)
            raise _Abandon()
        if x.flush_failed is not None:
            raise x.flush_failed
        if x.pending:
            write.entries[:0] = x.pending
            x.pending = []
        if x.pending_attempts:
            write.attempts[:0] = x.pending_attempts
            x.pending_attempts = []
        x.flush_at_yield = False  # (this commit takes what a step's end deferred)
        every = write.attempts
        if every and (x.rowless or x.run.app in x.engine.lean_apps):  # (lean_write's test)
            write.attempts = lean_attempts(x, write)
        if x.flush_scheduled and not x.create_pending:  # (this commit takes it all)
            unschedule(x)
        if x.pending_status is not None and write.status is None:
            write.status = x.pending_status
        x.pending_status = None
        if x.create_pending:
            x.create_pending = False
            await create(x, write)
        else:
            # Committed (fenced) without a coroutine of its own around the store's call
            # (every checkpoint of every run: docs/performance.md, round twenty-seven);
            # a store error goes to commit_failed
            run = x.run
            try:
                await x.engine.store.commit_run(run.app, run.run_id, run.fence, write)
            except StoreError as exc:
                await commit_failed(x, write, every, exc)
    finally:
        if lock._waiters:  # (CommitLock.release: asyncio's, to wake the first)
            lock.release()
        else:
            lock._locked = False
    if write.status is not None:
        x.run.status = write.status
    if write.events:
        x.engine.events_appended(write.events)


async def commit_failed(
    x: RunExecution, write: RunWrite, every: list[Attempt] | None, exc: StoreError
) -> None:
    """A checkpoint's write (``write``, fenced) failed with ``exc``. An outage is not the
    run's failure: the write waits and is tried again (fenced, so it is refused if
    another worker took the run meanwhile); a long outage ends this execution through
    the engine's self-fencing. A lost lease lets the run go (``_Abandon``); another
    store error is ``_StoreFailed``. ``every``: the attempts the write ended or began,
    those whose rows :func:`lean_attempts` left out too (not charged when the run is
    resumed here); ``write.attempts`` if ``None``."""
    engine, run = x.engine, x.run
    try:
        if not isinstance(exc, WAITED_OUT):
            raise exc
        await wait_out(
            lambda: engine.store.commit_run(run.app, run.run_id, run.fence, write),
            quiet=engine.quiet,
            key="commit",
            what="checkpointing runs",
            give_up=lambda: not engine.waits_out_outages(),
            max_delay=engine.lease / 4,
        )
    except LeaseLost:
        log.warning("run %s was taken over by another worker; letting it go", x.run.run_id)
        x.lost = True
        raise _Abandon() from None
    except StoreError as failed:
        # not charged when the run is resumed here
        x.uncommitted.extend(write.attempts if every is None else every)
        raise _StoreFailed(failed) from failed


def lean_attempts(x: RunExecution, write: RunWrite) -> list[Attempt]:
    """The attempts of ``write`` whose rows are written: all of them, but, while the
    gate of the run's app is open (``engine.lean_apps``, engine/gate.py), the first
    attempt of a step in progress or succeeded whose history entry in the same write
    says it alone (``records.first_attempt``: its start, its end once completed,
    no error, one attempt), which every reader reads from that entry
    (``with_first_attempts``; docs/leases.md, "Where an attempt is recorded").

    Only from the attempt's first begin in this execution, of a step the run had no
    attempt of when it was loaded, on: a step whose row was written once (the gate
    was closed, an attempt was cut short, failed or excused, a second began) keeps
    its rows, each attempt's end written to the row its start wrote. Once the gate
    closes, an attempt left out so far is written whole (its start kept) with its
    next write. (A transactional step's ``done`` attempt goes through here too:
    engine/transaction.py.)"""
    lean = x.run.app in x.engine.lean_apps
    rowless = x.rowless
    entries = write.entries
    kept: list[Attempt] = []
    for a in write.attempts:
        key = a.key
        if lean and a.attempt == 1 and a.error_type is None and a.error is None and (
                key in rowless or (a.ended_at is None and key not in x.attempts
                                   and (key, 1) not in x.mine)):
            entry = None
            for e in entries:  # (one or two: the last of the key, as a dict of them)
                if e.key == key:
                    entry = e
            # first_attempt(entry) == a (model.records), inline for what is known here
            # (the attempt is a first one without an error, of the entry's key), without
            # making an attempt to compare: every commit of a step asks it
            # (tests/engine/test_lean_attempts.py compares the two)
            if (entry is not None and entry.attempts == 1 and entry.error_type is None
                    and entry.started_at is not None and a.started_at == entry.started_at
                    and (a.ended_at == entry.ended_at if entry.status == ENTRY_COMPLETED
                         else entry.status == ENTRY_RUNNING and a.ended_at is None)):
                rowless.add(key)
                continue
        if rowless:
            rowless.discard(key)
        kept.append(a)
    return kept


def lean_write(x: RunExecution, write: RunWrite) -> None:
    """Leave out of ``write`` the attempt rows :func:`lean_attempts` leaves out, when it
    may leave any out: the gate of the run's app is open, or a row was left out before
    (written whole now if the gate closed since). For every checkpoint (:func:`commit`)
    and a transactional step's commit (engine/transaction.py)."""
    if x.rowless or x.run.app in x.engine.lean_apps:
        write.attempts = lean_attempts(x, write)


def expect_creation(x: RunExecution) -> None:
    """This run is not stored yet: store it with its first checkpoint.

    :attr:`created` resolves once it is durable (or fails with the store's error, and
    the execution ends). If the workflow yields to the event loop before its first
    write, the run is stored on its own then.
    """
    x.created = asyncio.get_running_loop().create_future()
    x.create_pending = True
    if x.engine.hooks.hooks:  # its task may yield before FlushAtYield (the trace's parent)
        x.flush_scheduled = True
        flush_later(x)
    else:
        # Looked at when the run's task first yields or ends (FlushAtYield), as a step's
        # deferred end: its first commit, usually in its first pass, takes it, and no
        # loop callback is made for it. A task that never runs its code (cancelled
        # before its first step) has it flushed by the engine's end of it (launch).
        x.flush_at_yield = True


async def store_first(x: RunExecution) -> None:
    """Before a store write that names this run as its parent (a child's creation):
    the run itself is stored, so that no child ever exists in the store without it.

    A run stored already (the usual case) costs nothing. A run not stored yet is
    stored now, with what it holds, or, when a commit storing it is under way (a
    flush, another branch), once that has landed. Its creation failed: ``_Abandon``
    (the caller of start() was told; see :func:`create`).
    """
    created = x.created
    if created is None:
        return
    if x.create_pending:
        await x.commit(RunWrite())
    elif not created.done():  # being stored by a commit that holds the lock
        async with x.commit_lock:
            pass
    if not created.done() or created.cancelled() or created.exception() is not None:
        raise _Abandon()


async def create(x: RunExecution, write: RunWrite) -> None:
    assert x.created is not None
    try:
        stored, created, _ = await create_once(
            x.engine, x.run, lambda: x.engine.store.create_run(x.run, write))
    except Exception as exc:  # the caller of start() gets it (cancelled: see execute)
        resolve_created(x, error=exc)
        raise _Abandon() from exc
    resolve_created(x, (stored, created))
    if not created:  # only without an idempotency key, so never: be safe anyway
        raise _Abandon()


def resolve_created(
    x: RunExecution,
    result: tuple[RunRecord, bool] | None = None,
    *,
    error: BaseException | None = None,
) -> None:
    """The run's creation is known: resolve :attr:`created` and the waiting caller's
    future (:attr:`starter`, unless that caller was cancelled)."""
    for fut in (x.created, x.starter):
        if fut is None or fut.done():
            continue
        if error is None:
            assert result is not None
            fut.set_result(result)
        else:
            fut.set_exception(error)
    if error is not None and x.created is not None and not x.created.cancelled():
        x.created.exception()  # nobody awaits it: do not log it as never retrieved


def defer(x: RunExecution, write: RunWrite) -> None:
    """Hold a finished step's checkpoint to commit it with the run's next write.

    The workflow code between two steps is deterministic and has no effects, so the
    result of step *n* can share one transaction (and one fsync) with the start of
    step *n+1*: that step's body only runs once both are durable, and a crash before
    then only repeats step *n*, as a crash before its own commit would. If the
    workflow does not reach another write by the time it yields to the event loop
    (parallel steps, a plain ``await``), the held checkpoint is committed on its own.
    """
    x.pending.extend(write.entries)
    x.pending_attempts.extend(write.attempts)
    if x.riding:  # in the run's own task: looked at when it yields (FlushAtYield)
        x.flush_at_yield = True
    elif not x.flush_scheduled:
        x.flush_scheduled = True
        flush_later(x)


def defer_one(x: RunExecution, entry: HistoryEntry, attempt: Attempt) -> None:
    """:func:`defer` of a step's ended entry and attempt, without a ``RunWrite`` to
    carry them."""
    x.pending.append(entry)
    x.pending_attempts.append(attempt)
    if x.riding:
        x.flush_at_yield = True
    elif not x.flush_scheduled:
        x.flush_scheduled = True
        flush_later(x)


class FlushAtYield:
    """Awaits a run's code in the run's own task (``await FlushAtYield(x, coro)``) and
    schedules the flush of what a step's end deferred there (:func:`defer`) only if the
    task yields to the event loop, or ends, with it still held: not on every step's
    end. The usual next thing after a step's end in the run's task is the next step's
    start (or the run's end), whose commit takes the deferred records in the same
    turn: the flush's loop callback scheduled at the step's end and cancelled by that
    commit (a ``Handle`` made, cancelled and dropped each step) is not made at all.

    ``x.riding`` is true while the run's task executes through this (so a deferral in
    any other task, a branch's, schedules its flush at once, as before); what is
    deferred meanwhile sets ``x.flush_at_yield``, which a commit clears
    (docs/performance.md, round twenty-six)."""

    __slots__ = ("_coro", "_x")

    def __init__(self, x: RunExecution, coro: Coroutine[Any, Any, T]) -> None:
        self._x = x
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        x, coro = self._x, self._coro
        send, throw = coro.send, coro.throw
        value: Any = None
        exc: BaseException | None = None
        while True:
            x.riding = True
            try:
                yielded = send(value) if exc is None else throw(exc)
            except StopIteration as stop:
                return stop.value
            finally:
                x.riding = False
                if x.flush_at_yield:  # held while the task yields or ends: flush it
                    x.flush_at_yield = False
                    if not x.flush_scheduled:
                        x.flush_scheduled = True
                        flush_later(x)
            try:
                value, exc = (yield yielded), None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as thrown:  # a cancel of the task: passed on to the code
                value, exc = None, thrown


class CommitLock(asyncio.Lock):
    """A run's commit lock: an ``asyncio.Lock`` that a free lock hands over without a
    coroutine (:meth:`take_now`), every checkpoint of every run (docs/performance.md,
    round twenty-five)."""

    def take_now(self) -> bool:
        """Take the lock if it is free and nobody waits for it (whose turn comes first,
        even if cancelled: ``acquire`` sorts that out); False: await :meth:`acquire`."""
        if self.locked() or self._waiters:
            return False
        self._locked = True  # (as acquire() takes a free lock)
        return True

    def release(self) -> None:
        """``asyncio.Lock.release``: with nobody waiting, the lock is freed without its
        call to wake the first waiter (every checkpoint, docs/performance.md, round
        twenty-seven); else as asyncio does it."""
        if self._locked and not self._waiters:
            self._locked = False
            return
        super().release()


def flush_later(x: RunExecution) -> None:
    """:func:`flush_soon` once ``x``'s task has yielded: one loop callback for every run
    waiting for it (runs started or deferring in one pass), not one each."""
    engine = x.engine
    waiting = engine.to_flush
    if not waiting:  # the first since the last pass
        engine.flush_handle = asyncio.get_running_loop().call_soon(flush_all, waiting)
    waiting.append(x)


def unschedule(x: RunExecution) -> None:
    """A commit took what ``x`` held for its flush: when ``x`` is the only run the
    flush's callback is for (a run executed alone), the callback is cancelled, as
    :func:`flush_soon` would find nothing to flush (a commit defers after this one
    schedules it again). With other runs waiting too, it is left to run (no search
    of the list on every commit)."""
    engine = x.engine
    waiting = engine.to_flush  # (x is in it: x.flush_scheduled)
    if len(waiting) == 1:
        handle, engine.flush_handle = engine.flush_handle, None
        if handle is not None:
            handle.cancel()
        waiting.clear()
        x.flush_scheduled = False


def flush_all(waiting: list[RunExecution]) -> None:
    """:func:`flush_soon` of the runs waiting for it. Each has yielded since (this runs
    in a later callback than the one it was queued in), except a new run whose task
    was queued after this callback and has not begun: it is looked at in the next pass
    (its first pass usually stores it with its first checkpoint)."""
    runs = waiting[:]
    waiting.clear()
    if runs:
        runs[0].engine.flush_handle = None
    for x in runs:
        if not x.began and x.task is not None and not x.task.done():
            flush_later(x)
        else:
            flush_soon(x)


def flush_soon(x: RunExecution) -> None:
    x.flush_scheduled = False
    if x.pending or x.pending_attempts or x.create_pending:
        x.engine.track(asyncio.create_task(flush(x)))


async def flush(x: RunExecution) -> None:
    if not (x.pending or x.pending_attempts or x.create_pending):
        return
    try:
        await x.commit(RunWrite())
    except (_Abandon, _StoreFailed) as exc:
        # The run's next write raises it, and the run goes on from its history.
        x.flush_failed = exc
        x.request_interrupt(exc)
