"""A blocking facade over the async API, for scripts, notebooks and threaded servers.

    from cantata import sync
    with sync.connect(app) as shop:             # client only; serve=True runs a worker too
        handle = shop.start("place_order", {"id": 42}, idempotency_key="order-42")
        print(handle.result(timeout=10))

The app's async core runs on one event loop in a background thread of this process,
shared by every ``sync.connect(app)`` block of that app that is open, from any thread,
nested or overlapping: the first block to begin opens the app there, the last to end
closes it. Every call blocks until its coroutine finishes on that loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from cantata.app import App
from cantata.engine.handle import RunHandle
from cantata.errors import ConfigurationError, StoreUnavailable
from cantata.model.event import Event
from cantata.model.records import DeadLetter, RunInfo, RunRecord
from cantata.model.status import RunStatus

if TYPE_CHECKING:
    from cantata.flow.schedules import ScheduleInfo
    from cantata.model.flow import QueueStats
    from cantata.observability.node import TraceNode
    from cantata.observability.stalled import Stall

T = TypeVar("T")

# Seconds waited for a close told to stop at once (a Ctrl-C came while it ran): it only
# releases what is left and closes connections.
_FORCED_CLOSE = 10.0

# Per app: a lock, held while its session opens or closes the app (which may take
# the app's shutdown_grace), and its session while one block or more is open.
_registry = threading.Lock()  # guards the two maps (held only to read or write them)
_locks: weakref.WeakKeyDictionary[App, threading.Lock] = weakref.WeakKeyDictionary()
_sessions: weakref.WeakKeyDictionary[App, _Session] = weakref.WeakKeyDictionary()
# Per app: the session whose close goes on in the background after a Ctrl-C (see
# _Session.end); the app's next block waits for it.
_unfinished: weakref.WeakKeyDictionary[App, _Session] = weakref.WeakKeyDictionary()


def _lock_of(app: App) -> threading.Lock:
    with _registry:
        return _locks.setdefault(app, threading.Lock())


def _current(app: App) -> _Session | None:
    with _registry:
        return _sessions.get(app)


class _Session:
    """One app opened on an event loop in a thread of its own, for as long as one
    ``sync.connect(app)`` block or more is open."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.blocks = 0  # sync.connect blocks open
        self.opened = 0  # app.open calls made on the loop (each closed at the end)
        self.serving = False
        self.closed = False
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._calls_lock = threading.Lock()  # never held while waiting for the loop
        self.hurry = False  # a Ctrl-C came while the app closed: no more grace
        self.closing: concurrent.futures.Future[None] | None = None
        # Done once the close is, or once a block's end stops waiting for it (Ctrl-C).
        self._waiting: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=_run_loop, args=(self.loop,), name=f"cantata-sync-{app.name}", daemon=True
        )
        self.thread.start()

    def open(self, serve: bool) -> None:
        self._run(self.app.open(serve=serve))
        self.opened += 1
        self.serving = self.serving or serve

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it; a call still waiting when the
        session ends raises ``StoreUnavailable``."""
        if threading.current_thread() is self.thread:
            coro.close()
            raise ConfigurationError(
                f"cantata.sync called on app {self.app.name!r}'s own event loop (in a "
                "step, handler or hook of this process?): await the async API there"
            )
        with self._calls_lock:
            if self.closed:
                coro.close()
                raise self._closed_error()
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
            self._calls.add(fut)
        fut.add_done_callback(self._done)
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            if self.closed:
                raise self._closed_error("while this call waited") from None
            raise

    def _done(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._calls_lock:
            self._calls.discard(fut)

    def _closed_error(self, when: str = "") -> StoreUnavailable:
        return StoreUnavailable(
            f"app {self.app.name!r} was closed{' ' + when if when else ''}: the last "
            "`with cantata.sync.connect(app):` block ended; call it inside one"
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def end(self, ctrl_c: _CtrlC) -> None:
        """Cancel the calls still waiting, close the app, stop the loop.

        A Ctrl-C while the app closes (``ctrl_c``'s presses, made before the close or
        during it) ends the close's grace at once (as a second signal does to a
        worker: what still runs is released now). One more (or a close still not done
        after ``_FORCED_CLOSE`` seconds) stops the waiting, not the close: it finishes
        on this session's loop in the background, and the next block of the app waits
        for it (:meth:`finish_closing`) before opening the app anew.
        """
        with self._calls_lock:
            self.closed = True
            waiting = list(self._calls)
        for fut in waiting:
            fut.cancel()
        try:
            self._close_app(ctrl_c)
        finally:
            closing = self.closing
            if closing is not None and not closing.done():
                with _registry:
                    _unfinished[self.app] = self
                closing.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.loop.stop))
            else:
                self._stop()

    def _close_app(self, ctrl_c: _CtrlC) -> None:
        """Close the app on the loop and wait until the close is done or given up."""
        self.closing = asyncio.run_coroutine_threadsafe(self._close_all(), self.loop)
        self.closing.add_done_callback(lambda _: _settle(self._waiting))
        ctrl_c.watch(self)
        while True:
            try:
                self._waiting.result()
                break
            except KeyboardInterrupt:  # no handler of ours (not the main thread's own)
                ctrl_c.press()
        if self.closing.done():  # not given up: its error, if it failed
            self.closing.result()

    def interrupt(self, presses: int) -> None:
        """Ctrl-C number ``presses`` while the app closes; safe in a signal handler (it
        takes no lock: the loop does the work)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to stop
            self.loop.call_soon_threadsafe(self._hurry if presses == 1 else self._give_up)

    async def _close_all(self) -> None:
        """The ``app.close()`` for each ``app.open`` made here."""
        for _ in range(self.opened):
            if self.hurry:
                await _close_at_once(self.app)
            else:
                await self.app.close()

    def _hurry(self) -> None:  # on the loop
        if self.hurry:
            return
        self.hurry = True
        self.app.force_stop()
        self.loop.call_later(_FORCED_CLOSE, self._give_up)

    def _give_up(self) -> None:  # on the loop
        _settle(self._waiting)

    def _stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # stopped and closed already
            self.loop.call_soon_threadsafe(self.loop.stop)
        try:
            self.thread.join(timeout=30)
        finally:
            self.app._drop_loop(self.loop)  # if its close failed: nothing runs there now

    def finish_closing(self) -> None:
        """Wait for this session's close, which went on in the background after its
        block ended with a Ctrl-C (:meth:`end`)."""
        assert self.closing is not None
        try:
            self.closing.result(timeout=_FORCED_CLOSE)
        except concurrent.futures.TimeoutError:
            raise StoreUnavailable(
                f"app {self.app.name!r} is still closing after a `cantata.sync` block "
                f"ended with Ctrl-C (waited another {_FORCED_CLOSE:.0f} s): its store or "
                "broker is not answering; try again once it is, or restart the process"
            ) from None
        except BaseException:  # failed: _stop's App._drop_loop tells and frees the app
            pass
        with _registry:
            _unfinished.pop(self.app, None)
        self._stop()


