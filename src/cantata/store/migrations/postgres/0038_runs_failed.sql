-- Version 38 of the PostgreSQL schema: the failed runs by the time they failed. The
-- console's overview counts the runs that failed in the last hour (and
-- GET /api/runs?failed_since= lists them) at every read; runs_status_newest orders the
-- failed runs by creation, so a run created earlier that failed within the hour was
-- either missed or found by reading every failed run.
--
-- The index is on a column of its own, `failed_at`: the run's updated_at while it is
-- failed, else NULL, computed by the server on every write of a row (a generated
-- column: every path that writes runs, the functions of 0032 and the store's
-- statements alike, without a trigger). Not on updated_at itself: an index on
-- updated_at, even a partial one, would make every checkpoint's update of a live run
-- non-HOT (updated_at changes at each; migration 0021), where `failed_at` stays NULL
-- and the update stays HOT. A BEFORE trigger would have done the same at the cost of a
-- lock of the old row on every update of a run (PostgreSQL takes it before it looks at
-- the trigger's WHEN). Adding the column rewrites the table once.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS failed_at double precision
    GENERATED ALWAYS AS (CASE WHEN status = 'failed' THEN updated_at END) STORED;

CREATE INDEX IF NOT EXISTS runs_failed ON runs (app, failed_at) WHERE status = 'failed';
