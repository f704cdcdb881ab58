"""The PostgreSQL store, runs: creating, claiming, checkpointing and cancelling them,
their history, attempts and step heartbeats (see :class:`~cantata.store.roles.RunStore`).
Creating, claiming and committing are group-committed (:mod:`cantata.store.postgres_writes`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from cantata.model.records import (
    Attempt,
    HistoryEntry,
    RunRecord,
    RunWrite,
    StepHeartbeat,
)
from cantata.model.status import LIVE_STATUSES, RunStatus
from cantata.store import audit
from cantata.store import postgres_ops as ops
from cantata.store import postgres_writes as writes
from cantata.store.base import (
    CANCEL,
)
from cantata.store.common import FIRST_ATTEMPT_ROWS, with_first_attempts
from cantata.store.postgres_core import PostgresCore
from cantata.store.postgres_ops import (
    ATTEMPT_COLS,
    HISTORY_COLS,
    LIVE_SQL,
    RUN_COLS,
    run_row,
)

# (each by its key, whatever the statistics: postgres_ops.each_by_key)
_RUNS_BY_KEY = ops.each_by_key("runs", "r", "x.app=$1", "run_id", "$2")

# The oldest live run: the smallest created_at of each live status, each the first
# entry of its (app, status) range of the index runs_status_newest (app, status,
# created_at): one list of the three statuses would read every live run's entry.
_OLDEST_LIVE = (
    "SELECT min(m) FROM ("
    + " UNION ALL ".join(
        f"SELECT min(created_at) AS m FROM runs WHERE app=$1 AND status='{status}'"
        for status in sorted(LIVE_STATUSES)
    )
    + ") AS live"
)


#: Seconds a PostgreSQL store keeps its answer to whether an app has a queue with a
#: ``per_worker`` limit (a claim of runs takes such a queue's runs over apart).
PER_WORKER_LOOK_EVERY = 5.0


class PostgresRuns(PostgresCore):
    """The runs role of :class:`~cantata.store.postgres.PostgresStore`."""

    async def create_run(
        self, run: RunRecord, first: RunWrite | None = None, *, actor: str = audit.SYSTEM
    ) -> tuple[RunRecord, bool]:
        if actor == audit.SYSTEM:  # (the one-statement paths record system's creations)
            return await self._w.run_many(writes.create_runs, (run, first))
        return await self._w.run_many(writes.create_runs_by, (run, first, actor))

    async def get_run(self, app: str, run_id: str) -> RunRecord | None:
        row = await self._db.fetchrow(
            f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND run_id=$2", app, run_id
        )
        return None if row is None else run_row(row)

    async def list_runs(
        self,
        app: str,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        rows = await self._db.fetch(
            f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND ($2::text IS NULL OR status=$2) "
            "AND ($3::text IS NULL OR workflow=$3) "
            'ORDER BY created_at DESC, run_id COLLATE "C" DESC LIMIT $4',
            app, None if status is None else str(status), workflow, limit,
        )
        return [run_row(r) for r in rows]

    async def oldest_live_run(self, app: str) -> float | None:
        row = await self._db.fetchrow(_OLDEST_LIVE, app)
        return None if row is None or row[0] is None else float(row[0])

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
        pin_version: str | None = None,
        unchanged: Sequence[float] | None = None,
        keep_versions_of: Sequence[str] = (),
    ) -> list[RunRecord]:
        if not workflows or (run_ids is not None and not run_ids):
            return []
        claimed = await self._w.run(
            lambda c, b: writes.claim_runs(c, b, app, worker_id, workflows, stale_before, limit,
                                           versions, run_ids, now, pin_version, unchanged,
                                           keep_versions_of)
        )
        if len(claimed) < limit and await self._has_per_worker_queues(app):
            # (apart from the batch: it locks queue rows, which a queue claim holds)
            async with self._db.tx() as c:
                claimed += await writes.take_over_in_queues(
                    c, app, worker_id, workflows, stale_before, limit - len(claimed),
                    versions, run_ids, pin_version, unchanged, keep_versions_of,
                )
        return claimed

    async def _has_per_worker_queues(self, app: str) -> bool:
        """Whether ``app`` has a queue with a ``per_worker`` limit, looked up again at
        most every few seconds (queues are declared when an app opens): an app without
        one pays no second round trip per claim of runs."""
        known: dict[str, tuple[float, bool]] = self.__dict__.setdefault("_per_worker_seen", {})
        seen = known.get(app)
        if seen is None or time.monotonic() - seen[0] > PER_WORKER_LOOK_EVERY:
            has = bool(await self._db.fetch(
                "SELECT 1 FROM queues WHERE app=$1 AND per_worker IS NOT NULL LIMIT 1", app
            ))
            seen = known[app] = (time.monotonic(), has)
        return seen[1]

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        await self._w.run_many(writes.commit_runs, (app, run_id, fence, write))

    async def request_cancel(
        self, app: str, run_id: str, *, actor: str = audit.SYSTEM
    ) -> RunRecord | None:
        async with self._db.tx() as c:
            status = await c.execute(
                "UPDATE runs SET cancel_requested=true, updated_at=$3, wake_at=NULL, "
                f"waits_for=NULL, wait_match=NULL WHERE app=$1 "
                f"AND run_id=$2 AND status IN {LIVE_SQL}",
                app, run_id, time.time(),
            )
            row = await c.fetchrow(
                f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND run_id=$2", app, run_id
            )
            if row is None:
                return None
            run = run_row(row)
            await self._db.notify(c, app, CANCEL)
            await ops.audit_append(c, app, audit.cancel_entry(
                run_id, actor, str(run.status), status != "UPDATE 0"
            ), self._audit_keys.get(app))
        return run

    async def owned_runs(self, app: str, worker_id: str) -> dict[str, int]:
        rows = await self._db.fetch(
            f"SELECT run_id, fence FROM runs WHERE app=$1 AND owner=$2 AND status IN {LIVE_SQL}",
            app, worker_id,
        )
        return {r[0]: r[1] for r in rows}

    async def cancelled_runs(self, app: str, run_ids: Sequence[str]) -> list[str]:
        if not run_ids:
            return []
        rows = await self._db.fetch(
            f"SELECT r.run_id FROM {_RUNS_BY_KEY} WHERE r.cancel_requested",
            app, list(dict.fromkeys(run_ids)),
        )
        return [r[0] for r in rows]

    async def load_history(self, app: str, run_id: str) -> list[HistoryEntry]:
        rows = await self._db.fetch(
            f"SELECT {HISTORY_COLS} FROM history WHERE app=$1 AND run_id=$2 ORDER BY seq",
            app, run_id,
        )
        return [HistoryEntry(*r) for r in rows]

    async def load_attempts(self, app: str, run_id: str) -> list[Attempt]:
        async with self._db.conn() as c:
            rows = await c.fetch(
                f"SELECT {ATTEMPT_COLS} FROM attempts WHERE app=$1 AND run_id=$2 "
                "ORDER BY started_at, attempt",
                app, run_id,
            )
            firsts = await c.fetch(
                f"SELECT {HISTORY_COLS} FROM history WHERE app=$1 AND run_id=$2 "
                f"AND {FIRST_ATTEMPT_ROWS}",
                app, run_id,
            )
        return with_first_attempts((HistoryEntry(*r) for r in firsts),
                                   [Attempt(*r) for r in rows])

    async def load_histories(
        self, app: str, run_ids: Sequence[str]
    ) -> dict[str, tuple[list[HistoryEntry], list[Attempt]]]:
        ids = list(dict.fromkeys(run_ids))
        out: dict[str, tuple[list[HistoryEntry], list[Attempt]]] = {r: ([], []) for r in ids}
        if not ids:
            return out
        async with self._db.conn() as c:
            for r in await c.fetch(
                f"SELECT run_id, {HISTORY_COLS} FROM history WHERE app=$1 "
                "AND run_id = ANY($2::text[]) ORDER BY run_id, seq", app, ids,
            ):
                out[r[0]][0].append(HistoryEntry(*r[1:]))
            for r in await c.fetch(
                f"SELECT run_id, {ATTEMPT_COLS} FROM attempts WHERE app=$1 "
                "AND run_id = ANY($2::text[]) ORDER BY run_id, started_at, attempt", app, ids,
            ):
                out[r[0]][1].append(Attempt(*r[1:]))
        for run_id, (entries, attempts) in out.items():
            out[run_id] = (entries, with_first_attempts(entries, attempts))
        return out

    async def excuse_attempts(self, app: str, run_id: str, attempts: Sequence[Attempt]) -> int:
        if not attempts:
            return 0
        args = (app, run_id, [a.key for a in attempts],
                [a.attempt for a in attempts], [a.started_at for a in attempts],
                [a.ended_at for a in attempts], [a.error_type for a in attempts],
                [a.error for a in attempts])
        n = 0
        if any(a.attempt == 1 for a in attempts):  # (a lean writer's may have no row)
            n = int((await self._db.execute(ops.EXCUSE_FIRST_ATTEMPTS, *args)).rsplit(" ", 1)[-1])
        status = await self._db.execute(ops.EXCUSE_ATTEMPTS, *args)
        return n + int(status.rsplit(" ", 1)[-1])

    async def child_runs(self, app: str, parent_run_id: str) -> list[RunRecord]:
        rows = await self._db.fetch(
            f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND parent_run_id=$2 "
            "ORDER BY created_at",
            app, parent_run_id,
        )
        return [run_row(r) for r in rows]

    async def record_step_heartbeat(self, app: str, run_id: str, beat: StepHeartbeat) -> None:
        await self._db.execute(
            "INSERT INTO step_heartbeats (app, run_id, key, attempt, at, details) "
            "VALUES ($1,$2,$3,$4,$5,$6) "
            "ON CONFLICT (app, run_id, key) DO UPDATE SET attempt=excluded.attempt, "
            "at=excluded.at, details=excluded.details "
            "WHERE excluded.attempt >= step_heartbeats.attempt",
            app, run_id, beat.key, beat.attempt, beat.at, beat.details,
        )

    async def last_step_heartbeat(
        self, app: str, run_id: str, key: str
    ) -> StepHeartbeat | None:
        row = await self._db.fetchrow(
            "SELECT key, attempt, at, details FROM step_heartbeats WHERE app=$1 "
            "AND run_id=$2 AND key=$3",
            app, run_id, key,
        )
        return None if row is None else StepHeartbeat(*row)
