"""``@app.transaction`` steps: the step's SQL, its checkpoint and its events in one
transaction of the store's database (see docs/workflow-api.md)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from cantata.choreography.orphans import report_orphans
from cantata.declare.defs import StepDef
from cantata.errors import LeaseLost, StoreError, TransactionUnsupported
from cantata.model import codec
from cantata.model.records import ENTRY_COMPLETED, Attempt, HistoryEntry, RunWrite
from cantata.store.tx import Tx

from .branches import marked
from .checkpoint import lean_write
from .heartbeat import Beat
from .invoke import invoke_step
from .signals import _StoreFailed

if TYPE_CHECKING:
    from .runner import RunExecution


async def run_transactional(
    x: RunExecution, sdef: StepDef, args: list[Any], key: str, attempt: int, beat: Beat
) -> Any:
    """Run one attempt of a transactional step; on success its completion is committed
    (with the step's writes) before this returns, marked if the workflow's code
    cancelled the step's branch meanwhile (see engine/branches.py).

    Raises:
        TransactionUnsupported: the store cannot share its transaction (``memory://``).
        _StoreFailed: the store failed the transaction, not the step's code: an outage
            (docs/workflow-api.md).
    """
    engine, run = x.engine, x.run
    runner = getattr(engine.store, "run_transaction", None)
    if runner is None:
        raise TransactionUnsupported(
            f"step {sdef.name} of run {run.run_id} is an @app.transaction step, but store "
            f"{engine.store.url} cannot share its transaction: use sqlite:///file.db or "
            "postgresql://... (see docs/workflow-api.md)"
        )

    published: list[Any] = []
    committed: list[HistoryEntry] = []
    failed: list[Exception] = []  # the step's own error
    ended: list[tuple[Tx, Any]] = []  # the transaction, and the step's result

    async def body(tx: Tx) -> tuple[RunWrite, Any]:
        tx.run_id, tx.step, tx.correlation_id = run.run_id, sdef.name, run.correlation_id
        ended[:] = [(tx, None)]
        try:
            value = await invoke_step(sdef, args, run.run_id, key, attempt, beat=beat,
                                      leading=(tx,))
            result = codec.dumps(value, sdef.result_what)
        except Exception as exc:
            failed.append(exc)
            raise
        now = engine.clock.now()
        entry = x.journal.history[key]
        # (marked if the workflow's code cancelled the step's branch meanwhile: a
        # later checkpoint would leave a window for a crash, engine/branches.py)
        entry = dataclasses.replace(
            entry, status=ENTRY_COMPLETED, result=result, ended_at=now, error=None,
            error_type=None, attempts=attempt, detail=marked(x, key, entry.detail),
        )
        # its recorded start (a row the store has keeps its own; one written now, the
        # gate having closed since its start went without it, takes this one)
        begun = x.mine.get((key, attempt))
        done = Attempt(key, attempt, now if begun is None else begun.started_at, ended_at=now)
        published[:] = tx.events
        committed[:] = [entry]
        ended[:] = [(tx, value)]
        write = RunWrite(entries=[entry], attempts=[done], events=list(tx.events))
        lean_write(x, write)
        return write, value

    def settle() -> None:
        """The transaction committed: the step completed, even if a stop of its body
        comes now (execute_fenced takes its result then, engine/steps.py)."""
        x.tx_done[(key, attempt)] = ended[0][1]
        # The run's next checkpoint writes the entry again: never without the mark.
        x.journal.history[key].detail = committed[0].detail
        if published:
            engine.events_appended(published)

    try:
        value = await runner(run.app, run.run_id, run.fence, body)
    except asyncio.CancelledError:
        if ended and ended[0][0].committed:  # stopped during its COMMIT, which went through
            settle()
        raise
    except TransactionUnsupported as exc:
        raise TransactionUnsupported(f"step {sdef.name}: {exc}") from None
    except StoreError as exc:
        if isinstance(exc, LeaseLost) or (exc in failed and not any(t.met(exc) for t, _ in ended)):
            raise  # (the run was taken over; the step's own error: its attempt failed)
        # The transaction's connection failed (before the step's code ran, under its
        # statements, or at the COMMIT), or the store refused its writes (disk full,
        # read-only: met by the step's statements, raised by the step as they gave it,
        # or at the checkpoint or the COMMIT): an outage, not the step's failure,
        # whatever the error the step's code then raised. No attempt is charged; the
        # run goes on from its history once the store answers. That history is right
        # even when the COMMIT's outcome is unknown: the step's completion commits
        # with its writes, so it is replayed if they committed, and run again if not.
        raise _StoreFailed(exc) from exc
    settle()
    if published:
        await report_orphans(engine, published)  # (best-effort: the step committed)
    return value
