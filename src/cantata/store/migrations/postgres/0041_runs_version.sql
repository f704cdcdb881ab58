-- Version 41 of the PostgreSQL schema: the runs pinned to a code version, newest first,
-- by an index (GET /api/runs?version=V, `cantata runs --version V`,
-- find_runs(version=)). Without it a page of them read every newer run of the app (by
-- runs_newest), and all of the runs (a scan of the table) for a version with fewer
-- than 50 (100,000 runs: 76-146 ms in the server; 0.02-0.05 ms with the index;
-- docs/console.md, "The runs of a code version"). Runs pinned to no version do not
-- enter it, but by default every run has one. Its columns are never updated but by a
-- worker that takes a run of another version and pins it to its own, so a
-- checkpoint's update of a run stays HOT; a run's creation adds one entry.
CREATE INDEX IF NOT EXISTS runs_version ON runs (app, version, created_at, run_id COLLATE "C")
    WHERE version IS NOT NULL;
