"""Cluster-wide limits on one step (``@app.step(concurrency=, rate=)``) or one handler
group (``@app.on(..., concurrency=)``).

A slot is a row in the store held by this worker (so it is lost with the worker's
lease if the worker dies) and released when the attempt ends, however it ends.
Waiting for a slot comes before the attempt is recorded: it is neither an attempt
nor a failure. See docs/flow-control.md.

Each slot is asked for, re-timed and released under a holder of one execution alone:
a step's run id and key with the fence of the execution's claim of the run (a task's:
the fence of its claim of the task), a handler's group and event id with a token of
its own. A stale execution of a run another worker took over (its worker paused past
its lease, then resumed) therefore never asks for, nor frees, the new owner's slot;
and the store grants and frees a holder's slot only for the worker that holds it
(:meth:`~cantata.store.roles.flow.FlowStore.acquire_slot`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cantata.errors import StoreFull, StoreUnavailable
from cantata.model.flow import Rate, SlotGrant
from cantata.quietlog import reason
from cantata.store.faults import wait_out

if TYPE_CHECKING:
    from cantata.declare.defs import HandlerDef, StepDef
    from cantata.engine.engine import Engine
    from cantata.engine.runner import RunExecution

log = logging.getLogger("cantata.limits")


def step_scope(name: str) -> str:
    return f"step:{name}"


def handler_scope(group: str) -> str:
    return f"handler:{group}"


def step_holder(run_id: str, key: str, fence: int) -> str:
    """The holder of a step's slot in one execution of its run: its run and key, and
    the fence of the claim that execution runs under."""
    return f"{run_id}:{key}@{fence}"


def task_holder(run_id: str, key: str, fence: int) -> str:
    """The holder of the slot of a step run as a task, in one claim of the task."""
    return f"{run_id}:{key}@task{fence}"


def ask_period(engine: Engine) -> float:
    """The longest a slot's waiter goes between two requests: five times
    ``poll_interval`` (1 s by default), at most a quarter of the lease (a waiter that
    keeps asking is never taken for one that gave up)."""
    return min(engine.poll_interval * 5, engine.lease / 4)


def waiter_lapse(engine: Engine) -> float:
    """How long a slot's waiter that stopped asking (its process frozen, a withdrawal
    lost to a store error) keeps its place ahead of newcomers: three of its asking
    periods, at least 2 s (a slow store round trip is not giving up), at most the lease;
    3 s with the default ``poll_interval`` and lease. Passed over, it regains its place
    if it asks again before a lease has passed (then its row is removed)."""
    return min(engine.lease, max(3 * ask_period(engine), 2.0))


@dataclass(frozen=True, slots=True)
class Granted:
    """A slot granted: the clock time its begin was recorded at (for a rate) and how
    long the store took to answer the request that was granted."""

    begin: float
    trip: float


async def acquire(
    engine: Engine,
    scope: str,
    holder: str,
    concurrency: int | None,
    rate: Rate | None,
    wait: Any,
) -> float:
    """Take a slot of ``scope``, waiting with ``wait(seconds)`` while none is free; the
    clock time the grant was recorded at (its begin, for a rate).

    A denied request waits in the store's queue of the scope's waiters, first come,
    first served across processes (see :meth:`~cantata.store.roles.flow.FlowStore.
    acquire_slot`), and asks again at least every :func:`ask_period` to keep its place.
    ``wait`` returns early when something may have freed a slot (a store
    notification): the waiter asks again at once if it may be next by now (see
    :func:`may_be_next`), else it sleeps on. ``wait`` may raise (a cancelled run): the
    request is then withdrawn from the queue and nothing is held. News that came while
    the store was asked (too late for its answer, too early for ``wait``) counts too.
    """
    granted = await acquire_ahead(engine, scope, holder, concurrency, rate, wait, 0.0)
    return granted.begin


async def acquire_ahead(
    engine: Engine,
    scope: str,
    holder: str,
    concurrency: int | None,
    rate: Rate | None,
    wait: Any,
    lead: float,
) -> Granted:
    """:func:`acquire`, the begin recorded ``lead`` seconds after each request is sent
    (when the caller will begin its code, a store's round trip later)."""
    store, clock, flow = engine.store, engine.clock, engine.flow
    while True:
        now = clock.now()
        seen = flow.releases if flow is not None else 0
        try:
            grant = await store.acquire_slot(
                engine.app, scope, holder, engine.worker_id, concurrency=concurrency,
                rate=rate, now=now, stale_before=now, lapsed_before=now - waiter_lapse(engine),
                forget_before=now - engine.lease, begin_at=now + lead,
            )
        except BaseException:
            # The grant may have been committed with its answer lost (or the request
            # cut short): free what this holder may hold (only its own).
            await free(engine, scope, holder, f"{scope} ({holder})")
            raise
        if grant.granted:
            return Granted(now + lead, clock.now() - now)
        try:
            await _wait_for_turn(engine, wait, grant, now, seen, concurrency, rate)
        except BaseException:
            await _withdraw(engine, scope, holder)
            raise


async def _wait_for_turn(engine: Engine, wait: Any, grant: SlotGrant, asked: float,
                         seen: int, concurrency: int | None, rate: Rate | None) -> None:
    """After a denial: return when it is time to ask again (:func:`next_ask`), or
    earlier on news after which this waiter may be next."""
    flow, clock = engine.flow, engine.clock
    until = asked + next_ask(engine, grant, asked)
    while True:
        news = flow.releases - seen if flow is not None else 0
        if news and grant.retry_at is None and may_be_next(grant.ahead, news, concurrency,
                                                           rate):
            return
        left = until - clock.now()
        if left <= 0:
            return
        await wait(left)


def may_be_next(ahead: int, news: int, concurrency: int | None, rate: Rate | None) -> bool:
    """Whether a waiter told that ``ahead`` live waiters were before it may be served
    after ``news`` releases since: each release lets at most the waiters of one round
    (:func:`served_at_once`) through, so one far back sleeps through the first ones
    instead of asking on every release with the rest."""
    return ahead - news * served_at_once(concurrency, rate) < served_at_once(concurrency, rate)


def served_at_once(concurrency: int | None, rate: Rate | None) -> int:
    """How many waiters one release can let through: the slots of ``concurrency``
    (or the begins of a rate's window)."""
    limits = [n for n in (concurrency, rate.limit if rate is not None else None) if n]
    return min(limits, default=1)


def next_ask(engine: Engine, grant: SlotGrant, now: float) -> float:
    """Seconds until a denied waiter asks again: :func:`ask_period`, or sooner when a
    rate's window has room for it; without a rate's time, on a store whose listeners do
    not hear other processes (SQLite), the poll interval for the next two in line (a
    release in another process leaves the slot idle until the head asks, and the one
    behind it is the head as soon as that is granted). On a store that tells every
    process of a release (PostgreSQL), the waiters sleep until they hear it:
    :func:`ask_period` is then only their safety net for a lost notification (and how
    they keep their place)."""
    pause = ask_period(engine)
    if grant.retry_at is not None:
        return min(pause, max(grant.retry_at - now, 0.005))
    if grant.ahead <= 1 and not hears_others(engine):
        return min(pause, engine.poll_interval)
    return pause


def hears_others(engine: Engine) -> bool:
    """Whether the engine's store tells this process of other processes' releases
    (``StoreLifecycle.hears_others``; a store without the attribute: no)."""
    return bool(getattr(engine.store, "hears_others", False))


async def _withdraw(engine: Engine, scope: str, holder: str) -> None:
    """Leave the waiters of ``scope`` (a store error only delays it: the row lapses)."""
    try:
        await engine.store.withdraw_slot_request(engine.app, scope, holder, engine.worker_id)
    except Exception as exc:
        log.warning("withdrawing the request of %s for a slot of %s failed (%s); it lapses "
                    "in %.1f s", holder, scope, exc, waiter_lapse(engine))


async def take_step_slot(execution: RunExecution, sdef: StepDef, key: str) -> float | None:
    """Wait for a slot of a limited step: the time its begin was recorded at (``None``:
    the step has no limit)."""
    if sdef.concurrency is None and sdef.rate is None:
        return None
    engine = execution.engine
    # An outage (or a store that answers slower than its driver's timeouts) is waited
    # out here, as a checkpoint's is: the run's steps held for its next write stay held.
    return await wait_out(
        lambda: acquire(engine, step_scope(sdef.name), _holder(execution, key),
                        sdef.concurrency, sdef.rate, _step_wait(execution)),
        quiet=engine.quiet, key="slot", what=f"taking a slot of step {sdef.name}",
        give_up=lambda: not engine.serving, max_delay=engine.lease / 4,
    )


def _holder(execution: RunExecution, key: str) -> str:
    run = execution.run
    return step_holder(run.run_id, key, run.fence)


def _step_wait(execution: RunExecution) -> Any:
    """A ``wait`` for :func:`acquire` in a run: until ``seconds`` pass or the flow
    service wakes the execution (a slot may be free)."""
    engine = execution.engine
    waiting = engine.flow.slot_waiters if engine.flow is not None else set()

    async def wait(seconds: float) -> None:
        # wait_until asks ``woken`` before it first sleeps (False), then each time the
        # execution is woken: the flow service wakes it when a slot may be free.
        asked = 0

        async def woken() -> bool:
            nonlocal asked
            asked += 1
            return asked > 1

        waiting.add(execution)
        try:
            # busy: a run waiting for a step's slot counts against App(max_runs=...),
            # else a worker would claim run after run that all wait for the slots
            await execution.wait_until(engine.clock.now() + seconds, woken, poll=False,
                                       busy=True)
        finally:
            waiting.discard(execution)

    return wait


async def retime_step_begin(execution: RunExecution, sdef: StepDef, key: str,
                            stamped: float) -> None:
    """Just before a rate-limited step's body: make its recorded begin that of the body
    (:func:`retime_begin`)."""
    rate = sdef.rate
    if rate is None:
        return
    scope, holder = step_scope(sdef.name), _holder(execution, key)

    async def ask(lead: float) -> Granted:
        return await acquire_ahead(execution.engine, scope, holder, sdef.concurrency, rate,
                                   _step_wait(execution), lead)

    await retime_begin(execution.engine, rate, stamped, ask)


async def retime_begin(engine: Engine, rate: Rate, stamped: float, ask: Any) -> None:
    """Return when the body of a rate-limited call may begin: within half the window's
    margin (``slack``) after its recorded begin ``stamped``, and not before it.

    A body that would begin later than that (a slow store round trip, a cold
    connection, the attempt's own write) has its begin recorded again (``ask(lead)``,
    the holder's own request), ``lead`` seconds after the request is sent: the store's
    last round trip and a half, so that the answer comes before the new begin, which
    the body then waits for. Each miss lengthens the lead (up to the lease); a begin
    that left the window meanwhile is asked for anew, as a waiter. A wait for a begin
    ahead is a miss too when it ends more than ``slack`` past that begin (a busy event
    loop or a loaded machine wakes its sleepers late): the time is looked at again after
    every wait, and the body begins only within ``slack``. The rate counts recorded
    begins; this keeps each body's start within ``slack`` of its own, however slow the
    store or the wake-ups, so the limit holds for starts timed in the body
    (docs/flow-control.md).

    Returns right after its last look at the clock (no ``await`` between), so the
    caller must begin the body without awaiting anything first.
    """
    clock = engine.clock
    slack = (rate.window - rate.per) / 2
    lead = 0.0
    while True:
        late = clock.now() - stamped
        if late < 0:
            await clock.sleep(-late)
            if slack < TIMER_GRAIN:
                return  # (a margin finer than the loop's timers: as close as it gets)
            continue  # (look again: the wake-up itself may come late)
        if late <= slack:
            return
        granted = await ask(lead)
        stamped = granted.begin
        lead = next_lead(lead, granted.trip, engine.lease)


# How late an idle event loop may wake a sleeper (its selector counts milliseconds):
# a rate whose margin is finer than this (``per`` under 40 ms) is not looked at again
# after a wait, which could then miss for ever.
TIMER_GRAIN = 0.002


def next_lead(lead: float, trip: float, longest: float) -> float:
    """How far ahead of its request a late body's begin is recorded next: the last
    round trip and a half, at least twice the lead that was too short, at most
    ``longest``."""
    return min(max(1.5 * trip, 2 * lead), longest)


async def release_step_slot(execution: RunExecution, sdef: StepDef, key: str) -> None:
    """Free the slot of a finished attempt (see :func:`free`)."""
    await free(execution.engine, step_scope(sdef.name), _holder(execution, key),
               f"step {sdef.name}")


async def free(engine: Engine, scope: str, holder: str, what: str) -> None:
    """Free ``holder``'s slot of ``scope`` (this worker's, nothing if it holds none).

    Once asked, the release goes on even if the caller is cancelled meanwhile (a run let
    go while it frees its step's slot). An outage or a full disk does not keep the slot
    held: the release is retried in the background until the store takes it (or this
    worker stops, and its slots go with its row), for no one else frees a live worker's
    slot. Returns after the first try."""
    tried: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    engine.track(asyncio.ensure_future(_free(engine, scope, holder, what, tried)))
    await asyncio.shield(tried)


async def _free(engine: Engine, scope: str, holder: str, what: str,
                tried: asyncio.Future[None]) -> None:
    delay = 0.05
    while True:
        try:
            await engine.store.release_slot(engine.app, scope, holder, engine.worker_id)
            return
        except (StoreUnavailable, StoreFull) as exc:
            engine.quiet.warning("slot-release", "releasing the slot of %s failed (%s); "
                                 "retrying until it is freed", what, reason(exc))
        except Exception as exc:
            log.warning("releasing the slot of %s failed (%s); it is freed when this "
                        "worker stops or its lease lapses", what, reason(exc))
            return
        finally:
            if not tried.done():
                tried.set_result(None)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max(engine.lease / 4, 0.05))


