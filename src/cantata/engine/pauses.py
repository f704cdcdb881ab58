"""A worker paused past its lease: its step bodies stop at once, its attempts are excused.

The rules, with the reasons (docs/leases.md, "Paused past the lease"):

- **The body guard.** Every step body runs through :class:`GuardedBody`, which checks
  the owner's fence before it lets the body go on after an ``await``: when more than
  ``FENCE_AT`` of the lease has passed (``time.monotonic()``, which keeps counting
  through SIGSTOP) since the last heartbeat that got through, it throws
  ``CancelledError`` into the body instead of resuming it. So a body never goes on
  past a pause longer than that, before any other code of the process runs: another
  worker may own the run by now. Only a pause inside the body's own synchronous code
  (between two awaits, or in a thread) lets it finish late.
- **Excuses.** A pause is not a death. At takeover time a paused worker looks dead,
  so the new owner records the attempt it was in as ``WorkerLost``; the paused
  worker, once it runs again and finds the run taken over, marks those of its
  attempts ``Paused`` (:meth:`~cantata.store.base.Store.excuse_attempts`), which
  does not count. An attempt whose body held the event loop past the fence itself
  (a step that blocks its worker) is not excused, so a step that stalls its worker
  every time still runs out of attempts. A pause of the whole process inside the
  body's code is told from that by :class:`PauseClock`, a thread that keeps ticking
  while only the event loop is blocked, and stands still with the whole process.
- **Before failing a step for good** on attempts of which some are ``WorkerLost``,
  the owner waits up to one lease (:func:`await_excuses`) for their workers to
  excuse them: a worker that was paused excuses its attempts within moments of
  running again. A worker silent that long past the takeover is taken for dead, so a
  step that kills its worker every time still fails after its attempts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cantata.errors import CantataError
from cantata.model.records import Attempt
from cantata.quietlog import reason

if TYPE_CHECKING:
    from .engine import Engine
    from .runner import RunExecution

log = logging.getLogger("cantata.worker")

T = TypeVar("T")

# An attempt cut off by a pause of its worker past the lease, the run taken over
# meanwhile: recorded, not counted (docs/leases.md).
PAUSED = (
    "Paused",
    "the worker running this attempt was paused past its lease and another worker took "
    "the run over; not counted as an attempt",
)


class PauseClock:
    """A thread that ticks every ``every`` seconds. A gap in its ticks is a stall of
    the whole process (SIGSTOP, a VM stall), not of the event loop alone: a step body
    that blocks the loop (``time.sleep``, a CPU-bound loop) lets it tick on, as Python
    hands the GIL over every few milliseconds. (A C extension that holds the GIL for
    long looks like a pause.)"""

    def __init__(self, every: float = 0.05) -> None:
        self._every = every
        self._last = time.monotonic()
        self._gaps: deque[tuple[float, float]] = deque(maxlen=64)
        self._thread = threading.Thread(target=self._run, name="cantata-pause-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        never = threading.Event()
        while True:
            never.wait(self._every)
            now = time.monotonic()
            if now - self._last > 4 * self._every:
                self._gaps.append((self._last, now))
            self._last = now

    def stood_still(self, began: float, ended: float) -> float:
        """Seconds between ``began`` and ``ended`` (monotonic) the whole process stood
        still, including a gap the thread has not had the chance to note yet."""
        gaps = list(self._gaps)
        now, last = time.monotonic(), self._last
        if now - last > 4 * self._every:
            gaps.append((last, now))
        return sum(max(0.0, min(e, ended) - max(s, began)) for s, e in gaps)


_clock: PauseClock | None = None
_clock_lock = threading.Lock()


def pause_clock() -> PauseClock:
    """The process's :class:`PauseClock` (started on first use)."""
    global _clock
    with _clock_lock:
        if _clock is None:
            _clock = PauseClock()
        return _clock


class StepStalled(CantataError):
    """A step body held its worker's event loop past the fence in its own code.

    Its worker cannot heartbeat meanwhile, so another worker may take the run over: the
    body is stopped at its next ``await`` and the attempt counts (a step that does
    this every time runs out of attempts instead of being restarted forever).
    """


