-- Version 30 of the SQLite schema: fewer pages written by a saga's commits, each one a
-- WAL frame of its COMMIT (docs/performance.md, "Round twenty-four (saga, SQLite)").
--
-- `runs_live` (app, workflow) over the live runs is dropped: no statement reads it
-- (the claims and the reads of the live work name `runs_claimable`, the parked ones
-- `runs_parked` and `runs_waiting`, a worker's runs `runs_owner`, the oldest live run
-- `runs_status_newest`; no release ever named it), and a run's creation and its end
-- each wrote a page of it. PostgreSQL dropped its own at schema 34.

DROP INDEX IF EXISTS runs_live;
