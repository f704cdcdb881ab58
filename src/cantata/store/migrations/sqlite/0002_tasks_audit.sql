-- Cantata store, SQLite schema version 2: remote step tasks and the audit log.

-- One row per step call addressed to another service's workers (docs/guide.md, "Steps in other services").
CREATE TABLE IF NOT EXISTS tasks (
    app TEXT NOT NULL,
    task_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    step TEXT NOT NULL,
    service TEXT NOT NULL,
    args TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    owner TEXT,
    fence INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    error_type TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    correlation_id TEXT,
    PRIMARY KEY (app, task_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (app, service, next_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS tasks_run ON tasks (app, run_id);
CREATE INDEX IF NOT EXISTS tasks_correlation ON tasks (app, correlation_id);
CREATE INDEX IF NOT EXISTS tasks_owner ON tasks (app, owner) WHERE owner IS NOT NULL;

-- The hash-chained audit log (docs/security.md; see cantata/store/audit.py), one
-- chain per app, and the head of each chain (written in the same transaction).
CREATE TABLE IF NOT EXISTS audit (
    app TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (app, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit_head (
    app TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

-- Append-only: changing or removing records takes dropping these first (which
-- the hash chain then exposes).
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the Cantata audit log is append-only');
END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'the Cantata audit log is append-only');
END;