class GuardedBody(Coroutine[Any, Any, T]):
    """A step body that is not resumed once its owner's hold may have lapsed.

    ``fenced()`` is asked before every resumption; the first time it is true,
    ``CancelledError`` is thrown into the body instead (its ``finally`` blocks and
    ``except BaseException`` handlers run; what it awaits there is resumed as usual).
    ``stalled(seconds)`` is called when one resumption held the event loop longer than
    ``stall`` seconds, not counting time the whole process stood still (a pause
    inside the body's own code is not the body's doing: :class:`PauseClock`).
    """

    __slots__ = ("_clock", "_coro", "_fenced", "_stall", "_stalled", "_thrown")

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        fenced: Callable[[], bool],
        stalled: Callable[[float], None],
        stall: float,
    ) -> None:
        self._coro = coro
        self._fenced = fenced
        self._stalled = stalled
        self._stall = stall
        self._thrown = False
        self._clock = pause_clock()

    def _timed(self, step: Callable[[], Any]) -> Any:
        began = time.monotonic()
        try:
            return step()
        finally:
            ended = time.monotonic()
            if ended - began > self._stall:
                held = ended - began - self._clock.stood_still(began, ended)
                if held > self._stall:
                    self._stalled(held)

    def send(self, value: Any) -> Any:
        if not self._thrown and self._fenced():
            self._thrown = True
            return self._timed(lambda: self._coro.throw(asyncio.CancelledError()))
        return self._timed(lambda: self._coro.send(value))

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if val is None else val
        return self._timed(lambda: self._coro.throw(exc))

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()


class BodyFenced(BaseException):
    """Internal: a handler body was stopped because its worker's hold may have lapsed."""


async def guarded(engine: Engine, coro: Coroutine[Any, Any, T]) -> T:
    """Await a handler body as a :class:`GuardedBody` task: it is never resumed past a
    pause of this worker longer than the fence. Raises :class:`BodyFenced` when the
    guard stopped it (a cancel of the awaiting task is passed on as usual).

    Only a pause of the whole process counts here, not a store outage: in an outage a
    handler runs on and its outcome waits for the store, the delivery staying this
    live worker's (docs/leases.md); stopping it would only spend its attempts.
    """
    from .ownership import FENCE_AT

    clock = pause_clock()

    def fenced() -> bool:
        if not (engine.serving and engine.ownership.expired()):
            return False
        since = engine.ownership.beat_at
        return clock.stood_still(since, time.monotonic()) >= engine.lease / 4

    body = asyncio.ensure_future(
        GuardedBody(coro, fenced, lambda seconds: None, engine.lease * FENCE_AT)
    )
    try:
        return await body
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if body.cancelled() and me is not None and me.cancelling() == 0:
            raise BodyFenced() from None
        raise


async def excuse(engine: Engine, run_id: str, app: str, attempts: Sequence[Attempt]) -> None:
    """Mark ``attempts`` (this live worker's, of a run taken from it) ``Paused``.

    Retried for a few leases while the store is away (the worker just came back from
    a pause or an outage); given up after that: the attempts stay charged. (A retry
    after a try that was applied but whose answer was lost could, in theory, excuse
    an attempt the new owner started since under the same number and start time.)
    """
    now = engine.clock.now()
    marked = [Attempt(a.key, a.attempt, a.started_at, now, *PAUSED) for a in attempts]
    deadline = time.monotonic() + 4 * engine.lease
    delay = 0.05
    while True:
        try:
            n = await engine.store.excuse_attempts(app, run_id, marked)
        except Exception as exc:
            if time.monotonic() > deadline:
                log.warning(
                    "run %s: could not mark the attempts this worker was cut off "
                    "in as paused (%s); they count as attempts",
                    run_id,
                    reason(exc),
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, engine.lease / 4)
            continue
        if n:
            log.info(
                "run %s was taken over while this worker was paused: %d attempt(s) "
                "it was cut off in do not count",
                run_id,
                n,
            )
        return


async def await_excuses(execution: RunExecution, key: str, lost: Sequence[Attempt]) -> int:
    """Wait up to one lease for the workers of ``lost`` (``WorkerLost`` attempts of
    step ``key``) to excuse them, as a worker that was only paused does on resuming.

    Returns how many of them were excused (marked ``Paused``); they are marked so in
    ``lost`` too. Called only before a step fails for running out of attempts.
    """
    engine, run = execution.engine, execution.run
    wanted = {(a.attempt, a.started_at): a for a in lost}
    deadline = time.monotonic() + engine.lease
    while True:
        try:
            rows = await engine.store.load_attempts(run.app, run.run_id)
        except Exception:
            rows = []
        excused = [
            a
            for a in rows
            if a.key == key and a.error_type == PAUSED[0] and (a.attempt, a.started_at) in wanted
        ]
        if excused or time.monotonic() >= deadline:
            for a in excused:
                mine = wanted[(a.attempt, a.started_at)]
                mine.ended_at, mine.error_type, mine.error = a.ended_at, a.error_type, a.error
            return len(excused)
        await asyncio.sleep(min(engine.lease / 4, max(0.0, deadline - time.monotonic())))
