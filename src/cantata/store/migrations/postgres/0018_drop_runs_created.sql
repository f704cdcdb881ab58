-- Version 18 of the PostgreSQL schema: runs_created (app, created_at) is a prefix of
-- runs_newest (app, created_at, run_id), which serves every lookup it served (as
-- SQLite's 0018); every new run, and every update of a run that is not HOT (its
-- status changed), paid for one more index entry.
DROP INDEX IF EXISTS runs_created;
