-- Version 26 of the SQLite schema: the runs flagged for an operator (a compensation
-- failed for good), by a partial index. `cantata stalled`, GET /api/stalled and the
-- console's overview read them at every call (stale_correlations); without it that
-- part read every run of the app (docs/performance.md, "The operator's reads with many
-- runs parked"). Its WHERE is evaluated on each new run and on the updates that set
-- `flagged` (a run's end, an operator's retry), not on a checkpoint's.
CREATE INDEX IF NOT EXISTS runs_flagged ON runs (app) WHERE flagged=1;
