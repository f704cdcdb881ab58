"""Group commit for the PostgreSQL store: many write operations, one transaction.

A hot write of :class:`~cantata.store.postgres.PostgresStore` is an *operation*: a
coroutine function of a connection and the :class:`Batch` it runs in, or a share
of a grouped one (checkpoints, event appends, settlements and delivery claims of a
transaction run as one call, their statements pipelined). The
:class:`BatchWriter` runs every operation queued while its transactions are in
flight (two at most, by default) together in the next one, on one pooled
connection, then COMMITs once: one round trip and one WAL flush for all of them
(``synchronous_commit`` stays as the server has it). Each caller's future resolves
only after that COMMIT succeeded; a failed COMMIT fails them all, and a lost
connection fails them with :class:`~cantata.errors.StoreUnavailable`.

One failing operation never undoes or fails the others, without SAVEPOINTs:

- An operation that refuses (``LeaseLost``, ``IdempotencyConflict``) raises
  :class:`Refused` *before its first write*, so the transaction is as it was and
  the others go on in it.
- Any other error (an SQL error aborts the whole transaction): ROLLBACK, that
  operation fails, and the rest run again from the start in a fresh transaction.
  Operations are functions of their arguments and the database, so running one
  again after a rollback is safe. A deadlock or serialization failure fails
  nobody: the whole set runs again (a few times at most).

That saves a round trip per operation, and keeps batches free of
subtransactions (more than 64 in one transaction overflow PostgreSQL's
per-backend cache of subtransaction ids and slow down every snapshot taken on
the server while it runs).

Notifications and audit records are collected in the :class:`Batch` and written
at its end, in the same transaction: the audit records of one app in operation
order, apps in name order (so writers of two processes never lock audit heads in
opposite orders), and every chain head stays locked only from that statement to
the COMMIT. NOTIFY goes in the COMMIT's round trip.

The audit records of every app are one statement, yet one app's records that cannot
be appended fail only the writes they belong to: the transaction is rolled back and
the others run again without them. A record forged past an app's chain head names
the app in the error (:func:`~cantata.store.audit.forged_past_head`): every write with
a record for that app fails with it. Any other refusal (a record PostgreSQL cannot
store) is looked for write by write: the batch runs again with each write on its own
and each write's records appended by a statement of their own (apps still in name
order), and the write whose statement fails is the one that fails, with an error
that names its record (:func:`refused_record`). Before, such a statement failed every
write of the batch, of every app, with the first app's error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg

from cantata.errors import StoreError, StoreUnavailable
from cantata.store import audit
from cantata.store import postgres_ops as ops
from cantata.store.faults import postgres_fault
from cantata.store.postgres_pool import CONN_ERRORS, Conn, PgPool

log = logging.getLogger("cantata.store")

T = TypeVar("T")
A = TypeVar("A")

MAX_BATCH = 256  # operations in one transaction
WRITERS = 2  # transactions in flight at once
MAX_RETRIES = 3  # whole-batch reruns after a deadlock or serialization failure
_RETRY_ERRORS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# Generic plans for the writer's prepared statements: they find their rows by key
# (pipelined over many keys) or through the claim indexes, and planning the CTE
# statements anew each time (the custom plans PostgreSQL may keep choosing for
# them) would cost about as much as running them.
_BEGIN = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan"


class Refused(Exception):
    """An operation declines, having written nothing: its caller gets ``error``.

    Raise it only before the operation's first write (and not after an SQL
    error), so that the transaction it leaves is the one it was given.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Batch:
    """One transaction of the writer, as its operations see it."""

    __slots__ = ("_subs", "audits", "by", "notices", "writing")

    def __init__(self) -> None:
        self.notices: set[tuple[str, str]] = set()
        self.audits: list[tuple[str, audit.Entry]] = []
        # who wrote each of ``audits`` (the writer's operations: several for a grouped
        # call), and who is running now
        self.by: list[Sequence[object]] = []
        self.writing: Sequence[object] = ()
        self._subs: dict[str, list[tuple[str, str]]] = {}

    def notify(self, app: str, *channels: str) -> None:
        """Notify ``'<app>:<channel>'`` on the schema's channel at COMMIT."""
        self.notices.update((app, ch) for ch in channels)

    def audit(self, app: str, entry: audit.Entry | None) -> None:
        """Append ``entry`` to ``app``'s audit chain at the end of this transaction."""
        if entry is not None:
            self.audits.append((app, entry))
            self.by.append(self.writing)

    async def subscriptions(self, c: Conn, app: str) -> list[tuple[str, str]]:
        """(group, pattern) of ``app``'s handlers and triggers, read once per transaction.

        Operations in a transaction were all submitted before it began, so a
        declaration committed before any of them was called is seen.
        """
        subs = self._subs.get(app)
        if subs is None:
            rows = await c.fetch(
                "SELECT name, pattern FROM declarations WHERE app=$1 "
                "AND kind IN ('handler','trigger')",
                app,
            )
            subs = self._subs[app] = [(r[0], r[1]) for r in rows]
        return subs


