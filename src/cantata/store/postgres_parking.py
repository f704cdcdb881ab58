"""The PostgreSQL store, parked runs (see :mod:`cantata.store.roles.parking`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cantata.errors import LeaseLost
from cantata.model.parking import Parking
from cantata.store.base import RUNS
from cantata.store.postgres_ops import LIVE_SQL, unindexed

if TYPE_CHECKING:
    from cantata.store.postgres_pool import Conn, PgPool

UNPARK = "wake_at=NULL, waits_for=NULL, wait_match=NULL"

# Park a run: by its key only (no index of live runs read, whatever the statistics).
PARK = (
    "UPDATE runs SET owner=NULL, updated_at=$1, "
    " wake_at=CASE WHEN cancel_requested THEN NULL ELSE $2::float8 END,"
    " waits_for=CASE WHEN cancel_requested THEN NULL ELSE $3::text END,"
    " wait_match=CASE WHEN cancel_requested THEN NULL ELSE $4::text END "
    f"WHERE app=$5 AND run_id=$6 AND fence=$7 AND {unindexed(f'status IN {LIVE_SQL}')}"
)
# The next parked run due after $2 of the workflows $3: the first entry of the
# runs_parked range, whatever the statistics (not every parked run of the workflows
# read through runs_workflow_newest and sorted).
NEXT_WAKE = (
    "SELECT wake_at FROM runs WHERE app=$1 AND wake_at IS NOT NULL AND wake_at > $2 "
    f"AND {unindexed('workflow = ANY($3::text[])')} ORDER BY wake_at LIMIT 1"
)

# Wake the parents (parked in ctx.call) of runs that ended, in their checkpoint's
# transaction.
WAKE_PARENTS = (
    f"UPDATE runs SET {UNPARK} WHERE app=$1 AND run_id = ANY($2::text[]) "
    "AND wake_at IS NOT NULL AND owner IS NULL"
)


class PostgresParking:
    """Parking operations of :class:`~cantata.store.postgres.PostgresStore`."""

    _db: PgPool  # provided by PostgresStore

    async def park_run(self, app: str, run_id: str, fence: int, parking: Parking) -> None:
        status = await self._db.execute(
            PARK, time.time(), parking.wake_at, parking.waits_for, parking.wait_match,
            app, run_id, fence,
        )
        if status == "UPDATE 0":
            raise LeaseLost(
                f"run {run_id} was taken over by another worker (fence {fence} is stale); "
                "this worker stops executing it"
            )

    async def _wake(self, app: str, sql: str, *args: object) -> int:
        async with self._db.tx() as c:
            status = await c.execute(sql, *args)
            n = int(status.split()[-1])
            if n:
                await self._db.notify(c, app, RUNS)
        return n

    async def wake_runs(self, app: str, run_ids: Sequence[str]) -> int:
        if not run_ids:
            return 0
        return await self._wake(app, WAKE_PARENTS, app, list(run_ids))

    async def wake_waiting(self, app: str, waits_for: str, matches: Sequence[str]) -> int:
        if not matches:
            return 0
        return await self._wake(
            app,
            f"UPDATE runs SET {UNPARK} WHERE app=$1 AND waits_for=$2 AND owner IS NULL "
            "AND wait_match = ANY($3::text[])",
            app, waits_for, list(matches),
        )

    async def parked_waits(self, app: str) -> list[str]:
        # A skip scan of the runs_waiting index: one probe per distinct value.
        rows = await self._db.fetch(
            "WITH RECURSIVE t(v) AS (SELECT (SELECT min(waits_for) FROM runs WHERE app=$1 "
            " AND waits_for IS NOT NULL) UNION ALL SELECT (SELECT min(waits_for) FROM runs "
            " WHERE app=$1 AND waits_for IS NOT NULL AND waits_for > t.v) FROM t "
            " WHERE t.v IS NOT NULL) SELECT v FROM t WHERE v IS NOT NULL",
            app,
        )
        return [str(r[0]) for r in rows]

    async def waits_looked(self, app: str) -> tuple[int, float] | None:
        row = await self._db.fetchrow(
            "SELECT position, looked_at FROM wait_looks WHERE app=$1", app
        )
        return None if row is None else (int(row[0]), float(row[1]))

    async def mark_waits_looked(self, app: str, position: int, at: float) -> None:
        await self._db.execute(
            "INSERT INTO wait_looks (app, position, looked_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (app) DO UPDATE SET position=excluded.position, "
            "looked_at=excluded.looked_at WHERE excluded.position > wait_looks.position",
            app, position, at,
        )

    async def parked_runs(self, app: str, run_ids: Sequence[str], *, now: float) -> set[str]:
        if not run_ids:
            return set()
        rows = await self._db.fetch(
            "SELECT run_id FROM runs WHERE app=$1 AND run_id = ANY($2::text[]) "
            "AND wake_at IS NOT NULL AND wake_at > $3",
            app, list(run_ids), now,
        )
        return {str(r[0]) for r in rows}

    async def next_wake(
        self, app: str, workflows: Sequence[str], *, after: float
    ) -> float | None:
        if not workflows:
            return None
        row = await self._db.fetchrow(NEXT_WAKE, app, after, list(workflows))
        return None if row is None else float(row[0])


async def wake_parents(c: Conn, app: str, run_ids: list[str]) -> None:
    """Wake the parked runs among ``run_ids`` (in the caller's transaction)."""
    await c.execute(WAKE_PARENTS, app, run_ids)