def _news_wait(engine: Engine, extend: Any = None, cancels: bool = False) -> Any:
    """A ``wait`` for :func:`acquire` outside a run: until ``seconds`` pass or the
    flow service hears that a slot may be free (with ``cancels``, or that a run was
    cancelled); ``extend()`` first, when given, at most once per :func:`ask_period`: a
    waiter far back is woken by news it sleeps through."""
    flow = engine.flow
    news = [flow.released] if flow is not None else []
    if cancels and flow is not None:
        news.append(flow.cancelled)
    extended = -math.inf

    async def wait(seconds: float) -> None:
        nonlocal extended
        for event in news:
            event.clear()  # (before the await: news meanwhile ends this wait at once)
        if extend is not None and engine.clock.now() - extended >= ask_period(engine):
            extended = engine.clock.now()
            await extend()
        waits = [asyncio.ensure_future(engine.clock.sleep(seconds)),
                 *(asyncio.ensure_future(event.wait()) for event in news)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    return wait


async def take_task_slot(engine: Engine, sdef: StepDef, holder: str,
                         check: Any = None) -> float | None:
    """Wait for a slot of a limited step called from another service (a task): the
    same scope as a local call of the step, so one limit holds for both; ``holder``
    is :func:`task_holder`'s. The clock time its begin was recorded at (``None``: no
    limit).

    ``check()`` (when given) is awaited as the wait begins, then whenever this process
    hears of a cancel, when the clock time it returned (a deadline, or ``None``) comes,
    and at least every :func:`ask_period`: what it raises ends the wait, the request
    withdrawn (the task's run no longer wants it, say)."""
    if sdef.concurrency is None and sdef.rate is None:
        return None
    wait = _news_wait(engine, cancels=check is not None)
    if check is not None:
        wait = _checked_wait(engine, wait, check)
    return await acquire(engine, step_scope(sdef.name), holder, sdef.concurrency, sdef.rate,
                         wait)


def _checked_wait(engine: Engine, news_wait: Any, check: Any) -> Any:
    """``news_wait`` with ``check()`` awaited when it is due (see
    :func:`take_task_slot`): not on every wake-up, so a release elsewhere costs the
    waiter no look at its run."""
    flow, clock = engine.flow, engine.clock
    checked = -math.inf  # clock time of the last check
    cancels = -1  # the flow service's count of cancels heard at the last check
    due: float | None = None  # what the last check returned (the run's deadline)

    async def look_if_due() -> None:
        nonlocal checked, cancels, due
        now = clock.now()
        heard = flow.cancels if flow is not None else 0
        if (heard != cancels or now - checked >= ask_period(engine)
                or (due is not None and now >= due)):
            checked, cancels = now, heard
            due = await check()

    async def wait(seconds: float) -> None:
        heard = (flow.releases, flow.cancels) if flow is not None else None
        await look_if_due()
        if flow is not None and heard != (flow.releases, flow.cancels):
            return  # news while it looked (the wait would not see it): the caller decides
        span = min(seconds, max(checked + ask_period(engine) - clock.now(), 0.0))
        if due is not None:
            span = min(span, max(due - clock.now(), 0.0))
        await news_wait(span)
        await look_if_due()  # (before the caller may ask: a cancel heard, or the deadline)

    return wait


async def retime_task_begin(engine: Engine, sdef: StepDef, holder: str,
                            stamped: float) -> None:
    """:func:`retime_step_begin` for a task: its recorded begin made the body's."""
    rate = sdef.rate
    if rate is None:
        return
    scope, wait = step_scope(sdef.name), _news_wait(engine)

    async def ask(lead: float) -> Granted:
        return await acquire_ahead(engine, scope, holder, sdef.concurrency, rate, wait, lead)

    await retime_begin(engine, rate, stamped, ask)


async def release_task_slot(engine: Engine, sdef: StepDef, holder: str) -> None:
    """Free the slot a task's attempt held (see :func:`free`)."""
    if sdef.concurrency is None and sdef.rate is None:
        return
    await free(engine, step_scope(sdef.name), holder, f"step {sdef.name}")


async def take_handler_slot(engine: Engine, hdef: HandlerDef, event_id: str,
                            extend: Any) -> str | None:
    """Wait for a slot of a limited handler group; the holder to release (or ``None``)."""
    if hdef.concurrency is None:
        return None
    holder = f"{hdef.group}:{event_id}@{secrets.token_hex(6)}"  # (this handling's own)
    # (extend: a broker message stays ours while it waits)
    await acquire(engine, handler_scope(hdef.group), holder, hdef.concurrency, None,
                  _news_wait(engine, extend))
    return holder


async def release_handler_slot(engine: Engine, hdef: HandlerDef, holder: str) -> None:
    """Free a handler's slot (see :func:`free`)."""
    await free(engine, handler_scope(hdef.group), holder, f"group {hdef.group}")
