-- Version 33 of the PostgreSQL schema: the runs flagged for an operator (a compensation
-- failed for good), by a partial index. `cantata stalled`, GET /api/stalled and the
-- console's overview read them at every call (stale_correlations); without it that
-- part read every run of the app, by runs_correlation or a scan (docs/performance.md,
-- "The operator's reads with many runs parked"). Only flagged rows have an entry, and
-- a checkpoint that leaves `flagged` as it is keeps its update HOT.
CREATE INDEX IF NOT EXISTS runs_flagged ON runs (app) WHERE flagged;
