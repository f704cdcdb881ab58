"""One SQLite connection driven by one thread, with group commit.

Every operation is a function of the connection. Writes queued while a commit is
in flight are applied together in the next transaction and share one fsync; their
futures resolve only after COMMIT returns, so nobody proceeds past a checkpoint
that is not durable. One failing operation does not undo the others: the batch
runs straight through, and only if one of its operations fails is it rolled back
and run again with each operation inside a SAVEPOINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")

Op = Callable[[sqlite3.Connection], Any]
MAX_BATCH = 512


if TYPE_CHECKING:
    from cantata.store.audit import AuditKey


class TxConnection(sqlite3.Connection):
    """A connection with state that lives as long as one write transaction.

    ``audit_heads`` holds the head of each app's audit chain as appended in this
    transaction (``app -> (seq, prev_hash, hash)``): operations read and advance it
    instead of the ``audit_head`` row, which is written once, just before COMMIT.

    ``decl_versions`` holds each app's declaration version (``cantata_meta``'s
    ``decl:<app>``) as read in this write transaction: inside ``BEGIN IMMEDIATE`` no
    other connection (or process) can change it, so every append after the first
    skips that read. A declaration written on this connection drops its app's entry.

    ``was`` holds the arguments of the last call of the SQL function ``cantata_was``
    (which returns 1): an UPDATE whose WHERE ends in ``AND cantata_was(col, ...)`` on
    one row hands back the values the row had before it (RETURNING gives only the new
    ones), instead of a SELECT of them first. Valid only if the UPDATE changed a row.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audit_heads: dict[str, tuple[int, str, str]] = {}
        self.decl_versions: dict[str, str] = {}
        self.was: tuple[Any, ...] = ()
        self.create_function("cantata_was", -1, self._capture)
        # app -> the key of its audit chain (shared with the store, which sets them)
        self.audit_keys: dict[str, AuditKey] = {}

    def _capture(self, *values: Any) -> int:
        self.was = values
        return 1

    def begin_write(self) -> None:
        self.audit_heads = {}
        self.decl_versions = {}
        self.execute("BEGIN IMMEDIATE")

    def before_commit(self) -> None:
        if self.audit_heads:
            self.executemany(
                "INSERT INTO audit_head VALUES (?,?,?,?) ON CONFLICT (app) DO UPDATE SET "
                "seq=excluded.seq, prev_hash=excluded.prev_hash, hash=excluded.hash",
                [(app, *head) for app, head in self.audit_heads.items()],
            )
            self.audit_heads = {}
        self.decl_versions = {}


@dataclass(slots=True)
class _Item:
    fn: Op
    future: asyncio.Future[Any]
    write: bool
    channels: tuple[str, ...] = ()
    result: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Stop:
    done: threading.Event = field(default_factory=threading.Event)


class ConnectionThread:
    """Runs operations on one connection in a dedicated thread."""

    def __init__(
        self,
        connect: Callable[[], TxConnection],
        on_commit: Callable[[set[str]], None],
        name: str,
        translate: Callable[[BaseException], BaseException | None] = lambda exc: None,
    ) -> None:
        self._connect = connect
        self._on_commit = on_commit
        self._translate = translate  # storage faults -> Cantata errors (see store.faults)
        self._queue: queue.SimpleQueue[_Item | _Stop] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._conn: TxConnection | None = None

    def start(self) -> None:
        """Open the connection in the thread; re-raise its error here."""
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            raise self._open_error

    def stop(self) -> None:
        """Finish queued work, close the connection and end the thread."""
        if not self._thread.is_alive():
            return
        stop = _Stop()
        self._queue.put(stop)
        stop.done.wait(timeout=30)
        self._thread.join(timeout=30)  # the file is closed once close() returns

    # ``read`` and ``write`` return the operation's future itself (no coroutine
    # around it: one layer less on every store call). A ``sqlite3.Error`` reaches it
    # already translated (storage faults -> Cantata errors) by the thread.

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` outside any write transaction."""
        return self._submit(fn, False, ())

    def write(self, fn: Callable[[sqlite3.Connection], T], *channels: str) -> asyncio.Future[T]:
        """Run ``fn`` in the next group-committed transaction."""
        return self._submit(fn, True, channels)

    def _fault(self, exc: BaseException) -> BaseException:
        if isinstance(exc, sqlite3.Error):
            return self._translate(exc) or exc
        return exc

    def _submit(self, fn: Op, write: bool, channels: tuple[str, ...]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put(_Item(fn, fut, write, channels))
        return fut

    # -- the thread ----------------------------------------------------------

    def _main(self) -> None:
        try:
            self._conn = self._connect()
        except BaseException as exc:
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        conn = self._conn
        try:
            while True:
                first = self._queue.get()
                if isinstance(first, _Stop):
                    first.done.set()
                    return
                batch: list[_Item] = [first]
                stop: _Stop | None = None
                while len(batch) < MAX_BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(nxt, _Stop):
                        stop = nxt
                        break
                    batch.append(nxt)
                self._run_batch(conn, batch)
                if stop is not None:
                    stop.done.set()
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: TxConnection, batch: list[_Item]) -> None:
        reads = [i for i in batch if not i.write]
        writes = [i for i in batch if i.write]
        for item in reads:
            try:
                item.result = item.fn(conn)
            except BaseException as exc:
                item.error = exc
        channels: set[str] = set()
        if writes:
            try:
                conn.begin_write()
                if not self._run_straight(conn, writes):
                    conn.execute("ROLLBACK")
                    if len(writes) == 1:  # nothing else to keep: its error is the outcome
                        self._deliver(batch, set())
                        return
                    conn.begin_write()
                    self._run_isolated(conn, writes)
                conn.before_commit()
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                for item in writes:
                    item.error = exc
            else:
                for item in writes:
                    if item.error is None:
                        channels.update(item.channels)
        self._deliver(batch, channels)

    @staticmethod
    def _run_straight(conn: TxConnection, writes: list[_Item]) -> bool:
        """Run every write in the open transaction; False (with the error of the one that
        failed recorded) as soon as one fails."""
        for item in writes:
            try:
                item.result = item.fn(conn)
            except BaseException as exc:
                item.error = exc
                for other in writes:
                    if other is not item:
                        other.result = other.error = None
                return False
        return True

    @staticmethod
    def _run_isolated(conn: TxConnection, writes: list[_Item]) -> None:
        """Run every write in its own SAVEPOINT, so that one failing undoes only itself."""
        for item in writes:
            conn.execute("SAVEPOINT op")
            saved = dict(conn.audit_heads)
            try:
                item.result = item.fn(conn)
                item.error = None
            except BaseException as exc:
                item.error = exc
                conn.execute("ROLLBACK TO op")
                conn.audit_heads = saved
                conn.decl_versions = {}
            conn.execute("RELEASE op")

    def _deliver(self, batch: list[_Item], channels: set[str]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Item]] = {}
        for item in batch:
            by_loop.setdefault(item.future.get_loop(), []).append(item)
        for item in batch:
            if item.error is not None:
                item.error = self._fault(item.error)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, items, self._on_commit, channels)


def _resolve(
    items: list[_Item], on_commit: Callable[[set[str]], None], channels: set[str]
) -> None:
    for item in items:
        if item.future.done():
            continue
        if item.error is not None:
            item.future.set_exception(item.error)
        else:
            item.future.set_result(item.result)
    if channels:
        on_commit(channels)
