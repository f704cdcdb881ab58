-- Version 33 of the SQLite schema: the runs pinned to a code version, newest first, by
-- an index (GET /api/runs?version=V, `cantata runs --version V`, find_runs(version=)).
-- Without it a page of them walked runs_newest from the newest run of the app and read
-- each run's row until it had found 50: every run newer than them, and all of the
-- runs for a version with fewer than 50 (100,000 runs: 100-500 ms for an old version's
-- runs, 0.1 ms with the index; docs/performance.md, "Round twenty-six (fixes)").
-- Runs pinned to no version do not enter it. What it costs: a run's creation writes a
-- page of it (a saga's four commits wrote 38.5 WAL pages, 39.5 with it); a run's later
-- writes only when they change its version (a worker that takes a run of another
-- version pins it to its own).
CREATE INDEX IF NOT EXISTS runs_version ON runs (app, version, created_at, run_id)
    WHERE version IS NOT NULL;
