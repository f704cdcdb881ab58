"""The store contract: reading one transaction back (``trace_records``).

Every backend applies the one rule of
:meth:`~cantata.store.roles.TraceStore.trace_records`: which records are kept
under ``limit`` and in which order, ties included. The data below is built so
that a backend that truncates before sorting, caps the wrong part or breaks ties
by insertion order returns something else.
"""

from __future__ import annotations

import pytest

from cantata.errors import DeadLetterNotFound
from cantata.model.records import DELIVERY_DONE, Attempt, RunWrite
from cantata.store.base import Settlement, Store
from cantata.store.roles import TRACE_ORDER
from cantata.testing.contract.support import StoreFixtures, entry, ev, new_run
from cantata.testing.contract.tasks import task

T0 = 1_700_000_000.0


class TraceContract(StoreFixtures):
    """``trace_records``: the same records, in the same order, on every backend."""

    async def test_trace_records_apply_one_rule_under_a_limit(self, store: Store) -> None:
        await self.handlers(store, ("z", "order.*"), ("m", "order.*"), ("a", "order.*"))
        # Three runs created at the same instant, inserted out of id order.
        for run_id in ("run-c", "run-a", "run-b"):
            await store.create_run(
                new_run(self.app, run_id=run_id, correlation_id="t", created_at=T0,
                        updated_at=T0)
            )
        await store.commit_run(self.app, "run-a", 0, RunWrite(
            entries=[entry("s#1", 1), entry("s#2", 2), entry("s#3", 3)],
            attempts=[Attempt("b#1", 1, 5.0), Attempt("a#1", 2, 5.0), Attempt("a#1", 1, 5.0)],
            tasks=[task("run-a", "inv.x#1", created_at=T0 + 3),
                   task("run-a", "inv.x#2", created_at=T0 + 2)],
        ))
        await store.commit_run(self.app, "run-b", 0, RunWrite(
            tasks=[task("run-b", "inv.x#1", created_at=T0 + 1)],
        ))
        await store.commit_run(self.app, "run-c", 0, RunWrite(
            tasks=[task("run-c", "inv.x#1", created_at=T0)],  # its run is past the limit
        ))
        first, second, third = (ev("order.placed", correlation_id="t") for _ in range(3))
        await store.append_events(self.app, [first, second, third])
        await store.settle_delivery(self.app, "z", first.id, Settlement("dead", 1, error="E: z"))
        await store.settle_delivery(self.app, "a", second.id, Settlement("dead", 1, error="E"))

        tr = await store.trace_records(self.app, "t", limit=2)

        assert [r.run_id for r in tr.runs] == ["run-a", "run-b"]  # created_at, then run_id
        assert set(tr.entries) == set(tr.attempts) == {"run-a", "run-b"}
        assert [e.key for e in tr.entries["run-a"]] == ["s#1", "s#2"]
        assert tr.entries["run-b"] == [] and tr.attempts["run-b"] == []
        assert [(a.key, a.attempt) for a in tr.attempts["run-a"]] == [("a#1", 1), ("b#1", 1)]
        # The first two tasks over both runs, not the first ones of each run.
        assert [t.task_id for t in tr.tasks] == ["run-b:inv.x#1", "run-a:inv.x#2"]
        assert [e for e, _ in tr.events] == [first, second]
        # Every delivery of the events kept (3 groups x 2 events), none of the third.
        assert {(d.group, d.event.id) for d in tr.deliveries} == {
            (g, e.id) for g in "azm" for e in (first, second)
        }
        key = TRACE_ORDER["deliveries"]
        assert key == ("updated_at", "group", "event_id")
        assert [(d.updated_at, d.group, d.event.id) for d in tr.deliveries] == sorted(
            (d.updated_at, d.group, d.event.id) for d in tr.deliveries
        )
        assert [(d.group, d.event) for d in tr.dead_letters] == sorted(
            [("z", first), ("a", second)],
            key=lambda p: next(x.failed_at for x in tr.dead_letters if x.group == p[0]),
        )
        assert [(d.failed_at, d.id) for d in tr.dead_letters] == sorted(
            (d.failed_at, d.id) for d in tr.dead_letters
        )

    async def test_trace_records_of_a_run_with_ties_in_deliveries(self, store: Store) -> None:
        # One event, groups declared out of name order: all its deliveries share
        # updated_at, so the group name decides.
        await self.handlers(store, ("w", "order.placed"), ("b", "order.placed"),
                            ("k", "order.placed"))
        placed = ev(correlation_id="u")
        await store.append_events(self.app, [placed])
        tr = await store.trace_records(self.app, "u", limit=10)
        assert [d.group for d in tr.deliveries] == ["b", "k", "w"]

    async def test_a_replayed_dead_letter_stays_in_the_trace_and_leaves_the_queue(
        self, store: Store
    ) -> None:
        """A replay takes the letter off the queue, not out of the transaction's
        history: the trace still has each episode that ended in a dead letter (its
        attempts, its error, when it was replayed), after the replay succeeded too."""
        await self.handlers(store, ("g", "order.placed"))
        placed = ev(correlation_id="r")
        await store.append_events(self.app, [placed])
        assert await store.settle_delivery(self.app, "g", placed.id, Settlement(
            "dead", 3, error="RuntimeError: down", dead_letter_id="dl-1"))
        await store.replay_dead_letter(self.app, "dl-1", T0 + 10)
        assert await store.settle_delivery(self.app, "g", placed.id, Settlement(
            "dead", 2, error="RuntimeError: still down", dead_letter_id="dl-2"))
        await store.replay_dead_letter(self.app, "dl-2", T0 + 20)
        assert await store.settle_delivery(self.app, "g", placed.id, Settlement("done", 1))

        tr = await store.trace_records(self.app, "r", limit=10)

        assert tr.dead_letters == []
        assert TRACE_ORDER["replayed_dead_letters"] == ("failed_at", "id")
        assert [
            (d.id, d.group, d.event, d.error, d.attempts, at)
            for d, at in tr.replayed_dead_letters
        ] == [
            ("dl-1", "g", placed, "RuntimeError: down", 3, T0 + 10),
            ("dl-2", "g", placed, "RuntimeError: still down", 2, T0 + 20),
        ]
        [row] = tr.deliveries
        assert (row.status, row.attempts) == (DELIVERY_DONE, 1)
        # Off the queue for good: not listed, not replayed nor discarded a second time.
        assert await store.dead_letters(self.app) == []
        for letter in ("dl-1", "dl-2"):
            with pytest.raises(DeadLetterNotFound):
                await store.replay_dead_letter(self.app, letter, T0 + 30)
            with pytest.raises(DeadLetterNotFound):
                await store.discard_dead_letter(self.app, letter)
