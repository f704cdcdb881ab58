"""One SQLite connection driven by one thread, with group commit.

Every operation is a function of the connection. Writes queued while a commit is
in flight are applied together in the next transaction and share one fsync; their
futures resolve only after COMMIT returns, so nobody proceeds past a checkpoint
that is not durable. One failing operation does not undo the others: the batch
runs straight through, and only if one of its operations fails is it rolled back
and run again with each operation inside a SAVEPOINT.

Writes of the store's own event loop (``home``) skip the thread when they can: the
writes made in one turn of the loop are gathered and run as one batch on the
loop's thread at the start of the next turn (one group commit, as the thread's),
with no hand-off to the thread and back (two thread wake-ups per commit) and no GIL
passed between two busy threads. When the thread holds the connection (a read,
such as a worker's pollers make now and then), the batch runs as soon as the thread
lets go of it (the thread tells the loop; half a millisecond later at the latest).
When another connection holds the database's write lock, the thread runs the batch:
the inline ``BEGIN IMMEDIATE`` waits for no one (the connection's busy timeout is 0
unless the thread runs a batch), the thread may wait the full busy timeout. While the
thread has writes of the home loop unanswered, later writes wait on the loop until they
are answered (so writes stay in the order they were made, and the next batch runs
inline again). Reads go to the thread, so that a long query never blocks the loop; a lookup
of a row by its key (:meth:`ConnectionThread.lookup`) runs on the loop's thread when
the connection is free.
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

from cantata.store.sqlite_wal import lengthen_wal

T = TypeVar("T")

Op = Callable[[sqlite3.Connection], Any]
MAX_BATCH = 512  # writes in one transaction (inline or in the thread)


if TYPE_CHECKING:
    from cantata.store.audit import AuditKey


_NONE_KEY = (type(None), sqlite3.PrepareProtocol)


def bind_none_at_once() -> None:
    """Make ``None`` bind as NULL without sqlite3's failing search for an adapter.

    CPython's sqlite3 binds an exact ``int``, ``float``, ``str`` or ``bytearray`` as it
    is; any other parameter, ``None`` too, goes through its adapter lookup, which for
    ``None`` finds no adapter in its registry and then looks for ``__adapt__`` on the
    protocol and ``__conform__`` on ``None``, both missing (~3,200 instructions a
    ``None`` on CPython 3.11: the failed attribute lookups raise and clear an
    AttributeError; a checkpoint binds ~15 of them, its history and attempt rows'
    empty columns). An adapter registered for ``None`` is found by the first step: a
    C function that returns ``None`` for it (``dict.get`` of an empty dict), so
    ``None`` is still bound as NULL (~1,100 instructions). It applies to every
    connection of the process, and changes what none of them stores; an adapter for
    ``None`` registered by someone else is left as it is."""
    if _NONE_KEY not in sqlite3.adapters:
        sqlite3.register_adapter(type(None), _NONE_ADAPTER)


_NO_ITEMS: dict[object, None] = {}
_NONE_ADAPTER = _NO_ITEMS.get  # (an empty dict's: None for any key)


class TxConnection(sqlite3.Connection):
    """A connection with state that lives as long as one write transaction.

    ``audit_heads`` holds the head of each app's audit chain as appended in this
    transaction (``app -> (seq, prev_hash, hash)``): operations read and advance it
    instead of the head's rows, which are written once, just before COMMIT: the head
    row of ``audit`` (keyed ``(app + HEAD_MARK, 0)``) always, and the ``audit_head``
    row too unless the app is in ``lean_apps`` (the store's set, shared: the apps no
    process of an older Cantata can still append to, which read ``audit_head`` alone).

    ``decl_versions`` holds each app's declaration version (``cantata_meta``'s
    ``decl:<app>``) as read in this write transaction: inside ``BEGIN IMMEDIATE`` no
    other connection (or process) can change it, so every append after the first
    skips that read. A declaration written on this connection drops its app's entry.

    ``known_heads`` holds the head of each app's chain as this connection last committed
    it (:meth:`commit_write`), and :meth:`committed_head` hands it to the first append of
    a later write transaction instead of the head's read, while no other connection (or
    process) has committed since: ``PRAGMA data_version``, read once a write transaction,
    changes when one has (docs/performance.md, "Round twenty-seven (saga, SQLite
    statements)"). Inside ``BEGIN IMMEDIATE`` nobody else can commit, so what it says
    holds until COMMIT.

    ``was`` holds the arguments of the last call of the SQL function ``cantata_was``
    (which returns 1): an UPDATE whose WHERE ends in ``AND cantata_was(col, ...)`` on
    one row hands back the values the row had before it (RETURNING gives only the new
    ones), instead of a SELECT of them first. Valid only if the UPDATE changed a row.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bind_none_at_once()
        self.audit_heads: dict[str, tuple[int, str, str]] = {}
        self.decl_versions: dict[str, str] = {}
        self.was: tuple[Any, ...] = ()
        # The heads this connection committed (see the class's docstring), the
        # data_version they are valid at, whether this write transaction read it, and
        # the heads its before_commit wrote (commit_write keeps them once COMMIT returns).
        self.known_heads: dict[str, tuple[int, str, str]] = {}
        self._known_version = -1
        self._version_read = False
        self._committing: dict[str, tuple[int, str, str]] = {}
        # The cursor of the write path's statements that return no rows (BEGIN, a
        # checkpoint's writes, the audit append, COMMIT; and PRAGMA data_version, whose
        # one row fetchone takes, resetting it): Connection.execute makes a cursor for
        # each statement (~1,400 instructions). Such a statement is done (and reset)
        # when execute returns, so the cursor holds nothing between them.
        self.dml = self.cursor()
        self.create_function("cantata_was", -1, self._capture)
        # app -> the key of its audit chain (shared with the store, which sets them)
        self.audit_keys: dict[str, AuditKey] = {}
        # the store's StoreBase.lean_apps (shared: the engine's gate adds and discards)
        self.lean_apps: set[str] = set()
        # the write-ahead log to lengthen at the first write (sqlite_wal.py), if any
        self.wal_to_lengthen: str | None = None

    def _capture(self, *values: Any) -> int:
        self.was = values
        return 1

    def begin_write(self) -> None:
        self.audit_heads = {}
        self.decl_versions = {}
        self._version_read = False
        self.dml.execute("BEGIN IMMEDIATE")
        if self.wal_to_lengthen is not None:  # (once: its first write)
            wal, self.wal_to_lengthen = self.wal_to_lengthen, None
            lengthen_wal(self, wal)

    def committed_head(self, app: str) -> tuple[int, str, str] | None:
        """``app``'s chain head as this connection committed it last, if no other
        connection has committed since (else ``None``: read the head). Only inside a
        write transaction, where no one else can commit until this one does."""
        if not self._version_read:
            if not self.in_transaction:
                return None
            self._version_read = True
            version = self.dml.execute("PRAGMA data_version").fetchone()[0]
            if version != self._known_version:  # another connection committed
                self.known_heads = {}
                self._known_version = version
        return self.known_heads.get(app)

    def before_commit(self) -> None:
        heads = self.audit_heads
        if heads:
            execute, lean, known = self.dml.execute, self.lean_apps, self.known_heads
            for app, (seq, prev_hash, hash_) in heads.items():
                # (seq bound as an integer: the TEXT column stores it as text)
                execute(UPSERT_HEAD_ROW, (app + HEAD_MARK, seq, prev_hash, hash_))
                if app not in lean:  # a process of an older release may read it
                    execute(UPSERT_HEAD, (app, seq, prev_hash, hash_))
                # (known again only once COMMIT has returned: commit_write)
                known.pop(app, None)
            self.audit_heads = {}
        self._committing = heads
        self.decl_versions = {}

    def commit_write(self) -> None:
        """:meth:`before_commit`, ``COMMIT``, and then the heads it wrote known
        (:meth:`committed_head`). A COMMIT that raises leaves them unknown."""
        self.before_commit()
        self.dml.execute("COMMIT")
        if self._committing:
            self.known_heads.update(self._committing)
            self._committing = {}


