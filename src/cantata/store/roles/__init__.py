"""The store protocol, one :class:`~typing.Protocol` per role.

:class:`cantata.Store` (:mod:`cantata.store.base`) is their union. A caller
types its store with the roles it uses, so it says what it depends on: a broker
takes a :class:`~cantata.broker.base.BrokerStore` (lifecycle, workers, events
and the outbox), trace assembly a :class:`TraceStore`. See docs/architecture.md.

========================  ==============================================  ==============
role                      what it holds                                   module
========================  ==============================================  ==============
:class:`StoreLifecycle`   open, close, listeners, the store's identity    ``lifecycle``
:class:`WorkerStore`      declarations and worker heartbeats              ``lifecycle``
:class:`RunStore`         runs, history, attempts, step heartbeats        ``runs``
:class:`EventStore`       the event log, deliveries, dead letters         ``events``
:class:`OutboxStore`      the outbox an external broker relays from       ``events``
:class:`TaskStore`        steps served by another service                 ``tasks``
:class:`AuditStore`       the hash-chained audit log                      ``audit``
:class:`TraceStore`       reading one transaction back, stale work        ``trace``
:class:`FlowStore`        queues, slots, schedules                        ``flow``
:class:`OperateStore`     find, retry and fork runs (docs/operating.md)   ``operate``
:class:`ParkingStore`     runs released while they wait                   ``parking``
:class:`ConsoleStore`     the console's pages and API tokens              ``console``
========================  ==============================================  ==============

:class:`TransactionalStore` (``transaction``) is not part of ``Store``: only
stores that can share their transaction with a service's tables have it.

**Liveness** (docs/leases.md, docs/backends.md). Each worker is judged by its own
lease: :meth:`WorkerStore.heartbeat` records the worker's lease with its heartbeat,
and the worker is live while its expiry (heartbeat + lease) is at or after the time it
is judged at. The methods that take work from dead workers keep their parameter
``stale_before``, which is that time: the caller's current time, not the current time
minus a lease (its meaning before SQLite schema 23 / PostgreSQL schema 30). A
``stale_before`` of ``0`` or ``float("-inf")`` counts every worker with a row as live
(only work nobody holds is taken).
"""

from cantata.store.roles.audit import AuditStore
from cantata.store.roles.console import ConsoleStore
from cantata.store.roles.events import DeliveryHold, EventStore, OutboxStore, Settlement
from cantata.store.roles.flow import FlowStore
from cantata.store.roles.lifecycle import (
    CANCEL,
    CLAIMS,
    EVENTS,
    RUNNABLE,
    RUNS,
    SCHEDULES,
    SLOTS,
    TASKS,
    ChangeListener,
    StoreLifecycle,
    WorkerStore,
)
from cantata.store.roles.operate import OperateStore
from cantata.store.roles.parking import ParkingStore
from cantata.store.roles.runs import RunStore
from cantata.store.roles.tasks import TASK_OUTCOMES, TaskStore
from cantata.store.roles.trace import TRACE_ORDER, TraceRecords, TraceStore
from cantata.store.roles.transaction import TransactionalStore

__all__ = [
    "CANCEL",
    "CLAIMS",
    "EVENTS",
    "RUNNABLE",
    "RUNS",
    "SCHEDULES",
    "SLOTS",
    "TASKS",
    "TASK_OUTCOMES",
    "TRACE_ORDER",
    "AuditStore",
    "ChangeListener",
    "ConsoleStore",
    "DeliveryHold",
    "EventStore",
    "FlowStore",
    "OperateStore",
    "OutboxStore",
    "ParkingStore",
    "RunStore",
    "Settlement",
    "StoreLifecycle",
    "TaskStore",
    "TraceRecords",
    "TraceStore",
    "TransactionalStore",
    "WorkerStore",
]
