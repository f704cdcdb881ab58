-- Cantata store, SQLite schema version 6: the last heartbeat of each step.

-- One row per (run, step key): the newest details a step attempt reported with
-- cantata.heartbeat(), handed to the step's next attempt (step_info().heartbeat_details).
CREATE TABLE IF NOT EXISTS step_heartbeats (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    details TEXT,
    PRIMARY KEY (app, run_id, key)
) WITHOUT ROWID;
