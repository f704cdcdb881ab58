"""Step and handler bodies that are never resumed past a pause of their worker.

Shared by the engine (step bodies) and the choreography consumer (handler bodies); the
rules are in docs/leases.md ("Paused past the lease") and :mod:`cantata.engine.pauses`.

- :class:`GuardedBody` asks a ``fenced()`` predicate before every resumption of a
  body and throws ``CancelledError`` into it instead when the worker's hold may have
  lapsed (by ``time.monotonic()``, which keeps counting through SIGSTOP, or by the wall
  clock, which jumps ahead when a paused VM resumes), before any other code of the
  process runs. A ``fenced()`` that returns a future instead (a verdict on the hold
  still to come: the heartbeat after a pause) holds the body, not resumed, until that
  future is done, then asks again (:data:`Fence`).
- :class:`InlineBody` is the same guard for a body awaited in the awaiting task itself
  (a workflow's step, a handler's body: no task of its own to create, schedule and
  wake on every step or delivery).
- :class:`PauseClock` tells a pause of the whole process (SIGSTOP, a VM stall) from a
  body that blocks the event loop itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: A body's guard: ``True`` once the body must not be resumed, ``False`` while it may
#: go on, or a future while that is not known yet (the heartbeat sent after a pause of
#: the worker has not answered, docs/leases.md): the body is held until the future is
#: done, and the guard asked again.
Fence = Callable[[], "bool | asyncio.Future[bool]"]

def in_body() -> bool:
    """True in the context an :class:`InlineBody` runs a step's body in (and so in what
    the body starts: its timeouts, task groups, tasks). A cancel of the run's task asked
    from there is the body's own; one asked from elsewhere comes from the workflow's code
    (see cantata.engine.branches.RunTask). (The guard's own variable, ``_BODY``, tells
    it: one variable set per step, not two.)"""
    return _BODY.get() is not None


def body_ended() -> None:
    """Tell the :class:`InlineBody` this runs in (if any) that the step's own code has
    returned or raised: what its awaiting code still does (close the attempt's
    heartbeat, release a limited step's slot) is the engine's bookkeeping, which the
    guard neither cuts nor lets the engine cancel any more. Cut there, a body that
    returned would have its result thrown away and run again (its worker paused past
    the fence after the body's last line); kept, the result goes to the run's fenced
    checkpoint, which fails if another worker took the run over meanwhile."""
    body = _BODY.get()
    if body is not None:
        body.ended = True


_BODY: contextvars.ContextVar[InlineBody[Any] | None] = contextvars.ContextVar(
    "cantata_body", default=None)


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
        # A tick (its reading of the time, the gap, the last tick moved) and a reading
        # are atomic to each other. Without it, a tick whose thread lost the GIL between
        # reading the time and noting the gap made a reading just then count the gap as
        # ongoing up to the reading's time, and the next one, the gap noted, count it
        # shorter: the guard of a handler stopped its body for a pause that the check at
        # its stop, a moment later, found shorter than the bar (docs/leases.md).
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cantata-pause-clock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        never = threading.Event()
        while True:
            never.wait(self._every)
            self._tick()

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last > 4 * self._every:
                self._gaps.append((self._last, now))
            self._last = now

    def stood_still(self, began: float, ended: float) -> float:
        """Seconds between ``began`` and ``ended`` (monotonic) the whole process stood
        still, including a gap the thread has not had the chance to note yet."""
        return sum(self._within(began, ended))

    def longest(self, began: float, ended: float) -> float:
        """The longest single stretch between ``began`` and ``ended`` (monotonic) the
        whole process stood still (:meth:`stood_still` sums them)."""
        return max(self._within(began, ended), default=0.0)

    def _within(self, began: float, ended: float) -> list[float]:
        # Under the tick's lock (a reading sees a tick whole or not at all; the time is
        # read after the last tick's), so that each stall counts once and a later
        # reading never finds less stood still than an earlier one: a gap the thread
        # has not noted yet is the ongoing one, up to now.
        with self._lock:
            last = self._last
            gaps = list(self._gaps)
            now = time.monotonic()
        if now - last > 4 * self._every:
            gaps.append((last, now))
        return [max(0.0, min(e, ended) - max(s, began)) for s, e in gaps]


_clock: PauseClock | None = None
_monotonic = time.monotonic
_clock_lock = threading.Lock()


def pause_clock() -> PauseClock:
    """The process's :class:`PauseClock` (started on first use)."""
    global _clock
    with _clock_lock:
        if _clock is None:
            _clock = PauseClock()
        return _clock


class _Guard:
    """What both guards hold: the body, when it may not go on, whom to tell of a held loop."""

    __slots__ = ("_coro", "_fenced", "_held_value", "_stall", "_stalled", "thrown")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        fenced: Fence,
        stalled: Callable[[float], None],
        stall: float,
    ) -> None:
        self._coro = coro
        self._fenced = fenced
        self._stalled = stalled
        self._stall = stall
        self.thrown = False  # the guard threw CancelledError into the body
        self._held_value: Any = _NOT_HELD  # GuardedBody: the value held for a verdict
        if _clock is None:
            pause_clock()


_NOT_HELD: Any = object()


def _waiter(verdict: asyncio.Future[Any]) -> asyncio.Future[None]:
    """A future done once ``verdict`` is: what a held body's task waits on, so that a
    cancel of that task cancels this future, not the verdict other bodies wait for."""
    waiter = verdict.get_loop().create_future()

    def done(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    verdict.add_done_callback(done)
    return waiter


class GuardedBody(_Guard, Coroutine[Any, Any, T]):
    """A step body that is not resumed once its owner's hold may have lapsed.

    ``fenced()`` is asked before every resumption; the first time it is true,
    ``CancelledError`` is thrown into the body instead (its ``finally`` blocks and
    ``except BaseException`` handlers run; what it awaits there is resumed as usual).
    ``stalled(seconds)`` is called when one resumption held the event loop longer than
    ``stall`` seconds, not counting time the whole process stood still (a pause
    inside the body's own code is not the body's doing: :class:`PauseClock`).
    """

    __slots__ = ()

    # The hot path (every resumption of every step body): no closure, no allocation
    # but the monotonic readings; the pause clock is asked only after a long one.
    def send(self, value: Any) -> Any:
        if self._held_value is not _NOT_HELD:  # (resumed after a verdict it waited for)
            value, self._held_value = self._held_value, _NOT_HELD
        stop = False if self.thrown else self._fenced()
        if stop and stop is not True:
            # A verdict on the hold is due: wait for it, the body not resumed (its
            # task waits on the future this yields, as on the body's own).
            self._held_value = value
            waiter = _waiter(stop)
            waiter._asyncio_future_blocking = True
            return waiter
        began = _monotonic()
        try:
            if stop:
                self.thrown = True
                return self._coro.throw(asyncio.CancelledError())
            return self._coro.send(value)
        finally:
            if _monotonic() - began > self._stall:
                self._held(began)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if val is None else val
        self._held_value = _NOT_HELD  # (a cancel while held: passed on to the body)
        began = _monotonic()
        try:
            return self._coro.throw(exc)
        finally:
            if _monotonic() - began > self._stall:
                self._held(began)

    def _held(self, began: float) -> None:
        _report_held(began, self._stall, self._stalled)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()


def _report_held(began: float, stall: float, stalled: Callable[[float], None]) -> None:
    """One resumption held the loop past ``stall``: tell, unless the whole process stood
    still meanwhile (a pause is not the body's doing)."""
    ended = _monotonic()
    assert _clock is not None
    held = ended - began - _clock.stood_still(began, ended)
    if held > stall:
        stalled(held)


class InlineBody(_Guard, Generic[T]):
    """:class:`GuardedBody`'s guard for a body awaited by ``task`` itself, not run as a
    task of its own: ``await InlineBody(...)`` resumes the body through the guard, each
    time in a copy of the context it was made in (as a task would: what the body sets
    in context variables stays its own).

    :meth:`cancel` stops it as cancelling a body's task would: it cancels ``task``,
    which is suspended in the body whenever another task can call it (through the
    task's ``engine_cancel`` when it has one: a run's task holds back other cancels
    while a step runs). The awaiting code tells that cancel (``cancelled``) and the
    guard's own throw (``thrown``) from a cancel of ``task`` by anyone else, and takes
    its own cancel back (``task.uncancel()``). The body runs with :func:`in_body` true
    (``in_body``: a step's body; a handler's body runs without it, as in a task of its
    own).
    """

    __slots__ = ("_context", "cancelled", "ended", "task")

    def __init__(
        self,
        coro: Coroutine[Any, Any, T],
        fenced: Fence,
        stalled: Callable[[float], None],
        stall: float,
        task: asyncio.Task[Any],
        *,
        in_body: bool = True,
    ) -> None:
        # (_Guard.__init__'s, inline: one frame less on every step)
        self._coro = coro
        self._fenced = fenced
        self._stalled = stalled
        self._stall = stall
        self.thrown = False
        if _clock is None:
            pause_clock()
        self._context = contextvars.copy_context()
        if in_body:
            self._context.run(_BODY.set, self)
        self.task = task
        self.cancelled = False  # cancel() cancelled the task
        self.ended = False  # the step's own code returned or raised (body_ended)

    def cancel(self) -> None:
        """Stop the body now (its worker's hold may have lapsed), unless the step's own
        code ended already (:func:`body_ended`)."""
        if not self.cancelled and not self.ended:
            self.cancelled = True
            getattr(self.task, "engine_cancel", self.task.cancel)()

    def __await__(self) -> Generator[Any, Any, T]:
        # The hot path, as GuardedBody.send: locals only, no allocation but the readings.
        coro, run, fenced, stall, monotonic = (
            self._coro, self._context.run, self._fenced, self._stall, _monotonic)
        send, throw = coro.send, coro.throw
        value: Any = None
        exc: BaseException | None = None
        try:
            while True:
                stop = exc is None and not self.thrown and not self.ended and fenced()
                if stop and stop is not True:
                    # A verdict on the hold is due (the heartbeat after a pause): the
                    # body is held, not resumed, until it comes; then asked again. A
                    # cancel of the task meanwhile is passed on to the body.
                    try:
                        yield from _waiter(stop)
                    except GeneratorExit:
                        coro.close()
                        raise
                    except BaseException as thrown:
                        exc = thrown
                    continue
                began = monotonic()
                try:
                    if exc is not None:
                        yielded = run(throw, exc)
                    elif stop:
                        self.thrown = True
                        yielded = run(throw, asyncio.CancelledError())
                    else:
                        yielded = run(send, value)
                except StopIteration as returned:
                    return returned.value  # type: ignore[no-any-return]
                finally:
                    if monotonic() - began > stall:
                        _report_held(began, stall, self._stalled)
                try:
                    value, exc = (yield yielded), None
                except GeneratorExit:
                    coro.close()
                    raise
                except BaseException as thrown:  # a cancel of the task, passed on to the body
                    value, exc = None, thrown
        finally:
            # The body's context holds this guard (_BODY): let go of it once the body has
            # ended, so that the guard (and the run's state it reaches: its task, the
            # execution) is freed by reference counting, not left in a cycle for the
            # garbage collector to find (every step of every run, docs/performance.md).
            self._context = _DONE


_DONE = contextvars.Context()  # an ended InlineBody's context (it holds none of its own)


class BodyFenced(BaseException):
    """Internal: a handler body was stopped because its worker's hold may have lapsed."""


async def guarded(coro: Coroutine[Any, Any, T], fenced: Fence, stall: float) -> T:
    """Await a handler's body, guarded as a :class:`GuardedBody` task would be, in the
    awaiting task itself (:class:`InlineBody`: no task to create, schedule and wake per
    delivery), in a copy of the context as a task would run it. Raises
    :class:`BodyFenced` when the body ended cancelled while the awaiting task was not
    (the guard stopped it, or it raised ``CancelledError`` of its own, as a task of its
    own would have ended cancelled); a cancel of the awaiting task is passed on as
    usual."""
    me = asyncio.current_task()
    if me is None:  # (not in a task: as a task of its own)
        body: asyncio.Future[T] = asyncio.ensure_future(
            GuardedBody(coro, fenced, _not_told, stall))
        try:
            return await body
        except asyncio.CancelledError:
            if body.cancelled():
                raise BodyFenced() from None
            raise
    try:
        return await InlineBody(coro, fenced, _not_told, stall, me, in_body=False)
    except asyncio.CancelledError:
        if me.cancelling() == 0:
            raise BodyFenced() from None
        raise


def _not_told(seconds: float) -> None:
    """A handler's body that held the loop is not reported (as before: no hook for it)."""