#: The mark that makes the key of an app's audit head row: ``(app + HEAD_MARK, 0)``,
#: right after the app's records ``(app, 1..n)`` (SQLite schema 32; docs/performance.md,
#: "Round twenty-six (audit head)"). ``data`` holds the head's seq as text.
HEAD_MARK = "\x01"

#: The head row written: a REPLACE (the row deleted and inserted again, on its leaf)
#: costs ~40 % fewer instructions than an upsert (ON CONFLICT DO UPDATE, which also
#: enters the append-only trigger's program); it fires no trigger (no recursive_triggers).
UPSERT_HEAD_ROW = (
    "INSERT OR REPLACE INTO audit (app, seq, time, actor, action, target, data, prev_hash, "
    "hash) VALUES (?, 0, 0, 'cantata', 'audit.head', '', ?, ?, ?)"
)

#: The ``audit_head`` row, which releases before SQLite schema 32 read and move alone.
UPSERT_HEAD = (
    "INSERT INTO audit_head (app, seq, prev_hash, hash) VALUES (?,?,?,?) "
    "ON CONFLICT (app) DO UPDATE SET "
    "seq=excluded.seq, prev_hash=excluded.prev_hash, hash=excluded.hash"
)


@dataclass(slots=True)
class _Item:
    fn: Op
    future: asyncio.Future[Any]
    write: bool
    channels: tuple[str, ...] = ()
    result: Any = None
    error: BaseException | None = None
    counted: bool = False  # a write of the home loop counted in ConnectionThread._handed


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
        home: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._connect = connect
        self._on_commit = on_commit
        self._translate = translate  # storage faults -> Cantata errors (see store.faults)
        self._queue: queue.SimpleQueue[_Item | _Stop] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        self._conn: TxConnection | None = None
        # Inline writes (see the module's docstring); None: every operation in the thread.
        self._home = home
        self._lock = threading.Lock()  # held by whoever runs SQL on the connection
        self._pending: list[_Item] = []  # the home loop's writes of this turn
        self._flush_due = False  # a _flush is scheduled on the home loop
        # The _flush scheduled because the thread held the connection: the thread runs it
        # sooner, once it lets go (_deliver), or it runs _RETRY_S later.
        self._retry: asyncio.TimerHandle | None = None
        self._handed = 0  # home-loop writes handed to the thread and not yet answered
        self._busy_ms = 0  # the connection's busy timeout while the thread runs a batch

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
        if self._pending:  # this turn's inline writes: the thread commits them first
            self._hand_over(self._pending)
            self._pending = []
        stop = _Stop()
        self._queue.put(stop)
        stop.done.wait(timeout=30)
        self._thread.join(timeout=30)  # the file is closed once close() returns

    # ``read`` and ``write`` return the operation's future itself (no coroutine
    # around it: one layer less on every store call). A ``sqlite3.Error`` reaches it
    # already translated (storage faults -> Cantata errors) by the thread.

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` outside any write transaction."""
        return self._submit(fn)

    def lookup(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """:meth:`read` of a few rows by key: run at once on the home loop's thread when
        the connection is free (a lookup by key is shorter than the hand-off to the
        thread and back: two thread wake-ups and the GIL passed twice), else in the
        thread. It sees what :meth:`read` would: what was committed."""
        loop = asyncio.get_running_loop()
        conn = self._conn
        if (loop is not self._home or conn is None
                or not self._lock.acquire(blocking=False)):
            return self._submit(fn)
        fut: asyncio.Future[T] = loop.create_future()
        try:
            if conn.in_transaction:  # (never between the loop's batches: be safe)
                return self._submit(fn)
            fut.set_result(fn(conn))
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _LOCKED:
                fut.set_exception(self._fault(exc))
            else:  # (a WAL being recovered by another process): the thread may wait
                return self._submit(fn)
        except Exception as exc:
            fut.set_exception(self._fault(exc))
        finally:
            self._lock.release()
        return fut

    def write(self, fn: Callable[[sqlite3.Connection], T], *channels: str) -> asyncio.Future[T]:
        """Run ``fn`` in the next group-committed transaction."""
        # (no helper call: every write of every run, docs/performance.md, round
        # twenty-eight (engine CPU))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        item = _Item(fn, fut, True, channels)
        if loop is not self._home:
            self._queue.put(item)
        else:
            self._pending.append(item)
            if not self._flush_due and not self._handed:  # else: once they are answered
                self._flush_due = True
                loop.call_soon(self._flush)
        return fut

    def _fault(self, exc: BaseException) -> BaseException:
        if isinstance(exc, sqlite3.Error):
            return self._translate(exc) or exc
        return exc

    def _submit(self, fn: Op) -> asyncio.Future[Any]:
        """A read handed to the thread (writes: :meth:`write`)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put(_Item(fn, fut, False, ()))  # (reads keep no order with writes:
        return fut                                   # see _run_batch)

    # -- inline writes, on the home loop -------------------------------------

    def _flush(self) -> None:
        """Run this turn's writes on the loop's thread, or hand them to the thread.

        While the thread has writes of this loop unanswered, the new ones wait here
        (behind them, in their order) and :meth:`_resolve` flushes them once the last
        is answered: the thread does not keep every write for itself once it has one."""
        self._flush_due = False
        self._retry = None
        if self._handed or not self._pending:
            return
        conn = self._conn
        if conn is not None and not self._lock.acquire(blocking=False):
            # The thread runs a read (or another loop's batch): a moment, not a wait.
            # It calls _flush_after_thread once it lets go of the connection; this timer
            # is for the case it looked just before the flag was set.
            self._flush_due = True
            self._retry = asyncio.get_running_loop().call_later(_RETRY_S, self._flush)
            return
        # At most MAX_BATCH in one transaction, as the thread's: the rest is the next
        # turn's (the loop is not held for one huge commit; the order is kept).
        batch = self._pending
        if len(batch) <= MAX_BATCH:  # (the usual: no slices made)
            self._pending = []
        else:
            batch, self._pending = batch[:MAX_BATCH], batch[MAX_BATCH:]
        if conn is not None:
            try:
                ran = self._run_inline(conn, batch)
            finally:
                self._lock.release()
            if ran:
                # (nothing was handed to the thread: checked above; a listener that
                # wrote while the batch was answered may have scheduled the flush)
                if self._pending and not self._flush_due:
                    self._flush_due = True
                    asyncio.get_running_loop().call_soon(self._flush)
                return
        self._hand_over(batch)

    def _flush_after_thread(self) -> None:
        """On the home loop: the thread let go of the connection, and a flush waits for
        it (a saga's checkpoint behind a poller's read): run it now, not at its timer."""
        retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()
            self._flush()

    def _hand_over(self, items: list[_Item]) -> None:
        for item in items:
            item.counted = True
            self._queue.put(item)
        self._handed += len(items)

    def _run_inline(self, conn: TxConnection, batch: list[_Item]) -> bool:
        """The batch on this thread; False (nothing done) if another connection holds
        the database's write lock."""
        begun = True
        try:
            conn.begin_write()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) in _LOCKED:
                return False
            begun = False  # _run_writes tries again and gives its error to every write
        channels = self._run_writes(conn, batch, begun=begun)
        for item in batch:  # (_translate_errors, inline)
            if item.error is not None:
                item.error = self._fault(item.error)
        self._resolve(batch, channels)
        return True

    # -- the thread ----------------------------------------------------------

    def _main(self) -> None:
        try:
            self._conn = self._connect()
        except BaseException as exc:
            self._open_error = exc
            self._ready.set()
            return
        conn = self._conn
        if self._home is not None:  # see the module's docstring: inline writes wait for none
            self._busy_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
            conn.execute("PRAGMA busy_timeout = 0")
        self._ready.set()
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
                with self._lock:
                    if self._home is None:
                        channels = self._run_batch(conn, batch)
                    else:
                        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                        try:
                            channels = self._run_batch(conn, batch)
                        finally:
                            conn.execute("PRAGMA busy_timeout = 0")
                # Answered once the connection is free: the loop may write inline at once,
                # and a write of the loop that found the connection taken runs now.
                self._deliver(batch, channels)
                if self._retry is not None and self._home is not None:
                    with contextlib.suppress(RuntimeError):  # (the loop is closed)
                        self._home.call_soon_threadsafe(self._flush_after_thread)
                if stop is not None:
                    stop.done.set()
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: TxConnection, batch: list[_Item]) -> set[str]:
        """Reads, then writes in one transaction; the channels of the writes that
        committed."""
        reads = [i for i in batch if not i.write]
        writes = [i for i in batch if i.write]
        for item in reads:
            try:
                item.result = item.fn(conn)
            except BaseException as exc:
                item.error = exc
        return self._run_writes(conn, writes, begun=False) if writes else set()

    def _run_writes(self, conn: TxConnection, writes: list[_Item], begun: bool) -> set[str]:
        """Every write in one transaction (begun already if ``begun``); the channels of
        those that committed."""
        channels: set[str] = set()
        try:
            if not begun:
                conn.begin_write()
            if not self._run_straight(conn, writes):
                conn.execute("ROLLBACK")
                if len(writes) == 1:  # nothing else to keep: its error is the outcome
                    return channels
                conn.begin_write()
                self._run_isolated(conn, writes)
            conn.commit_write()
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for item in writes:
                item.error = exc
        else:
            for item in writes:
                if item.error is None:
                    channels.update(item.channels)
        return channels

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
        self._translate_errors(batch)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(self._resolve, items, channels)

    def _translate_errors(self, batch: list[_Item]) -> None:
        for item in batch:
            if item.error is not None:
                item.error = self._fault(item.error)

    def _resolve(self, items: list[_Item], channels: set[str]) -> None:
        """On the items' loop: answer them, then tell the store what was committed."""
        for item in items:
            if item.counted:
                self._handed -= 1
                if not self._handed and self._pending and not self._flush_due:
                    self._flush_due = True
                    item.future.get_loop().call_soon(self._flush)
            if item.future.done():
                continue
            if item.error is not None:
                item.future.set_exception(item.error)
            else:
                item.future.set_result(item.result)
        if channels:
            self._on_commit(channels)


# How soon a flush that found the connection in the thread's hands tries again.
_RETRY_S = 0.0005

# SQLITE_BUSY and SQLITE_LOCKED: another connection holds the write lock.
_LOCKED = (5, 6)