Op = Callable[[Conn, Batch], Awaitable[T]]
# An operation that runs for many callers at once: one result (or Refused) per argument.
Many = Callable[[Conn, Batch, list[A]], Awaitable[list[T | Refused]]]


class OneStatement(Protocol):
    """A whole batch of grouped operations as one statement, without BEGIN or COMMIT
    (see :mod:`cantata.store.postgres_onetrip`)."""

    def eligible(self, shares: Sequence[tuple[Any, Any]]) -> bool:
        """Whether these ``(many, arg)`` shares can go as one statement."""

    async def write(
        self, c: Conn, shares: Sequence[tuple[Any, Any]], keys: Mapping[str, audit.AuditKey]
    ) -> list[Any]:
        """One result (or :class:`Refused`) per share."""

    def falls_back(self, exc: BaseException) -> bool:
        """Whether ``exc`` from :meth:`write` asks for a transaction instead."""


@dataclass(slots=True)
class _Failed:
    """What undid a transaction: the operations it is the error of (``None``: not
    known yet; the transaction runs again in smaller parts to find them)."""

    items: list[_Item] | None
    error: Exception
    audits: bool = False  # the audit records' statement failed (by whose record?)


@dataclass(slots=True, eq=False)
class _Item:
    op: Op[Any] | None  # one operation...
    many: Many[Any, Any] | None  # ...or its share (``arg``) of a grouped one
    arg: Any
    future: asyncio.Future[Any]
    result: Any = None
    refusal: Exception | None = None
    error: BaseException | None = None


