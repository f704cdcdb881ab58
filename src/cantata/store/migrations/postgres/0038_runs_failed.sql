-- Version 38 of the PostgreSQL schema: the failed runs by the time they failed. The
-- console's overview counts the runs that failed in the last hour (and
-- GET /api/runs?failed_since= lists them) at every read; runs_status_newest orders the
-- failed runs by creation, so a run created earlier that failed within the hour was
-- either missed or found by reading every failed run.
--
-- The index is on a column of its own, `failed_at` (the run's updated_at while it is
-- failed, else left as it was), not on updated_at: an index on updated_at, even a
-- partial one, would make every checkpoint's update of a live run non-HOT (updated_at
-- changes at each; migration 0021). `failed_at` changes only in an update of a failed
-- run, whose `status` (indexed by runs_status_newest) changed already or which is
-- rare. A BEFORE trigger sets it, for every path that writes runs (the functions of
-- 0032 and the statements of the store alike); its WHEN is evaluated on each row
-- written, the function called for failed rows only. runs_failed holds failed rows
-- only, so an earlier failure's `failed_at`, left on a run retried since, counts for
-- nothing.
ALTER TABLE runs ADD COLUMN IF NOT EXISTS failed_at double precision;

CREATE OR REPLACE FUNCTION cantata_runs_failed_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.failed_at := NEW.updated_at;
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER runs_failed_at BEFORE INSERT OR UPDATE ON runs
    FOR EACH ROW WHEN (NEW.status = 'failed') EXECUTE FUNCTION cantata_runs_failed_at();

UPDATE runs SET failed_at = updated_at WHERE status = 'failed';

CREATE INDEX IF NOT EXISTS runs_failed ON runs (app, failed_at) WHERE status = 'failed';
