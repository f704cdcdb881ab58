-- Version 18 of the SQLite schema: runs_created (app, created_at) is a prefix of
-- runs_newest (app, created_at, run_id), which serves every lookup it served; every
-- new run paid for one more index entry.
DROP INDEX IF EXISTS runs_created;
