"""What reading a SQLite audit chain's head from either layout costs: a micro timing.

    python -m bench.audit_head_read [READS] [ROUNDS]

Makes a store of 300 audited runs in a temporary directory (``$TMPDIR``; ``/dev/shm``
for the CPU alone), then, inside one read transaction as the append's read is, times
``READS`` (default 20,000) reads of the head in turn, ``ROUNDS`` (default 7) times:
``old``, the statement of the releases that kept the head in ``audit_head`` alone;
``new``, :func:`cantata.store.sqlite_ops.audit_head` (``audit_head`` and the head row
``(app || char(1), 0)`` of ``audit``, whichever is further along); ``union``, the two
as a ``UNION ALL`` ordered by seq (tried, not kept). Prints µs a read per round
(docs/performance.md, "Round twenty-five (saga, SQLite): the audit head read from
either layout").
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable

from cantata.store import sqlite_ops
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import new_run

OLD = "SELECT seq, hash FROM audit_head WHERE app=?"
UNION = (
    "SELECT seq, hash FROM (SELECT seq, hash, 1 AS o FROM audit_head WHERE app=?1 "
    "UNION ALL SELECT CAST(data AS INTEGER), hash, 0 FROM audit WHERE app=?2 AND seq=0) "
    "ORDER BY seq DESC, o DESC LIMIT 1"
)


async def _fill(path: str, runs: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        for _ in range(runs):
            await store.create_run(new_run("shop"))
    finally:
        await store.close()


def main(reads: int = 20_000, rounds: int = 7) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "head.db")
        asyncio.run(_fill(path, 300))
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        def old() -> tuple[int, str] | None:  # the function as it was
            row = conn.execute(OLD, ("shop",)).fetchone()
            return None if row is None else (row[0], row[1])

        reads_of: dict[str, Callable[[], object]] = {
            "old": old,
            "new": lambda: sqlite_ops.audit_head(conn, "shop"),
            "union": lambda: conn.execute(UNION, ("shop", "shop\x01")).fetchone(),
        }
        for i in range(rounds):
            took = {}
            for name, read in reads_of.items():
                start = time.perf_counter()
                for _ in range(reads):
                    read()
                took[name] = (time.perf_counter() - start) / reads * 1e6
            print(f"round {i}: " + ", ".join(f"{k} {v:.2f} µs" for k, v in took.items()))
        conn.close()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
