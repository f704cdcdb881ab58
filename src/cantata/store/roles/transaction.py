"""A store that can share its transaction with a service's own tables."""

from __future__ import annotations

from typing import Protocol

from cantata.store.tx import T, TxBody


class TransactionalStore(Protocol):
    """A store whose database can also hold a service's own tables (SQLite, PostgreSQL).

    ``@app.transaction`` steps use it; a store without it (``memory://``) cannot
    run them.
    """

    async def run_transaction(self, app: str, run_id: str, fence: int, body: TxBody[T]) -> T:
        """Open a transaction, run ``body(tx)``, then apply the checkpoint it returns
        (as :meth:`Store.commit_run` does, fenced) and COMMIT; returns ``body``'s value.

        Whatever ``body`` did with the tx, and the checkpoint with its events, commit
        together or not at all.

        ``body``'s own exceptions are raised as they are, after the rollback. A fault
        of the database met by a statement of ``body`` (disk full, read-only, damaged)
        is raised to ``body`` as the store's error for it (``StoreFull``,
        ``StoreReadOnly``, ...), never the driver's, and recorded in ``tx.faults``
        (:meth:`~cantata.store.tx.Tx.met`): the engine takes it for the store's
        condition, not the step's failure. A shortage the transaction may have caused
        itself (PostgreSQL out of memory or shared memory, a configured limit), met by
        ``body``'s statements, the checkpoint or the COMMIT, is raised as the driver's
        error, the step's own.

        Raises:
            StoreUnavailable: the store's connection failed (it could not be had, or
                was lost while beginning, under ``body``'s statements, or at the
                checkpoint or the COMMIT, where the outcome is unknown): an outage,
                not the step's failure (docs/workflow-api.md).
            StoreFull, StoreReadOnly: the database refused the checkpoint or the
                COMMIT (or ``body``'s statements, which ``body`` let through).
            LeaseLost: the run's fence is no longer ``fence`` (nothing is committed).
            TransactionUnsupported: this store cannot share its transaction.
        """
