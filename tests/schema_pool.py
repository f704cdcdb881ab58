"""PostgreSQL schemas of one test's own, made ahead and dropped afterwards, off the
tests' path.

A store on a schema nobody used migrates it on open (every script under
``store/migrations/postgres``): about 0.4 s, most of it waiting for the disk (each
index built is synced to it), and dropping the schema after the test another 0.2 s.
Hundreds of tests take such a schema. A :class:`SchemaPool` (one per test process)
has a thread that keeps a few schemas migrated ahead, by opening and closing a store
on each (the path an app takes on a new schema), and drops the schemas the tests gave
back: both while the tests run. A test gets a schema nobody else used; the store it
opens there finds it at the current version, as on any later open of a store.

Tests of creating or migrating a schema keep asking for a name nobody used yet
(``fresh_schema`` in tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque

from tests.helpers import with_schema

__all__ = ["SchemaPool"]

#: Schemas dropped in one statement (each holds a hundred-odd relations to lock: few,
#: so the server's shared lock table keeps room for the tests).
_DROP_BATCH = 2


class SchemaPool:
    """Migrated schemas on the PostgreSQL server of ``url``, ``ready`` kept ahead.

    :meth:`take` hands one out (waiting for it if the thread has none ready);
    :meth:`give_back` queues it for dropping; :meth:`close` stops the thread once it
    dropped every schema it made.
    """

    def __init__(self, url: str, *, ready: int = 2, prefix: str = "tp_") -> None:
        self.url = url
        self.ready = ready
        self.prefix = prefix
        self._cond = threading.Condition()
        self._ready: deque[str] = deque()
        self._doomed: list[str] = []
        self._failure: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    def take(self, timeout: float = 120.0) -> str:
        """A migrated schema nobody used; the caller gives it back when done.

        Raises:
            RuntimeError: the thread could not make one (its error is the cause), or
                none came within ``timeout`` seconds.
        """
        with self._cond:
            self._start()
            self._failure = None
            if not self._cond.wait_for(
                lambda: bool(self._ready) or self._failure is not None, timeout
            ):
                raise RuntimeError(f"no migrated schema came within {timeout:g} s")
            if not self._ready:
                raise RuntimeError(
                    f"could not make a migrated schema on {self.url}: {self._failure}"
                ) from self._failure
            schema = self._ready.popleft()
            self._cond.notify_all()
            return schema

    def give_back(self, schema: str) -> None:
        """Drop ``schema`` (and everything in it) soon, in the thread: one this pool
        handed out, or any other a test made (``fresh_schema`` in tests/conftest.py)."""
        with self._cond:
            self._start()
            self._doomed.append(schema)
            self._cond.notify_all()

    def _start(self) -> None:
        """Start the thread if it is not running (the caller holds ``_cond``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="schema-pool", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Drop the schemas given back and those still ready; stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closing or len(self._ready) < self.ready
                    or bool(self._doomed)
                )
                if self._closing:
                    doomed = [*self._doomed, *self._ready]
                    self._doomed.clear()
                    self._ready.clear()
                    break
                make = len(self._ready) < self.ready
                doomed = [] if make else self._doomed[:_DROP_BATCH]
                del self._doomed[:len(doomed)]
            if make:
                await self._make()
            else:
                await self._drop(doomed)
        for i in range(0, len(doomed), _DROP_BATCH):
            await self._drop(doomed[i:i + _DROP_BATCH])

    async def _make(self) -> None:
        from cantata.store.factory import store_from_url

        schema = f"{self.prefix}{uuid.uuid4().hex[:12]}"
        try:
            store = store_from_url(with_schema(self.url, schema))
            await store.open()
            await store.close()
        except Exception as exc:  # handed to the test that waits (take)
            with self._cond:
                self._doomed.append(schema)
                self._failure = exc
                self._cond.notify_all()
            await asyncio.sleep(1.0)
            return
        with self._cond:
            self._ready.append(schema)
            self._cond.notify_all()

    async def _drop(self, schemas: list[str]) -> None:
        import asyncpg

        names = ", ".join(f'"{s}"' for s in schemas)
        try:
            # A lock held past the test (a process of its still exiting): wait a while,
            # not for ever, so that making schemas goes on meanwhile.
            conn = await asyncpg.connect(self.url, server_settings={"lock_timeout": "5s"})
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {names} CASCADE")
            finally:
                await conn.close()
        except Exception:  # a test's process still holds a lock there: try again later
            with self._cond:
                if not self._closing:
                    self._doomed.extend(schemas)
            await asyncio.sleep(1.0)