class BatchWriter:
    """Runs write operations of one store in group-committed transactions.

    Up to ``writers`` transactions are in flight at once, each on its own pooled
    connection: an operation that arrives while all are busy waits for the next
    one to finish, and goes with everything else that waited, up to
    ``max_batch``. Several writers are safe because nothing relies on the order
    of operations whose callers did not wait for each other: audit appends are
    serialized by their chain heads' row locks (taken in app order, at the end),
    claims skip rows locked by another writer, and a deadlock runs the batch again.

    :meth:`run_many` operations of one kind in a transaction run as one call (one
    statement for all, say). Everything in a transaction was submitted before it
    began, none of it answered, so any order of execution is one its callers
    could have seen. Should a grouped call fail, the transaction runs again with
    each operation on its own, which names the one that fails.

    Args:
        db: the store's pool.
        writers: most transactions in flight at once.
        max_batch: most operations in one transaction.
        one_statement: writes a batch of some grouped kinds as one statement in a
            transaction of its own (one round trip instead of BEGIN ... COMMIT).
    """

    def __init__(
        self, db: PgPool, *, writers: int = WRITERS, max_batch: int = MAX_BATCH,
        one_statement: OneStatement | None = None,
    ) -> None:
        self._db = db
        self._one = one_statement
        # app -> the key of its audit chain (the store's, set by PostgresStore)
        self.audit_keys: dict[str, audit.AuditKey] = {}
        self.writers = writers
        self.max_batch = max_batch
        self._queue: list[_Item] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = 0  # writer tasks that will still look at the queue
        self._closed = False

    def reopen(self) -> None:
        self._closed = False

    async def run(self, op: Op[T]) -> T:
        """Run ``op`` in the next transaction; its result once that has committed."""
        result: T = await self._submit(op, None, None)
        return result

    async def run_many(self, many: Many[A, T], arg: A) -> T:
        """Run ``many`` for ``arg``, with the other arguments of ``many`` queued with it."""
        result: T = await self._submit(None, many, arg)
        return result

    def _submit(
        self, op: Op[Any] | None, many: Many[Any, Any] | None, arg: Any
    ) -> asyncio.Future[Any]:
        if self._closed or not self._db.is_open:
            raise StoreUnavailable(
                f"store {self._db.masked_url} is not open: use `async with app:` first"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Item(op, many, arg, future))
        if self._draining < self.writers:
            # An idle store's write goes out now: the writer's first step (the batch
            # taken, a connection, the statement sent) runs in the caller's turn, the
            # rest in a task of its own, so the caller's cancel never stops a write. With
            # a transaction in flight, a task that begins a turn later: what is submitted
            # meanwhile goes with it (docs/performance.md, round twenty-nine).
            eager = self._draining == 0
            self._draining += 1
            task = (_started(loop, self._drain()) if eager
                    else loop.create_task(self._drain()))
            if task is not None:
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return future

    async def close(self) -> None:
        """Refuse new operations; commit those queued or in flight."""
        self._closed = True
        while self._tasks:
            await asyncio.gather(*[asyncio.shield(t) for t in self._tasks])

    # -- the writer tasks -------------------------------------------------------------

    async def _drain(self) -> None:
        # A writer stops counting the moment it finds the queue empty (no await in
        # between), not when its task is done: callers it just answered run before
        # that, and what they submit must find a writer.
        try:
            while self._queue:
                items = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                for part in self._split([i for i in items if not i.future.done()]):
                    await self._apply(part)
        finally:
            self._draining -= 1

    def _split(self, items: list[_Item]) -> list[list[_Item]]:
        """The transactions for ``items``: the shares that can go as one statement on
        their own (a claim among checkpoints would send them all the long way), then
        the rest. Callers that did not wait for each other may see either order."""
        if self._one is None:
            return [items]
        shares = [i for i in items if i.many is not None]
        if not shares or len(shares) == len(items):
            return [items]
        if not self._one.eligible([(i.many, i.arg) for i in shares]):
            return [items]
        return [shares, [i for i in items if i.many is None]]

    async def _apply(self, items: list[_Item]) -> None:
        """Commit ``items`` (dropping those that fail), then resolve every future."""
        todo, retries, grouped, apart = items, 0, True, False
        try:
            while todo:
                async with self._db.conn(keep=True) as c:
                    failed = await self._transaction(c, todo, grouped, apart)
                    if failed is None:
                        # Committed: answer the callers before the connection goes back
                        # to the pool (asyncpg releases it in a task of its own, a turn
                        # of the event loop each caller would otherwise wait for).
                        _resolve(items)
                        break
                bad, exc = failed.items, failed.error
                if isinstance(exc, _RETRY_ERRORS) and retries < MAX_RETRIES:
                    retries += 1
                    log.info("store write batch: %s; running it again", exc)
                elif (fault := postgres_fault(exc, self._db.masked_url)) is not None:
                    for i in todo:  # disk full, read-only: every write fails alike
                        i.error = fault
                    todo = []
                elif bad is None and not grouped and (apart or not failed.audits):
                    for i in todo:  # nothing smaller to run (a deadlock again and again)
                        i.error = exc
                    todo = []
                elif bad is None:  # a grouped call or the audit failed: find out whose
                    if failed.audits:
                        apart = True  # each write's records in a statement of their own
                    grouped = False
                else:
                    for i in bad:
                        i.error = exc
                    todo = [i for i in todo if all(i is not b for b in bad)]
        except Exception as exc:  # a lost connection (StoreUnavailable), a failed COMMIT
            for i in todo:
                i.error = exc
        except BaseException:  # cancelled: tell the callers, then stop
            for i in todo:
                i.error = StoreUnavailable(
                    f"the writer of store {self._db.masked_url} was stopped; the operation "
                    "may not have been applied"
                )
            _resolve(items)
            raise
        _resolve(items)

    async def _transaction(
        self, c: Conn, todo: list[_Item], grouped: bool, apart: bool = False
    ) -> _Failed | None:
        """Run ``todo`` in one transaction and COMMIT it.

        Returns ``None`` once committed; after rolling everything back, the
        operations that failed (``None`` when not known: a grouped call, an audit
        statement) and their error. A lost connection or a failed COMMIT raises.
        ``apart``: each operation's audit records in a statement of their own (to
        find the one whose record PostgreSQL refuses).
        """
        if grouped and self._one is not None and all(i.many is not None for i in todo):
            shares = [(i.many, i.arg) for i in todo]
            if self._one.eligible(shares):
                return await self._one_statement(c, todo, shares)
        batch = Batch()
        await c.execute(_BEGIN)
        try:
            for group in _groups(todo, grouped):
                failed = await _run_group(c, batch, group)
                if failed is not None:
                    await c.execute("ROLLBACK")
                    return failed
            if batch.audits:
                failed = await self._audit(c, batch, apart)
                if failed is not None:
                    await c.execute("ROLLBACK")
                    return failed
            await c.execute(_commit_sql(batch.notices, self._db.channel))
        except BaseException:
            if not c.is_closed() and c.is_in_transaction():
                try:
                    await c.execute("ROLLBACK")
                except Exception:
                    log.debug("rollback after a failed write batch failed", exc_info=True)
            raise
        return None

    async def _audit(self, c: Conn, batch: Batch, apart: bool) -> _Failed | None:
        """Append the batch's audit records; if they cannot be, whose they are (the
        transaction is then rolled back, and runs again without those operations)."""
        if apart:
            return await self._audit_apart(c, batch)
        try:
            await ops.write_audit(c, batch.audits, self.audit_keys)
        except CONN_ERRORS:
            raise
        except Exception as exc:
            if not self._refused(exc):
                return _Failed(None, exc)  # (run again, or a fault: all fail alike)
            place = ops.forged_place(exc)
            forged, seq = place if place is not None else (None, None)
            if forged is not None:  # that app's chain is forged: its writes fail
                writers = _writers(batch, lambda i: batch.audits[i][0] == forged)
                return _Failed(writers or None, audit.forged_past_head(forged, seq),
                               audits=not writers)
            writers = _writers(batch, lambda i: True)
            if writers is not None and len(writers) == 1:  # the one operation audited
                return _Failed(writers, _refusal(batch.audits, exc, place))
            return _Failed(None, exc, audits=True)
        return None

    async def _audit_apart(self, c: Conn, batch: Batch) -> _Failed | None:
        """:meth:`_audit` with each operation's records in a statement of their own,
        apps in name order (each app's in operation order): the first statement that
        fails names its operation (each is on its own here: ``by`` is one)."""
        parts: dict[tuple[str, int], list[int]] = {}
        for i, ((app, _), by) in enumerate(zip(batch.audits, batch.by, strict=True)):
            parts.setdefault((app, id(by[0]) if len(by) == 1 else -1 - i), []).append(i)
        for _, where in sorted(parts.items(), key=lambda kv: (kv[0][0], kv[1][0])):
            entries = [batch.audits[i] for i in where]
            try:
                await ops.write_audit(c, entries, self.audit_keys)
            except CONN_ERRORS:
                raise
            except Exception as exc:
                if not self._refused(exc):
                    return _Failed(None, exc)
                by = batch.by[where[0]]
                items = [i for i in by if isinstance(i, _Item)]
                return _Failed(items if len(items) == 1 else None,
                               _refusal(entries, exc, ops.forged_place(exc)), audits=True)
        return None

    def _refused(self, exc: Exception) -> bool:
        """Whether ``exc`` is the database refusing some record (rather than a deadlock
        to run again, or a fault that fails every write alike)."""
        return not isinstance(exc, _RETRY_ERRORS) and (
            postgres_fault(exc, self._db.masked_url) is None)

    async def _one_statement(
        self, c: Conn, todo: list[_Item], shares: list[tuple[Any, Any]]
    ) -> _Failed | None:
        """:meth:`_transaction` as one statement: nothing is written if it fails."""
        assert self._one is not None
        try:
            outs = await self._one.write(c, shares, self.audit_keys)
        except CONN_ERRORS:
            raise
        except Exception as exc:  # like a failed grouped call: run each one in turn
            if not self._one.falls_back(exc):
                log.debug("one-statement write batch failed: %s", exc)
            return _Failed(None, exc)
        for item, out in zip(todo, outs, strict=True):
            item.result, item.refusal = (
                (None, out.error) if isinstance(out, Refused) else (out, None)
            )
        return None


