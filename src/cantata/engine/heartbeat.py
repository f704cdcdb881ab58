"""Step heartbeats: ``cantata.heartbeat(details)`` and ``heartbeat_timeout``.

Each attempt of a step has a :class:`Beat`. A heartbeat notes the time (the
watchdog of a step declared with ``heartbeat_timeout`` reads it) and the details;
the details are written to the store at most once per throttle interval (the first
at once), and once more when the attempt fails, so the step's next attempt — here
or, after a crash, in another worker — starts with the last details it reported
(``step_info().heartbeat_details``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cantata.errors import CantataError, HeartbeatTimeout
from cantata.model import codec
from cantata.model.records import StepHeartbeat

T = TypeVar("T")

THROTTLE = 2.0  # seconds between two writes of one attempt's heartbeat details

Persist = Callable[[StepHeartbeat], Awaitable[None]]
_NEVER = float("-inf")  # (parsed once, not per attempt)


class Beat:
    """The heartbeat state of one step attempt."""

    __slots__ = (
        "_closed",
        "_details_json",
        "_dirty",
        "_loop",
        "_loop_thread",
        "_persist",
        "_throttle",
        "_timer",
        "_what",
        "_writes",
        "_written_at",
        "attempt",
        "beats",
        "key",
        "last",
        "previous",
    )

    def __init__(
        self,
        what: str | tuple[str, str],
        key: str,
        attempt: int,
        previous: Any = None,
        persist: Persist | None = None,
        throttle: float = THROTTLE,
    ) -> None:
        # "step charge of run 0195..." for messages, or (step, run id) to make it once
        # needed (most attempts never need it)
        self._what = what
        self.key = key
        self.attempt = attempt
        self.previous = previous  # the details the step's last attempt reported
        self.last = time.monotonic()
        self.beats = 0
        self._details_json: str | None = None
        self._persist = persist
        self._throttle = throttle
        self._written_at = _NEVER
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._writes: set[asyncio.Task[None]] | None = None  # made by the first write
        self._closed = False

    @property
    def what(self) -> str:
        what = self._what
        if isinstance(what, tuple):
            what = self._what = f"step {what[0]} of run {what[1]}"
        return what

    def beat(self, details: Any) -> None:
        """Record one heartbeat (any thread)."""
        text = codec.dumps(details, f"cantata.heartbeat(details) in {self.what}")
        self.last = time.monotonic()
        if threading.get_ident() == self._loop_thread:
            self._noted(text)
        else:
            self._loop.call_soon_threadsafe(self._noted, text)

    def _noted(self, text: str) -> None:
        self.beats += 1
        self._details_json = text
        self._dirty = True
        if self._persist is None or self._timer is not None:
            return
        wait = self._written_at + self._throttle - time.monotonic()
        if wait <= 0:
            self._write()
        else:
            self._timer = self._loop.call_later(wait, self._write)

    def _write(self) -> None:
        self._timer = None
        if not self._dirty or self._persist is None:
            return
        self._dirty = False
        self._written_at = time.monotonic()
        task = asyncio.ensure_future(self._persist(self._record()))
        if self._writes is None:
            self._writes = set()
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        if self._writes is not None:
            self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A failed write (a store hiccup): write the newest details again later,
            # even if the step sends no further heartbeat.
            self._dirty = True
            if self._timer is None and not self._closed:
                self._timer = self._loop.call_later(self._throttle, self._write)

    def _record(self) -> StepHeartbeat:
        return StepHeartbeat(self.key, self.attempt, time.time(), self._details_json)

    def close_now(self, failed: bool) -> bool:
        """End of the attempt when nothing is left to write (the usual case): True.
        False: await :meth:`close` instead."""
        if self._writes or (failed and self._dirty and self._persist is not None):
            return False
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return True

    async def close(self, failed: bool) -> None:
        """End of the attempt: a failed one writes its newest details for the retry."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if failed and self._dirty and self._persist is not None:
            self._dirty = False
            try:
                await self._persist(self._record())
            except Exception:  # the attempt's outcome matters more than its details
                self._dirty = True


_current: contextvars.ContextVar[Beat | None] = contextvars.ContextVar(
    "cantata_heartbeat", default=None
)
# (workflow, run id) of the workflow code running in this task, to name it in errors
workflow_run: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "cantata_workflow_run", default=None
)


def heartbeat(details: Any = None) -> None:
    """Report that the running step is alive, with optional JSON ``details`` (progress).

    A step declared with ``heartbeat_timeout`` that reports nothing for longer is a
    lost attempt (retried); the last ``details`` reach the next attempt as
    ``step_info().heartbeat_details``. Callable from async and sync steps.

    Raises:
        CantataError: called outside a step.
        SerializationError: ``details`` is not JSON-serialisable.
    """
    beat = _current.get()
    if beat is None:
        where = workflow_run.get()
        inside = "" if where is None else f" (in the code of workflow {where[0]}, run {where[1]})"
        raise CantataError(
            f"cantata.heartbeat() was called outside a step{inside}: call it inside a "
            "function decorated with @app.step while a workflow runs it"
        )
    beat.beat(details)


def set_beat(beat: Beat | None) -> contextvars.Token[Beat | None]:
    return _current.set(beat)


def reset_beat(token: contextvars.Token[Beat | None]) -> None:
    _current.reset(token)


async def watched(aw: Awaitable[T], beat: Beat, timeout: float) -> T:
    """Await ``aw``, but give up (cancelling it) once the step is silent for ``timeout`` s.

    Raises:
        HeartbeatTimeout: no heartbeat for ``timeout`` seconds.
    """
    task = asyncio.ensure_future(aw)
    try:
        while True:
            left = beat.last + timeout - time.monotonic()
            if left <= 0:
                raise HeartbeatTimeout(
                    f"{beat.what} attempt {beat.attempt} sent no heartbeat for {timeout} s "
                    f"(its heartbeat_timeout; {beat.beats} heartbeat(s) before): the attempt "
                    "is lost and retried"
                )
            done, _ = await asyncio.wait([task], timeout=left)
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()


async def beat_for(store: Any, app: str, run_id: str, step: str, key: str, attempt: int) -> Beat:
    """The :class:`Beat` of an attempt, with the details an earlier attempt left."""
    previous = None
    if attempt > 1:
        kept = await store.last_step_heartbeat(app, run_id, key)
        if kept is not None and kept.attempt < attempt:
            previous = codec.loads(kept.details)
    return first_beat(store, app, run_id, step, key, attempt, previous)


def first_beat(
    store: Any, app: str, run_id: str, step: str, key: str, attempt: int, previous: Any = None
) -> Beat:
    """The :class:`Beat` of an attempt no earlier attempt left details for (the first:
    no store read, so no await)."""

    # (a partial, not a closure: made for every attempt, and called by few)
    persist: Persist = functools.partial(store.record_step_heartbeat, app, run_id)
    return Beat((step, run_id), key, attempt, previous, persist)
