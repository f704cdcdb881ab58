"""A run's creation whose answer was lost: settled by the run's id, not left in doubt.

The store's answer to the write that creates a run can be lost after that write
committed (the connection cut between the COMMIT and its reply): the store raises
``StoreUnavailable`` ("may not have been applied"). The run's id settles it: each run
id is new (:func:`cantata.model.codec.new_id`), so a run stored with it is this
creation's. :func:`create_once` reads the run back; only if it is not stored is the
creation made again, and that retry changes nothing if the first one committed
meanwhile (its idempotency key returns the run stored; a second row with the id is
refused, and the run is read back then). Within one lease of the engine it tries
again while the store stays unreachable; after that, or as soon as the app begins
closing (``Engine.closing``: finding out would hold the close up for as long), the
caller gets a ``StoreUnavailable`` naming the run's id and how to find out
(docs/guarantees.md, "Starting a run").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from cantata.cancel_safe import wait_event
from cantata.errors import IdempotencyConflict, StoreUnavailable
from cantata.model.records import RunRecord
from cantata.quietlog import reason

if TYPE_CHECKING:
    from .engine import Engine

Created = tuple[RunRecord, bool]
T = TypeVar("T")


class Creation(NamedTuple):
    """What :func:`create_once` learnt: the run and whether this creation stored it, as
    the store's ``create_run`` says; ``read_back``: after a lost answer, ``run`` is the
    record as read from the store (a worker reconciling its runs may have resumed it
    meanwhile: engine/ownership.py)."""

    run: RunRecord
    created: bool
    read_back: bool = False


async def create_once(
    engine: Engine, run: RunRecord, create: Callable[[], Awaitable[Created]]
) -> Creation:
    """``create()`` (a store call creating ``run``), its lost answer found out.

    Returns what ``create()`` returns; after a lost answer, ``created`` when ``run``
    turns out stored (by the first try, or by a retry), else what a retry returns
    (the idempotency key's run of another start, not created).

    Raises:
        StoreUnavailable: the store stayed unreachable for a lease after the answer was
            lost, or the app began closing while this found out; the message names the
            run's id, how to find out whether it was stored, and whether starting it
            again is safe.
        IdempotencyConflict: (from a retry) the key belongs to another start.
    """
    try:
        return Creation(*await create())
    except StoreUnavailable as exc:
        lost: StoreUnavailable = exc
    engine.quiet.warning(
        "create", "storing run %s of %s: the store's answer was lost (%s); finding out "
        "whether it was stored", run.run_id, run.workflow, reason(lost),
    )
    found = await _find_out(engine, run, create, lost, time.monotonic() + engine.lease)
    if isinstance(found, _Closed):
        raise StoreUnavailable(lost_message(run, engine.lease, found.lost, closed=True)
                               ) from found.lost
    if isinstance(found, StoreUnavailable):
        raise StoreUnavailable(lost_message(run, engine.lease, found)) from found
    engine.quiet.recovered("create", "storing runs works again")
    return found


class _Closed(NamedTuple):
    """The app began closing before :func:`_find_out` knew; ``lost``: the store's last
    error."""

    lost: StoreUnavailable


class _Closing(Exception):
    """Raised by :func:`_unless_closing` when the app begins closing."""


async def _unless_closing(closing: asyncio.Event, call: Awaitable[T]) -> T:
    """Await ``call``, given up (cancelled) as soon as ``closing`` is set: then raises
    :class:`_Closing`. (A store call through an unreachable server may take its
    connect timeout, or longer: the close must not wait for it.)"""
    if closing.is_set():
        if asyncio.iscoroutine(call):
            call.close()  # (never started)
        raise _Closing()
    task = asyncio.ensure_future(call)
    watch = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():  # the app closing, or this caller cancelled
            task.cancel()
            task.add_done_callback(_retrieved)
    if task.done() and not task.cancelled():
        return task.result()
    raise _Closing()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Take a given-up call's outcome (else asyncio logs an exception never retrieved)."""
    if not task.cancelled():
        task.exception()


async def _find_out(
    engine: Engine, run: RunRecord, create: Callable[[], Awaitable[Created]],
    lost: StoreUnavailable, until: float,
) -> Creation | StoreUnavailable | _Closed:
    """Whether ``run`` is stored (read back, created again if not), until the monotonic
    time ``until``; the store's last error if it stayed unreachable, or :class:`_Closed`
    once the app begins closing (each wait and store call given up at once)."""
    delay = 0.05
    refused: Exception | None = None  # a retry's own error, the run not found stored
    closing = engine.closing
    while time.monotonic() < until:
        if await wait_event(closing, delay):
            return _Closed(lost)
        delay = min(delay * 2, max(engine.lease / 4, 0.05))
        try:
            stored = await _unless_closing(closing, engine.store.get_run(run.app, run.run_id))
            if stored is not None:
                return Creation(stored, True, read_back=True)
            if refused is None:
                again, created = await _unless_closing(closing, create())
                # (the key's run is this one: stored by the first try meanwhile)
                mine = not created and again.run_id == run.run_id
                return Creation(again, created or mine, read_back=mine)
        except _Closing:
            return _Closed(lost)
        except StoreUnavailable as exc:
            lost = exc
            continue
        except IdempotencyConflict:
            raise
        except Exception as exc:
            # The retry's row was refused: the first try may have committed meanwhile
            # (it was still under way on the server). Read back once more.
            refused = exc
            continue
        raise refused  # not stored, and the retry was refused: that is the answer
    return lost


def lost_message(run: RunRecord, patience: float, lost: Exception, *,
                 closed: bool = False) -> str:
    """Why start could not tell whether ``run`` was stored, how to find out, and whether
    starting it again is safe; ``closed``: the app began closing before it knew (else
    the store stayed unreachable for ``patience`` seconds)."""
    why = ("the app was closed before the store answered" if closed
           else f"the store stayed unreachable for {patience:g} s")
    again = (
        "starting it again with the same idempotency key is safe: that returns this run "
        "if it was stored, and starts it once if not"
        if run.idempotency_key is not None else
        "starting it again without an idempotency key may start a second run: give "
        "app.start an idempotency_key= to make starting again safe"
    )
    return (
        f"run {run.run_id} of {run.workflow} may have been stored: the store's answer to "
        f"its creation was lost and {why} ({reason(lost)}). Find out with "
        f"app.get_handle({run.run_id!r}).status() (it raises RunNotFound if the run was "
        f"not stored) or `cantata run {run.run_id}`; {again}"
    )
