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
settled ``done`` or ``dead``, every dead letter replayed and every task finished
``done`` or ``failed``. Records are chained per app (see :mod:`cantata.store.audit`).

``tests/contract/store_contract.py`` is the executable definition of this
protocol; a backend is done when it passes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from cantata.model.access import RunQuery, TokenRecord
from cantata.model.event import Event
from cantata.model.records import (
    Attempt,
    AuditRecord,
    AuditReport,
    DeadLetter,
    Declaration,
    Delivery,
    HistoryEntry,
    RunRecord,
    RunWrite,
    StepHeartbeat,
    TaskRecord,
    WorkerInfo,
)
from cantata.model.status import RunStatus
from cantata.store.flow import FlowStore
from cantata.store.parking import ParkingStore
from cantata.store.tx import T, TxBody

if TYPE_CHECKING:
    from cantata.store.audit import AuditKey

# Change channels passed to listeners.
RUNS = "runs"
EVENTS = "events"
CANCEL = "cancel"
TASKS = "tasks"

ChangeListener = Callable[[str], None]


@dataclass(slots=True)
class Settlement:
    """The outcome of one handler attempt for (group, event).

    ``done`` marks the delivery handled and appends ``events`` (what the handler
    emitted) in the same transaction; ``retry_at`` schedules another attempt;
    ``dead`` moves it to the dead-letter queue with ``error``.

    ``hold_for`` (a worker id) with ``hold`` ((group, event id) pairs of ``events``):
    those new deliveries are claimed by that worker in the same transaction (their
    first attempt counted), so the worker can handle them at once without a claim of
    its own (the embedded broker's hand-off, docs/performance.md); if it dies they are
    taken over after the lease like any claimed delivery.
    """

    outcome: str  # "done" | "retry" | "dead"
    attempts: int
    events: list[Event[Any]] = field(default_factory=list)
    error: str | None = None
    retry_at: float = 0.0
    dead_letter_id: str | None = None
    hold_for: str | None = None
    hold: list[tuple[str, str]] = field(default_factory=list)
    held: list[tuple[str, str]] = field(default_factory=list)  # set by the store: of
    # ``hold``, the deliveries it did claim (a new one, pending, nobody's, no attempt)


@dataclass(frozen=True, slots=True)
class TraceRecords:
    """Everything the store knows about one correlation id (for ``app.trace``)."""

    runs: list[RunRecord]
    entries: dict[str, list[HistoryEntry]]  # run_id -> history
    attempts: dict[str, list[Attempt]]  # run_id -> attempts
    events: list[tuple[Event[Any], float]]  # (event, stored_at)
    deliveries: list[Delivery]
    dead_letters: list[DeadLetter]
    tasks: list[TaskRecord] = field(default_factory=list)  # remote step calls of the runs


class TransactionalStore(Protocol):
    """A store whose database can also hold a service's own tables (SQLite, PostgreSQL).

    ``@app.transaction`` steps use it; a store without it (``memory://``) cannot
    run them.
    """

    async def run_transaction(
        self, app: str, run_id: str, fence: int, body: TxBody[T]
    ) -> T:
        """Open a transaction, run ``body(tx)``, then apply the checkpoint it returns
        (as :meth:`Store.commit_run` does, fenced) and COMMIT; returns ``body``'s value.

        Whatever ``body`` did with the tx, and the checkpoint with its events, commit
        together or not at all.

        Raises:
            LeaseLost: the run's fence is no longer ``fence`` (nothing is committed).
            TransactionUnsupported: this store cannot share its transaction.
        """