def _settle(fut: concurrent.futures.Future[None]) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # settled already
        fut.set_result(None)


class _CtrlC:
    """The Ctrl-C presses while a block ends (as ``asyncio.Runner`` takes them).

    In the main thread, if SIGINT has Python's default handler, a handler of its own
    stands in for it from the start of the block's end until the app's close stopped:
    it counts the presses, tells the closing session at once (the first ends the
    grace, the second stops the waiting) and raises nothing, so that no press is lost
    or cuts the end short half-way. The caller raises ``KeyboardInterrupt`` afterwards
    if any came. Elsewhere, a ``KeyboardInterrupt`` raised during the close counts as a
    press (see :meth:`_Session._close_app`).
    """

    def __init__(self) -> None:
        self.presses = 0
        self._session: _Session | None = None
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        """Take SIGINT over, if this is the main thread and its handler the default."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            return
        self._previous, self._installed = previous, True
        signal.signal(signal.SIGINT, self._on_sigint)

    def restore(self) -> None:
        """Give SIGINT its previous handler back."""
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.press()

    def press(self) -> None:
        self.presses += 1
        session = self._session
        if session is not None:
            session.interrupt(self.presses)

    def watch(self, session: _Session) -> None:
        """Tell ``session``, which now closes, of the presses so far and those to come."""
        self._session = session
        for presses in range(1, min(self.presses, 2) + 1):
            session.interrupt(presses)


def _taking_ctrl_c(presses: int) -> _CtrlC:
    """A :class:`_CtrlC` with SIGINT taken over, counting ``presses`` made already."""
    ctrl_c = _CtrlC()
    ctrl_c.presses = presses
    ctrl_c.install()
    return ctrl_c


async def _close_at_once(app: App) -> None:
    """``app.close()`` with no grace: what still runs is released now."""
    grace, app.shutdown_grace = app.shutdown_grace, 0.0
    try:
        await app.close()
    finally:
        app.shutdown_grace = grace


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _begin(app: App, serve: bool) -> _Session:
    """Join the app's session (opening it on a new loop if none is open)."""
    with _lock_of(app):
        with _registry:
            unfinished = _unfinished.get(app)
        if unfinished is not None:
            unfinished.finish_closing()
        session = _current(app)
        if session is None:
            session = _Session(app)
            try:
                session.open(serve)
            except BaseException:
                session.opened = 0
                ctrl_c = _CtrlC()
                session.end(ctrl_c)
                if ctrl_c.presses:
                    raise KeyboardInterrupt from None
                raise
            with _registry:
                _sessions[app] = session
        elif threading.current_thread() is session.thread:
            raise ConfigurationError(
                f"cantata.sync.connect({app.name!r}) called on the app's own event loop (in a "
                "step, handler or hook of this process?): await the async API there"
            )
        elif serve and not session.serving:
            session.open(serve=True)  # a worker from now until the last block ends
        session.blocks += 1
        return session


