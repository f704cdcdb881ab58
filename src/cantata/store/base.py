"""The persistence seam: the :class:`Store` protocol every backend implements.

A store holds, for any number of apps (namespaces), the runs and their history,
the event log (which doubles as the outbox of external brokers), one delivery row
per (group, event) (the inbox), dead letters, tasks (step calls served by another
service's workers), declarations, worker heartbeats and a hash-chained audit log.
Every method is atomic; :meth:`Store.commit_run`, :meth:`Store.settle_delivery`
and :meth:`Store.finish_task` write all their parts in one transaction, so run
state, emitted events, the flow ledger and the audit log never disagree.

Audit: the store itself appends one :class:`~cantata.model.records.AuditRecord`,
in the transaction of the change, for every run created, every checkpoint that
changes a run's status, completes or fails history entries, creates tasks or
emits events (not for attempt starts), every cancel request, every delivery
settled ``done`` or ``dead``, every dead letter replayed, every group retired and
every task finished ``done`` or ``failed``. Records are chained per app (see
:mod:`cantata.store.audit`).

The methods are specified, one protocol per role, in :mod:`cantata.store.roles`;
``Store`` is their union. :mod:`cantata.testing.contract` is the executable
definition of this protocol; a backend is done when it passes it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cantata.store.roles import (
    CANCEL,
    CLAIMS,
    EVENTS,
    RUNNABLE,
    RUNS,
    SCHEDULES,
    SLOTS,
    TASKS,
    AuditStore,
    ChangeListener,
    ConsoleStore,
    EventStore,
    FlowStore,
    OperateStore,
    OutboxStore,
    ParkingStore,
    RunStore,
    Settlement,
    StoreLifecycle,
    TaskStore,
    TraceRecords,
    TraceStore,
    TransactionalStore,
    WorkerStore,
)

__all__ = [
    "CANCEL",
    "CLAIMS",
    "EVENTS",
    "RUNNABLE",
    "RUNS",
    "SCHEDULES",
    "SLOTS",
    "TASKS",
    "ChangeListener",
    "Settlement",
    "Store",
    "TraceRecords",
    "TransactionalStore",
]


@runtime_checkable
class Store(
    StoreLifecycle,
    WorkerStore,
    RunStore,
    EventStore,
    OutboxStore,
    TaskStore,
    AuditStore,
    TraceStore,
    FlowStore,
    OperateStore,
    ConsoleStore,
    ParkingStore,
    Protocol,
):
    """Durable state of Cantata apps: every role of :mod:`cantata.store.roles`.

    All times are POSIX seconds from the app's clock.
    """
