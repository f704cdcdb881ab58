"""``cantata.Tx``: SQL in the store's transaction that also commits a step's checkpoint.

An ``@app.transaction`` step is called with a :class:`Tx` first. Its statements run
in one transaction of the store's database together with the step's checkpoint
(its completed history entry and attempt) and the events it publishes with
``app.publish(..., tx=tx)``: after a crash all of them are there, or none is
(docs/workflow-api.md). Placeholders may be written ``?`` or ``$1`` on both
backends; they are rewritten to the database's own style.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from cantata.errors import StoreError, StoreUnavailable, TransactionClosed
from cantata.model.event import Event
from cantata.model.records import RunWrite

T = TypeVar("T")

# A transaction's body: runs the step with the Tx, returns its checkpoint and result.
TxBody = Callable[["Tx"], Awaitable[tuple[RunWrite, T]]]

# A quoted string, a quoted identifier, or a placeholder (outside both).
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\$(\d+)|\?(\d*)")


def to_numbered(sql: str, style: str) -> str:
    """Rewrite ``?`` / ``$n`` placeholders outside quotes to ``$n`` (``style="$"``,
    PostgreSQL) or ``?n`` (``style="?"``, SQLite)."""
    count = 0

    def sub(m: re.Match[str]) -> str:
        nonlocal count
        text = m.group(0)
        if text[0] in "'\"":
            return text
        number = m.group(1) or m.group(2)
        if not number:
            count += 1
            number = str(count)
        return f"{style}{number}"

    return _TOKENS.sub(sub, sql)


class Tx:
    """The transaction of an ``@app.transaction`` step (the step's first argument).

    Attributes:
        dialect: ``"sqlite"`` or ``"postgresql"``.
        run_id: the run whose step this is.
        step: the step's name.
        faults: the store's errors its statements raised for a fault of the database
            (``StoreFull``, ``StoreReadOnly``, ...), in order.
    """

    dialect = ""

    def __init__(self) -> None:
        self.run_id = ""
        self.step = ""
        self.correlation_id: str | None = None
        self.events: list[Event[Any]] = []
        # The store's faults its statements met (disk full, read-only, ...), raised to
        # the step as Cantata's errors: the store's condition, not the step's failure.
        self.faults: list[StoreError] = []
        self._open = True
        self.committed = False  # set by the store once its COMMIT went through

    def _check(self, call: str) -> None:
        if not self._open:
            raise TransactionClosed(
                f"tx.{call}() after step {self.step} of run {self.run_id} returned: its "
                "transaction is committed; use the tx only inside the step"
            )

    async def execute(self, sql: str, *params: Any) -> int:
        """Run one statement; returns the number of rows it changed (where known).

        Raises:
            StoreFull: the database's disk is full (a store condition, as are the two
                below: the step's attempt is not charged, docs/workflow-api.md).
            StoreReadOnly: the database refuses writes.
            StoreError: another fault of the store (damaged, unreachable).

        A shortage the step's transaction may cause (PostgreSQL out of memory or
        shared memory, a configured limit: SQLSTATE 53200, 53400, 53000) is raised as
        the driver's error: the step's own, as any SQL error of it.
        """
        self._check("execute")
        return await self._faults_named(self._execute(sql, params))

    async def fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run a query; returns its rows as tuples (raises as :meth:`execute`)."""
        self._check("fetch")
        return await self._faults_named(self._fetch(sql, params))

    def met(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a fault of the store that this transaction's statements met
        (raised to the step as it is)."""
        return any(exc is fault for fault in self.faults)

    async def _faults_named(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as exc:
            fault = self._fault(exc)
            if fault is None:
                raise
            self.faults.append(fault)
            if fault is exc:
                raise
            raise fault from exc

    def _fault(self, exc: Exception) -> StoreError | None:
        """The Cantata error for a fault of the store raised by a statement (``None``:
        the statement's own error, raised as it is)."""
        return None

    async def fetchone(self, sql: str, *params: Any) -> tuple[Any, ...] | None:
        """The first row of a query, or ``None``."""
        rows = await self.fetch(sql, *params)
        return rows[0] if rows else None

    def publish(self, event: Event[Any]) -> None:
        """Append ``event`` to the store's log in this transaction (``app.publish(tx=)``)."""
        self._check("publish")
        self.events.append(event)

    def close(self) -> None:
        self._open = False

    async def _execute(self, sql: str, params: Sequence[Any]) -> int:
        raise NotImplementedError

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError


#: Seconds a stopped step waits for its transaction's COMMIT to end before it gives up
#: knowing its outcome (a connection gone silent would hold it for good).
STOP_PATIENCE = 5.0


async def commit_through(
    tx: Tx, commit: Coroutine[Any, Any, None], abandon: Callable[[], None] | None = None,
) -> None:
    """Run ``commit`` (a step's transaction's checkpoint and COMMIT) to its end, and
    set ``tx.committed`` if it went through.

    A cancel of the awaiting task that comes meanwhile (the engine stopping the step's
    body: a fence, the run's deadline, the run let go; a body guard's throw) never
    lands in it, where it would leave the transaction's outcome unknown: it is raised
    once the commit has ended, and the caller tells from ``tx.committed`` whether
    the step completed (engine/transaction.py). The commit's own error, if any, is
    raised instead (it says what became of the transaction). A commit still under way
    :data:`STOP_PATIENCE` seconds after the cancel is abandoned (``abandon()``, which
    must end it, else it is cancelled) and ``StoreUnavailable`` raised: its outcome
    is unknown, and the run's history tells it (an outage, docs/workflow-api.md)."""
    loop = asyncio.get_running_loop()
    ending = asyncio.ensure_future(commit)
    stop: asyncio.CancelledError | None = None
    give_up: float | None = None  # (once stopped)
    abandoned = False
    while not ending.done():
        if give_up is not None and loop.time() >= give_up and not abandoned:
            abandoned = True
            (abandon or ending.cancel)()
        try:  # (a cancel of this wait leaves ``ending`` alone)
            await asyncio.wait([ending], timeout=None if give_up is None or abandoned
                               else max(0.0, give_up - loop.time()))
        except asyncio.CancelledError as exc:
            if stop is None:
                give_up = loop.time() + STOP_PATIENCE
            stop = exc
    if abandoned and (ending.cancelled() or ending.exception() is not None):
        raise StoreUnavailable(
            f"the COMMIT of step {tx.step} of run {tx.run_id} had not ended {STOP_PATIENCE:g} "
            "s after the step was stopped (its connection silent?): whether it committed is "
            "unknown; the run goes on from its history, which tells"
        ) from None
    ending.result()
    tx.committed = True
    if stop is not None:
        raise stop