def _finish(session: _Session, ctrl_c: _CtrlC) -> None:
    with _lock_of(session.app):
        session.blocks -= 1
        if session.blocks > 0:
            return
        with _registry:
            del _sessions[session.app]
        session.end(ctrl_c)


def _session_of(app: App) -> _Session:
    session = _current(app)
    if session is None:
        raise StoreUnavailable(
            f"app {app.name!r} is not open here: use this handle inside a "
            "`with cantata.sync.connect(app):` block (any block of this app, in any thread)"
        )
    return session


class SyncHandle:
    """Blocking twin of :class:`~cantata.RunHandle`.

    It outlives the ``with sync.connect(app)`` block it came from: used while another
    block of the app is open (in any thread) it works through it; while none is, it
    raises ``StoreUnavailable``.
    """

    def __init__(self, app: App, handle: RunHandle) -> None:
        self._app = app
        self._handle = handle
        self.run_id = handle.run_id

    @property
    def workflow(self) -> str | None:
        """The run's workflow name, once known."""
        return self._handle.workflow

    def __repr__(self) -> str:
        return f"SyncHandle(run_id={self.run_id!r}, workflow={self.workflow!r})"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            session = _session_of(self._app)
        except StoreUnavailable:
            coro.close()
            raise
        return session.call(coro)

    def status(self) -> RunStatus:
        """Blocking ``RunHandle.status``."""
        return self._call(self._handle.status())

    def info(self) -> RunRecord:
        """Blocking ``RunHandle.info``: the stored run record."""
        return self._call(self._handle.info())

    def result(self, timeout: float | None = None) -> Any:
        """Block until the run ends; same errors as ``RunHandle.result``."""
        return self._call(self._handle.result(timeout=timeout))

    def cancel(self, *, actor: str | None = None) -> None:
        """Blocking ``RunHandle.cancel``; ``actor`` is audited."""
        self._call(self._handle.cancel(actor=actor))

    def retry(self, actor: str | None = None, include_compensated: bool = False) -> None:
        """Blocking ``RunHandle.retry``: continue a failed run from its failed step."""
        self._call(self._handle.retry(actor=actor, include_compensated=include_compensated))

    def get_value(self, key: str, wait: float | None = None) -> Any:
        """Blocking ``RunHandle.get_value``."""
        return self._call(self._handle.get_value(key, wait=wait))

    def query(self, name: str) -> Any:
        """Blocking ``RunHandle.query``."""
        return self._call(self._handle.query(name))


class SyncSchedules:
    """Blocking twin of ``app.schedules``."""

    def __init__(self, owner: SyncApp) -> None:
        self._owner = owner

    def create(self, name: str, cron: str | None, workflow: Any, **kw: Any) -> None:
        """Blocking ``app.schedules.create`` (same keyword arguments)."""
        self._owner._call(self._owner.app.schedules.create(name, cron, workflow, **kw))

    def list(self) -> list[ScheduleInfo]:
        return self._owner._call(self._owner.app.schedules.list())

    def pause(self, name: str, *, actor: str | None = None) -> None:
        self._owner._call(self._owner.app.schedules.pause(name, actor=actor))

    def resume(self, name: str, *, actor: str | None = None) -> None:
        self._owner._call(self._owner.app.schedules.resume(name, actor=actor))

    def trigger(self, name: str, *, actor: str | None = None) -> SyncHandle:
        return self._owner._wrap(
            self._owner._call(self._owner.app.schedules.trigger(name, actor=actor))
        )

    def delete(self, name: str, *, actor: str | None = None) -> None:
        self._owner._call(self._owner.app.schedules.delete(name, actor=actor))


