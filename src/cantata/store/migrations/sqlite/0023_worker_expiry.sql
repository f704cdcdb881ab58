-- Version 23 of the SQLite schema: each worker is judged by its own lease.
-- A worker was taken for dead once its heartbeat was older than the lease of the
-- worker looking at it; workers of one app with different leases (a rolling change of
-- App(lease=...)) then took a live long-lease worker's runs, slots, deliveries and
-- tasks while it still ran them. Each heartbeat now records its worker's own lease,
-- and `expires_at` (heartbeat_at + lease) is when that worker may be taken for dead:
-- the stores compare it with the current time. Rows written before this version have
-- the default lease, 10 s. A generated column: it cannot disagree with the heartbeat
-- it comes from. A process of an older Cantata still open on the file cannot
-- heartbeat after this (its statement gives the table five values): it stops its step
-- bodies as in a store outage until it is restarted with this version.
-- The table is made anew and its rows copied (SQLite cannot add a column only if it
-- is missing): applied again, as every script may be, it keeps the rows, their leases
-- back at the default until each worker's next heartbeat.
CREATE TABLE IF NOT EXISTS workers_0023 (
    app TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    info TEXT,
    lease REAL NOT NULL DEFAULT 10,
    expires_at REAL GENERATED ALWAYS AS (heartbeat_at + lease) VIRTUAL,
    PRIMARY KEY (app, worker_id)
);
INSERT OR IGNORE INTO workers_0023 (app, worker_id, started_at, heartbeat_at, info)
SELECT app, worker_id, started_at, heartbeat_at, info FROM workers;
DROP TABLE workers;
ALTER TABLE workers_0023 RENAME TO workers;
