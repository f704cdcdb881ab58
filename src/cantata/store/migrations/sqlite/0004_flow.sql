-- Cantata store, SQLite schema version 4: flow control (docs/flow-control.md).

-- Queues as declared by the apps' processes (the limits the store enforces).
CREATE TABLE IF NOT EXISTS queues (
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    concurrency INTEGER,
    per_worker INTEGER,
    rate_limit INTEGER,
    rate_per REAL,
    priorities INTEGER NOT NULL DEFAULT 0,
    declared_by TEXT,
    PRIMARY KEY (app, name)
);

-- One row per run started in a queue: waiting until began_at is set, in
-- progress until done (its run ended); began_at is also the rate log. A row whose
-- run ended without beginning (cancelled) gets began_at 0 and done when a claim meets it.
CREATE TABLE IF NOT EXISTS queue_runs (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    queue TEXT NOT NULL,
    workflow TEXT NOT NULL,
    partition_key TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL,
    began_at REAL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, run_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_runs_waiting ON queue_runs (app, queue, priority, seq)
    WHERE began_at IS NULL;
CREATE INDEX IF NOT EXISTS queue_runs_active ON queue_runs (app, queue, partition_key)
    WHERE began_at IS NOT NULL AND done = 0;
CREATE INDEX IF NOT EXISTS queue_runs_began ON queue_runs (app, queue, began_at)
    WHERE began_at IS NOT NULL;

-- Cluster-wide slots of limited steps and handler groups, held by a worker
-- (lost with its lease), and the begin times that rate limits count.
CREATE TABLE IF NOT EXISTS flow_slots (
    app TEXT NOT NULL,
    scope TEXT NOT NULL,
    holder TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    PRIMARY KEY (app, scope, holder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flow_begins (
    app TEXT NOT NULL,
    scope TEXT NOT NULL,
    at REAL NOT NULL,
    holder TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flow_begins_at ON flow_begins (app, scope, at);

-- Durable schedules and the state that makes each tick start exactly one run.
CREATE TABLE IF NOT EXISTS schedules (
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    source TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (app, name)
);
