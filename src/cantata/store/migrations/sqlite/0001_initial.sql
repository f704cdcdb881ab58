CREATE TABLE IF NOT EXISTS runs (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    status TEXT NOT NULL,
    args TEXT NOT NULL,
    result TEXT,
    error TEXT,
    idempotency_key TEXT,
    args_hash TEXT,
    correlation_id TEXT NOT NULL,
    causation_id TEXT,
    parent_run_id TEXT,
    service TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deadline_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    fence INTEGER NOT NULL DEFAULT 0,
    flagged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, run_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency ON runs (app, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_live ON runs (app, workflow)
    WHERE status IN ('pending', 'running', 'compensating');
CREATE INDEX IF NOT EXISTS runs_correlation ON runs (app, correlation_id);
CREATE INDEX IF NOT EXISTS runs_created ON runs (app, created_at);
CREATE INDEX IF NOT EXISTS runs_parent ON runs (app, parent_run_id)
    WHERE parent_run_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS history (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    error_type TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    ended_at REAL,
    wake_at REAL,
    detail TEXT,
    PRIMARY KEY (app, run_id, key)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS attempts (
    app TEXT NOT NULL,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    error_type TEXT,
    error TEXT,
    PRIMARY KEY (app, run_id, key, attempt)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    subject TEXT,
    time TEXT NOT NULL,
    data TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    traceparent TEXT,
    signature TEXT,
    stored_at REAL NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS events_id ON events (app, id);
CREATE INDEX IF NOT EXISTS events_type ON events (app, type, stored_at);
CREATE INDEX IF NOT EXISTS events_correlation ON events (app, correlation_id);
CREATE INDEX IF NOT EXISTS events_outbox ON events (app, seq) WHERE published = 0;

CREATE TABLE IF NOT EXISTS deliveries (
    app TEXT NOT NULL,
    grp TEXT NOT NULL,
    event_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    owner TEXT,
    fence INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (app, grp, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (app, grp, next_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (app, event_id);

CREATE TABLE IF NOT EXISTS dead_letters (
    app TEXT NOT NULL,
    id TEXT NOT NULL,
    grp TEXT NOT NULL,
    event_id TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    PRIMARY KEY (app, id)
);
CREATE INDEX IF NOT EXISTS dead_letters_event ON dead_letters (app, event_id);

CREATE TABLE IF NOT EXISTS declarations (
    app TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    pattern TEXT NOT NULL,
    service TEXT,
    detail TEXT,
    PRIMARY KEY (app, kind, name, pattern)
);

CREATE TABLE IF NOT EXISTS workers (
    app TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    info TEXT,
    PRIMARY KEY (app, worker_id)
);
