"""The SQLite store, operating runs: lookups, retry, fork, superseded history and
discarded dead letters (docs/operating.md): :class:`SQLiteOperate`, each operation's SQL
in its method, run in the store's connection thread (writes inside its transaction)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cantata.errors import DeadLetterNotFound
from cantata.model.event import Event
from cantata.model.flow import QueueEntry
from cantata.model.records import (
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
from cantata.store.common import FIRST_ATTEMPT_ROWS, superseded_with_first_attempts
from cantata.store.sqlite_core import SQLiteCore, declarations_changed
from cantata.store.sqlite_flow import HAS_HISTORY, enqueue, requeue
from cantata.store.sqlite_ops import (
    ATTEMPT_COLS,
    E_EVENT_COLS,
    HISTORY_COLS,
    LIVE,
    LIVE_R,
    RUN_COLS,
    audit_append,
    dead_letter_row,
    event_row,
    reindex_attributes,
    run_row,
    run_values,
)


def foreign_runs(
    c: sqlite3.Connection, app: str, worker_id: str, workflows: Sequence[str],
    versions: Sequence[str], stale_before: float, limit: int, now: float | None = None,
) -> list[RunRecord]:
    cols = ", ".join("r." + col.strip() for col in RUN_COLS.split(","))
    wfs, vs = ",".join("?" * len(workflows)), ",".join("?" * len(versions))
    # Runs that are not parked, and (with ``now``) parked runs that are due: each by
    # its index, never a scan of the parked runs (store/roles/parking.py).
    sql = (
        f"SELECT {cols} FROM runs r INDEXED BY runs_claimable LEFT JOIN workers w "
        "ON w.app=r.app AND w.worker_id=r.owner "
        f"WHERE r.app=? AND {LIVE_R} AND r.wake_at IS NULL "
        f"AND r.workflow IN ({wfs}) AND r.version IS NOT NULL AND r.version NOT IN ({vs}) "
        "AND (r.owner IS NULL OR (r.owner<>? AND (w.worker_id IS NULL OR w.expires_at < ?))) "
    )
    params: list[object] = [app, *workflows, *versions, worker_id, stale_before]
    if now is not None:
        sql += (
            f"UNION ALL SELECT {cols} FROM runs r INDEXED BY runs_parked "
            f"WHERE r.app=? AND r.wake_at IS NOT NULL AND r.wake_at<=? "
            f"AND {LIVE_R} AND r.owner IS NULL AND r.workflow IN ({wfs}) "
            f"AND r.version IS NOT NULL AND r.version NOT IN ({vs}) "
        )
        params += [app, now, *workflows, *versions]
    rows = c.execute(sql + "ORDER BY 14 LIMIT ?", (*params, limit)).fetchall()
    return [run_row(r) for r in rows]


def queued_foreign_runs(
    c: sqlite3.Connection, app: str, workflows: Sequence[str], versions: Sequence[str],
    limit: int,
) -> list[RunRecord]:
    """Runs waiting in a queue that may begin, with history, pinned to a version not in
    ``versions`` (``Store.foreign_runs(queued=True)``), first queued first."""
    cols = ", ".join("r." + col.strip() for col in RUN_COLS.split(","))
    wfs, vs = ",".join("?" * len(workflows)), ",".join("?" * len(versions))
    rows = c.execute(
        f"SELECT {cols} FROM queue_runs q JOIN runs r ON r.app=q.app AND r.run_id=q.run_id "
        f"WHERE q.app=? AND q.began_at IS NULL AND q.workflow IN ({wfs}) "
        "AND r.status='pending' AND r.cancel_requested=0 AND r.owner IS NULL "
        f"AND r.version IS NOT NULL AND r.version NOT IN ({vs}) AND {HAS_HISTORY} "
        "ORDER BY q.seq, q.run_id LIMIT ?",
        (app, *workflows, *versions, limit),
    ).fetchall()
    return [run_row(r) for r in rows]


def _history_rows(c: sqlite3.Connection, app: str, run_id: str) -> list[rules.Row]:
    return [
        (r[0], r[1], r[2], r[3])
        for r in c.execute(
            "SELECT key, seq, kind, status FROM history WHERE app=? AND run_id=? ORDER BY seq",
            (app, run_id),
        )
    ]


def _get_run(c: sqlite3.Connection, app: str, run_id: str) -> RunRecord | None:
    row = c.execute(
        f"SELECT {RUN_COLS} FROM runs WHERE app=? AND run_id=?", (app, run_id)
    ).fetchone()
    return None if row is None else run_row(row)


class SQLiteOperate(SQLiteCore):
    """The operating role of :class:`~cantata.store.sqlite.SQLiteStore` (docs/operating.md)."""

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
        def op(c: sqlite3.Connection) -> list[RunRecord]:
            sql = f"SELECT {RUN_COLS} FROM runs WHERE app=?"
            params: list[Any] = [app]
            if version is not None:
                sql += " AND version=?"
                params.append(version)
            if idempotency_key is not None:
                sql += " AND idempotency_key=?"
                params.append(idempotency_key)
            if workflow is not None:
                sql += " AND workflow=?"
                params.append(workflow)
            if status is not None:
                sql += " AND status=?"
                params.append(str(status))
            for name, value in (attributes or {}).items():
                sql += (
                    " AND run_id IN (SELECT run_id FROM run_attributes INDEXED BY "
                    "run_attributes_value WHERE app=? AND name=? AND value=?)"
                )
                params += [app, name, value]
            sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
            params.append(limit)
            return [run_row(r) for r in c.execute(sql, params).fetchall()]

        return await self._t.read(op)

    async def run_attributes(self, app: str, run_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        def op(c: sqlite3.Connection) -> dict[str, dict[str, str]]:
            out: dict[str, dict[str, str]] = {}
            ids = list(dict.fromkeys(run_ids))
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                for run_id, name, value in c.execute(
                    "SELECT run_id, name, value FROM run_attributes WHERE app=? AND run_id IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY name",
                    (app, *chunk),
                ):
                    out.setdefault(run_id, {})[name] = value
            return out

        return await self._t.read(op)

    async def attribute_names(self, app: str) -> list[str]:
        def op(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "WITH RECURSIVE n(name) AS (SELECT min(name) FROM run_attributes WHERE app=?1 "
                "UNION ALL SELECT (SELECT min(name) FROM run_attributes WHERE app=?1 "
                "AND name > n.name) FROM n WHERE n.name IS NOT NULL) "
                "SELECT name FROM n WHERE name IS NOT NULL",
                (app,),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._t.read(op)

    async def runs_by_prefix(self, app: str, prefix: str, *, limit: int) -> list[RunRecord]:
        def op(c: sqlite3.Connection) -> list[RunRecord]:
            rows = c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND run_id>=? AND run_id<? "
                "ORDER BY run_id LIMIT ?",
                (app, prefix, prefix + "\U0010ffff", limit),
            ).fetchall()
            return [run_row(r) for r in rows]

        return await self._t.read(op)

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
        if queued:
            return await self._t.read(
                lambda c: queued_foreign_runs(c, app, workflows, versions or [""], limit)
            )
        return await self._t.read(
            lambda c: foreign_runs(
                c, app, worker_id, workflows, versions or [""], stale_before, limit, now
            )
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
        def op(c: sqlite3.Connection) -> RunRecord | None:
            row = c.execute(
                "UPDATE runs SET version=?, updated_at=? WHERE app=? AND run_id=? "
                f"AND version=? AND updated_at=? AND {LIVE} AND (owner IS NULL OR NOT EXISTS "
                "(SELECT 1 FROM workers w WHERE w.app=runs.app AND w.worker_id=runs.owner "
                f"AND w.expires_at >= ?)) RETURNING {RUN_COLS}",
                (to_version, time.time(), app, run_id, from_version, unchanged, stale_before),
            ).fetchone()
            if row is None:
                return None
            audit_append(c, app, rules.repin_entry(run_id, actor, from_version, to_version))
            return run_row(row)

        return await self._t.write(op, RUNS)

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
        def op(c: sqlite3.Connection) -> RunRecord:
            run = rules.check_retryable(app, run_id, _get_run(c, app, run_id), include_compensated)
            keys = rules.superseded_keys(_history_rows(c, app, run_id))
            epoch = run.epoch + 1
            for key in keys:
                where = (app, run_id, key)
                c.execute(
                    f"INSERT INTO history_superseded (app, run_id, epoch, {HISTORY_COLS}) "
                    f"SELECT app, run_id, ?, {HISTORY_COLS} FROM history "
                    "WHERE app=? AND run_id=? AND key=?",
                    (epoch, *where),
                )
                c.execute(
                    f"INSERT INTO attempts_superseded (app, run_id, epoch, {ATTEMPT_COLS}) "
                    f"SELECT app, run_id, ?, {ATTEMPT_COLS} FROM attempts "
                    "WHERE app=? AND run_id=? AND key=?",
                    (epoch, *where),
                )
                c.execute("DELETE FROM attempts WHERE app=? AND run_id=? AND key=?", where)
                c.execute("DELETE FROM history WHERE app=? AND run_id=? AND key=?", where)
            # The attributes are those the remaining history set (a superseded entry's are gone).
            reindex_attributes(c, app, run_id)
            if queue is not None:  # it waits in its queue again, behind the runs there
                requeue(c, app, run, queue, now)
            row = c.execute(
                "UPDATE runs SET status='pending', result=NULL, error=NULL, flagged=0, owner=NULL, "
                "cancel_requested=0, epoch=?, version=?, updated_at=?, "
                "deadline_at=CASE WHEN deadline_at<=? THEN NULL ELSE deadline_at END "
                f"WHERE app=? AND run_id=? RETURNING {RUN_COLS}",
                (epoch, version, time.time(), now, app, run_id),
            ).fetchone()
            audit_append(
                c, app, rules.retry_entry(run_id, actor, str(run.status), epoch, keys, version)
            )
            return run_row(row)

        return await self._t.write(op, RUNS)

    async def fork_run(
        self, app: str, source_run_id: str, run: RunRecord, *, before_key: str, actor: str,
        queue: QueueEntry | None = None,
    ) -> RunRecord:
        def op(c: sqlite3.Connection) -> RunRecord:
            source = _get_run(c, app, source_run_id)
            keys = rules.check_fork(
                app, source_run_id, source, _history_rows(c, app, source_run_id), before_key
            )
            c.execute(
                f"INSERT INTO runs ({RUN_COLS}) VALUES ({','.join('?' * 22)})",
                run_values(run),
            )
            for key in keys:  # in seq order, so later attributes win as they did in the source
                where = (app, source_run_id, key)
                c.execute(
                    f"INSERT INTO history (app, run_id, {HISTORY_COLS}) SELECT app, ?, "
                    f"{HISTORY_COLS} "
                    "FROM history WHERE app=? AND run_id=? AND key=?",
                    (run.run_id, *where),
                )
                c.execute(
                    f"INSERT INTO attempts (app, run_id, {ATTEMPT_COLS}) SELECT app, ?, "
                    f"{ATTEMPT_COLS} FROM attempts WHERE app=? AND run_id=? AND key=?",
                    (run.run_id, *where),
                )
            reindex_attributes(c, app, run.run_id)
            if queue is not None:  # it waits in the queue as a start does
                enqueue(c, app, run.run_id, run.workflow, queue, run.created_at)
            audit_append(c, app, audit.run_created_entry(
                run.run_id, run.workflow, run.correlation_id, None, actor))
            audit_append(c, app, rules.fork_entry(run.run_id, actor, source_run_id, before_key))
            return run

        return await self._t.write(op, RUNS)

    async def superseded_history(self, app: str, run_id: str) -> list[tuple[int, HistoryEntry]]:
        def op(c: sqlite3.Connection) -> list[tuple[int, HistoryEntry]]:
            rows = c.execute(
                f"SELECT epoch, {HISTORY_COLS} FROM history_superseded WHERE app=? AND run_id=? "
                "ORDER BY epoch, seq",
                (app, run_id),
            ).fetchall()
            return [(r[0], HistoryEntry(*r[1:])) for r in rows]

        return await self._t.read(op)

    async def superseded_attempts(self, app: str, run_id: str) -> list[tuple[int, Attempt]]:
        def read(c: sqlite3.Connection) -> list[tuple[int, Attempt]]:
            rows = c.execute(
                f"SELECT epoch, {ATTEMPT_COLS} FROM attempts_superseded "
                "WHERE app=? AND run_id=? ORDER BY epoch, started_at, attempt",
                (app, run_id),
            ).fetchall()
            firsts = c.execute(
                f"SELECT epoch, {HISTORY_COLS} FROM history_superseded "
                f"WHERE app=? AND run_id=? AND {FIRST_ATTEMPT_ROWS}",
                (app, run_id),
            ).fetchall()
            return superseded_with_first_attempts(
                [(r[0], HistoryEntry(*r[1:])) for r in firsts],
                [(r[0], Attempt(*r[1:])) for r in rows],
            )

        return await self._t.read(read)

    async def discard_dead_letter(
        self, app: str, dead_letter_id: str, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        def op(c: sqlite3.Connection) -> DeadLetter:
            row = c.execute(
                f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, {E_EVENT_COLS} "
                "FROM dead_letters d JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? AND d.id=?",
                (app, dead_letter_id),
            ).fetchone()
            if row is None:
                raise DeadLetterNotFound(
                    f"no dead letter {dead_letter_id!r} in app {app!r}; list them with "
                    "`cantata dlq list`"
                )
            dl = dead_letter_row(row)
            c.execute("DELETE FROM dead_letters WHERE app=? AND id=?", (app, dead_letter_id))
            audit_append(c, app, rules.discard_entry(dl.group, dl.event.id, dead_letter_id, actor))
            return dl

        return await self._t.write(op)

    # -- handler groups ----------------------------------------------------------------

    async def group_stats(self, app: str, *, now: float) -> list[GroupStats]:
        def op(c: sqlite3.Connection) -> list[GroupStats]:
            declared = c.execute(
                "SELECT kind, name, pattern FROM declarations WHERE app=? "
                "AND kind IN ('handler','trigger')", (app,),
            ).fetchall()
            pending = c.execute(
                "SELECT d.grp, count(*), "
                " sum(CASE WHEN w.expires_at >= ? THEN 1 ELSE 0 END), min(e.stored_at) "
                "FROM deliveries d "
                "LEFT JOIN workers w ON w.app=d.app AND w.worker_id=d.owner "
                "LEFT JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? AND d.status='pending' GROUP BY d.grp", (now, app),
            ).fetchall()
            dead = c.execute(
                "SELECT grp, count(*) FROM dead_letters WHERE app=? GROUP BY grp", (app,),
            ).fetchall()
            return rules.group_stats(declared, pending, dead)

        return await self._t.read(op)

    async def pending_events(self, app: str, group: str, *, limit: int) -> list[Event[Any]]:
        rows = await self._t.read(lambda c: c.execute(
            # (by deliveries_due: the key starts with the event since migration 0027)
            f"SELECT {E_EVENT_COLS} FROM deliveries d INDEXED BY deliveries_due JOIN events e "
            "ON e.app=d.app AND e.id=d.event_id "
            "WHERE d.app=? AND d.grp=? AND d.status='pending' ORDER BY e.seq LIMIT ?",
            (app, group, limit),
        ).fetchall())
        return [event_row(r) for r in rows]

    async def retire_group(
        self, app: str, group: str, *, now: float, actor: str
    ) -> GroupRetired:
        def op(c: sqlite3.Connection) -> GroupRetired:
            rows = c.execute(
                "DELETE FROM declarations WHERE app=? AND name=? "
                "AND kind IN ('handler','trigger') RETURNING kind, name, pattern, service, detail",
                (app, group),
            ).fetchall()
            removed = rules.removed_declarations(rows)
            if removed:
                declarations_changed(c, app)
            ended = c.execute(
                "UPDATE deliveries INDEXED BY deliveries_due "
                "SET status='done', error=?, owner=NULL, updated_at=? "
                "WHERE app=? AND grp=? AND status='pending' AND (owner IS NULL OR NOT EXISTS "
                " (SELECT 1 FROM workers w WHERE w.app=deliveries.app "
                "  AND w.worker_id=deliveries.owner AND w.expires_at >= ?))",
                (retired_error(actor), now, app, group, now),
            ).rowcount
            held = c.execute(
                "SELECT count(*) FROM deliveries INDEXED BY deliveries_due "
                "WHERE app=? AND grp=? AND status='pending'",
                (app, group),
            ).fetchone()[0]
            dead = c.execute(
                "SELECT count(*) FROM dead_letters WHERE app=? AND grp=?", (app, group),
            ).fetchone()[0]
            done = GroupRetired(group, removed, ended, held, dead)
            if done.changed:
                audit_append(c, app, rules.retire_entry(
                    group, actor, [(d.kind, d.pattern) for d in removed], ended, held, dead,
                ))
            return done

        return await self._t.write(op)
