"""One loop timer for the timeouts of the local ``result()`` waits, not one each."""

from __future__ import annotations

import asyncio
import time

from cantata.model.records import RunRecord

# As the event loop reads its timers (BaseEventLoop._clock_resolution): a timer is due
# once its time is less than the loop's time plus this.
_RESOLUTION = time.get_clock_info("monotonic").resolution


class WaitDeadlines:
    """The local ``result()`` waits of one engine that have a timeout, and one timer,
    armed for the earliest of them (``RunHandle.result``; docs/performance.md, round
    twenty-seven). A wait past its deadline gets ``None``, as a run let go gives it.

    A wait registers itself (:meth:`add`) and leaves once it ends (:meth:`discard`): a
    dict entry each, where a timer each was a ``TimerHandle`` made, pushed on the
    loop's heap and cancelled for every ``result()`` of every run. The timer stays set
    for a deadline whose wait ended meanwhile: it then finds nothing due and is set
    again for the earliest left, if any."""

    __slots__ = ("_loop", "_timer", "_waits")

    def __init__(self) -> None:
        self._waits: dict[asyncio.Future[RunRecord | None], float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, waiter: asyncio.Future[RunRecord | None], deadline: float,
            loop: asyncio.AbstractEventLoop) -> bool:
        """Give ``waiter`` ``None`` at ``deadline`` (``loop``'s time) unless it is done
        first; False (nothing done) when waits of another loop still running are here:
        the caller sets a timer of its own."""
        if loop is not self._loop:
            if self._waits and self._loop is not None and not self._loop.is_closed():
                return False
            self._waits, self._timer, self._loop = {}, None, loop
        self._waits[waiter] = deadline
        timer = self._timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._due)
        return True

    def discard(self, waiter: asyncio.Future[RunRecord | None]) -> None:
        """``waiter``'s wait ended (done, or given up by its caller)."""
        self._waits.pop(waiter, None)

    def _due(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        due = loop.time() + _RESOLUTION
        earliest: float | None = None
        waits = self._waits
        for waiter, deadline in list(waits.items()):
            if deadline < due:
                del waits[waiter]
                if not waiter.done():
                    waiter.set_result(None)
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._timer = loop.call_at(earliest, self._due)