def _groups(todo: list[_Item], grouped: bool) -> list[list[_Item]]:
    """The calls of a transaction: each grouped kind once (where its first item was)."""
    groups: list[list[_Item]] = []
    kinds: dict[Any, list[_Item]] = {}
    for item in todo:
        if item.many is None or not grouped:
            groups.append([item])
        elif (same := kinds.get(item.many)) is not None:
            same.append(item)
        else:
            kinds[item.many] = same = [item]
            groups.append(same)
    return groups


async def _run_group(c: Conn, batch: Batch, group: list[_Item]) -> _Failed | None:
    """Run one call; on an error that undoes the transaction, who failed and why."""
    first = group[0]
    batch.writing = group
    try:
        if first.many is not None:  # refusals come back in ``outs``, never raised
            outs = await first.many(c, batch, [i.arg for i in group])
            for item, out in zip(group, outs, strict=True):
                item.result, item.refusal = (
                    (None, out.error) if isinstance(out, Refused) else (out, None)
                )
        else:
            assert first.op is not None
            marks = len(batch.notices), len(batch.audits)
            first.refusal = None
            try:
                first.result = await first.op(c, batch)
            except Refused as r:
                if (len(batch.notices), len(batch.audits)) != marks:  # it wrote after all
                    return _Failed([first], r.error)
                first.result, first.refusal = None, r.error
    except CONN_ERRORS:
        raise
    except Exception as exc:
        return _Failed([first] if len(group) == 1 else None, exc)
    return None