class SyncApp:
    """Blocking access to an :class:`~cantata.App`; use as a context manager.

    Blocks of one app may be open in several threads at once, and nested: they share
    the app, opened once (see the module's description).
    """

    def __init__(self, app: App, *, serve: bool = False) -> None:
        self.app = app
        self.serve = serve
        self._session: _Session | None = None

    def __enter__(self) -> SyncApp:
        if self._session is not None:
            raise ConfigurationError(
                f"this cantata.sync connection to app {self.app.name!r} is open already: "
                "call sync.connect(app) again for another block"
            )
        self._session = _begin(self.app, self.serve)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        """End the block (the last one closes the app); a Ctrl-C meanwhile hurries the
        close (see :meth:`_Session.end`) and is raised once the close stopped."""
        presses = 0
        while True:
            try:
                ctrl_c = _taking_ctrl_c(presses)
                break
            except KeyboardInterrupt:  # a Ctrl-C before the handler was in place
                presses += 1
        try:
            session, self._session = self._session, None
            if session is not None:
                _finish(session, ctrl_c)
        finally:
            ctrl_c.restore()
        if ctrl_c.presses and not (exc_type and issubclass(exc_type, KeyboardInterrupt)):
            raise KeyboardInterrupt

    def _open(self) -> _Session:
        if self._session is None:
            raise ConfigurationError(
                f"app {self.app.name!r}: use `with cantata.sync.connect(app) as c:` first "
                "and call c's methods inside the block"
            )
        return self._session

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            session = self._open()
        except ConfigurationError:
            coro.close()
            raise
        return session.call(coro)

    def _wrap(self, handle: RunHandle) -> SyncHandle:
        return SyncHandle(self.app, handle)

    def start(self, workflow: Callable[..., Any] | str, *args: Any, **kw: Any) -> SyncHandle:
        """Blocking ``app.start`` (same arguments)."""
        return self._wrap(self._call(self.app.start(workflow, *args, **kw)))

    def get_handle(self, run_id: str) -> SyncHandle:
        """A handle on an existing run."""
        self._open()
        return self._wrap(self.app.get_handle(run_id))

    def list_runs(
        self, status: RunStatus | str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[RunInfo]:
        """Blocking ``app.list_runs``."""
        return self._call(self.app.list_runs(status=status, workflow=workflow, limit=limit))

    def find_runs(
        self,
        idempotency_key: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        workflow: str | None = None,
        status: RunStatus | str | None = None,
        limit: int = 100,
    ) -> list[RunInfo]:
        """Blocking ``app.find_runs``."""
        return self._call(
            self.app.find_runs(
                idempotency_key=idempotency_key,
                attributes=attributes,
                workflow=workflow,
                status=status,
                limit=limit,
            )
        )

    def fork(self, run_id: str, from_step: str, *, actor: str | None = None) -> SyncHandle:
        """Blocking ``app.fork``."""
        return self._wrap(self._call(self.app.fork(run_id, from_step, actor=actor)))

    def publish(
        self,
        type: str,
        data: Any = None,
        *,
        subject: str | None = None,
        correlation_id: str | None = None,
        source: str | None = None,
        id: str | None = None,
        actor: str | None = None,
    ) -> Event[Any]:
        """Blocking ``app.publish`` (``tx=`` belongs to a step's transaction: async only);
        ``actor`` is audited."""
        return self._call(
            self.app.publish(
                type,
                data,
                subject=subject,
                correlation_id=correlation_id,
                source=source,
                id=id,
                actor=actor,
            )
        )

    def trace(self, correlation_id: str) -> TraceNode:
        """Blocking ``app.trace``."""
        return self._call(self.app.trace(correlation_id))

    def stalled(self, older_than: float = 300) -> list[Stall]:
        """Blocking ``app.stalled``."""
        return self._call(self.app.stalled(older_than=older_than))

    def queue_stats(self) -> list[QueueStats]:
        """Blocking ``app.queue_stats``."""
        return self._call(self.app.queue_stats())

    def dead_letters(
        self, limit: int = 100, *, group: str | None = None, type: str | None = None
    ) -> list[DeadLetter]:
        """Blocking ``app.dead_letters``."""
        return self._call(self.app.dead_letters(limit=limit, group=group, type=type))

    def replay(self, dead_letter_id: str, *, actor: str | None = None) -> DeadLetter:
        """Blocking ``app.replay``; ``actor`` is audited."""
        return self._call(self.app.replay(dead_letter_id, actor=actor))

    def discard(self, dead_letter_id: str, *, actor: str | None = None) -> DeadLetter:
        """Blocking ``app.discard``; ``actor`` is audited."""
        return self._call(self.app.discard(dead_letter_id, actor=actor))

    def redrive(self, older_than: float = 60.0) -> int:
        """Blocking ``app.redrive``."""
        return self._call(self.app.redrive(older_than=older_than))

    @property
    def schedules(self) -> SyncSchedules:
        """Blocking ``app.schedules``."""
        return SyncSchedules(self)


def connect(app: App, *, serve: bool = False) -> SyncApp:
    """A blocking view of ``app``; ``serve=True`` also runs a worker in the background
    (from the first such block until the last block of the app ends)."""
    return SyncApp(app, serve=serve)
