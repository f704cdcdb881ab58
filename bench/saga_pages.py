"""The WAL pages a SQLite saga's commits write, by b-tree: a count, not a timing.

    python -m bench.saga_pages [N]

Runs the warm-up and then ``N`` (default 200) order sagas of the benchmark (three
steps; every 10th payment declined, so that run is compensated) one at a time in
this process on a fresh SQLite store, with the store's write transactions recorded
as ``bench.sqlite_breakdown`` records them (the frames each transaction appended to
the WAL, read after its COMMIT, their pages named by ``dbstat`` once the runs are
over). It prints, for every write transaction that began during a saga (the
worker's own claims and heartbeats fall between sagas and are left out), per saga:
the commits, the WAL frames (pages), and the pages of each b-tree; then the same
for the completed sagas' four transactions one by one (p50 and mean).

Deterministic up to the few transactions of the worker's background loops that
happen to fall inside a saga: two runs on one revision agree to ~0.1 page a saga.
Each page is a WAL frame of 4 KB (with ``PRAGMA page_size`` otherwise, that size)
written and checksummed by the COMMIT; docs/performance.md ("Round twenty-four
(saga, SQLite)") has what a page costs on this disk.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import shutil
import sqlite3
import statistics
import sys
import tempfile

from bench.common import fails
from bench.sqlite_breakdown import Recorder, run_sagas


def measure(n: int) -> str:
    tmp = tempfile.mkdtemp(prefix="cantata-saga-pages-")
    try:
        path = f"{tmp}/p.db"
        rec = Recorder(path)
        rec.install()
        spans = asyncio.run(run_sagas(path, n))
        names = rec.btrees()
        c = sqlite3.connect(path)
        page_size = c.execute("PRAGMA page_size").fetchone()[0]
        c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    txs = sorted((t for t in rec.txs if t.end), key=lambda t: t.begin)
    begins = [t.begin for t in txs]
    trees: collections.Counter[str] = collections.Counter()
    commits = frames = 0
    per: dict[int, list[int]] = collections.defaultdict(list)
    per_trees: dict[int, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    completed = 0
    for t0, t1, order in spans:
        mine = txs[bisect.bisect_left(begins, t0):bisect.bisect_right(begins, t1)]
        commits += len(mine)
        for tx in mine:
            frames += len(tx.frames)
            trees.update(names.get(p, "?") for p in tx.frames)
        if fails(order) or len(mine) != 4:
            continue
        completed += 1
        for i, tx in enumerate(mine):
            per[i].append(len(tx.frames))
            per_trees[i].update(names.get(p, "?") for p in tx.frames)
    out = [f"SQLite saga, {n} runs one at a time, page size {page_size}: "
           f"{commits / n:.2f} commits and {frames / n:.2f} WAL pages a saga "
           f"({frames / max(commits, 1):.2f} a commit)",
           "  pages a saga by b-tree: "
           + ", ".join(f"{t} {k / n:.2f}" for t, k in trees.most_common())]
    what = ("run created, step 1 begun", "step 1 ended, step 2 begun",
            "step 2 ended, step 3 begun", "step 3 ended, run completed")
    out.append(f"  the {completed} completed runs with four transactions, each "
               "(WAL pages p50 / mean; b-trees' pages a run):")
    for i, label in enumerate(what):
        if not per[i]:
            continue
        cells = ", ".join(f"{t} {k / completed:.2f}" for t, k in per_trees[i].most_common())
        out.append(f"    {i + 1} ({label}): {statistics.median(per[i]):.0f} / "
                   f"{statistics.mean(per[i]):.2f}: {cells}")
    return "\n".join(out)


def main() -> None:
    print(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 200))


if __name__ == "__main__":
    main()
