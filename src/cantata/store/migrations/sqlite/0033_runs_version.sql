-- Version 33 of the SQLite schema: the runs pinned to a code version, newest first, by
-- an index (GET /api/runs?version=V, `cantata runs --version V`, find_runs(version=)).
-- Without it a page of them walked runs_newest from the newest run of the app and read
-- each run's row until it had found 50: every run newer than them, and all of the
-- runs for a version with fewer than 50 (100,000 runs: 65-293 ms for an old or a rare
-- version, 0.04-0.24 ms with the index; docs/console.md, "The runs of a code version").
-- Runs pinned to no version do not enter it, but by default every run has one (the
-- hash of the code that started it). What it costs: a run's creation writes a page of
-- it (a saga's commits wrote 38.51 WAL pages, 39.72 with it: docs/performance.md,
-- "Round twenty-six (fixes)"); a run's later writes only when they change its version
-- (a worker that takes a run of another version pins it to its own).
CREATE INDEX IF NOT EXISTS runs_version ON runs (app, version, created_at, run_id)
    WHERE version IS NOT NULL;
