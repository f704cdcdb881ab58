-- Cantata store, PostgreSQL schema version 2: remote step tasks and the audit log.

-- One row per step call addressed to another service's workers (docs/guide.md, "Steps in other services").
CREATE TABLE tasks (
    app text NOT NULL,
    task_id text NOT NULL,
    run_id text NOT NULL,
    key text NOT NULL,
    step text NOT NULL,
    service text NOT NULL,
    args text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    next_at double precision NOT NULL DEFAULT 0,
    owner text,
    fence bigint NOT NULL DEFAULT 0,
    result text,
    error text,
    error_type text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    correlation_id text,
    PRIMARY KEY (app, task_id)
);
CREATE INDEX tasks_due ON tasks (app, service, next_at) WHERE status = 'pending';
CREATE INDEX tasks_run ON tasks (app, run_id);
CREATE INDEX tasks_correlation ON tasks (app, correlation_id);
CREATE INDEX tasks_owner ON tasks (app, owner) WHERE owner IS NOT NULL;

-- The hash-chained audit log (docs/security.md; see cantata/store/audit.py), one
-- chain per app. audit_head holds each chain's last record; appending locks that
-- row (the last statement of the writing transaction), which serializes appends
-- per app and lets verification notice records cut from the end.
CREATE TABLE audit (
    app text NOT NULL,
    seq bigint NOT NULL,
    time double precision NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    data text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    PRIMARY KEY (app, seq)
);

CREATE TABLE audit_head (
    app text PRIMARY KEY,
    seq bigint NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL
);

-- Append-only: changing or removing records takes disabling this trigger first
-- (which the hash chain then exposes).
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the Cantata audit log is append-only';
END
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
