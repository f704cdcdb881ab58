"""A blocking facade over the async API, for scripts and notebooks.

    from cantata import sync
    with sync.connect(app) as shop:             # client only; serve=True runs a worker too
        handle = shop.start("place_order", {"id": 42}, idempotency_key="order-42")
        print(handle.result(timeout=10))

The async core runs on an event loop in a background thread; every call blocks
until its coroutine finishes there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from cantata.app import App
from cantata.engine.handle import RunHandle
from cantata.model.event import Event
from cantata.model.records import DeadLetter, RunInfo
from cantata.model.status import RunStatus

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cantata-sync",
                                       daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SyncHandle:
    """Blocking twin of :class:`~cantata.RunHandle`."""

    def __init__(self, runner: _LoopThread, handle: RunHandle) -> None:
        self._runner = runner
        self._handle = handle
        self.run_id = handle.run_id

    def result(self, timeout: float | None = None) -> Any:
        """Block until the run ends; same errors as ``RunHandle.result``."""
        return self._runner.call(self._handle.result(timeout=timeout))

    def status(self) -> RunStatus:
        return self._runner.call(self._handle.status())

    def cancel(self) -> None:
        self._runner.call(self._handle.cancel())

    def get_value(self, key: str, wait: float | None = None) -> Any:
        """Blocking ``RunHandle.get_value``."""
        return self._runner.call(self._handle.get_value(key, wait=wait))

    def query(self, name: str) -> Any:
        """Blocking ``RunHandle.query``."""
        return self._runner.call(self._handle.query(name))


class SyncApp:
    """Blocking access to an :class:`~cantata.App`; use as a context manager."""

    def __init__(self, app: App, *, serve: bool = False) -> None:
        self.app = app
        self.serve = serve
        self._runner: _LoopThread | None = None

    def __enter__(self) -> SyncApp:
        self._runner = _LoopThread()
        try:
            self._call(self.app.open(serve=self.serve))
        except BaseException:
            self._runner.stop()
            self._runner = None
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            try:
                self._call(self.app.close())
            finally:
                self._runner.stop()
                self._runner = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._runner is None:
            coro.close()
            from cantata.errors import ConfigurationError

            raise ConfigurationError("use `with cantata.sync.connect(app) as c:` first")
        return self._runner.call(coro)

    def start(self, workflow: Callable[..., Any] | str, *args: Any, **kw: Any) -> SyncHandle:
        """Blocking ``app.start``."""
        handle = self._call(self.app.start(workflow, *args, **kw))
        assert self._runner is not None
        return SyncHandle(self._runner, handle)

    def get_handle(self, run_id: str) -> SyncHandle:
        assert self._runner is not None
        return SyncHandle(self._runner, self.app.get_handle(run_id))

    def list_runs(self, **kw: Any) -> list[RunInfo]:
        return self._call(self.app.list_runs(**kw))

    def publish(self, type: str, data: Any = None, **kw: Any) -> Event[Any]:
        return self._call(self.app.publish(type, data, **kw))

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self._call(self.app.dead_letters(limit=limit))

    def replay(self, dead_letter_id: str) -> DeadLetter:
        return self._call(self.app.replay(dead_letter_id))


def connect(app: App, *, serve: bool = False) -> SyncApp:
    """A blocking view of ``app``; ``serve=True`` also runs a worker in the background."""
    return SyncApp(app, serve=serve)
