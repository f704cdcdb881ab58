"""Operating runs and groups: finding, retrying and forking runs, discarding dead
letters, listing and retiring handler groups (docs/operating.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from cantata.model.event import Event
from cantata.model.flow import QueueEntry
from cantata.model.records import (
    Attempt,
    DeadLetter,
    GroupRetired,
    GroupStats,
    HistoryEntry,
    RunRecord,
)
from cantata.model.status import RunStatus


class OperateStore(Protocol):
    """What an operator does to runs and dead letters (docs/operating.md)."""

    async def find_runs(
        self,
        app: str,
        *,
        idempotency_key: str | None = None,
        attributes: Mapping[str, str] | None = None,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        version: str | None = None,
    ) -> list[RunRecord]:
        """Runs matching every given filter, newest first; ``attributes`` are
        ``{name: indexed text}`` pairs a run must all hold; ``version``: the runs pinned
        to that version (docs/operating.md, versions)."""

    async def run_attributes(self, app: str, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
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
        queued: bool = False,
    ) -> list[RunRecord]:
        """Runs :meth:`claim_runs` could give ``worker_id`` (with the same ``now`` and
        ``stale_before``, the current time: an owner is gone once its expiry is before
        it) but that are pinned to a version not in ``versions`` (read only: a worker
        checks it can replay them). With ``queued``, instead, the runs waiting in a queue
        that may begin (never begun, unowned, no cancel asked) with recorded history (a
        retry's or a fork's), pinned to a version not in ``versions``, first queued
        first: those ``claim_queued_runs(replay_checked=...)`` leaves waiting until
        checked (``stale_before`` and ``now`` do not matter then)."""

    async def repin_run(
        self,
        app: str,
        run_id: str,
        *,
        from_version: str,
        to_version: str,
        unchanged: float,
        stale_before: float,
        actor: str,
    ) -> RunRecord | None:
        """Pin a live run of ``from_version`` to ``to_version`` (an operator's re-pin,
        for a rollback: docs/operating.md, versions).

        In one transaction, and only while the run is live, pinned to
        ``from_version``, its ``updated_at`` still ``unchanged`` (the run as the caller
        read it, and checked that ``to_version``'s code replays its history), and held
        by nobody (no owner, or one whose expiry is before ``stale_before``, the
        current time): its version becomes ``to_version``, its ``updated_at`` the
        store's time, the audit log records ``run.repinned`` by ``actor`` (with
        ``from_version`` and ``to_version``), and listeners hear ``runs``. Returns the
        run as re-pinned, or ``None``, changing nothing, when one of these does not
        hold (read it again to tell which)."""

    async def retry_run(
        self,
        app: str,
        run_id: str,
        *,
        include_compensated: bool,
        version: str | None,
        actor: str,
        now: float,
        queue: QueueEntry | None = None,
    ) -> RunRecord:
        """Make a failed (or, with ``include_compensated``, compensated) run live again.

        In one transaction: the run's first failed entry (not a compensation) and every
        entry after it, and every compensation entry, move with their attempts to the
        superseded history under the run's next ``epoch``; the run's attributes are
        those its remaining history set; it becomes ``pending``, unowned, with no
        result, error, flag or cancel request, pinned to ``version``, and a deadline
        already passed is dropped. Audited as ``run.retried`` by ``actor``. With
        ``queue``, the run waits in that queue again, as a queued start does (last of
        the runs waiting since ``now``, parked until the queue admits it); its old row
        there, if it began, is kept under ``common.earlier_begin_key``, done, so that
        begin still counts in the queue's rate window until it is pruned.

        Raises:
            RunNotFound: no such run.
            RunInProgress: the run is live.
            RunNotRetryable: it ended in another status.
        """

    async def fork_run(
        self,
        app: str,
        source_run_id: str,
        run: RunRecord,
        *,
        before_key: str,
        actor: str,
        queue: QueueEntry | None = None,
    ) -> RunRecord:
        """Create ``run`` (a new pending run) with the source run's recorded history
        before entry ``before_key``: entries of lower ``seq`` that ended (completed or
        failed), compensations left out, with their attempts. Audited as
        ``run.created`` and ``run.forked``, both by ``actor``, in one transaction. With
        ``queue``, the new run waits in that queue, as one :meth:`create_queued_run`
        made.

        Raises:
            RunNotFound: no such source run.
            RunInProgress: the source run is live.
            StepNotInHistory: ``before_key`` is not an entry of it of a kind in
                :data:`~cantata.model.records.FORKABLE_KINDS` (a step, wait, sleep, emit
                or child run).
        """

    async def superseded_history(self, app: str, run_id: str) -> list[tuple[int, HistoryEntry]]:
        """``(epoch, entry)`` for each entry retries superseded, by epoch then ``seq``."""

    async def superseded_attempts(self, app: str, run_id: str) -> list[tuple[int, Attempt]]:
        """``(epoch, attempt)`` for each attempt of the entries retries superseded, by
        epoch, then as :meth:`load_attempts` orders them (start, then number); a
        superseded step's first attempt read from its superseded entry where no row
        holds it, as ``load_attempts`` reads it."""

    async def discard_dead_letter(
        self, app: str, dead_letter_id: str, *, actor: str = "system"
    ) -> DeadLetter:
        """Remove a dead letter for good (its delivery stays ``dead``).

        Audited as ``dead_letter.discarded`` by ``actor``.

        Raises:
            DeadLetterNotFound: no such dead letter in ``app``.
        """

    async def group_stats(self, app: str, *, now: float) -> list[GroupStats]:
        """Every handler group and trigger declared in ``app``, and every group no longer
        declared that has pending deliveries or dead letters (``kind`` ``None``), by
        name: the patterns it is declared for, its pending deliveries (those held by a
        worker whose expiry is at or after ``now`` counted as in progress), the time
        the oldest one's event was stored, and its dead letters. Read only."""

    async def pending_events(self, app: str, group: str, *, limit: int) -> list[Event[Any]]:
        """The events of ``group``'s pending deliveries (held by a worker or not), the
        first stored first, at most ``limit``. Read only (what a retire would end, for
        the caller to judge: :func:`cantata.observability.groups.retire`)."""

    async def retire_group(
        self, app: str, group: str, *, now: float, actor: str
    ) -> GroupRetired:
        """Retire handler group (or trigger group, ``start:<workflow>``) ``group``.

        In one transaction: its declarations (kinds ``handler`` and ``trigger``) are
        removed, so an event stored after the commit gets no delivery for it (until a
        process declares it again: the declaration wins, and the events stored from
        then on are addressed to it); each of its pending deliveries that no worker
        whose expiry is at or after ``now`` holds is settled ``done``, not handled, its
        ``error`` :func:`~cantata.model.records.retired_error` ``(actor)`` and no
        owner; those a live worker holds stay pending (``held``: that worker handles
        them). Its dead letters stay (``dead_letters`` counts them). Audited as
        ``group.retired`` by ``actor`` when it removed or ended anything; a retire of a
        group with nothing left to retire changes nothing and records nothing.

        Which processes serve the group is not the store's to judge (their heartbeats'
        ``info``): the caller refuses first while one does
        (:func:`cantata.observability.groups.retire`).
        """
