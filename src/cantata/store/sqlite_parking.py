"""The SQLite store, parked runs (see :mod:`cantata.store.roles.parking`)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cantata.errors import LeaseLost
from cantata.model.parking import Parking
from cantata.store.base import RUNS
from cantata.store.sqlite_ops import LIVE

if TYPE_CHECKING:
    from cantata.store.sqlite_thread import ConnectionThread

UNPARK = "wake_at=NULL, waits_for=NULL, wait_match=NULL"


def wake_parent(c: sqlite3.Connection, app: str, run_id: str) -> None:
    """Wake ``run_id`` if it is parked (in the caller's transaction)."""
    c.execute(
        f"UPDATE runs SET {UNPARK} WHERE app=? AND run_id=? AND wake_at IS NOT NULL "
        "AND owner IS NULL",
        (app, run_id),
    )


class SQLiteParking:
    """Parking operations of :class:`~cantata.store.sqlite.SQLiteStore`."""

    @property
    def _t(self) -> ConnectionThread:  # provided by SQLiteStore
        raise NotImplementedError

    async def park_run(self, app: str, run_id: str, fence: int, parking: Parking) -> None:
        def op(c: sqlite3.Connection) -> None:
            n = c.execute(
                "UPDATE runs SET owner=NULL, updated_at=?, "
                " wake_at=CASE WHEN cancel_requested=1 THEN NULL ELSE ? END,"
                " waits_for=CASE WHEN cancel_requested=1 THEN NULL ELSE ? END,"
                " wait_match=CASE WHEN cancel_requested=1 THEN NULL ELSE ? END "
                f"WHERE app=? AND run_id=? AND fence=? AND {LIVE}",
                (time.time(), parking.wake_at, parking.waits_for, parking.wait_match,
                 app, run_id, fence),
            ).rowcount
            if n == 0:
                raise LeaseLost(
                    f"run {run_id} was taken over by another worker (fence {fence} is "
                    "stale); this worker stops executing it"
                )

        await self._t.write(op)

    async def _woken(self, n: int) -> int:
        if n:
            await self._t.write(lambda c: None, RUNS)
        return n

    async def wake_runs(self, app: str, run_ids: Sequence[str]) -> int:
        ids = list(run_ids)
        if not ids:
            return 0

        def op(c: sqlite3.Connection) -> int:
            n = 0
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                n += c.execute(
                    f"UPDATE runs SET {UNPARK} WHERE app=? AND wake_at IS NOT NULL "
                    f"AND owner IS NULL AND run_id IN ({','.join('?' * len(chunk))})",
                    (app, *chunk),
                ).rowcount
            return n

        return await self._woken(await self._t.write(op))

    async def wake_waiting(self, app: str, waits_for: str, matches: Sequence[str]) -> int:
        found = list(matches)
        if not found:
            return 0

        def op(c: sqlite3.Connection) -> int:
            n = 0
            for i in range(0, len(found), 500):
                chunk = found[i : i + 500]
                n += c.execute(
                    f"UPDATE runs SET {UNPARK} WHERE app=? AND waits_for=? AND owner IS NULL "
                    f"AND wait_match IN ({','.join('?' * len(chunk))})",
                    (app, waits_for, *chunk),
                ).rowcount
            return n

        return await self._woken(await self._t.write(op))

    async def parked_waits(self, app: str) -> list[str]:
        # A skip scan of the runs_waiting index: one probe per distinct value.
        rows = await self._t.read(lambda c: c.execute(
            "WITH RECURSIVE t(v) AS (SELECT (SELECT min(waits_for) FROM runs WHERE app=? "
            " AND waits_for IS NOT NULL) UNION ALL SELECT (SELECT min(waits_for) FROM runs "
            " WHERE app=? AND waits_for IS NOT NULL AND waits_for > t.v) FROM t "
            " WHERE t.v IS NOT NULL) SELECT v FROM t WHERE v IS NOT NULL",
            (app, app),
        ).fetchall())
        return [str(r[0]) for r in rows]

    async def waits_looked(self, app: str) -> tuple[int, float] | None:
        row = await self._t.read(lambda c: c.execute(
            "SELECT position, looked_at FROM wait_looks WHERE app=?", (app,)
        ).fetchone())
        return None if row is None else (int(row[0]), float(row[1]))

    async def mark_waits_looked(self, app: str, position: int, at: float) -> None:
        await self._t.write(lambda c: c.execute(
            "INSERT INTO wait_looks (app, position, looked_at) VALUES (?, ?, ?) "
            "ON CONFLICT (app) DO UPDATE SET position=excluded.position, "
            "looked_at=excluded.looked_at WHERE excluded.position > wait_looks.position",
            (app, position, at),
        ))

    async def parked_runs(self, app: str, run_ids: Sequence[str], *, now: float) -> set[str]:
        ids = list(run_ids)

        def op(c: sqlite3.Connection) -> set[str]:
            out: set[str] = set()
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                out.update(str(r[0]) for r in c.execute(
                    "SELECT run_id FROM runs WHERE app=? AND wake_at IS NOT NULL AND "
                    f"wake_at > ? AND run_id IN ({','.join('?' * len(chunk))})",
                    (app, now, *chunk),
                ))
            return out

        return await self._t.read(op) if ids else set()

    async def next_wake(
        self, app: str, workflows: Sequence[str], *, after: float
    ) -> float | None:
        if not workflows:
            return None
        marks = ",".join("?" * len(workflows))
        row = await self._t.read(lambda c: c.execute(
            "SELECT wake_at FROM runs INDEXED BY runs_parked WHERE app=? AND "
            f"wake_at IS NOT NULL AND wake_at > ? AND workflow IN ({marks}) "
            "ORDER BY wake_at LIMIT 1",
            (app, after, *workflows),
        ).fetchone())
        return None if row is None else float(row[0])
