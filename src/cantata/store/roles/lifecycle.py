"""Opening, closing and watching a store, and the members of each app.

:class:`StoreLifecycle` is what every user of a store needs: open it, close it,
hear its changes (:data:`ChangeListener` on one of the channels below) and know
which store it is. :class:`WorkerStore` records what each process declares and
that its workers are alive (docs/leases.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from cantata.model.records import (
    Declaration,
    WorkerInfo,
)

# Change channels passed to listeners.
RUNS = "runs"
EVENTS = "events"
CANCEL = "cancel"
TASKS = "tasks"
# Deliveries may have become claimable: sent with ``events`` by every commit that stores
# events or makes a delivery pending, except a settlement or a held append whose caller
# said ``wake=False`` (it holds every delivery a consumer of this process would claim),
# and, to the other processes, one that made no delivery claimable at all (PostgreSQL:
# every delivery it made held for its worker; docs/performance.md, round nine).
CLAIMS = "claims"
# A slot of a limited step or handler group was freed, or a waiter for one left the
# line (``release_slot``, ``withdraw_slot_request``): a waiter may be next. Apart from
# ``runs`` so that a slot's waiters are not woken by every run's change.
SLOTS = "slots"
# A schedule was created, replaced, paused, resumed or deleted (not the schedulers' own
# bookkeeping of their ticks): the schedulers look at the schedules again
# (flow/schedules.py).
SCHEDULES = "schedules"
# A run may have become claimable (created with no owner, let go, woken from its park):
# PostgreSQL says it right after ``runs`` for every notice but that of runs that only
# ended (an ended run is nobody's to claim: docs/performance.md, round twenty). The
# claim loops wake at it instead of at every ``runs`` where the store says so
# (``says_runnable``, PostgreSQL's); elsewhere (SQLite) they wake at every ``runs``.
RUNNABLE = "runnable"

ChangeListener = Callable[[str], None]


# While a store hears other processes' writes (``StoreLifecycle.listening``), how long
# a loop that looks for work committed elsewhere waits for a notification before it
# looks anyway (a notification lost to a network cut the listener has not noticed yet,
# work whose time came without a write): seconds, each wait drawn within +-20 %, so a
# fleet of idle workers does not look in step (docs/performance.md, "Idle workers").
SAFETY_NET = 5.0

# A worker's heartbeat reads the schema version the store records once every this many
# heartbeats (a heartbeat goes every lease / 4: once a lease), and after a heartbeat that
# failed: a newer Cantata may have migrated the store under the running worker
# (docs/deploy.md, "Upgrading Cantata"). One cheap read, never on a checkpoint's path.
SCHEMA_CHECK_EVERY = 4


def idle_wait(store: object, poll: float) -> float:
    """How long a loop waits for news of work before it looks on its own: ``poll``
    (its cadence of looking) while ``store`` does not hear other processes' writes,
    else the safety net (never shorter than ``poll``)."""
    if not getattr(store, "listening", False):
        return poll
    return max(poll, SAFETY_NET * random.uniform(0.8, 1.2))


class StoreLifecycle(Protocol):
    """Open, close, listen and say which store it is."""

    url: str
    #: Whether the listeners also hear the writes of other processes (PostgreSQL's
    #: LISTEN/NOTIFY): then a slot's waiters sleep until they hear ``slots``, asking
    #: the store only to keep their place, instead of the next ones in line polling
    #: every ``poll_interval`` (docs/flow-control.md). ``StoreBase``: ``False``.
    hears_others: bool

    @property
    def listening(self) -> bool:
        """Whether the listeners hear other processes' writes right now (PostgreSQL: its
        listening connection is up). While true, the loops that look for work committed
        elsewhere wait for what they hear, and look on their own only every few seconds
        (:func:`idle_wait`); when the listener is lost they go back
        to every ``poll_interval``, and the store calls every listener on every channel
        both when it is lost and when it listens again (docs/performance.md, "Idle
        workers"). ``StoreBase``: ``False``."""

    async def open(self) -> None:
        """Connect and migrate the schema.

        Raises:
            StoreUnavailable: the database cannot be reached or opened.
            StoreCorrupt: it exists but is not a (compatible) Cantata store.
        """

    async def close(self) -> None:
        """Release connections; pending writes are committed first."""

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(channel)`` when runs, events, cancellations, tasks, slots or
        schedules change.

        Backends call it for their own writes and, where the database can say so
        (PostgreSQL LISTEN/NOTIFY), for other processes' writes too. ``runs`` is
        called at least when a run nobody owns is created, when a run ends and when
        its owner lets it go; a backend may leave out the checkpoints in between.
        A store whose ``says_runnable`` is true follows ``runs`` with ``runnable``
        whenever a run may have become claimable (see :data:`RUNNABLE`).
        ``claims`` comes with ``events`` (see :data:`CLAIMS`): the embedded broker's
        consumers look for deliveries to claim when they hear it. A backend may leave
        ``events`` out for a settlement, or an append that held deliveries for its
        worker, that nobody else can need to hear of (PostgreSQL's
        ``cantata_settle_one`` and ``cantata_settle_hop``: no delivery pending, no wait
        declared for its events' types); the process that wrote them learns of its
        events in process.
        ``slots`` is called when a slot is released, when a waiter for one
        withdraws, and when a worker is removed (its slots are free; see
        :data:`SLOTS`); ``schedules`` when a schedule is created,
        replaced, paused, resumed or deleted (see :data:`SCHEDULES`).
        """

    def adopt_timing(self, *, lease: float) -> None:
        """Take the lease of the app that opened it: what the store warns about its own
        connections during an outage (PostgreSQL's listener) it says at most every
        ``max(10 s, lease)``, as the worker's loops do (docs/leases.md), and PostgreSQL
        bounds how long a silent client's session keeps its locks by it. Called before
        :meth:`open` (a store given already open follows it in the connections it makes
        from then on); a backend with nothing to warn about or bound ignores it
        (``StoreBase`` does)."""

    async def identity(self) -> str:
        """This store's id, made once when the store was created (a broker records it
        on what it creates for an app, to tell two stores of one app name apart)."""

    async def location(self) -> tuple[str, ...]:
        """Marks of where this store's data lives, as its database sees it (a file's
        full path and the file itself; a server, database and schema by name and by
        object id). Every instance of one store shares at least one mark with every
        other; a copy made elsewhere (a file copied, a database dumped and restored)
        keeps :meth:`identity` but shares none, which is how a broker tells a copy from
        its original."""


class WorkerStore(Protocol):
    """Declarations of every process of an app, and its workers' heartbeats."""

    async def declare(self, app: str, declarations: Sequence[Declaration]) -> None:
        """Record what an app's process declares (replaces nothing: union by key)."""

    async def declarations(self, app: str) -> list[Declaration]:
        """Everything declared in ``app`` by any process."""

    async def heartbeat(
        self, app: str, worker_id: str, now: float, info: str | None, *, lease: float
    ) -> bool | None:
        """Record that ``worker_id`` is alive at ``now`` and stays so for ``lease``
        seconds: its expiry is ``now + lease``. Other workers take its runs, slots,
        deliveries and tasks only once their ``stale_before`` (their current time) is
        past that expiry, whatever their own lease (see the module docs of
        :mod:`cantata.store.roles`).

        Returns whether the hold this renews was still **held** at the renewal: the
        worker's row was there and its expiry had not passed, by ``now`` nor by the
        store's own clock (the database server's; for a file, the clock of the host
        whose processes share it), judged in the renewal's own write (``True``); or not
        (``False``: no row, as at a worker's first heartbeat or after
        :meth:`remove_worker`, or an expiry passed). A worker paused past 3/4 of its
        lease lets the handler and step bodies it held go on only on ``True``
        (docs/leases.md, "Paused"). ``None``: this store cannot tell (taken as not
        held).

        A backend that records a schema version also reads it, cheaply, every few
        heartbeats (``SCHEMA_CHECK_EVERY`` below) and after a
        heartbeat that failed: a newer Cantata may have migrated the store under this
        running worker (docs/deploy.md, "Upgrading Cantata").

        Raises:
            ConfigurationError: ``lease`` is not a number of seconds > 0.
            StoreUpgraded: the store's schema is newer than this code knows (raised
                once, and that heartbeat is not written; the heartbeats after it are,
                while the worker drains).
        """

    async def remove_worker(self, app: str, worker_id: str) -> None:
        """Forget a worker that stopped cleanly (or whose process its supervisor saw
        end) and release what it owned.

        Its runs, and its pending deliveries and tasks, lose their owner, so other
        workers can claim them at once instead of waiting for the lease to expire; the
        slots it held are free (a holder's worker must be live), and the listeners hear
        ``slots`` with the others, so that waiters ask again now.
        """

    async def workers(self, app: str) -> list[WorkerInfo]:
        """Workers of ``app``, their last heartbeat and lease (so their expiry)."""
