"""The PostgreSQL store, operating runs: lookups, retry, fork, superseded history and
discarded dead letters (docs/operating.md). Rare operations: plain transactions on a
pooled connection, outside the group-committed hot path."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from cantata.errors import DeadLetterNotFound, StoreUnavailable
from cantata.model.event import Event
from cantata.model.flow import QueueEntry
from cantata.model.parking import FOREVER
from cantata.model.records import (
    ATTRS,
    Attempt,
    DeadLetter,
    GroupRetired,
    GroupStats,
    HistoryEntry,
    RunRecord,
    retired_error,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store import operate as rules
from cantata.store.base import RUNS
from cantata.store.common import (
    FIRST_ATTEMPT_ROWS,
    earlier_begin_key,
    superseded_with_first_attempts,
)
from cantata.store.postgres_core import PostgresCore
from cantata.store.postgres_flow import HAS_HISTORY, PENDING
from cantata.store.postgres_ops import (
    ATTEMPT_COLS,
    EVENT_COLS,
    HISTORY_COLS,
    LIVE_SQL,
    RUN_COLS,
    audit_append,
    dead_letter_row,
    event_row,
    run_row,
    run_values,
    unindexed,
)
from cantata.store.postgres_pool import Conn, PgPool

# A retire locks the declarations against every reader (the fan-out of each append
# reads them in its transaction): how long one try waits for the lock (milliseconds),
# and for how long it tries (seconds) before it gives up.
_RETIRE_LOCK_WAIT_MS = 500
_RETIRE_PATIENCE = 10.0

_RUN_MARKS = ', '.join(f'${i}' for i in range(1, 23))
_R_RUN_COLS = ", ".join("r." + col.strip() for col in RUN_COLS.split(","))


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


async def foreign_runs(
    c: Conn, app: str, worker_id: str, workflows: Sequence[str], versions: Sequence[str],
    stale_before: float, limit: int, now: float | None = None,
) -> list[RunRecord]:
    # Runs that are not parked, and (with ``now``) parked runs that are due: each by
    # its index, never a scan of the parked runs (store/roles/parking.py); the due
    # ones by runs_parked alone, whatever the statistics (postgres_ops.unindexed).
    rows = await c.fetch(
        f"SELECT * FROM (SELECT {_R_RUN_COLS} FROM runs r WHERE r.app=$1 "
        f"AND r.status IN {LIVE_SQL} AND r.wake_at IS NULL "
        "AND r.workflow = ANY($2::text[]) AND r.version IS NOT NULL "
        "AND NOT (r.version = ANY($3::text[])) "
        "AND (r.owner IS NULL OR (r.owner<>$4 AND NOT EXISTS (SELECT 1 FROM workers w "
        " WHERE w.app=r.app AND w.worker_id=r.owner AND w.expires_at >= $5))) "
        f"UNION ALL SELECT {_R_RUN_COLS} FROM runs r WHERE $7::float8 IS NOT NULL "
        "AND r.app=$1 AND r.wake_at IS NOT NULL AND r.wake_at <= $7::float8 "
        f"AND {unindexed(f'r.status IN {LIVE_SQL}')} AND r.owner IS NULL "
        f"AND {unindexed('r.workflow = ANY($2::text[])')} AND r.version IS NOT NULL "
        "AND NOT (r.version = ANY($3::text[]))) f "
        "ORDER BY f.created_at LIMIT $6",
        app, list(workflows), list(versions), worker_id, stale_before, limit, now,
    )
    return [run_row(r) for r in rows]


async def queued_foreign_runs(
    c: Conn, app: str, workflows: Sequence[str], versions: Sequence[str], limit: int
) -> list[RunRecord]:
    """Runs waiting in a queue that may begin, with history, pinned to a version not in
    ``versions`` (``Store.foreign_runs(queued=True)``), first queued first.

    Each queued run's run by its key whatever the statistics: planned without them,
    the status's equality made ``runs_status_newest`` look like one row, and each queued
    run was joined to every pending run of the app through it (docs/performance.md,
    "Queued runs and deliveries, planned without statistics")."""
    rows = await c.fetch(
        f"SELECT {_R_RUN_COLS} FROM queue_runs q JOIN runs r ON r.app=q.app "
        "AND r.run_id=q.run_id WHERE q.app=$1 AND q.began_at IS NULL "
        f"AND q.workflow = ANY($2::text[]) AND {PENDING} "
        "AND NOT r.cancel_requested AND r.owner IS NULL AND r.version IS NOT NULL "
        f"AND NOT (r.version = ANY($3::text[])) AND {HAS_HISTORY} "
        'ORDER BY q.seq, q.run_id COLLATE "C" LIMIT $4',
        app, list(workflows), list(versions), limit,
    )
    return [run_row(r) for r in rows]


async def _history_rows(c: Conn, app: str, run_id: str) -> list[rules.Row]:
    rows = await c.fetch(
        "SELECT key, seq, kind, status FROM history WHERE app=$1 AND run_id=$2 ORDER BY seq",
        app,
        run_id,
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


async def _lock_run(c: Conn, app: str, run_id: str) -> RunRecord | None:
    row = await c.fetchrow(
        f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND run_id=$2 FOR UPDATE", app, run_id
    )
    return None if row is None else run_row(row)


async def _enqueue(
    c: Conn, app: str, run_id: str, workflow: str, entry: QueueEntry, at: float
) -> None:
    """Put a pending run in ``entry``'s queue, last of those waiting since ``at``, parked
    until the queue admits it (as ``create_queued_run`` does)."""
    await c.execute(
        "INSERT INTO queue_runs (app, run_id, queue, workflow, partition_key, priority, seq) "
        "VALUES ($1,$2,$3,$4,$5,$6,$7)",
        app, run_id, entry.queue, workflow, entry.partition, entry.priority, int(at * 1e6),
    )
    await c.execute("UPDATE runs SET wake_at=$3 WHERE app=$1 AND run_id=$2", app, run_id, FOREVER)


async def _requeue(c: Conn, app: str, run: RunRecord, entry: QueueEntry, at: float) -> None:
    """Put a retried run in ``entry``'s queue again, last of those waiting since ``at``.
    The begin of the epoch that failed keeps counting in the queue's rate window and
    figures: its row stays, done, under ``earlier_begin_key`` (pruned as an ended run's
    row); a row that never began goes."""
    await c.execute(
        "UPDATE queue_runs SET run_id=$3, done=true WHERE app=$1 AND run_id=$2 AND began_at>0",
        app, run.run_id, earlier_begin_key(run.run_id, run.epoch),
    )
    await c.execute("DELETE FROM queue_runs WHERE app=$1 AND run_id=$2", app, run.run_id)
    await _enqueue(c, app, run.run_id, run.workflow, entry, at)


class PostgresOperate(PostgresCore):
    """The operating role of :class:`~cantata.store.postgres.PostgresStore` (docs/operating.md)."""

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
        async with self._db.conn() as c:
            sql = f"SELECT {RUN_COLS} FROM runs WHERE app=$1"
            params: list[Any] = [app]

            def arg(value: Any) -> str:
                params.append(value)
                return f"${len(params)}"

            if version is not None:
                sql += f" AND version={arg(version)}"
            if idempotency_key is not None:
                sql += f" AND idempotency_key={arg(idempotency_key)}"
            if workflow is not None:
                sql += f" AND workflow={arg(workflow)}"
            if status is not None:
                sql += f" AND status={arg(str(status))}"
            for name, value in (attributes or {}).items():
                sql += (
                    f" AND run_id IN (SELECT run_id FROM run_attributes WHERE app=$1 "
                    f"AND name={arg(name)} AND value={arg(value)})"
                )
            sql += f' ORDER BY created_at DESC, run_id COLLATE "C" DESC LIMIT {arg(limit)}'
            return [run_row(r) for r in await c.fetch(sql, *params)]

    async def run_attributes(self, app: str, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        async with self._db.conn() as c:
            out: dict[str, dict[str, str]] = {}
            if not run_ids:
                return out
            for run_id, name, value in await c.fetch(
                "SELECT run_id, name, value FROM run_attributes WHERE app=$1 "
                "AND run_id = ANY($2::text[]) ORDER BY name",
                app,
                list(run_ids),
            ):
                out.setdefault(run_id, {})[name] = value
            return out

    async def attribute_names(self, app: str) -> list[str]:
        async with self._db.conn() as c:
            rows = await c.fetch(
                "WITH RECURSIVE n(name) AS (SELECT min(name) FROM run_attributes WHERE app=$1 "
                "UNION ALL SELECT (SELECT min(name) FROM run_attributes WHERE app=$1 "
                "AND name > n.name) FROM n WHERE n.name IS NOT NULL) "
                'SELECT name FROM n WHERE name IS NOT NULL ORDER BY name COLLATE "C"',
                app,
            )
            return [r[0] for r in rows]

    async def runs_by_prefix(self, app: str, prefix: str, *, limit: int) -> list[RunRecord]:
        async with self._db.conn() as c:
            rows = await c.fetch(
                f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND run_id LIKE $2 "
                'ORDER BY run_id COLLATE "C" LIMIT $3',
                app,
                _like_prefix(prefix),
                limit,
            )
            return [run_row(r) for r in rows]

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
        if not workflows:
            return []
        async with self._db.conn() as c:
            if queued:
                return await queued_foreign_runs(c, app, workflows, versions, limit)
            return await foreign_runs(
                c, app, worker_id, workflows, versions, stale_before, limit, now
            )

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
        async with self._db.tx() as c:
            row = await c.fetchrow(
                "UPDATE runs r SET version=$3, updated_at=$4 WHERE r.app=$1 AND r.run_id=$2 "
                f"AND r.version=$5 AND r.updated_at=$6 AND r.status IN {LIVE_SQL} "
                "AND (r.owner IS NULL OR NOT EXISTS (SELECT 1 FROM workers w WHERE "
                "w.app=r.app AND w.worker_id=r.owner AND w.expires_at >= $7)) "
                f"RETURNING {RUN_COLS}",
                app, run_id, to_version, time.time(), from_version, unchanged, stale_before,
            )
            if row is None:
                return None
            await PgPool.notify(c, app, RUNS)
            await audit_append(c, app, rules.repin_entry(run_id, actor, from_version,
                                                         to_version), self._audit_keys.get(app))
            return run_row(row)

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
        async with self._db.tx() as c:
            run = rules.check_retryable(
                app, run_id, await _lock_run(c, app, run_id), include_compensated
            )
            keys = rules.superseded_keys(await _history_rows(c, app, run_id))
            epoch = run.epoch + 1
            if keys:
                await c.execute(
                    f"INSERT INTO history_superseded (app, run_id, epoch, {HISTORY_COLS}) "
                    f"SELECT app, run_id, $3, {HISTORY_COLS} FROM history "
                    "WHERE app=$1 AND run_id=$2 AND key = ANY($4::text[])",
                    app,
                    run_id,
                    epoch,
                    keys,
                )
                await c.execute(
                    f"INSERT INTO attempts_superseded (app, run_id, epoch, {ATTEMPT_COLS}) "
                    f"SELECT app, run_id, $3, {ATTEMPT_COLS} FROM attempts "
                    "WHERE app=$1 AND run_id=$2 AND key = ANY($4::text[])",
                    app,
                    run_id,
                    epoch,
                    keys,
                )
                for table in ("attempts", "history"):
                    await c.execute(
                        f"DELETE FROM {table} WHERE app=$1 AND run_id=$2 AND key = ANY($3::text[])",
                        app,
                        run_id,
                        keys,
                    )
            # The attributes are those the remaining history set (a superseded entry's are gone).
            await c.execute("DELETE FROM run_attributes WHERE app=$1 AND run_id=$2", app, run_id)
            await c.execute(
                "INSERT INTO run_attributes (app, run_id, name, value) "
                "SELECT DISTINCT ON (j.key) h.app, h.run_id, j.key, j.value FROM history h, "
                "jsonb_each_text(h.detail::jsonb) j WHERE h.app=$1 AND h.run_id=$2 AND h.kind=$3 "
                "AND h.detail IS NOT NULL ORDER BY j.key, h.seq DESC",
                app,
                run_id,
                ATTRS,
            )
            if queue is not None:  # it waits in its queue again, behind the runs there
                await _requeue(c, app, run, queue, now)
            row = await c.fetchrow(
                "UPDATE runs SET status='pending', result=NULL, error=NULL, flagged=false, "
                "owner=NULL, cancel_requested=false, epoch=$3, version=$4, updated_at=$5, "
                "deadline_at=CASE WHEN deadline_at<=$6 THEN NULL ELSE deadline_at END "
                f"WHERE app=$1 AND run_id=$2 RETURNING {RUN_COLS}",
                app,
                run_id,
                epoch,
                version,
                time.time(),
                now,
            )
            assert row is not None
            await PgPool.notify(c, app, RUNS)
            await audit_append(
                c, app, rules.retry_entry(run_id, actor, str(run.status), epoch, keys, version),
                self._audit_keys.get(app),
            )
            return run_row(row)

    async def fork_run(
        self, app: str, source_run_id: str, run: RunRecord, *, before_key: str, actor: str,
        queue: QueueEntry | None = None,
    ) -> RunRecord:
        async with self._db.tx() as c:
            source = await _lock_run(c, app, source_run_id)
            keys = rules.check_fork(
                app, source_run_id, source, await _history_rows(c, app, source_run_id), before_key
            )
            await c.execute(
                f"INSERT INTO runs ({RUN_COLS}) VALUES ({_RUN_MARKS})",
                *run_values(run),
            )
            if keys:
                # ORDER BY seq: the attribute trigger sees the entries as the source recorded them.
                await c.execute(
                    f"INSERT INTO history (app, run_id, {HISTORY_COLS}) SELECT app, $3, "
                    f"{HISTORY_COLS} "
                    "FROM history WHERE app=$1 AND run_id=$2 AND key = ANY($4::text[]) ORDER BY "
                    "seq",
                    app,
                    source_run_id,
                    run.run_id,
                    keys,
                )
                await c.execute(
                    f"INSERT INTO attempts (app, run_id, {ATTEMPT_COLS}) SELECT app, $3, "
                    f"{ATTEMPT_COLS} "
                    "FROM attempts WHERE app=$1 AND run_id=$2 AND key = ANY($4::text[])",
                    app,
                    source_run_id,
                    run.run_id,
                    keys,
                )
            if queue is not None:  # it waits in the queue as a start does
                await _enqueue(c, app, run.run_id, run.workflow, queue, run.created_at)
            await PgPool.notify(c, app, RUNS)
            key = self._audit_keys.get(app)
            await audit_append(c, app, audit.run_created_entry(
                run.run_id, run.workflow, run.correlation_id, None, actor), key)
            await audit_append(
                c, app, rules.fork_entry(run.run_id, actor, source_run_id, before_key), key
            )
            return run

    async def superseded_history(self, app: str, run_id: str) -> list[tuple[int, HistoryEntry]]:
        async with self._db.conn() as c:
            rows = await c.fetch(
                f"SELECT epoch, {HISTORY_COLS} FROM history_superseded WHERE app=$1 AND run_id=$2 "
                "ORDER BY epoch, seq",
                app,
                run_id,
            )
            return [(r[0], HistoryEntry(*r[1:])) for r in rows]

    async def superseded_attempts(self, app: str, run_id: str) -> list[tuple[int, Attempt]]:
        async with self._db.conn() as c:
            rows = await c.fetch(
                f"SELECT epoch, {ATTEMPT_COLS} FROM attempts_superseded "
                "WHERE app=$1 AND run_id=$2 ORDER BY epoch, started_at, attempt",
                app,
                run_id,
            )
            firsts = await c.fetch(
                f"SELECT epoch, {HISTORY_COLS} FROM history_superseded "
                f"WHERE app=$1 AND run_id=$2 AND {FIRST_ATTEMPT_ROWS}",
                app,
                run_id,
            )
        return superseded_with_first_attempts(
            [(r[0], HistoryEntry(*r[1:])) for r in firsts],
            [(r[0], Attempt(*r[1:])) for r in rows],
        )

    async def discard_dead_letter(
        self, app: str, dead_letter_id: str, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        async with self._db.tx() as c:
            row = await c.fetchrow(
                "DELETE FROM dead_letters WHERE app=$1 AND id=$2 "
                "RETURNING id, grp, event_id, error, attempts, failed_at",
                app,
                dead_letter_id,
            )
            ev_row = (
                None
                if row is None
                else await c.fetchrow(
                    f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND id=$2", app, row[2]
                )
            )
            if row is None or ev_row is None:
                raise DeadLetterNotFound(
                    f"no dead letter {dead_letter_id!r} in app {app!r}; list them with "
                    "`cantata dlq list`"
                )
            await audit_append(c, app, rules.discard_entry(row[1], row[2], dead_letter_id, actor),
                               self._audit_keys.get(app))
            return dead_letter_row(row, event_row(ev_row))

    # -- handler groups ----------------------------------------------------------------

    async def group_stats(self, app: str, *, now: float) -> list[GroupStats]:
        async with self._db.conn() as c:
            declared = await c.fetch(
                "SELECT kind, name, pattern FROM declarations WHERE app=$1 "
                "AND kind IN ('handler','trigger')", app,
            )
            pending = await c.fetch(
                "SELECT d.grp, count(*), count(w.worker_id), min(e.stored_at) "
                "FROM deliveries d "
                "LEFT JOIN workers w ON w.app=d.app AND w.worker_id=d.owner "
                " AND w.expires_at >= $2 "
                "LEFT JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=$1 AND d.status='pending' GROUP BY d.grp", app, now,
            )
            dead = await c.fetch(
                "SELECT grp, count(*) FROM dead_letters WHERE app=$1 GROUP BY grp", app,
            )
        return rules.group_stats(
            [tuple(r) for r in declared], [tuple(r) for r in pending], [tuple(r) for r in dead],
        )

    async def pending_events(self, app: str, group: str, *, limit: int) -> list[Event[Any]]:
        cols = ", ".join(f"e.{c.strip()}" for c in EVENT_COLS.split(","))
        rows = await self._db.fetch(
            f"SELECT {cols} FROM deliveries d JOIN events e "
            "ON e.app=d.app AND e.id=d.event_id "
            "WHERE d.app=$1 AND d.grp=$2 AND d.status='pending' ORDER BY e.seq LIMIT $3",
            app, group, limit,
        )
        return [event_row(tuple(r)) for r in rows]

    async def retire_group(
        self, app: str, group: str, *, now: float, actor: str
    ) -> GroupRetired:
        until = time.monotonic() + _RETIRE_PATIENCE
        while True:
            try:
                return await self._retire(app, group, now, actor)
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
                if time.monotonic() > until:
                    raise StoreUnavailable(
                        f"cannot retire group {group!r} of app {app!r}: the declarations "
                        f"stayed in use by other transactions for {_RETIRE_PATIENCE:.0f} s "
                        f"({exc}); look for long transactions in pg_stat_activity, and try "
                        "again"
                    ) from None
                await asyncio.sleep(random.uniform(0.05, 0.2))

    async def _retire(self, app: str, group: str, now: float, actor: str) -> GroupRetired:
        async with self._db.tx() as c:
            # Every transaction that fans an event out reads the declarations: this lock
            # waits for those under way and holds the next ones until the commit, so no
            # event gets a delivery for the group once its declaration is gone. A
            # delivery another transaction has locked right now (a claim or a settlement
            # in flight) is skipped, never waited for: it stays with its holder.
            await c.execute(f"SET LOCAL lock_timeout = {_RETIRE_LOCK_WAIT_MS}")
            await c.execute("LOCK TABLE declarations IN ACCESS EXCLUSIVE MODE")
            rows = await c.fetch(
                "DELETE FROM declarations WHERE app=$1 AND name=$2 "
                "AND kind IN ('handler','trigger') RETURNING kind, name, pattern, service, detail",
                app, group,
            )
            removed = rules.removed_declarations(rows)
            ended = await c.fetchval(
                "WITH e AS (UPDATE deliveries d SET status='done', error=$3, owner=NULL, "
                " updated_at=$4 WHERE (d.app, d.grp, d.event_id) IN ("
                "  SELECT p.app, p.grp, p.event_id FROM deliveries p WHERE p.app=$1 "
                "  AND p.grp=$2 AND p.status='pending' AND (p.owner IS NULL OR NOT EXISTS "
                "   (SELECT 1 FROM workers w WHERE w.app=p.app AND w.worker_id=p.owner "
                "    AND w.expires_at >= $4)) FOR UPDATE SKIP LOCKED) "
                " AND d.status='pending' RETURNING 1) SELECT count(*) FROM e",
                app, group, retired_error(actor), now,
            )
            held = await c.fetchval(
                "SELECT count(*) FROM deliveries WHERE app=$1 AND grp=$2 AND status='pending'",
                app, group,
            )
            dead = await c.fetchval(
                "SELECT count(*) FROM dead_letters WHERE app=$1 AND grp=$2", app, group,
            )
            done = GroupRetired(group, removed, int(ended), int(held), int(dead))
            if done.changed:
                await audit_append(c, app, rules.retire_entry(
                    group, actor, [(d.kind, d.pattern) for d in removed], done.ended,
                    done.held, done.dead_letters,
                ), self._audit_keys.get(app))
            return done
