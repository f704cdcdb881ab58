"""Cleanup after cancel: ``cantata.Cancelled`` is raised into the workflow once.

The first time a cancellation reaches a durable point, the workflow gets
``Cancelled`` and may catch it (``try/except/finally``) to run cleanup steps. From
then on durable calls work normally, for the workflow's ``cleanup_timeout``
(counted from a recorded time, so a replay keeps the same bound); past it,
``Cancelled`` is raised again at every durable point. Whatever the workflow does
next — re-raise, return, fail — the run ends ``cancelled`` (after the unwind runs
the compensations still registered).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from cantata.errors import Cancelled
from cantata.model import codec
from cantata.model.records import EntryKind, EntryStatus

from .journal import Save

if TYPE_CHECKING:
    from .runner import RunExecution

# The marker recorded where the cancellation reached the workflow (its value: the
# clock time). check-replay (replaycheck.py) delivers it again at the same place.
MARKER = "cancelled#1"


class CleanupExpired(Cancelled):
    """The cancellation again, once the cleanup window has closed."""


def accepts(x: RunExecution, exc: BaseException) -> bool:
    """False for a cancellation requested again while the workflow cleans up (the
    engine notices the run's cancel flag again and again)."""
    return not (
        isinstance(exc, Cancelled) and x.api.cancel_delivered
        and not isinstance(exc, CleanupExpired)
    )


def deliver(x: RunExecution, exc: BaseException) -> None:
    """Called with the interrupt about to be raised into the workflow.

    On the first ``Cancelled``, opens the cleanup window (a fresh interrupt, set when
    the window closes); a ``Cancelled`` raised later is the window closing.
    """
    if not isinstance(exc, Cancelled) or x.api.cancel_delivered:
        return
    x.api.cancel_delivered = True
    clock = x.engine.clock
    call = x.journal.lookup(EntryKind.VALUE, "cancelled", key=MARKER)
    if call.entry is not None:
        started = float(codec.loads(call.entry.result))
    else:
        started = clock.now()
        x.journal.record(call, EntryStatus.COMPLETED, save=Save.WITH_NEXT,
                         result=codec.dumps(started), started_at=started, ended_at=started)
    timeout = x.wdef.cleanup_timeout
    x.api.cleanup_timeout = timeout
    # A fresh interrupt: cleanup steps run until the window closes.
    x.interrupt = asyncio.get_running_loop().create_future()
    delay = started + timeout - clock.now()
    if delay <= 0:  # a replay after the window closed: closed before any durable call
        _close(x)
    else:
        timer = asyncio.create_task(_close_after(x, delay))
        x.engine.track(timer)
        # A run that ends within its window leaves no timer behind (a stop of the
        # worker would wait for it as for a flush: a second more for every such stop)
        if x.task is not None:
            x.task.add_done_callback(lambda _: timer.cancel())


async def _close_after(x: RunExecution, delay: float) -> None:
    await x.engine.clock.sleep(delay)
    _close(x)


def _close(x: RunExecution) -> None:
    x.request_interrupt(CleanupExpired(
        f"run {x.run.run_id} was cancelled and its cleanup took longer than its "
        f"cleanup_timeout of {x.wdef.cleanup_timeout} s"
    ))