@runtime_checkable
class Store(FlowStore, ParkingStore, Protocol):
    """Durable state of Cantata apps. All times are POSIX seconds from the app's clock."""

    url: str

    async def open(self) -> None:
        """Connect and migrate the schema.

        Raises:
            StoreUnavailable: the database cannot be reached or opened.
            StoreCorrupt: it exists but is not a (compatible) Cantata store.
        """

    async def close(self) -> None:
        """Release connections; pending writes are committed first."""

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener(channel)`` when runs, events, cancellations or tasks change.

        Backends call it for their own writes and, where the database can say so
        (PostgreSQL LISTEN/NOTIFY), for other processes' writes too. ``runs`` is
        called at least when a run nobody owns is created, when a run ends and when
        its owner lets it go; a backend may leave out the checkpoints in between.
        """

    # -- declarations and workers ------------------------------------------------

    async def declare(self, app: str, declarations: Sequence[Declaration]) -> None:
        """Record what an app's process declares (replaces nothing: union by key)."""

    async def declarations(self, app: str) -> list[Declaration]:
        """Everything declared in ``app`` by any process."""

    async def heartbeat(self, app: str, worker_id: str, now: float, info: str | None) -> None:
        """Record that ``worker_id`` is alive at ``now``."""

    async def remove_worker(self, app: str, worker_id: str) -> None:
        """Forget a worker that stopped cleanly and release what it owned.

        Its runs, and its pending deliveries and tasks, lose their owner, so other
        workers can claim them at once instead of waiting for the lease to expire.
        """

    async def workers(self, app: str) -> list[WorkerInfo]:
        """Workers of ``app`` and their last heartbeat."""

    # -- runs -------------------------------------------------------------------

    async def create_run(
        self, run: RunRecord, first: RunWrite | None = None
    ) -> tuple[RunRecord, bool]:
        """Insert ``run`` unless its (app, idempotency_key) exists.

        Returns ``(stored_run, created)``: the existing run and ``False`` when the key
        was used before with the same ``args_hash``. ``first``, the run's first
        checkpoint (by its owner, ``run.owner``), is committed in the same transaction
        when the run is created, and not at all when it is not.

        Raises:
            IdempotencyConflict: the key exists with a different ``args_hash``.
        """

    async def get_run(self, app: str, run_id: str) -> RunRecord | None:
        """One run, or ``None``."""

    async def list_runs(
        self,
        app: str,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """Runs, newest first."""

    async def claim_runs(
        self,
        app: str,
        worker_id: str,
        workflows: Sequence[str],
        *,
        stale_before: float,
        limit: int,
        versions: Sequence[str] | None = None,
        run_ids: Sequence[str] | None = None,
        now: float | None = None,
    ) -> list[RunRecord]:
        """Take ownership of live runs of ``workflows`` that nobody owns.

        A run is claimable when it is live and its owner is ``None`` or a worker
        whose last heartbeat is older than ``stale_before`` (or unknown). Runs
        already owned by ``worker_id`` are never returned. Each claim increments the
        run's ``fence``; writes with an older fence fail with ``LeaseLost``.
        ``versions`` keeps only runs pinned to one of them or to no version;
        ``run_ids`` only those runs (see docs/operating.md, versions). A parked run
        (:mod:`cantata.store.parking`) is claimable only once woken, or, with ``now``,
        once its ``wake_at`` is at or before ``now``; the claim clears its parking.
        """

    async def owned_runs(self, app: str, worker_id: str) -> dict[str, int]:
        """Live runs owned by ``worker_id``: run id -> fence.

        Lets a worker check its hold on its runs (docs/leases.md): a run it owns but
        does not execute (a claim whose answer was lost in an outage) is resumed, and
        an execution whose run it no longer owns (taken over) is stopped.
        """

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        """Apply one checkpoint atomically, if ``fence`` still owns the run.

        Upserts ``write.entries`` (by key) and ``write.attempts`` (by key+attempt),
        appends ``write.events`` (as :meth:`append_events`), creates
        ``write.tasks`` (a ``task_id`` that exists is left alone; a task without a
        correlation id gets the run's), then changes status, result, error and
        flags; ``release`` clears the owner; ``wake`` wakes that run if parked
        (a parent waiting for this run in ``ctx.call``). Writes one audit record when the
        checkpoint is a state change (see the module docstring); listeners hear
        ``runs``, plus ``events`` and ``tasks`` when there were any.

        Raises:
            LeaseLost: the run's fence is no longer ``fence``.
        """

    async def request_cancel(
        self, app: str, run_id: str, *, actor: str = "system"
    ) -> RunRecord | None:
        """Flag a live run for cancellation; returns the run (``None`` if unknown).

        The request is audited (``run.cancel_requested`` by ``actor``) whenever the
        run exists, with ``applied`` false when it had already ended.
        """

    async def cancelled_runs(self, app: str, run_ids: Sequence[str]) -> list[str]:
        """Those of ``run_ids`` that are flagged for cancellation."""

    async def load_history(self, app: str, run_id: str) -> list[HistoryEntry]:
        """A run's history, in ``seq`` order."""

    async def load_attempts(self, app: str, run_id: str) -> list[Attempt]:
        """Every attempt of every step of a run, in start order."""

    async def excuse_attempts(self, app: str, run_id: str, attempts: Sequence[Attempt]) -> int:
        """Record that a live worker was cut off in these attempts of its own (by a pause
        past its lease, the run taken over): each stored attempt with the same key,
        number and ``started_at`` that is still unfinished or marked ``WorkerLost`` takes
        the given ``ended_at``, ``error_type`` and ``error``. Not fenced: the run is
        another worker's by now. Returns how many attempts changed. A later write
        marking an excused attempt ``WorkerLost`` (same start time) leaves it excused;
        a later attempt under its number replaces it as usual (see docs/leases.md).
        Not audited.
        """

    async def child_runs(self, app: str, parent_run_id: str) -> list[RunRecord]:
        """Runs started by ``parent_run_id``."""

    async def record_step_heartbeat(self, app: str, run_id: str, beat: StepHeartbeat) -> None:
        """Keep ``beat`` as the newest heartbeat of step ``beat.key`` of ``run_id``.

        A beat of an older attempt than the one kept is ignored (a slow write of a
        lost attempt must not overwrite its retry's details). Not audited.
        """

    async def last_step_heartbeat(
        self, app: str, run_id: str, key: str
    ) -> StepHeartbeat | None:
        """The newest heartbeat kept for step ``key`` of ``run_id`` (``None`` if none)."""
    # -- operating runs (docs/operating.md) -------------------------------------------

    async def find_runs(
        self,
        app: str,
        *,
        idempotency_key: str | None = None,
        attributes: Mapping[str, str] | None = None,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        """Runs matching every given filter, newest first; ``attributes`` are
        ``{name: indexed text}`` pairs a run must all hold."""

    async def run_attributes(
        self, app: str, run_ids: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        """``run id -> {name: indexed text}`` for those of ``run_ids`` that have any."""

    async def attribute_names(self, app: str) -> list[str]:
        """Every attribute name some run of ``app`` has set, sorted."""

    async def runs_by_prefix(self, app: str, prefix: str, *, limit: int) -> list[RunRecord]:
        """Runs whose id starts with ``prefix``, in id order (at most ``limit``)."""

    async def foreign_runs(
        self,
        app: str,
        worker_id: str,
        workflows: Sequence[str],
        *,
        versions: Sequence[str],
        stale_before: float,
        limit: int,
        now: float | None = None,
    ) -> list[RunRecord]:
        """Runs :meth:`claim_runs` could give ``worker_id`` (with the same ``now``) but
        that are pinned to a version not in ``versions`` (read only: a worker checks
        it can replay them)."""

    async def retry_run(
        self,
        app: str,
        run_id: str,
        *,
        include_compensated: bool,
        version: str | None,
        actor: str,
        now: float,
    ) -> RunRecord:
        """Make a failed (or, with ``include_compensated``, compensated) run live again.

        In one transaction: the run's first failed entry (not a compensation) and every
        entry after it, and every compensation entry, move with their attempts to the
        superseded history under the run's next ``epoch``; the run's attributes are
        those its remaining history set; it becomes ``pending``, unowned, with no
        result, error, flag or cancel request, pinned to ``version``, and a deadline
        already passed is dropped. Audited as ``run.retried`` by ``actor``.

        Raises:
            RunNotFound: no such run.
            RunInProgress: the run is live.
            RunNotRetryable: it ended in another status.
        """

    async def fork_run(
        self, app: str, source_run_id: str, run: RunRecord, *, before_key: str, actor: str
    ) -> RunRecord:
        """Create ``run`` (a new pending run) with the source run's recorded history
        before entry ``before_key``: entries of lower ``seq`` that ended (completed or
        failed), compensations left out, with their attempts. Audited as
        ``run.created`` and ``run.forked`` by ``actor``, in one transaction.

        Raises:
            RunNotFound: no such source run.
            RunInProgress: the source run is live.
            StepNotInHistory: ``before_key`` is not a (non-compensation) entry of it.
        """

    async def superseded_history(
        self, app: str, run_id: str
    ) -> list[tuple[int, HistoryEntry]]:
        """``(epoch, entry)`` for each entry retries superseded, by epoch then ``seq``."""

    async def discard_dead_letter(
        self, app: str, dead_letter_id: str, *, actor: str = "system"
    ) -> DeadLetter:
        """Remove a dead letter for good (its delivery stays ``dead``).

        Audited as ``dead_letter.discarded`` by ``actor``.

        Raises:
            DeadLetterNotFound: no such dead letter in ``app``.
        """

    # -- events and deliveries ----------------------------------------------------

    async def append_events(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        """Append events to the log (idempotent by id) and fan out deliveries.

        For each event, one pending delivery row is created per declared handler
        group whose pattern matches its type. Returns, per event, how many groups
        it was addressed to (0 for an event already stored).
        """

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        """One stored event."""

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int
    ) -> list[Event[Any]]:
        """Events of ``event_type`` stored at or after ``since``, oldest first.

        ``event_type`` may be a pattern with one-token wildcards (``order.*``).
        """

    async def claim_deliveries(
        self,
        app: str,
        worker_id: str,
        groups: Sequence[str],
        *,
        now: float,
        stale_before: float,
        limit: int,
    ) -> list[Delivery]:
        """Take pending deliveries of ``groups`` that are due and not owned by a live worker.

        Each claim counts one attempt (``attempts`` is incremented before it is
        returned), so a handler that kills its worker is not retried forever.
        """

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        """Record the outcome of a handler attempt.

        For ``done`` the delivery is marked handled and ``settlement.events`` are
        appended in the same transaction, only if it was not handled before; returns
        ``False`` (and writes nothing) for a delivery already handled.
        """

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        """The per-group delivery rows of one event."""

    async def delivery_states(
        self, app: str, group: str, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        """``event id -> (status, attempts)`` of ``group``'s deliveries of these events;
        an event not addressed to the group (or not stored) is absent. One read for
        many events: a broker checks a whole fetched batch at once."""

    async def dead_letters(self, app: str, *, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first."""

    async def replay_dead_letter(
        self, app: str, dead_letter_id: str, now: float, *, actor: str = "system"
    ) -> DeadLetter:
        """Remove a dead letter and make its delivery pending again (attempts reset).

        Audited as ``dead_letter.replayed`` by ``actor``.

        Raises:
            DeadLetterNotFound: no such dead letter in ``app``.
        """

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        """Outbox: events not yet handed to an external broker, oldest first."""

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        """Outbox: these events reached the external broker."""

    async def append_external(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        """Store events that came from the broker, as :meth:`append_events` does, marked
        published and external in the same transaction: the outbox relay never sends
        them back and :meth:`redrive_events` leaves them alone."""

    async def redrive_events(
        self, app: str, *, stored_before: float, limit: int
    ) -> list[Event[Any]]:
        """Outbox: hand back to the outbox (unpublished) up to ``limit`` published events
        stored before ``stored_before`` that some group has still pending (the broker
        lost them, or an operator re-drives them); never external events.

        Returns:
            The events the outbox relay will publish again, oldest first.
        """

    async def identity(self) -> str:
        """This store's id, made once when the store was created (a broker records it
        on what it creates for an app, to tell two stores of one app name apart)."""

    # -- tasks (steps served by another service) -----------------------------------

    async def claim_tasks(
        self,
        app: str,
        worker_id: str,
        services: Sequence[str],
        *,
        now: float,
        stale_before: float,
        limit: int,
    ) -> list[TaskRecord]:
        """Take pending tasks of ``services`` that are due and not owned by a live worker.

        Exactly like :meth:`claim_deliveries`: a task is claimable when
        ``next_at <= now`` and its owner is ``None`` or another worker whose last
        heartbeat is older than ``stale_before`` (or unknown). Each claim sets the
        owner and increments ``attempts`` and ``fence``; the updated records are
        returned, due first.
        """

    async def finish_task(
        self,
        app: str,
        task_id: str,
        fence: int,
        *,
        outcome: str,
        attempts: Sequence[Attempt],
        result: str | None = None,
        error: str | None = None,
        error_type: str | None = None,
        next_at: float = 0.0,
    ) -> bool:
        """Record the outcome of a task attempt, if ``fence`` still owns the pending task.

        In one transaction: upserts ``attempts`` under the task's run (as
        :meth:`commit_run` does), then ``outcome`` ``"done"`` stores ``result``;
        ``"failed"`` stores ``error`` and ``error_type`` for good; ``"retry"`` keeps
        the task pending, unowned and due at ``next_at``, with the error recorded.
        ``done`` and ``failed`` are audited. Returns ``False`` and writes nothing
        when the task is unknown, finished, or claimed since with a newer fence.

        Raises:
            ValueError: ``outcome`` is none of ``done``, ``failed``, ``retry``.
        """

    async def get_task(self, app: str, task_id: str) -> TaskRecord | None:
        """One task, or ``None``."""

    async def tasks_of_run(self, app: str, run_id: str) -> list[TaskRecord]:
        """The tasks a run created, oldest first."""

    # -- audit ----------------------------------------------------------------------

    async def audit_records(
        self, app: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[AuditRecord]:
        """Audit records of ``app`` with ``seq > after_seq``, in ``seq`` order."""

    def set_audit_key(self, app: str, key: AuditKey | None) -> None:
        """Key ``app``'s audit chain from now on (HMAC-SHA256; ``None``: plain)."""

    async def audit_head(self, app: str) -> tuple[int, str] | None:
        """``(seq, hash)`` of the last record of ``app``'s chain (``None``: empty)."""

    async def verify_audit(
        self, app: str, *, key: AuditKey | None = None, head: tuple[int, str] | None = None
    ) -> AuditReport:
        """Recompute ``app``'s hash chain, page by page, up to its recorded head.

        Names the first record whose content no longer matches its hash, whose
        link to the previous record is broken, or that is missing (a gap in
        ``seq``, or records gone from the end of the chain). With ``key`` the chain
        must be keyed (after a plain prefix); with ``head`` (an exported head) its
        record must still be there, unchanged. Runs without a ``run.created`` record,
        and such records whose run is gone, are reported too.
        """

    # -- apps and observability ------------------------------------------------------

    async def apps(self) -> list[str]:
        """The names of the apps that have anything in this store, sorted."""

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        """Runs, history, tasks, events, deliveries and dead letters of one transaction."""

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int
    ) -> list[str]:
        """Correlation ids with live work older than a time.

        Live work: live runs, flagged runs, pending or dead deliveries, pending tasks
        (a service whose workers are down leaves its tasks pending).
        """

    # -- the console (docs/console.md) ------------------------------------------------------

    async def query_runs(self, app: str, query: RunQuery) -> list[RunRecord]:
        """One page of runs matching ``query``, newest first: ordered by ``created_at``
        then ``run_id``, both descending, starting after ``query.after``."""

    async def count_runs(self, app: str) -> dict[str, int]:
        """How many runs of ``app`` have each status (statuses with none are absent)."""

    async def record_action(
        self, app: str, actor: str, action: str, target: str, data: dict[str, Any]
    ) -> None:
        """Append an operator action (``actor`` did ``action`` to ``target``) to the audit log."""

    async def audit_head_seq(self, app: str) -> int:
        """The ``seq`` of ``app``'s last audit record (0 for none): where a change feed
        that follows the audit log starts."""

    async def create_token(self, token: TokenRecord) -> None:
        """Store an API token (its hash), replacing a revoked token of the same name.

        Raises:
            TokenExists: an active token has that name.
        """

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        """The token (active or revoked) whose secret hashes to ``token_hash``."""

    async def tokens(self) -> list[TokenRecord]:
        """Every token, active and revoked, by name."""

    async def revoke_token(self, name: str, now: float) -> bool:
        """Revoke the active token ``name``; ``False`` when there is none."""
