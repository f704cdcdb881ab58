"""A step's first attempt read from its history entry where no ``attempts`` row holds it.

A step whose only attempt is in progress or succeeded says in its history entry
everything its ``attempts`` row would (its start, its end, no error): every reader
of attempts (``load_attempts``: a run's steps and a resumed run's engine;
``load_histories``: a claim's runs; ``trace_records``; ``superseded_attempts``: the
attempts a retry superseded; a fork's copy) gives the same answer whether that row
was written or not (``cantata.store.common.with_first_attempts``). Each scenario is
written twice, as the engine writes it, once with every row and once without the
rows of such first attempts, and every reader must not tell the two apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cantata.model import codec
from cantata.model.records import (
    ENTRY_COMPLETED,
    ENTRY_FAILED,
    ENTRY_RUNNING,
    Attempt,
    HistoryEntry,
    RunWrite,
)
from cantata.model.status import RunStatus
from cantata.store.base import Store
from cantata.testing.contract.support import StoreFixtures, entry, new_run


@dataclass
class Write:
    """One checkpoint of a scenario: its entries, and its attempts (``rowless``: those
    a step's history entry holds alone)."""

    entries: list[HistoryEntry]
    attempts: list[Attempt] = field(default_factory=list)
    rowless: list[Attempt] = field(default_factory=list)
    status: RunStatus | None = None


def first_try(key: str, seq: int, t: float) -> list[Write]:
    """A step that succeeds at its first attempt: begun, then ended."""
    return [
        Write([entry(key, seq, ENTRY_RUNNING, attempts=1, started_at=t)],
              rowless=[Attempt(key, 1, t)]),
        Write([entry(key, seq, ENTRY_COMPLETED, attempts=1, started_at=t, ended_at=t + 1,
                     result="1")],
              rowless=[Attempt(key, 1, t, t + 1)]),
    ]


def retried(key: str, seq: int, t: float, *, succeeds: bool) -> list[Write]:
    """A step whose first attempt fails; its second succeeds, or fails for good."""
    one = Attempt(key, 1, t, t + 1, "ValueError", "no")
    begun = entry(key, seq, ENTRY_RUNNING, attempts=1, started_at=t)
    waits = entry(key, seq, ENTRY_RUNNING, attempts=1, started_at=t, error="ValueError: no",
                  error_type="ValueError", wake_at=t + 2)
    second = entry(key, seq, ENTRY_RUNNING, attempts=2, started_at=t)
    if succeeds:
        two = Attempt(key, 2, t + 2, t + 3)
        last = entry(key, seq, ENTRY_COMPLETED, attempts=2, started_at=t, ended_at=t + 3,
                     result="2")
    else:
        two = Attempt(key, 2, t + 2, t + 3, "ValueError", "no")
        last = entry(key, seq, ENTRY_FAILED, attempts=2, started_at=t, ended_at=t + 3.5,
                     error="ValueError: no", error_type="ValueError")
    return [
        Write([begun], rowless=[Attempt(key, 1, t)]),
        Write([waits], attempts=[one]),  # failed, another to follow: written with its end
        Write([second], attempts=[Attempt(key, 2, t + 2)]),
        Write([last], attempts=[two]),
    ]


def failed_once(key: str, seq: int, t: float) -> list[Write]:
    """A step with one attempt that fails for good (its end differs from the entry's)."""
    return [
        Write([entry(key, seq, ENTRY_RUNNING, attempts=1, started_at=t)],
              rowless=[Attempt(key, 1, t)]),
        Write([entry(key, seq, ENTRY_FAILED, attempts=1, started_at=t, ended_at=t + 1.5,
                     error="KeyError: k", error_type="KeyError")],
              attempts=[Attempt(key, 1, t, t + 1, "KeyError", "k")]),
    ]


def crashed(key: str, seq: int, t: float, *, taken_over: bool) -> list[Write]:
    """A step whose first attempt was cut short by its worker's crash; taken over, the
    new owner closes it ``WorkerLost`` (counted) and begins the second."""
    writes = [Write([entry(key, seq, ENTRY_RUNNING, attempts=1, started_at=t)],
                    rowless=[Attempt(key, 1, t)])]
    if taken_over:
        writes.append(Write(
            [entry(key, seq, ENTRY_RUNNING, attempts=2, started_at=t)],
            attempts=[Attempt(key, 1, t, t + 5, "WorkerLost", "its worker was lost"),
                      Attempt(key, 2, t + 6)],
        ))
    return writes


class FirstAttemptsContract(StoreFixtures):
    """Every reader of attempts gives the same answer with and without the rows of first
    attempts a history entry holds alone."""

    async def _twins(
        self, store: Store, writes: list[Write], *, end: RunStatus | None = None,
    ) -> tuple[str, str]:
        """The run written with every row, and its twin without the rowless ones (the
        same times, its own correlation id); both ended with ``end`` if given."""
        ids = []
        for rows in (True, False):
            run, _ = await store.create_run(new_run(self.app, correlation_id=codec.new_id()))
            for w in writes:
                await store.commit_run(self.app, run.run_id, 0, RunWrite(
                    entries=list(w.entries),
                    attempts=[*w.attempts, *(w.rowless if rows else ())],
                ))
            if end is not None:
                await store.commit_run(self.app, run.run_id, 0, RunWrite(
                    status=end, error="StepFailed: boom" if end == RunStatus.FAILED else None,
                    release=True,
                ))
            ids.append(run.run_id)
        return ids[0], ids[1]

    async def _readers(self, store: Store, run_id: str) -> dict[str, Any]:
        """What every reader of attempts says of ``run_id``."""
        run = await store.get_run(self.app, run_id)
        assert run is not None
        trace = await store.trace_records(self.app, run.correlation_id or "", limit=100)
        return {
            "load_attempts": await store.load_attempts(self.app, run_id),
            "load_histories": (await store.load_histories(self.app, [run_id]))[run_id][1],
            "trace": trace.attempts[run_id],
            "superseded": await store.superseded_attempts(self.app, run_id),
        }

    async def _same(self, store: Store, writes: list[Write], expected: list[Attempt],
                    *, end: RunStatus | None = None) -> tuple[str, str]:
        full, rowless = await self._twins(store, writes, end=end)
        with_rows = await self._readers(store, full)
        assert with_rows["load_attempts"] == expected
        assert await self._readers(store, rowless) == with_rows
        return full, rowless

    async def test_a_first_try_success_reads_the_same_without_its_row(
        self, store: Store
    ) -> None:
        t = time.time()
        writes = [*first_try("a#1", 1, t), *first_try("b#1", 2, t + 2)]
        await self._same(store, writes, [Attempt("a#1", 1, t, t + 1),
                                         Attempt("b#1", 1, t + 2, t + 3)],
                         end=RunStatus.COMPLETED)

    async def test_an_attempt_in_progress_reads_the_same_without_its_row(
        self, store: Store
    ) -> None:
        t = time.time()
        await self._same(store, [*first_try("a#1", 1, t), *crashed("b#1", 2, t + 2,
                                                                 taken_over=False)],
                         [Attempt("a#1", 1, t, t + 1), Attempt("b#1", 1, t + 2)])

    async def test_a_retry_then_success_reads_the_same(self, store: Store) -> None:
        t = time.time()
        await self._same(
            store, [*first_try("a#1", 1, t), *retried("b#1", 2, t + 2, succeeds=True)],
            [Attempt("a#1", 1, t, t + 1), Attempt("b#1", 1, t + 2, t + 3, "ValueError", "no"),
             Attempt("b#1", 2, t + 4, t + 5)],
            end=RunStatus.COMPLETED,
        )

    async def test_a_failure_exhausting_retries_reads_the_same(self, store: Store) -> None:
        t = time.time()
        await self._same(
            store, [*first_try("a#1", 1, t), *retried("b#1", 2, t + 2, succeeds=False),
                    *failed_once("c#1", 3, t + 6)],
            [Attempt("a#1", 1, t, t + 1), Attempt("b#1", 1, t + 2, t + 3, "ValueError", "no"),
             Attempt("b#1", 2, t + 4, t + 5, "ValueError", "no"),
             Attempt("c#1", 1, t + 6, t + 7, "KeyError", "k")],
            end=RunStatus.FAILED,
        )

    async def test_a_crash_mid_attempt_then_takeover_reads_the_same(
        self, store: Store
    ) -> None:
        t = time.time()
        await self._same(
            store, [*first_try("a#1", 1, t), *crashed("b#1", 2, t + 2, taken_over=True)],
            [Attempt("a#1", 1, t, t + 1),
             Attempt("b#1", 1, t + 2, t + 7, "WorkerLost", "its worker was lost"),
             Attempt("b#1", 2, t + 8)],
        )

    async def test_a_retried_and_a_forked_run_read_the_same(self, store: Store) -> None:
        """A retry supersedes the failed step and what followed (their first attempts
        read from ``history_superseded``); a fork copies the steps before the one
        named (theirs read from the new run's copy of their entries)."""
        t = time.time()
        writes = [*first_try("a#1", 1, t), *failed_once("b#1", 2, t + 2),
                  *first_try("c#1", 3, t + 4)]
        full, rowless = await self._same(
            store, writes,
            [Attempt("a#1", 1, t, t + 1), Attempt("b#1", 1, t + 2, t + 3, "KeyError", "k"),
             Attempt("c#1", 1, t + 4, t + 5)],
            end=RunStatus.FAILED,
        )
        forks = []
        for source in (full, rowless):
            new = new_run(self.app, run_id=codec.new_id(), correlation_id=codec.new_id())
            await store.fork_run(self.app, source, new, before_key="b#1", actor="ops")
            forks.append(await self._readers(store, new.run_id))
        assert forks[0]["load_attempts"] == [Attempt("a#1", 1, t, t + 1)]
        assert forks[1] == forks[0]
        for source in (full, rowless):
            await store.retry_run(self.app, source, include_compensated=False, version=None,
                                  actor="ops", now=time.time())
        retried_full = await self._readers(store, full)
        assert retried_full["load_attempts"] == [Attempt("a#1", 1, t, t + 1)]
        assert retried_full["superseded"] == [
            (1, Attempt("b#1", 1, t + 2, t + 3, "KeyError", "k")),
            (1, Attempt("c#1", 1, t + 4, t + 5)),
        ]
        assert await self._readers(store, rowless) == retried_full

    async def test_an_excuse_of_a_first_attempt_without_its_row_writes_it(
        self, store: Store
    ) -> None:
        """A paused worker's excuse of its first attempt (``excuse_attempts``) marks the
        attempt ``Paused`` whether or not its row was written: a lean writer's
        (engine/gate.py) has none, and the excuse makes it from the step's entry. The new
        owner's ``WorkerLost`` written after it leaves it excused, as with a row; an
        excuse naming another start (an earlier epoch's attempt) changes nothing."""
        t = time.time()
        lost = Attempt("b#1", 1, t + 2, t + 7, "WorkerLost", "its worker was lost")
        paused = Attempt("b#1", 1, t + 2, t + 4, "Paused", "its worker was paused")
        full, rowless = await self._twins(
            store, [*first_try("a#1", 1, t), *crashed("b#1", 2, t + 2, taken_over=False)])
        for run_id in (full, rowless):
            stale = Attempt("b#1", 1, t + 1, t + 4, "Paused", "an earlier attempt")
            assert await store.excuse_attempts(self.app, run_id, [stale]) == 0
            assert await store.excuse_attempts(self.app, run_id, [paused]) == 1
            await store.commit_run(self.app, run_id, 0, RunWrite(
                entries=[entry("b#1", 2, ENTRY_RUNNING, attempts=2, started_at=t + 2)],
                attempts=[lost, Attempt("b#1", 2, t + 8)],
            ))
        with_rows = await self._readers(store, full)
        assert with_rows["load_attempts"] == [
            Attempt("a#1", 1, t, t + 1), paused, Attempt("b#1", 2, t + 8)]
        assert await self._readers(store, rowless) == with_rows