def _writers(batch: Batch, which: Callable[[int], bool]) -> list[_Item] | None:
    """The operations that wrote the audit records ``which`` picks (by index), if each
    is known (``None`` when one came from a grouped call of several)."""
    found: list[_Item] = []
    for i, by in enumerate(batch.by):
        if not which(i):
            continue
        if len(by) != 1 or not isinstance(by[0], _Item):
            return None
        if all(by[0] is not f for f in found):
            found.append(by[0])
    return found


def _started(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """``coro`` begun at once: its first step runs here, up to its first wait, and the
    rest in a task of its own (``None`` if it ended in that step). The first step must
    not depend on the task it runs in: it runs in the caller's (the writer's does not:
    no ``asyncio.timeout``, no ``current_task``; a new connection is made in a task of
    its own, ``postgres_pool.connect_apart``)."""
    try:
        waits_on = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_Resumed(coro, waits_on).run())


class _Resumed:
    """Awaits what a begun coroutine's first step waits on, then drives the coroutine
    on, passing a cancel of the task it runs in into it as a task would."""

    __slots__ = ("_coro", "_waits_on")

    def __init__(self, coro: Coroutine[Any, Any, None], waits_on: Any) -> None:
        self._coro, self._waits_on = coro, waits_on

    async def run(self) -> None:
        await self

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waits_on = self._coro, self._waits_on
        self._waits_on = None
        while True:
            try:
                value = yield waits_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancel of the task: into the coroutine
                try:
                    waits_on = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waits_on = coro.send(value)
            except StopIteration:
                return


def _resolve(items: list[_Item]) -> None:
    for item in items:
        if item.future.done():  # the caller was cancelled: the write stands (or not)
            continue
        if item.error is not None:
            item.future.set_exception(item.error)
        elif item.refusal is not None:
            item.future.set_exception(item.refusal)
        else:
            item.future.set_result(item.result)


def _literal(text: str) -> str:
    """``text`` as an SQL string literal (an ``E''`` string: the same whatever
    ``standard_conforming_strings`` says)."""
    if "\x00" in text:
        raise ValueError("PostgreSQL text cannot hold NUL characters")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _commit_sql(notices: set[tuple[str, str]], channel: str) -> str:
    """COMMIT, preceded in the same round trip by the batch's notifications on
    ``channel`` (the schema's, ``PgPool.channel``: a literal, as this text is planned
    anew each time and a call of cantata_channel() would be inlined each time)."""
    if not notices:
        return "COMMIT"
    calls = ", ".join(
        f"pg_notify({_literal(channel)}, {_literal(f'{app}:{ch}')})"
        for app, ch in sorted(notices)
    )
    return f"SELECT {calls}; COMMIT"


def _refusal(
    entries: Sequence[tuple[str, audit.Entry]], exc: Exception,
    place: tuple[str | None, int | None] | None,
) -> StoreError:
    """The error of the write whose audit records are ``entries``, refused with
    ``exc`` (``place``: where :func:`ops.forged_place` says a record lies past the
    chain head)."""
    app = entries[0][0]
    if place is not None:
        return audit.forged_past_head(place[0] or app, place[1])
    return refused_record(entries, exc)


def refused_record(entries: Sequence[tuple[str, audit.Entry]], exc: Exception) -> StoreError:
    """The error of a write whose audit records (``entries``, of its app) PostgreSQL
    refused with ``exc``: it names the record, what was wrong and what to do."""
    holding = [(app, e) for app, e in entries if any("\x00" in t for t in e[:3])]
    app, (actor, action, target, _) = (holding or list(entries))[0]
    nul = bool(holding) or "0x00" in str(exc)
    what = (
        "a text of its record (actor, action, target or data) holds a NUL character, "
        "which PostgreSQL text cannot hold: write it again without one"
        if nul else "correct the value the database names, then write again"
    )
    return StoreError(
        f"PostgreSQL refused the audit record of a write to app {app!r} ({action!r} by "
        f"{actor!r} on {target!r}: {type(exc).__name__}: {exc}), so nothing of that write "
        f"was stored (the other writes committed with it were not affected); {what}"
    )
