-- Cantata store, PostgreSQL schema version 6: the last heartbeat of each step.

-- One row per (run, step key): the newest details a step attempt reported with
-- cantata.heartbeat(), handed to the step's next attempt (step_info().heartbeat_details).
CREATE TABLE step_heartbeats (
    app text NOT NULL,
    run_id text NOT NULL,
    key text NOT NULL,
    attempt integer NOT NULL,
    at double precision NOT NULL,
    details text,
    PRIMARY KEY (app, run_id, key)
);
